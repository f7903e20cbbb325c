"""fastattr for ComfyUI: which training images made each generated image.

Copy or symlink this folder into ``ComfyUI/custom_nodes/`` (with fastattr installed in ComfyUI's
Python). Nodes: Load Attribution Index, Attribute Images, Save Image with Attribution.
"""

try:
    import fastattr_hook  # noqa: F401
except ImportError as exc:  # ComfyUI logs this and skips the pack; say what to do
    raise ImportError("comfyui-fastattr needs the fastattr package in ComfyUI's Python: run "
                      "`<ComfyUI's python> -m pip install fastattr`, then restart ComfyUI") from exc

# ComfyUI's loader (nodes.load_custom_node) registers NODE_CLASS_MAPPINGS when a pack exports them and
# calls comfy_entrypoint only when it does not, so exactly one is exported: the V3 extension where
# ComfyUI offers the V3 node API (comfy_api.latest with io and ComfyExtension), the V1 mappings elsewhere.
try:
    from comfy_api.latest import ComfyExtension, io  # noqa: F401 - only asks whether the V3 API is there
except ImportError:  # an older ComfyUI, or none
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
else:  # imported outside the try: a fault in the V3 nodes is reported, not hidden behind V1
    from .nodes_v3 import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
