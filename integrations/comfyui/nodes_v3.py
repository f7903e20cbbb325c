"""ComfyUI nodes (V3 API, ``comfy_api.latest``): the three nodes of ``nodes.py`` as ``io.ComfyNode``.

The pack's ``__init__`` imports this module only where ComfyUI offers the V3 node API; elsewhere it
exports the V1 mappings instead. Each node keeps its V1 node id, display name, inputs and outputs, so saved
workflows load under either API, and runs by calling its V1 node: one implementation, one set of
error messages. Tooltips and descriptions are read from the V1 nodes so the texts live in one place.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import nodes as v1

Index = io.Custom(v1.INDEX_TYPE)


def _tooltips(node) -> dict[str, str]:
    """Input name -> tooltip of a V1 node."""
    spec = node.INPUT_TYPES()
    return {name: options["tooltip"] for section in ("required", "optional")
            for name, (_, options) in spec.get(section, {}).items()}


def _schema(node_id: str, **fields) -> io.Schema:
    """The schema of the V1 node ``node_id``: its id, display name, category and description, plus ``fields``."""
    return io.Schema(node_id=node_id, display_name=v1.NODE_DISPLAY_NAME_MAPPINGS[node_id], category=v1.CATEGORY,
                     description=v1.NODE_CLASS_MAPPINGS[node_id].DESCRIPTION, **fields)


class FastattrLoadIndex(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        node = v1.FastattrLoadIndex
        tip = _tooltips(node)
        return _schema(
            "FastattrLoadIndex",
            inputs=[
                io.String.Input("bundle_path", default="", multiline=False, tooltip=tip["bundle_path"]),
                io.String.Input("device", default="auto", optional=True, tooltip=tip["device"]),
            ],
            outputs=[Index.Output("index", display_name="index", tooltip=node.OUTPUT_TOOLTIPS[0])],
        )

    @classmethod
    def fingerprint_inputs(cls, bundle_path: str = "", device: str = "auto"):
        """V3's IS_CHANGED: re-run when the bundle is rebuilt."""
        return v1.FastattrLoadIndex.IS_CHANGED(bundle_path, device)

    @classmethod
    def execute(cls, bundle_path: str = "", device: str = "auto") -> io.NodeOutput:
        return io.NodeOutput(*v1.FastattrLoadIndex().load(bundle_path, device))


class FastattrAttributeImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        node = v1.FastattrAttributeImages
        tip = _tooltips(node)
        images_tip, json_tip, grid_tip = node.OUTPUT_TOOLTIPS
        return _schema(
            "FastattrAttributeImages",
            inputs=[
                io.Image.Input("images", tooltip=tip["images"]),
                io.String.Input("prompt", default="", multiline=True, tooltip=tip["prompt"]),
                Index.Input("index", tooltip=tip["index"]),
                io.Int.Input("k", default=10, min=1, max=v1.MAX_K, step=1, tooltip=tip["k"]),
                io.Boolean.Input("prompt_per_line", default=False, optional=True, tooltip=tip["prompt_per_line"]),
            ],
            outputs=[
                # Some ComfyUI releases reject an output id equal to an input id; the socket is still "images".
                io.Image.Output("images_out", display_name="images", tooltip=images_tip),
                io.String.Output("attribution_json", display_name="attribution_json", tooltip=json_tip),
                io.Image.Output("credits_grid", display_name="credits_grid", tooltip=grid_tip),
            ],
        )

    @classmethod
    def execute(cls, images, prompt: str, index, k: int = 10, prompt_per_line: bool = False) -> io.NodeOutput:
        return io.NodeOutput(*v1.FastattrAttributeImages().attribute(images, prompt, index, k, prompt_per_line))


class FastattrSaveImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        node = v1.FastattrSaveImage
        tip = _tooltips(node)
        return _schema(
            "FastattrSaveImage",
            inputs=[
                io.Image.Input("images", tooltip=tip["images"]),
                io.String.Input("filename_prefix", default="fastattr", tooltip=tip["filename_prefix"]),
                io.String.Input("attribution_json", force_input=True, tooltip=tip["attribution_json"]),
                io.Boolean.Input("sidecar", default=True, optional=True, tooltip=tip["sidecar"]),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, filename_prefix: str = "fastattr", attribution_json: str = "",
                sidecar: bool = True) -> io.NodeOutput:
        """V3 hands hidden inputs over on ``cls.hidden``, not as arguments."""
        saved = v1.FastattrSaveImage().save(images, filename_prefix, attribution_json, sidecar,
                                            prompt=cls.hidden.prompt, extra_pnginfo=cls.hidden.extra_pnginfo,
                                            unique_id=cls.hidden.unique_id)
        return io.NodeOutput(ui=saved["ui"])


class FastattrExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [FastattrLoadIndex, FastattrAttributeImages, FastattrSaveImage]


async def comfy_entrypoint() -> FastattrExtension:
    """Called by ComfyUI's custom node loader for packs that export no NODE_CLASS_MAPPINGS."""
    return FastattrExtension()
