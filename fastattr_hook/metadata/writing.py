"""Writing: splice every carrier into the encoded file, sign it, and replace the file atomically."""

from __future__ import annotations

import io
import math
import os
import re
import stat
from pathlib import Path

from PIL import Image

from ..attribution import Attribution
from ..errors import FastattrError
from ..files import atomic_open
from .c2pa import C2paConfig, _sign_c2pa
from .common import _supported_format
from .jpeg import _embed_jpeg
from .png import PNG_KEY, XMP_KEY, _embed_png
from .reading import _open_bounded, printable
from .sidecar import _write_sidecar
from .webp import _embed_webp
from .xmp import _existing_xmp, _merged_xmp

_SUFFIX_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_NAMED_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_SURROGATE = re.compile("[\ud800-\udfff]")


def save_with_attribution(image: Image.Image, path: str | Path, attribution: Attribution, *,
                          format: str | None = None, sidecar: bool = True,
                          c2pa: C2paConfig | None = None, extra_text: dict[str, str] | None = None,
                          max_json_bytes: int = 65536,
                          pnginfo_from: Image.Image | None = None) -> Path:
    """Encode ``image`` to ``path`` (atomically) with every carrier; returns ``path``.

    Text already on the image (PNG text chunks, e.g. ComfyUI ``prompt``/``workflow`` or A1111
    ``parameters``), on ``pnginfo_from`` and in ``extra_text`` is kept: as PNG text chunks, or for
    JPEG/WebP as ``key:value`` EXIF strings the way ComfyUI stores them in WebP. EXIF, ICC profile
    and dpi of ``image`` are kept too, and its XMP packet, with the credits merged in as in place.
    """
    path = Path(path)
    _check_json(attribution)
    fmt = _format_for_save(path, format)
    text = {**_text_of(pnginfo_from), **_text_of(image), **(extra_text or {})}
    source = getattr(image, "filename", "") or "the image being saved"
    xmp = _merged_xmp(_xmp_of(image), attribution, f"{path}: the XMP packet of {source}")
    data = _embed(_encode(image, fmt, path), fmt, attribution, xmp, text, max_json_bytes, path)
    return _write_carriers(path, data, fmt, attribution, c2pa, sidecar)


def write_attribution_in_place(path: str | Path, attribution: Attribution, *, sidecar: bool = True,
                               c2pa: C2paConfig | None = None,
                               extra_text: dict[str, str] | None = None,
                               max_json_bytes: int = 65536) -> Path:
    """Add or replace the carriers of an existing PNG/JPEG/WebP without re-encoding its pixels.

    Everything else in the file is kept byte for byte, except a previous fastattr payload and C2PA
    manifest (both replaced; with ``c2pa`` the old manifest becomes the parent ingredient of the new
    one); our XMP is merged into the file's own packet, and one that cannot be parsed is refused, not
    replaced. Atomic: on any error the original file is untouched.
    """
    path = Path(path)
    _check_json(attribution)
    previous, opened = _open_bounded(path)
    with opened as image:
        fmt = _supported_format(image, path)
    xmp = _merged_xmp(_existing_xmp(previous, fmt, path), attribution, f"{path}: its XMP packet")
    data = _embed(previous, fmt, attribution, xmp, extra_text or {}, max_json_bytes, path)
    return _write_carriers(path, data, fmt, attribution, c2pa, sidecar, previous)


def _check_json(attribution: Attribution) -> None:
    """Refuse, before anything is written, what no carrier can hold: lone surrogates (a file name
    decoded with ``surrogateescape``, say: UTF-8 carriers would fail half-way, EXIF's UTF-16 write
    '?') and NaN or infinity (not JSON: other parsers and C2PA refuse them; creator shares are sums)."""
    pending: list[tuple[str, object]] = [("attribution", attribution.to_dict())]
    while pending:
        where, value = pending.pop()
        if isinstance(value, dict):
            pending += [(f"{where} key", key) for key in value]
            pending += [(f"{where}.{key}", item) for key, item in value.items()]
        elif isinstance(value, list):
            pending += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            raise FastattrError(f"{printable(where)} is {value}: JSON has no NaN or infinity, "
                                "so no carrier can hold it; check the scores and shares")
        elif isinstance(value, str) and (found := _SURROGATE.search(value)):
            raise FastattrError(f"{printable(where)} holds {found.group()!r}, a lone "
                                "surrogate, not Unicode text; decode it with errors='replace' (or fix "
                                "its source) before writing credits")


def _format_for_save(path: Path, name: str | None) -> str:
    fmt = _NAMED_FORMATS.get(name.lower()) if name else _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        what = f"format {name!r}" if name else f"suffix {path.suffix!r}"
        raise FastattrError(f"{path}: unsupported {what}; fastattr writes .png, .jpg/.jpeg and .webp")
    return fmt


def _text_of(image: Image.Image | None) -> dict[str, str]:
    """Text metadata to carry over: all PNG text chunks, or str entries of ``info``; not ours."""
    if image is None:
        return {}
    text = getattr(image, "text", None)  # PNG files: every text chunk, even those after IDAT
    if text is None:
        text = {k: v for k, v in image.info.items() if isinstance(v, str)}
    return {k: v for k, v in text.items() if k not in (PNG_KEY, XMP_KEY)}


def _xmp_of(image: Image.Image) -> bytes | None:
    """The image's own XMP packet: Pillow keeps a PNG's in its text (also after the pixels), a
    JPEG's or WebP's (and a PNG's before the pixels) in ``info["xmp"]``."""
    packet = (getattr(image, "text", None) or {}).get(XMP_KEY) or image.info.get("xmp")
    return packet.encode() if isinstance(packet, str) else packet


def _encode(image: Image.Image, fmt: str, path: Path) -> bytes:
    """Pixels plus the image's own EXIF/ICC/dpi; the carriers are spliced in afterwards."""
    options = {key: image.info[key] for key in ("exif", "icc_profile", "dpi") if image.info.get(key)}
    if fmt == "JPEG":
        keep = image.format == "JPEG"  # re-use the source's quantisation instead of a fixed quality
        options.update(quality="keep" if keep else 95, subsampling="keep" if keep else 0)
    elif fmt == "WEBP":
        options["quality"] = 95
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt, **options)
    except (OSError, ValueError) as exc:
        raise FastattrError(f"cannot write {path} as {fmt}: {exc}") from None
    return buffer.getvalue()


def _embed(data: bytes, fmt: str, attribution: Attribution, xmp: bytes, text: dict[str, str],
           max_json_bytes: int, path: Path) -> bytes:
    if fmt == "PNG":
        return _embed_png(data, attribution.truncated_to(max_json_bytes).to_json(), xmp, text, path)
    if fmt == "JPEG":
        return _embed_jpeg(data, attribution, xmp, text, max_json_bytes, path)
    return _embed_webp(data, attribution, xmp, text, max_json_bytes, path)


def _write_carriers(path: Path, data: bytes, fmt: str, attribution: Attribution, c2pa: C2paConfig | None,
                    sidecar: bool, previous: bytes | None = None) -> Path:
    """Sign (optionally; a manifest in ``previous``, the file before this write, becomes the parent
    of ours), then write the image atomically and its sidecar."""
    if c2pa is not None:
        data = _sign_c2pa(data, fmt, attribution, c2pa, path, previous)
    _write_image(path, data)
    if sidecar:
        _write_sidecar(path, attribution)
    return path


def _write_image(path: Path, data: bytes) -> None:
    """Temp file + rename; a file being replaced keeps its permissions (not the temp file's 0600)."""
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    with atomic_open(path) as f:
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        f.write(data)
