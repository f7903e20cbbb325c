"""ComfyUI nodes (V1 API): load an index bundle, attribute generated images, save them with credits.

Nothing here imports ComfyUI at module level: ``folder_paths`` and ``comfy.cli_args`` are imported
inside ``FastattrSaveImage.save`` only, so the pack (and its tests) import without ComfyUI.

Every bad input raises ``FastattrError`` with a message that names the node, the input and what
to do; ComfyUI shows it on the node and keeps running.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastattr_hook.attribution import Attribution
from fastattr_hook.bundle import Bundle, shipped_bundle
from fastattr_hook.errors import FastattrError

log = logging.getLogger("fastattr.comfyui")

CATEGORY = "fastattr"
INDEX_TYPE = "ATTRIBUTION_INDEX"
CELL = 64  # pixels per thumbnail cell in the credits grid
MAX_K = 100
# Text keys that would collide with the chunks our metadata carriers write.
_RESERVED_TEXT_KEYS = ("fastattr", "XML:com.adobe.xmp")


# ----------------------------------------------------------------------------- helpers

def default_bundle_path() -> str:
    """The shipped sandbox bundle, or "" without the sandbox package."""
    path = shipped_bundle()
    return "" if path is None else str(path)


def resolve_bundle_path(value: str) -> Path:
    """``bundle_path`` input -> bundle directory; "" means the shipped sandbox bundle."""
    text = (value or "").strip()
    default = not text
    if default:
        text = default_bundle_path()
        if not text:
            raise FastattrError("Load Attribution Index: bundle_path is empty and the shipped sandbox bundle "
                                "is unavailable (fastattr_sandbox is not installed); enter the path of an "
                                "index bundle built with `fastattr index build`")
    path = Path(text).expanduser()
    if path.name == Bundle.MANIFEST:
        path = path.parent
    if not (path / Bundle.MANIFEST).is_file():
        if default or text == default_bundle_path():
            hint = (f"the shipped sandbox bundle has not been built yet; build it with "
                    f"`fastattr sandbox build --scale default --out {path.parent}`, or enter the path of "
                    "another index bundle")
        elif not path.exists():
            hint = ("no such file or directory; enter the path of an index bundle directory (the folder "
                    "holding bundle.yaml), or leave it empty for the shipped sandbox bundle")
        else:
            hint = ("it is not an index bundle (no bundle.yaml inside); build one with "
                    "`fastattr index build`, or leave bundle_path empty for the shipped sandbox bundle")
        raise FastattrError(f"Load Attribution Index: bundle_path {str(path)!r}: {hint}")
    return path.resolve()


def _device(value: str | None) -> str | None:
    text = (value or "").strip().lower()
    if text in ("", "auto"):
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise FastattrError(f"Load Attribution Index: device {value!r} is not a torch device; "
                            "use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise FastattrError(f"Load Attribution Index: device {value!r} is not available on this machine (torch sees "
                            f"{torch.cuda.device_count()} CUDA devices); use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FastattrError(f"Load Attribution Index: device {value!r} is not available on this machine; "
                            "use auto or cpu")
    return text


_cache: dict[tuple[str, int, str | None], object] = {}
_cache_lock = threading.Lock()


def load_attributor(bundle_path: str, device: str | None = None):
    """The ``Attributor`` of a bundle, cached by (resolved path, bundle.yaml mtime, device).

    A rebuilt bundle (new bundle.yaml) is re-opened and the stale entry dropped.
    """
    path = resolve_bundle_path(bundle_path)
    device = _device(device)
    key = (str(path), (path / Bundle.MANIFEST).stat().st_mtime_ns, device)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        from fastattr_hook.attributor import Attributor

        attributor = Attributor.from_bundle(path, device=device)
        for stale in [k for k in _cache if k[0] == key[0] and k[2] == device]:
            del _cache[stale]
        _cache[key] = attributor
        return attributor


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def images_to_uint8(images, node: str, name: str = "images") -> np.ndarray:
    """ComfyUI IMAGE ([B, H, W, C] float 0..1) -> uint8 [B, H, W, 3], quantised like SaveImage."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise FastattrError(f"{node}: input '{name}' must be an IMAGE (a torch tensor [batch, height, width, "
                            f"channels]), got {type(images).__name__}; connect an IMAGE output such as VAE Decode")
    if images.ndim != 4:
        raise FastattrError(f"{node}: input '{name}' must have shape [batch, height, width, channels] "
                            f"(ComfyUI IMAGE layout), got shape {list(images.shape)}")
    batch, height, width, channels = images.shape
    if batch == 0 or height == 0 or width == 0:
        raise FastattrError(f"{node}: input '{name}' is empty (shape {list(images.shape)})")
    if channels not in (1, 3, 4):
        hint = " (channels-first? ComfyUI IMAGE is channels-last)" if height in (1, 3, 4) else ""
        raise FastattrError(f"{node}: input '{name}' has {channels} channels in shape {list(images.shape)}; "
                            f"expected [batch, height, width, 3] RGB{hint}")
    if not images.is_floating_point():
        raise FastattrError(f"{node}: input '{name}' has dtype {images.dtype}; ComfyUI IMAGE is float32 in "
                            "0..1, convert it (e.g. tensor.float() / 255)")
    array = images.detach().to("cpu", torch.float32).nan_to_num(0.0).numpy()
    array = np.clip(255.0 * array, 0, 255).astype(np.uint8)  # exactly what SaveImage writes
    if channels == 1:
        array = np.repeat(array, 3, axis=3)
    return np.ascontiguousarray(array[..., :3])


def _blank_grid(rows: int, cols: int) -> np.ndarray:
    return np.zeros((rows * CELL, cols * CELL, 3), dtype=np.float32)


def credits_grid(attributor, attributions: list[Attribution], k: int) -> torch.Tensor:
    """[1, rows*CELL, k*CELL, 3] float tensor: row i = image i, column j = rank j+1; blanks are black."""
    grid = _blank_grid(len(attributions), k)
    for row, attribution in enumerate(attributions):
        for col, credit in enumerate(attribution.credits[:k]):
            thumb = _thumbnail(attributor, credit.key)
            if thumb is None:
                continue
            h, w = thumb.shape[:2]
            top, left = row * CELL + (CELL - h) // 2, col * CELL + (CELL - w) // 2
            grid[top:top + h, left:left + w] = thumb
    return torch.from_numpy(grid).unsqueeze(0)


def _thumbnail(attributor, key: int) -> np.ndarray | None:
    """The item's thumbnail scaled (nearest neighbour, aspect kept) to fit one cell, float 0..1."""
    try:
        data = attributor.store.thumbnail(key)
        if not data:
            return None
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - a damaged thumbnail is a blank cell, not a failed run
        log.warning("fastattr: thumbnail of item %s unreadable (%s); leaving its cell blank", key, exc)
        return None
    scale = CELL / max(image.size)
    size = (max(1, min(CELL, round(image.width * scale))), max(1, min(CELL, round(image.height * scale))))
    return np.asarray(image.resize(size, Image.NEAREST), dtype=np.float32) / 255.0


def parse_attribution_json(text: str, batch: int, node: str) -> list[Attribution]:
    """The Attribute Images node's JSON (a list, one document per image) -> Attributions."""
    where = f"{node}: input 'attribution_json'"
    connect = "connect the attribution_json output of the Attribute Images node that attributed these images"
    if not isinstance(text, str) or not text.strip():
        raise FastattrError(f"{where} is empty; {connect}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FastattrError(f"{where} is not valid JSON ({exc}); {connect}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise FastattrError(f"{where} must be a JSON list of attribution documents, got {type(data).__name__}; "
                            f"{connect}")
    if len(data) != batch:
        raise FastattrError(f"{where} holds {len(data)} attribution document(s) but 'images' has {batch} "
                            f"image(s); {connect} (same batch, same order)")
    out = []
    for i, doc in enumerate(data):
        try:
            out.append(Attribution.from_dict(doc))
        except FastattrError as exc:
            raise FastattrError(f"{where}, document {i}: {exc}; {connect}") from None
    return out


def _png_keyword_ok(key: str) -> bool:
    return (0 < len(key) < 80 and key == key.strip() and "  " not in key
            and all(32 <= ord(ch) <= 126 or 161 <= ord(ch) <= 255 for ch in key))


def _metadata_disabled() -> bool:
    """ComfyUI's --disable-metadata flag (False when comfy.cli_args is not importable)."""
    try:
        from comfy.cli_args import args
    except Exception:  # noqa: BLE001 - outside ComfyUI, or an older layout
        return False
    return bool(getattr(args, "disable_metadata", False))


# ----------------------------------------------------------------------------- nodes

class FastattrLoadIndex:
    DESCRIPTION = ("Opens a fastattr index bundle (encoder + nearest-neighbour index of the training set) "
                   "for the Attribute Images node. Loaded once and cached across runs; a rebuilt bundle "
                   "is re-opened automatically.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (INDEX_TYPE,)
    RETURN_NAMES = ("index",)
    OUTPUT_TOOLTIPS = ("The opened bundle; connect it to Attribute Images.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "bundle_path": ("STRING", {  # "" is saved in workflows: machine paths never travel
                    "default": "", "multiline": False,
                    "tooltip": "Folder of an index bundle (holds bundle.yaml), built with `fastattr index "
                               "build`. Empty = the sandbox bundle shipped with fastattr (leave it empty "
                               "in workflows you share)."}),
            },
            "optional": {
                "device": ("STRING", {
                    "default": "auto",
                    "tooltip": "Where the encoder runs: auto (CUDA when available, else CPU), cpu, cuda, "
                               "cuda:1, mps."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, bundle_path="", device="auto"):
        """Re-run when the bundle is rebuilt (bundle.yaml changes), so the cache sees the new one."""
        try:
            path = resolve_bundle_path(bundle_path)
            return f"{path}:{(path / 'bundle.yaml').stat().st_mtime_ns}:{device}"
        except (FastattrError, OSError):
            return "missing"

    def load(self, bundle_path: str = "", device: str = "auto"):
        return (load_attributor(bundle_path, device),)


class FastattrAttributeImages:
    DESCRIPTION = ("Finds, for each image of the batch, the k training images that most influenced it "
                   "(one encoder pass + one nearest-neighbour search). Passes the images through unchanged, "
                   "outputs the credits as JSON (one fastattr/attribution@1 document per image) and a grid "
                   "of the credited training thumbnails (rows = images, columns = ranks).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("images", "attribution_json", "credits_grid")
    OUTPUT_TOOLTIPS = (
        "The input images, unchanged.",
        "A JSON list with one fastattr/attribution@1 document per image; connect it to Save Image with "
        "Attribution.",
        f"Top-k training thumbnails: one row per image, one {CELL}px column per rank (black = no credit "
        "or no thumbnail).",
    )
    FUNCTION = "attribute"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The generated images (e.g. from VAE Decode)."}),
                "prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "The positive prompt the images were generated from (the same text for the "
                               "whole batch). Convert it to an input to share one text node with the "
                               "sampler."}),
                "index": (INDEX_TYPE, {"tooltip": "From Load Attribution Index."}),
                "k": ("INT", {"default": 10, "min": 1, "max": MAX_K, "step": 1,
                              "tooltip": "How many training images to credit per image."}),
            },
            "optional": {
                "prompt_per_line": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: the whole text is the prompt of every image. On: line i is the prompt "
                               "of image i (exactly one non-empty line per image), for batches made from "
                               "several prompts."}),
            },
        }

    def attribute(self, images, prompt: str, index, k: int = 10, prompt_per_line: bool = False):
        node = "Attribute Images"
        if not hasattr(index, "attribute") or not hasattr(index, "store"):
            raise FastattrError(f"{node}: input 'index' must come from Load Attribution Index, "
                                f"got {type(index).__name__}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise FastattrError(f"{node}: input 'prompt' is empty; enter (or connect) the positive prompt the "
                                "images were generated from: attribution compares image and prompt")
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise FastattrError(f"{node}: input 'k' must be an integer, got {k!r}") from None
        if not 1 <= k <= MAX_K:
            raise FastattrError(f"{node}: input 'k' must be between 1 and {MAX_K}, got {k}")
        pixels = images_to_uint8(images, node)
        prompts: str | list[str] = prompt
        if prompt_per_line:
            prompts = [line.strip() for line in prompt.splitlines() if line.strip()]
            if len(prompts) != len(pixels):
                raise FastattrError(f"{node}: prompt_per_line is on and input 'prompt' has {len(prompts)} "
                                    f"non-empty line(s) but 'images' has {len(pixels)} image(s); give one "
                                    "line per image, or turn prompt_per_line off to use the text for all")
        attributions = index.attribute(list(pixels), prompts, k=k)
        text = json.dumps([a.to_dict() for a in attributions], ensure_ascii=False)
        return (images, text, credits_grid(index, attributions, k))


