"""ComfyUI node pack, V3 API (``comfy_api.latest``): loaded and run the way ComfyUI loads and runs V3 nodes.

ComfyUI is not on PyPI, so ``comfy_api.latest`` is a stub written to ComfyUI's own source (read at
Comfy-Org/ComfyUI: comfy_api/latest/__init__.py @ c5dfba02, comfy_api/latest/_io.py @ 58a8a96c,
nodes.py load_custom_node @ 5aabaf51, execution.py get_input_data / _async_map_node_over_list /
get_output_from_returns @ cb707e9c), cut to what the pack uses. ``_load_custom_node`` and ``_run``
follow that loader and executor; every V3 node is checked against its V1 node on the same inputs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import importlib.util
import inspect
import json
import sys
import types
from abc import ABC, abstractmethod
from typing import ClassVar

import pytest
import test_comfyui
import torch
from test_comfyui import API_PROMPT, NODE_IDS, PACK_DIR, WORKFLOW, K

from fastattr_hook.errors import FastattrError

# The V1 tests' fixtures: the micro sandbox bundle, two of its training images, a stubbed output folder.
bundle_dir, training_batch, comfy_env = test_comfyui.bundle_dir, test_comfyui.training_batch, test_comfyui.comfy_env

PACK_V3 = "comfyui-fastattr-v3"


# ----------------------------------------------------------------------------- comfy_api.latest stub

def _prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class _Input:
    Parent = None

    def __init__(self, id, optional=False, tooltip=None):
        self.id, self.optional, self.tooltip = id, optional, tooltip

    def get_io_type(self):
        return self.Parent.io_type

    def as_dict(self):
        return _prune({"optional": self.optional, "tooltip": self.tooltip})


class _WidgetInput(_Input):
    OPTIONS: ClassVar[dict[str, tuple[str, object]]] = {}  # keyword -> (V1 option key, value when not given)

    def __init__(self, id, *, optional=False, tooltip=None, default=None, force_input=None, **options):
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise TypeError(f"{type(self).__qualname__}() got unexpected keyword arguments {sorted(unknown)}")
        super().__init__(id, optional, tooltip)
        self.widget = _prune({"default": default, "forceInput": force_input})
        self.widget |= _prune({key: options.get(kw, fallback) for kw, (key, fallback) in self.OPTIONS.items()})

    def as_dict(self):
        return super().as_dict() | self.widget


class _Output:
    Parent = None

    def __init__(self, id=None, display_name=None, tooltip=None):
        self.id, self.display_name, self.tooltip = id, display_name or id, tooltip

    @property
    def io_type(self):
        return self.Parent.io_type


def _comfy_type(io_type: str, options: dict | None = None) -> type:
    """``@comfytype(io_type)``: a type with Input/Output classes bound to it."""
    comfy_type = type(io_type, (), {"io_type": io_type})
    base = _Input if options is None else _WidgetInput
    comfy_type.Input = type("Input", (base,), {"Parent": comfy_type, "OPTIONS": options or {}})
    comfy_type.Output = type("Output", (_Output,), {"Parent": comfy_type})
    return comfy_type


class Hidden(str, enum.Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


class HiddenHolder:
    def __init__(self, values: dict):
        for hidden in Hidden:
            setattr(self, hidden.name, values.get(hidden))


@dataclasses.dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    hidden: list = dataclasses.field(default_factory=list)
    description: str = ""
    is_output_node: bool = False

    def finalize(self):
        if self.is_output_node:  # output nodes always get the prompt and workflow
            self.hidden += [h for h in (Hidden.prompt, Hidden.extra_pnginfo) if h not in self.hidden]
        for i, output in enumerate(self.outputs):
            output.id = output.id or f"_{i}_{output.io_type}_"

    def validate(self):
        """Unique ids; earlier releases (_io.py @ 004b1b5b) also reject an input id reused as an output id."""
        inputs, outputs = [i.id for i in self.inputs], [o.id for o in self.outputs]
        if len(set(inputs)) != len(inputs) or len(set(outputs)) != len(outputs) or set(inputs) & set(outputs):
            raise ValueError(f"{self.node_id}: input ids {inputs} and output ids {outputs} must be unique")

    def get_v1_info(self) -> dict:
        """What /object_info sends the frontend for a V3 node (NodeInfoV1), the fields the pack sets."""
        spec = {"required": {}}
        for i in self.inputs:
            options = i.as_dict()
            options.pop("optional", None)
            spec.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), options)
        for hidden in self.hidden:
            spec.setdefault("hidden", {})[hidden.name] = (hidden.value,)
        return {"input": spec, "name": self.node_id, "display_name": self.display_name, "category": self.category,
                "description": self.description, "output_node": self.is_output_node,
                "output": [o.io_type for o in self.outputs], "output_name": [o.display_name for o in self.outputs],
                "output_tooltips": [o.tooltip for o in self.outputs]}


class NodeOutput:
    def __init__(self, *args, ui=None):
        self.args, self.ui = args, ui


class ComfyNode:
    hidden = None  # a HiddenHolder on the clone that execute runs on
    FUNCTION = "EXECUTE_NORMALIZED"

    @classmethod
    def define_schema(cls):
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def FINALIZE_SCHEMA(cls):
        schema = cls.define_schema()
        schema.finalize()
        return schema

    @classmethod
    def GET_SCHEMA(cls):
        schema = cls.FINALIZE_SCHEMA()
        schema.validate()
        return schema

    @classmethod
    def INPUT_TYPES(cls):
        return cls.FINALIZE_SCHEMA().get_v1_info()["input"]

    @classmethod
    def EXECUTE_NORMALIZED(cls, **kwargs):
        out = cls.execute(**kwargs)
        if isinstance(out, tuple):
            return NodeOutput(*out)
        if not isinstance(out, NodeOutput):
            raise TypeError(f"Invalid return type from node: {type(out)}")
        return out

    @classmethod
    def PREPARE_CLASS_CLONE(cls, v3_data):
        clone = type(f"{cls.__name__}Clone", (cls,), {})
        clone.hidden = HiddenHolder(v3_data["hidden_inputs"])
        return clone


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        pass

    @abstractmethod
    async def get_node_list(self) -> list[type[ComfyNode]]:
        ...


def _lock_class(cls):
    """comfy_api.internal.lock_class: execute runs on a clone that refuses attribute writes."""
    class LockedMeta(type(cls)):
        def __setattr__(self, name, value):
            raise AttributeError(f"Cannot modify class attribute '{name}' on locked class '{self.__name__}'")

    return LockedMeta(cls.__name__, cls.__bases__, dict(cls.__dict__))


io = types.SimpleNamespace(
    ComfyNode=ComfyNode, Schema=Schema, NodeOutput=NodeOutput, Hidden=Hidden, Custom=_comfy_type,
    Image=_comfy_type("IMAGE"),
    String=_comfy_type("STRING", {"multiline": ("multiline", False)}),  # always written, like ComfyUI's
    Int=_comfy_type("INT", {"min": ("min", None), "max": ("max", None), "step": ("step", None)}),
    Boolean=_comfy_type("BOOLEAN", {}),
)


@pytest.fixture(scope="module")
def comfy_api():
    """Install the stub as ``comfy_api.latest`` for this module's tests."""
    package, latest = types.ModuleType("comfy_api"), types.ModuleType("comfy_api.latest")
    latest.ComfyExtension, latest.io, package.latest = ComfyExtension, io, latest
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "comfy_api", package)
        mp.setitem(sys.modules, "comfy_api.latest", latest)
        yield latest


