"""ComfyUI node pack: loaded the way ComfyUI loads custom nodes, driven with ComfyUI-layout tensors.

ComfyUI is not installed: ``folder_paths`` and ``comfy.cli_args`` are stubbed through sys.modules.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastattr_hook.attribution import SCHEMA, Attribution
from fastattr_hook.errors import FastattrError
from fastattr_hook.metadata import read_attribution, sidecar_path

PACK_DIR = Path(__file__).resolve().parents[1] / "integrations" / "comfyui"
PACK_NAME = "comfyui-fastattr"  # a custom_nodes folder name, as ComfyUI uses it for the module
NODE_IDS = ("FastattrLoadIndex", "FastattrAttributeImages", "FastattrSaveImage")
K = 5


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pack():
    """Import custom_nodes/<folder>/__init__.py by path, like ComfyUI's load_custom_node."""
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_DIR / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n == PACK_NAME or n.startswith(PACK_NAME + ".")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def nodes(pack):
    return sys.modules[PACK_NAME + ".nodes"]


@pytest.fixture(scope="module")
def bundle_dir(micro_sandbox, tmp_path_factory) -> Path:
    if (micro_sandbox / "bundle" / "bundle.yaml").is_file():
        return micro_sandbox / "bundle"
    from index_tools.build import BuildOptions, build_bundle

    out = tmp_path_factory.mktemp("comfy") / "bundle"
    build_bundle(micro_sandbox / "data" / "manifest.jsonl", micro_sandbox / "encoder.yaml", out,
                 BuildOptions(backend="exact", thumbnail_size=32, progress=False))
    return out


@pytest.fixture(scope="module")
def index(pack, bundle_dir):
    (attributor,) = pack.NODE_CLASS_MAPPINGS["FastattrLoadIndex"]().load(str(bundle_dir), "cpu")
    return attributor


@pytest.fixture(scope="module")
def training_batch(micro_sandbox):
    """Two training images as a ComfyUI IMAGE ([B, H, W, C] float32 0..1) and their rows."""
    data = micro_sandbox / "data"
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    picked = [rows[3], rows[len(rows) // 2]]
    arrays = [np.asarray(Image.open(data / row["image"]).convert("RGB"), dtype=np.float32) / 255.0
              for row in picked]
    return torch.from_numpy(np.stack(arrays)), picked


@pytest.fixture(scope="module")
def attributed(pack, index, training_batch):
    images, rows = training_batch
    node = pack.NODE_CLASS_MAPPINGS["FastattrAttributeImages"]()
    out = node.attribute(images, "\n".join(r["caption"] for r in rows), index, K, prompt_per_line=True)
    return out


def _get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
    """ComfyUI's folder_paths.get_save_image_path, condensed (same counter and subfolder rules)."""
    def map_filename(name):
        prefix_len = len(os.path.basename(filename_prefix))
        try:
            digits = int(name[prefix_len + 1:].split("_")[0])
        except ValueError:
            digits = 0
        return digits, name[:prefix_len + 1]

    filename_prefix = filename_prefix.replace("%width%", str(image_width)).replace("%height%", str(image_height))
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
        raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")
    try:
        counter = max(d for d, p in map(map_filename, os.listdir(full_output_folder))
                      if p[:-1] == filename and p[-1] == "_") + 1
    except ValueError:
        counter = 1
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
        counter = 1
    return full_output_folder, filename, counter, subfolder, filename_prefix


@pytest.fixture
def comfy_env(monkeypatch, tmp_path):
    """Stub ``folder_paths`` (output dir under tmp_path) and ``comfy.cli_args``."""
    output = tmp_path / "output"
    output.mkdir()
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(output)
    folder_paths.get_save_image_path = _get_save_image_path
    comfy = types.ModuleType("comfy")
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=False)
    comfy.cli_args = cli_args
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    return types.SimpleNamespace(output=output, args=cli_args.args)


API_PROMPT = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}},
              "9": {"class_type": "FastattrSaveImage", "inputs": {"filename_prefix": "fastattr"}}}
WORKFLOW = {"last_node_id": 9, "nodes": [{"id": 9, "type": "FastattrSaveImage"}], "version": 0.4}


# ----------------------------------------------------------------------------- the pack