class FastattrSaveImage:
    DESCRIPTION = ("Saves images to ComfyUI's output folder like Save Image (same file names, same prompt "
                   "and workflow metadata) and embeds each image's credits: PNG iTXt 'fastattr', an XMP "
                   "packet (IPTC trainedAlgorithmicMedia) and, optionally, a NAME.attribution.json sidecar. "
                   "With --disable-metadata the prompt/workflow are left out but the credits are kept.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    RETURN_NAMES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {
                    "default": "fastattr",
                    "tooltip": "File name prefix; may contain a subfolder and ComfyUI's %date:...% / "
                               "%batch_num% placeholders, as in Save Image."}),
                "attribution_json": ("STRING", {
                    "forceInput": True,
                    "tooltip": "The attribution_json output of Attribute Images for these same images."}),
            },
            "optional": {
                "sidecar": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Also write NAME.attribution.json next to each image: the one carrier that "
                               "survives re-encoding or metadata stripping."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    def save(self, images, filename_prefix: str = "fastattr", attribution_json: str = "", sidecar: bool = True,
             prompt=None, extra_pnginfo=None, unique_id=None):
        import folder_paths

        from fastattr_hook.metadata import save_with_attribution

        node = "Save Image with Attribution"
        pixels = images_to_uint8(images, node)
        attributions = parse_attribution_json(attribution_json, len(pixels), node)
        text = self._text_metadata(prompt, extra_pnginfo)

        output_dir = folder_paths.get_output_directory()
        full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(
            filename_prefix, output_dir, pixels.shape[2], pixels.shape[1])
        results = []
        for batch_number, (array, attribution) in enumerate(zip(pixels, attributions)):
            name = filename.replace("%batch_num%", str(batch_number))
            file = f"{name}_{counter:05}_.png"
            save_with_attribution(Image.fromarray(array), Path(full_output_folder) / file, attribution,
                                  format="png", sidecar=bool(sidecar), extra_text=text)
            results.append({"filename": file, "subfolder": subfolder, "type": "output"})
            counter += 1
        return {"ui": {"images": results}}

    @staticmethod
    def _text_metadata(prompt, extra_pnginfo) -> dict[str, str]:
        """ComfyUI's PNG text: "prompt" and each extra_pnginfo key, JSON-encoded as SaveImage does."""
        if _metadata_disabled():
            return {}
        text = {}
        if prompt is not None:
            text["prompt"] = json.dumps(prompt)
        for key, value in (extra_pnginfo or {}).items():
            if key in _RESERVED_TEXT_KEYS or key in text or not _png_keyword_ok(str(key)):
                log.warning("fastattr: extra_pnginfo key %r cannot be a PNG text chunk here; not saved", key)
                continue
            text[str(key)] = json.dumps(value)
        return text


NODE_CLASS_MAPPINGS = {
    "FastattrLoadIndex": FastattrLoadIndex,
    "FastattrAttributeImages": FastattrAttributeImages,
    "FastattrSaveImage": FastattrSaveImage,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FastattrLoadIndex": "Load Attribution Index",
    "FastattrAttributeImages": "Attribute Images",
    "FastattrSaveImage": "Save Image with Attribution",
}