# ----------------------------------------------------------------------------- ComfyUI's loader and executor

def _import_pack(name: str):
    """custom_nodes/<folder>/__init__.py imported by path, as load_custom_node does."""
    spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _forget_pack(name: str) -> None:
    for module in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
        del sys.modules[module]


def _load_custom_node(module) -> tuple[str, dict, dict]:
    """nodes.load_custom_node after the import: V1 mappings win; comfy_entrypoint only without them."""
    if getattr(module, "NODE_CLASS_MAPPINGS", None) is not None:
        return "v1", dict(module.NODE_CLASS_MAPPINGS), dict(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
    entrypoint = module.comfy_entrypoint
    extension = asyncio.run(entrypoint()) if inspect.iscoroutinefunction(entrypoint) else entrypoint()
    assert isinstance(extension, ComfyExtension)
    asyncio.run(extension.on_load())
    node_list = asyncio.run(extension.get_node_list())
    assert isinstance(node_list, list)
    mappings, names = {}, {}
    for node_cls in node_list:
        schema = node_cls.GET_SCHEMA()
        mappings[schema.node_id] = node_cls
        if schema.display_name is not None:
            names[schema.node_id] = schema.display_name
    return "v3", mappings, names


def _run(node_cls, inputs: dict, *, func: str | None = None, prompt=None, extra_pnginfo=None, unique_id="9"):
    """One node call as execution.py makes it, V1 or V3; returns (outputs, ui), or func's value.

    Undeclared inputs are dropped; hidden inputs are keyword arguments for V1 and ``cls.hidden`` on a
    locked class clone for V3; a V1 node runs on an instance (IS_CHANGED on the class).
    """
    spec = node_cls.INPUT_TYPES()
    kwargs = {k: v for k, v in inputs.items() if k in {**spec["required"], **spec.get("optional", {})}}
    values = {"PROMPT": {} if prompt is None else prompt, "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": unique_id}
    if issubclass(node_cls, ComfyNode):
        hidden = {Hidden[name]: values[Hidden[name].value] for name in spec.get("hidden", {})}
        locked = _lock_class(node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden}))
        result = getattr(node_cls, func or node_cls.FUNCTION).__func__(locked, **kwargs)
    else:
        kwargs |= {name: values[kind] for name, kind in spec.get("hidden", {}).items()}
        result = getattr(node_cls if func else node_cls(), func or node_cls.FUNCTION)(**kwargs)
    if func:
        return result
    if isinstance(result, NodeOutput):
        return result.args, result.ui
    if isinstance(result, dict):
        return tuple(result.get("result", ())), result.get("ui")
    return tuple(result), None


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pack_v3(comfy_api):
    try:
        yield _import_pack(PACK_V3)
    finally:
        _forget_pack(PACK_V3)


