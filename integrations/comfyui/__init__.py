"""fastattr for ComfyUI: which training images made each generated image.

Copy or symlink this folder into ``ComfyUI/custom_nodes/`` (with fastattr installed in ComfyUI's
Python). Nodes: Load Attribution Index, Attribute Images, Save Image with Attribution.
"""

try:
    import fastattr_hook  # noqa: F401
except ImportError as exc:  # ComfyUI logs this and skips the pack; say what to do
    raise ImportError("comfyui-fastattr needs the fastattr package in ComfyUI's Python: run "
                      "`<ComfyUI's python> -m pip install fastattr`, then restart ComfyUI") from exc

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