def test_pack_exports_v1_mappings_with_complete_node_classes(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(NODE_IDS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["FastattrSaveImage"] == "Save Image with Attribution"
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        for attr in ("DESCRIPTION", "RETURN_TYPES", "RETURN_NAMES", "FUNCTION", "CATEGORY"):
            assert hasattr(cls, attr), (node_id, attr)
        assert cls.CATEGORY == "fastattr" and callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (_, options) in spec.get(section, {}).items():
                assert options.get("tooltip"), (node_id, name)
    assert pack.NODE_CLASS_MAPPINGS["FastattrLoadIndex"].RETURN_TYPES == ("ATTRIBUTION_INDEX",)
    assert pack.NODE_CLASS_MAPPINGS["FastattrAttributeImages"].RETURN_TYPES == ("IMAGE", "STRING", "IMAGE")
    save = pack.NODE_CLASS_MAPPINGS["FastattrSaveImage"]
    assert save.OUTPUT_NODE is True and save.RETURN_TYPES == ()
    assert save.INPUT_TYPES()["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO",
                                            "unique_id": "UNIQUE_ID"}
    assert "folder_paths" not in sys.modules  # imported lazily, only by the save node


def test_pyproject_has_registry_fields():
    import tomllib

    data = tomllib.loads((PACK_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    assert data["project"]["dependencies"] == ["fastattr"]
    assert {"name", "version", "description"} <= set(data["project"])
    assert {"PublisherId", "DisplayName", "Icon"} <= set(data["tool"]["comfy"])


# ----------------------------------------------------------------------------- Load Attribution Index

def test_load_index_is_cached_and_defaults_to_the_shipped_sandbox(pack, nodes, bundle_dir, index):
    loader = pack.NODE_CLASS_MAPPINGS["FastattrLoadIndex"]()
    assert loader.load(str(bundle_dir), "cpu")[0] is index
    assert loader.load(str(bundle_dir / "bundle.yaml") + "  ", "cpu")[0] is index  # file path, stray spaces
    assert index.manifest.items > 0
    assert loader.IS_CHANGED(str(bundle_dir), "cpu") == loader.IS_CHANGED(str(bundle_dir), "cpu") != "missing"
    from fastattr_sandbox.build import DEFAULT_SANDBOX

    default = str(DEFAULT_SANDBOX / "bundle")
    assert loader.INPUT_TYPES()["required"]["bundle_path"][1]["default"] == ""  # workflows save no machine path
    if (Path(default) / "bundle.yaml").is_file():
        assert nodes.resolve_bundle_path("") == Path(default).resolve()
    else:
        with pytest.raises(FastattrError, match="fastattr sandbox build"):
            nodes.resolve_bundle_path("")


def test_load_index_cache_follows_bundle_rebuilds(nodes, monkeypatch, tmp_path):
    from fastattr_hook import attributor

    opened = []
    monkeypatch.setattr(attributor.Attributor, "from_bundle",
                        classmethod(lambda cls, path, device=None: opened.append((path, device)) or object()))
    fake = tmp_path / "b"
    fake.mkdir()
    (fake / "bundle.yaml").write_text("schema: x\n")
    first = nodes.load_attributor(str(fake), "auto")
    assert nodes.load_attributor(str(fake), "") is first and len(opened) == 1
    assert nodes.load_attributor(str(fake), "cpu") is not first  # another device, another encoder
    os.utime(fake / "bundle.yaml", ns=(1, 10**18))  # "rebuilt"
    assert nodes.load_attributor(str(fake), "auto") is not first and len(opened) == 3
    assert sum(1 for key in nodes._cache if key[0] == str(fake.resolve()) and key[2] is None) == 1
    for key in [k for k in nodes._cache if k[0] == str(fake.resolve())]:
        del nodes._cache[key]


def test_load_index_errors_name_the_input(pack, nodes, monkeypatch, tmp_path):
    loader = pack.NODE_CLASS_MAPPINGS["FastattrLoadIndex"]()
    with pytest.raises(FastattrError, match=r"bundle_path .*nope.*no such file"):
        loader.load(str(tmp_path / "nope"))
    with pytest.raises(FastattrError, match="not an index bundle"):
        loader.load(str(tmp_path))
    (tmp_path / "bundle.yaml").write_text("schema: x\n")
    with pytest.raises(FastattrError, match="device 'gpu0'"):
        loader.load(str(tmp_path), "gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(FastattrError, match="device 'cuda:0' is not available on this machine"):
            loader.load(str(tmp_path), "cuda:0")
    monkeypatch.setattr(nodes, "default_bundle_path", lambda: str(tmp_path / "missing" / "bundle"))
    with pytest.raises(FastattrError, match="shipped sandbox bundle has not been built"):
        loader.load("")
    assert loader.IS_CHANGED("") == "missing"


# ----------------------------------------------------------------------------- Attribute Images

def test_attribute_images_credits_each_training_image_first(attributed, training_batch, index):
    images, rows = training_batch
    out_images, text, grid = attributed
    assert out_images is images
    docs = json.loads(text)
    assert isinstance(docs, list) and len(docs) == 2
    for doc, row in zip(docs, rows):
        assert doc["schema"] == SCHEMA and doc["prompt"] == row["caption"]
        assert doc["k"] == K and len(doc["credits"]) == K
        assert doc["credits"][0]["id"] == row["id"]
        assert doc["bundle"]["fingerprint"] == index.manifest.fingerprint
        Attribution.from_dict(doc)
    # grid: one row per image, one 64 px column per rank, ComfyUI IMAGE layout
    cell = 64
    assert grid.shape == (1, 2 * cell, K * cell, 3) and grid.dtype == torch.float32
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    top = docs[1]["credits"][0]["key"]
    thumb = Image.open(io.BytesIO(index.store.thumbnail(top))).convert("RGB")
    cell_pixels = grid[0, cell:2 * cell, 0:cell].numpy()
    assert float(cell_pixels.max()) > 0  # not blank
    scale = cell / max(thumb.size)
    expected = np.asarray(thumb.resize((round(thumb.width * scale), round(thumb.height * scale)), Image.NEAREST),
                          dtype=np.float32) / 255.0
    h, w = expected.shape[:2]
    y, x = (cell - h) // 2, (cell - w) // 2
    np.testing.assert_allclose(cell_pixels[y:y + h, x:x + w], expected)


def test_one_prompt_for_the_batch(pack, index, training_batch):
    images, rows = training_batch
    node = pack.NODE_CLASS_MAPPINGS["FastattrAttributeImages"]()
    _, text, grid = node.attribute(images[:1].half(), rows[0]["caption"], index, 2)  # float16 accepted
    docs = json.loads(text)
    assert len(docs) == 1 and docs[0]["credits"][0]["id"] == rows[0]["id"]
    assert grid.shape == (1, 64, 128, 3)


def test_credits_grid_leaves_blank_cells(nodes):
    from fastattr_hook.attribution import Credit

    def png(size, colour):
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, "PNG")
        return buffer.getvalue()

    thumbs = {1: png((32, 16), (255, 0, 0)), 2: None, 3: b"not a png"}
    store = types.SimpleNamespace(thumbnail=thumbs.get)
    credits = [Credit(rank=i + 1, key=key, id=str(key), score=1.0, share=1 / 3) for i, key in enumerate((1, 2, 3))]
    grid = nodes.credits_grid(types.SimpleNamespace(store=store),
                              [Attribution("p", credits), Attribution("p", credits[:1])], k=4)
    assert grid.shape == (1, 128, 256, 3)
    g = grid[0].numpy()
    assert (g[16:48, 0:64] == [1, 0, 0]).all()  # 32x16 -> 64x32, centred vertically
    assert (g[0:16, 0:64] == 0).all() and (g[48:64, 0:64] == 0).all()
    assert (g[0:64, 64:256] == 0).all()  # no thumbnail, unreadable thumbnail, no 4th credit
    assert (g[64:128, 64:256] == 0).all()


@pytest.mark.parametrize("images, message", [
    (torch.zeros(32, 32, 3), r"shape \[batch, height, width, channels\]"),
    (torch.zeros(1, 3, 32, 32), "channels-first"),
    (torch.zeros(1, 32, 32, 3, dtype=torch.uint8), "dtype torch.uint8"),
    (torch.zeros(0, 32, 32, 3), "empty"),
    ([[0.0]], "must be an IMAGE"),
])
def test_attribute_images_rejects_bad_images(pack, index, images, message):
    node = pack.NODE_CLASS_MAPPINGS["FastattrAttributeImages"]()
    with pytest.raises(FastattrError, match=f"Attribute Images: input 'images'.*{message}"):
        node.attribute(images, "a red circle", index, 3)


def test_attribute_images_rejects_bad_prompt_and_index(pack, index, training_batch):
    images, _ = training_batch
    node = pack.NODE_CLASS_MAPPINGS["FastattrAttributeImages"]()
    with pytest.raises(FastattrError, match="input 'prompt' is empty"):
        node.attribute(images, "  \n ", index, 3)
    with pytest.raises(FastattrError, match="1 non-empty line.*2 image"):
        node.attribute(images, "only one line\n\n", index, 3, prompt_per_line=True)
    with pytest.raises(FastattrError, match="input 'index' must come from Load Attribution Index"):
        node.attribute(images, "a red circle", "/some/path", 3)
    with pytest.raises(FastattrError, match="input 'k' must be between"):
        node.attribute(images, "a red circle", index, 0)


# ----------------------------------------------------------------------------- Save Image with Attribution

def test_save_image_writes_comfyui_files_with_credits(pack, attributed, training_batch, comfy_env):
    images, rows = training_batch
    _, text, _ = attributed
    node = pack.NODE_CLASS_MAPPINGS["FastattrSaveImage"]()
    out = node.save(images, "fastattr", text, prompt=API_PROMPT, extra_pnginfo={"workflow": WORKFLOW},
                    unique_id="9")
    assert out == {"ui": {"images": [
        {"filename": "fastattr_00001_.png", "subfolder": "", "type": "output"},
        {"filename": "fastattr_00002_.png", "subfolder": "", "type": "output"}]}}
    docs = json.loads(text)
    expected_pixels = np.clip(255.0 * images.numpy(), 0, 255).astype(np.uint8)
    for i, entry in enumerate(out["ui"]["images"]):
        path = comfy_env.output / entry["filename"]
        with Image.open(path) as image:
            assert json.loads(image.text["prompt"]) == API_PROMPT
            assert json.loads(image.text["workflow"]) == WORKFLOW
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), expected_pixels[i])
        found = read_attribution(path)
        assert {"png", "xmp", "sidecar"} <= set(found)
        assert [c.id for c in found["png"].credits] == [c["id"] for c in docs[i]["credits"]]
        assert found["png"].credits[0].id == rows[i]["id"]
        assert found["sidecar"].to_dict() == docs[i]
        assert found["xmp"]["credits"][0]["id"] == rows[i]["id"]
    # the counter continues, subfolders and %batch_num% work as in SaveImage; sidecar can be off
    again = node.save(images, "runs/fa_%batch_num%", text, sidecar=False, prompt=API_PROMPT)
    assert [(e["filename"], e["subfolder"]) for e in again["ui"]["images"]] == [
        ("fa_0_00001_.png", "runs"), ("fa_1_00002_.png", "runs")]
    assert not sidecar_path(comfy_env.output / "runs" / "fa_0_00001_.png").exists()
    third = node.save(images[:1], "fastattr", json.dumps(docs[0]))  # a single document, no hidden inputs
    assert third["ui"]["images"][0]["filename"] == "fastattr_00003_.png"
    with Image.open(comfy_env.output / "fastattr_00003_.png") as image:
        assert "prompt" not in image.text and "fastattr" in image.text


def test_save_image_disable_metadata_keeps_credits_only(pack, attributed, training_batch, comfy_env):
    images, _ = training_batch
    _, text, _ = attributed
    comfy_env.args.disable_metadata = True
    out = pack.NODE_CLASS_MAPPINGS["FastattrSaveImage"]().save(
        images, "fastattr", text, prompt=API_PROMPT, extra_pnginfo={"workflow": WORKFLOW})
    path = comfy_env.output / out["ui"]["images"][0]["filename"]
    with Image.open(path) as image:
        assert "prompt" not in image.text and "workflow" not in image.text
    assert read_attribution(path)["png"].credits[0].id == json.loads(text)[0]["credits"][0]["id"]


def test_save_image_rejects_attribution_json_of_another_batch(pack, attributed, training_batch, comfy_env):
    images, _ = training_batch
    _, text, _ = attributed
    node = pack.NODE_CLASS_MAPPINGS["FastattrSaveImage"]()
    where = "Save Image with Attribution: input 'attribution_json'"
    with pytest.raises(FastattrError, match=f"{where} holds 2 attribution document.*'images' has 1 image"):
        node.save(images[:1], "fastattr", text)
    with pytest.raises(FastattrError, match=f"{where} is not valid JSON"):
        node.save(images, "fastattr", "{nope")
    with pytest.raises(FastattrError, match=f"{where} is empty"):
        node.save(images, "fastattr", "")
    with pytest.raises(FastattrError, match=f"{where}, document 1: not a fastattr/attribution@1"):
        node.save(images, "fastattr", json.dumps([json.loads(text)[0], {"schema": "other"}]))
    with pytest.raises(FastattrError, match="Save Image with Attribution: input 'images'"):
        node.save(images.permute(0, 3, 1, 2), "fastattr", text)
    assert list(comfy_env.output.iterdir()) == []  # nothing half-written