@pytest.fixture(scope="module")
def v1(pack_v3):
    """The V1 node module the V3 nodes wrap (one index cache for both)."""
    return sys.modules[PACK_V3 + ".nodes"]


@pytest.fixture(scope="module")
def v3(pack_v3):
    return sys.modules[PACK_V3 + ".nodes_v3"]


@pytest.fixture(scope="module")
def index(v1, bundle_dir):
    (attributor,), _ = _run(v1.FastattrLoadIndex, {"bundle_path": str(bundle_dir), "device": "cpu"})
    return attributor


def _both(v1, v3, node_id: str):
    return v1.NODE_CLASS_MAPPINGS[node_id], getattr(v3, node_id)


# ----------------------------------------------------------------------------- the pack

def test_pack_exports_comfy_entrypoint_only_where_comfyui_has_the_v3_api(pack_v3, v1, v3):
    assert hasattr(pack_v3, "comfy_entrypoint") and not hasattr(pack_v3, "NODE_CLASS_MAPPINGS")
    path, mappings, names = _load_custom_node(pack_v3)
    assert path == "v3"
    assert mappings == {node_id: getattr(v3, node_id) for node_id in NODE_IDS}
    assert names == v1.NODE_DISPLAY_NAME_MAPPINGS
    assert "folder_paths" not in sys.modules


@pytest.mark.parametrize("latest", [None, types.ModuleType("comfy_api.latest")], ids=["no comfy_api", "no V3 API"])
def test_pack_exports_v1_mappings_without_the_v3_api(monkeypatch, latest):
    """Without comfy_api, or with a comfy_api.latest from before the V3 node API (no io, no ComfyExtension)."""
    package = types.ModuleType("comfy_api")
    package.latest = latest
    monkeypatch.setitem(sys.modules, "comfy_api", package if latest is not None else None)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    name = PACK_V3 + "-v1"
    try:
        module = _import_pack(name)
        assert not hasattr(module, "comfy_entrypoint")
        path, mappings, names = _load_custom_node(module)
        nodes = sys.modules[name + ".nodes"]
        assert path == "v1" and mappings == nodes.NODE_CLASS_MAPPINGS and names == nodes.NODE_DISPLAY_NAME_MAPPINGS
    finally:
        _forget_pack(name)


def test_get_node_list_returns_the_v3_node_classes(pack_v3, v3):
    extension = asyncio.run(pack_v3.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    node_list = asyncio.run(extension.get_node_list())
    assert node_list == [v3.FastattrLoadIndex, v3.FastattrAttributeImages, v3.FastattrSaveImage]
    assert all(issubclass(cls, ComfyNode) for cls in node_list)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_v3_schema_matches_the_v1_node(v1, v3, node_id):
    """Same id, name, category, description, inputs and outputs: saved workflows load under either API."""
    old, new = _both(v1, v3, node_id)
    info = new.GET_SCHEMA().get_v1_info()
    assert info["name"] == node_id and info["display_name"] == v1.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert (info["category"], info["description"]) == (old.CATEGORY, old.DESCRIPTION)
    assert info["output_node"] == getattr(old, "OUTPUT_NODE", False)
    assert tuple(info["output"]) == old.RETURN_TYPES and tuple(info["output_name"]) == old.RETURN_NAMES
    assert tuple(info["output_tooltips"]) == getattr(old, "OUTPUT_TOOLTIPS", ())
    # V3's String.Input always writes "multiline" (False: V1's default) and hidden kinds as 1-tuples
    expected = old.INPUT_TYPES()
    for section in ("required", "optional"):
        for kind, options in expected.get(section, {}).values():
            if kind == "STRING":
                options.setdefault("multiline", False)
    actual = new.INPUT_TYPES()
    actual["hidden"] = {name: kind for name, (kind,) in actual.get("hidden", {}).items()} or None
    assert _prune(actual) == expected


# ----------------------------------------------------------------------------- same results as V1

def test_v3_load_index_matches_v1(v1, v3, bundle_dir, index):
    old, new = _both(v1, v3, "FastattrLoadIndex")
    inputs = {"bundle_path": str(bundle_dir), "device": "cpu"}
    assert _run(new, inputs) == ((index,), None)  # the same cached index
    assert _run(new, {"bundle_path": str(bundle_dir)}) == _run(old, {"bundle_path": str(bundle_dir)})  # device auto
    assert _run(new, inputs, func="fingerprint_inputs") == _run(old, inputs, func="IS_CHANGED") != "missing"
    assert _run(new, {"bundle_path": "/nope"}, func="fingerprint_inputs") == "missing"


@pytest.mark.parametrize("per_line", [True, False])
def test_v3_attribute_images_matches_v1(v1, v3, index, training_batch, per_line):
    images, rows = training_batch
    inputs = {"images": images, "index": index, "k": K, "prompt_per_line": per_line,
              "prompt": "\n".join(r["caption"] for r in rows) if per_line else rows[0]["caption"]}
    (old_images, old_json, old_grid), _ = _run(v1.FastattrAttributeImages, inputs)
    (new_images, new_json, new_grid), ui = _run(v3.FastattrAttributeImages, inputs)
    assert new_images is old_images is images and ui is None
    assert torch.equal(new_grid, old_grid)

    def stable(text):  # each run has its own timing and creation time
        return [{k: v for k, v in doc.items() if k not in ("timing_ms", "created")} for doc in json.loads(text)]

    assert stable(new_json) == stable(old_json)
    if per_line:
        assert [doc["credits"][0]["id"] for doc in json.loads(new_json)] == [r["id"] for r in rows]


def test_v3_save_image_matches_v1(v1, v3, index, training_batch, comfy_env):
    images, rows = training_batch
    attribute = {"images": images, "index": index, "k": K, "prompt_per_line": True,
                 "prompt": "\n".join(r["caption"] for r in rows)}
    (_, text, _), _ = _run(v1.FastattrAttributeImages, attribute)
    workflow = {"workflow": WORKFLOW}
    saved = {}
    for api, node in (("v1", v1.FastattrSaveImage), ("v3", v3.FastattrSaveImage)):
        inputs = {"images": images, "filename_prefix": f"{api}/fastattr", "attribution_json": text}
        outputs, ui = _run(node, inputs, prompt=API_PROMPT, extra_pnginfo=workflow)
        assert outputs == () and [(e["filename"], e["subfolder"]) for e in ui["images"]] == [
            ("fastattr_00001_.png", api), ("fastattr_00002_.png", api)]
        saved[api] = {p.name: p.read_bytes() for p in sorted((comfy_env.output / api).iterdir())}
    assert len(saved["v3"]) == 4 and saved["v3"] == saved["v1"]  # 2 PNGs + 2 sidecars, byte for byte
    # no hidden values (an API client without a workflow) and sidecar off, as in V1
    outputs, ui = _run(v3.FastattrSaveImage, {"images": images[:1], "filename_prefix": "v3/fastattr",
                                              "attribution_json": json.dumps(json.loads(text)[0]), "sidecar": False})
    assert ui["images"][0]["filename"] == "fastattr_00003_.png"
    assert not (comfy_env.output / "v3" / "fastattr_00003_.attribution.json").exists()


def _bad_inputs(tmp_path, index, images):
    not_a_bundle = tmp_path / "plain"
    not_a_bundle.mkdir()
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "bundle.yaml").write_text("schema: x\n")
    return [
        ("FastattrLoadIndex", {"bundle_path": str(tmp_path / "nope")}, "no such file"),
        ("FastattrLoadIndex", {"bundle_path": str(not_a_bundle)}, "not an index bundle"),
        ("FastattrLoadIndex", {"bundle_path": str(bundle), "device": "gpu0"}, "device 'gpu0'"),
        ("FastattrAttributeImages", {"images": images, "prompt": " ", "index": index}, "input 'prompt' is empty"),
        ("FastattrAttributeImages", {"images": images, "prompt": "p", "index": index, "k": 0}, "input 'k'"),
        ("FastattrAttributeImages", {"images": images[0], "prompt": "p", "index": index}, "input 'images'"),
        ("FastattrLoadIndex", {"bundle_path": str(bundle), "device": "cuda:99"}, "not available on this machine"),
        ("FastattrSaveImage", {"images": images, "attribution_json": "{nope"}, "not valid JSON"),
    ]


def test_v3_bad_inputs_give_the_v1_errors(v1, v3, index, training_batch, comfy_env, tmp_path):
    images, _ = training_batch
    for node_id, inputs, message in _bad_inputs(tmp_path, index, images):
        errors = []
        for node in _both(v1, v3, node_id):
            with pytest.raises(FastattrError, match=message) as caught:
                _run(node, inputs)
            errors.append(str(caught.value))
        assert errors[0] == errors[1], node_id
    assert list(comfy_env.output.iterdir()) == []
