"""Write an image's credits where image tools and provenance standards look, and read them back.

Carriers (``CARRIERS``):

- ``png``: iTXt chunk ``fastattr`` with the attribution JSON (truncated to ``max_json_bytes``).
- ``xmp``: an XMP packet with IPTC ``Iptc4xmpExt:DigitalSourceType`` = trainedAlgorithmicMedia and a
  short summary of the top credits in the ``fastattr`` namespace (PNG iTXt, JPEG APP1, WebP chunk).
- ``exif``: EXIF UserComment (JPEG/WebP) with the attribution JSON, ASCII or UNICODE charset.
- ``sidecar``: ``NAME.attribution.json`` next to the image, full and untruncated; the one carrier
  that survives re-encoding.
- ``c2pa``: a signed C2PA manifest (optional, needs ``fastattr[c2pa]``).

Metadata is spliced into the encoded file at the container level (PNG chunks, JPEG segments, WebP
RIFF chunks), so writing in place never re-encodes pixels and keeps every unrelated chunk/segment.
A previous C2PA manifest is dropped when anything changes, because its hash binding would no longer
match; pass a ``C2paConfig`` to sign the new file.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import __version__
from .files import atomic_open, atomic_write_text
from .attribution import SCHEMA, Attribution
from .errors import FastattrError

__all__ = ["CARRIERS", "C2paConfig", "format_inspection", "inspect_image", "read_attribution",
           "save_with_attribution", "sidecar_path", "write_attribution_in_place"]

CARRIERS = ("png", "xmp", "exif", "sidecar", "c2pa")
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PNG_KEY = "fastattr"
XMP_KEY = "XML:com.adobe.xmp"
C2PA_LABEL = "dev.fastattr.attribution"
SIDECAR_SUFFIX = ".attribution.json"
XMP_TOP = 10  # credits summarised in XMP; the full list lives in the JSON carriers

FASTATTR_NS = "https://fastattr.dev/ns/1.0/"
IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"

_SUFFIX_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_NAMED_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_C2PA_ALGS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_MAX_TEXT_BYTES = 64 << 20  # cap on one inflated PNG text chunk (decompression bombs)
_JPEG_SEGMENT_MAX = 65533  # bytes after the 2-byte length field of one JPEG APPn segment
_JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_JPEG_XMP_EXTENSION_HEADER = b"http://ns.adobe.com/xmp/extension/\x00"
_EXIF_HEADER = b"Exif\x00\x00"
# ComfyUI's convention for text in WebP EXIF: "prompt:<json>" in Model, other keys from Make down.
_EXIF_PROMPT_TAG = 0x0110
_EXIF_TEXT_TAGS = (0x010F, 0x010E, 0x010D)
_OUR_JSON_PREFIX = '{"schema": "fastattr/attribution@'  # how Attribution.to_json() starts
_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class C2paConfig:
    """Signing credentials for C2PA; fastattr never creates or stores keys itself."""

    cert_chain: str | Path   # PEM: end-entity certificate first, then intermediates
    private_key: str | Path  # PEM private key of the end-entity certificate
    alg: str = "es256"
    ta_url: str | None = None  # RFC 3161 timestamp authority; None keeps signing offline


# ----------------------------------------------------------------------------- public API

def sidecar_path(image_path: str | Path) -> Path:
    """``out.png`` -> ``out.attribution.json``: by stem, so it still matches after a format change."""
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + SIDECAR_SUFFIX)


def save_with_attribution(image: Image.Image, path: str | Path, attribution: Attribution, *,
                          format: str | None = None, sidecar: bool = True,
                          c2pa: C2paConfig | None = None, extra_text: dict[str, str] | None = None,
                          max_json_bytes: int = 65536,
                          pnginfo_from: Image.Image | None = None) -> Path:
    """Encode ``image`` to ``path`` (atomically) with every carrier; returns ``path``.

    Text already on the image (PNG text chunks, e.g. ComfyUI ``prompt``/``workflow`` or A1111
    ``parameters``), on ``pnginfo_from`` and in ``extra_text`` is kept: as PNG text chunks, or for
    JPEG/WebP as ``key:value`` EXIF strings the way ComfyUI stores them in WebP. EXIF, ICC profile
    and dpi of ``image`` are kept too.
    """
    path = Path(path)
    fmt = _format_for_save(path, format)
    text = {**_text_of(pnginfo_from), **_text_of(image), **(extra_text or {})}
    data = _embed(_encode(image, fmt, path), fmt, attribution, text, max_json_bytes, path)
    return _write_carriers(path, data, fmt, attribution, c2pa, sidecar)


def write_attribution_in_place(path: str | Path, attribution: Attribution, *, sidecar: bool = True,
                               c2pa: C2paConfig | None = None,
                               extra_text: dict[str, str] | None = None,
                               max_json_bytes: int = 65536) -> Path:
    """Add or replace the carriers of an existing PNG/JPEG/WebP without re-encoding its pixels.

    Everything else in the file is kept byte for byte, except a previous fastattr payload, XMP
    packet and C2PA manifest (all replaced). Atomic: on any error the original file is untouched.
    """
    path = Path(path)
    with _open_image(path) as image:
        fmt = _supported_format(image, path)
    data = _embed(path.read_bytes(), fmt, attribution, extra_text or {}, max_json_bytes, path)
    return _write_carriers(path, data, fmt, attribution, c2pa, sidecar)


def read_attribution(path: str | Path) -> dict[str, Attribution | dict | None]:
    """One entry per carrier found; ``None`` marks a carrier that is present but unreadable.

    ``xmp`` is a summary dict (top credits only); the others are full ``Attribution`` objects
    (``png``/``exif`` possibly truncated). ``c2pa`` is only looked for when c2pa-python is installed.
    """
    _, records, _ = _scan(Path(path))
    return {name: record["value"] for name, record in records.items()}


def inspect_image(path: str | Path) -> dict:
    """Everything ``fastattr inspect`` shows: carriers, whether they agree, the best attribution."""
    path = Path(path)
    fmt, records, others = _scan(path)
    best = _best_attribution(records)
    problems = _disagreements(records, best)
    carriers = {name: _carrier_report(name, records.get(name)) for name in CARRIERS}
    if "c2pa" not in records and not _c2pa_available():
        carriers["c2pa"]["checked"] = False
    return {
        "path": str(path),
        "format": fmt,
        "carriers": carriers,
        "agree": not problems,
        "disagreements": problems,
        "authenticated": _authenticated(records),
        "attribution": best.to_dict() if best else None,
        "other_metadata": {"parameters": others.get("parameters"), "prompt": "prompt" in others,
                           "workflow": "workflow" in others},
    }


def format_inspection(report: dict) -> str:
    """Human-readable text of an ``inspect_image`` report; control characters are shown escaped."""
    lines = [f"{printable(report['path'])} ({report['format']})", "carriers:"]
    for name, info in report["carriers"].items():
        lines.append(f"  {name:<8} {_describe_carrier(name, info)}")
    if report["agree"]:
        lines.append("carriers agree: yes")
    else:
        lines.append("carriers agree: NO")
        lines.extend(f"  - {problem}" for problem in report["disagreements"])
    lines.append("credits authenticated: yes (a valid C2PA manifest; the other carriers were checked against it)"
                 if report["authenticated"] else
                 "credits authenticated: NO (no valid C2PA manifest: anyone can write or edit these credits)")
    attribution = report["attribution"]
    if attribution is None:
        lines.append("no attribution found")
    else:
        shown = attribution["credits"][:XMP_TOP]
        lines.append(f"top credits ({len(shown)} of {attribution['k']}):")
        for credit in shown:
            creator = f" by {printable(credit['creator'])}" if credit["creator"] else ""
            lines.append(f"  {credit['rank']:>3}. {credit['share']:6.1%}  {printable(credit['id'])}{creator}")
        creators = [c for c in attribution["creators"] if c["creator"]][:5]
        if creators:
            lines.append("top creators: " + ", ".join(f"{printable(c['creator'])} {c['share']:.1%}"
                                                      for c in creators))
    other = report["other_metadata"]
    lines.append(f"other metadata: A1111 parameters: {'yes' if other['parameters'] else 'no'}, "
                 f"ComfyUI prompt: {'yes' if other['prompt'] else 'no'}, "
                 f"workflow: {'yes' if other['workflow'] else 'no'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- formats, encoding

def _format_for_save(path: Path, name: str | None) -> str:
    fmt = _NAMED_FORMATS.get(name.lower()) if name else _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        what = f"format {name!r}" if name else f"suffix {path.suffix!r}"
        raise FastattrError(f"{path}: unsupported {what}; fastattr writes .png, .jpg/.jpeg and .webp")
    return fmt


def _open_image(path: Path) -> Image.Image:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise FastattrError(f"{path}: not a regular file")
        return Image.open(path)
    except FileNotFoundError:
        raise FastattrError(f"{path}: no such file") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise FastattrError(f"{path}: not a readable image ({exc})") from None


def _supported_format(image: Image.Image, path: Path) -> str:
    if image.format not in _MIME:
        raise FastattrError(f"{path}: {image.format} images are not supported; "
                            "fastattr reads and writes PNG, JPEG and WebP (convert it first)")
    return image.format


def _text_of(image: Image.Image | None) -> dict[str, str]:
    """Text metadata to carry over: all PNG text chunks, or str entries of ``info``; not ours."""
    if image is None:
        return {}
    text = getattr(image, "text", None)  # PNG files: every text chunk, even those after IDAT
    if text is None:
        text = {k: v for k, v in image.info.items() if isinstance(v, str)}
    return {k: v for k, v in text.items() if k not in (PNG_KEY, XMP_KEY)}


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


def _embed(data: bytes, fmt: str, attribution: Attribution, text: dict[str, str],
           max_json_bytes: int, path: Path) -> bytes:
    xmp = _merged_xmp(_existing_xmp(data, fmt, path), attribution)
    if fmt == "PNG":
        return _embed_png(data, attribution.truncated_to(max_json_bytes).to_json(), xmp, text, path)
    if fmt == "JPEG":
        return _embed_jpeg(data, attribution, xmp, text, max_json_bytes, path)
    return _embed_webp(data, attribution, xmp, text, max_json_bytes, path)


def _write_carriers(path: Path, data: bytes, fmt: str, attribution: Attribution, c2pa: C2paConfig | None,
                    sidecar: bool) -> Path:
    """Sign (optionally), then write the image atomically and its sidecar."""
    if c2pa is not None:
        data = _sign_c2pa(data, fmt, attribution, c2pa, path)
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


def _write_sidecar(path: Path, attribution: Attribution) -> None:
    atomic_write_text(sidecar_path(path), attribution.to_json(indent=2) + "\n")


# ----------------------------------------------------------------------------- PNG

def _png_chunks(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """(type, raw chunk bytes incl. length and CRC) up to IEND; raw bytes are re-used untouched."""
    if not data.startswith(_PNG_SIGNATURE):
        raise FastattrError(f"{path}: not a PNG file")
    chunks, pos = [], len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            break
        chunks.append((ctype, data[pos:end]))
        pos = end
        if ctype == b"IEND":
            return chunks
    raise FastattrError(f"{path}: PNG is truncated or corrupt (no IEND chunk)")


def _png_text(data: bytes, path: Path) -> dict[str, str]:
    """Every tEXt/zTXt/iTXt chunk, read without decoding pixels (so damaged image data is fine)."""
    text, total = {}, 0
    for ctype, raw in _png_chunks(data, path):
        if ctype not in _PNG_TEXT_CHUNKS:
            continue
        if total > _MAX_TEXT_BYTES:  # many compressed chunks: the cap holds in total, not only per chunk
            raise FastattrError(f"{path}: text chunks inflate beyond {_MAX_TEXT_BYTES} bytes in total")
        key, _, body = raw[8:-4].partition(b"\x00")
        try:
            if ctype == b"tEXt":
                value = body.decode("latin-1")
            elif ctype == b"zTXt":
                value = _inflate(body[1:]).decode("latin-1")
            else:  # iTXt: compression flag, method, language NUL, translated keyword NUL, text
                _, _, rest = body[2:].partition(b"\x00")
                _, _, rest = rest.partition(b"\x00")
                value = (_inflate(rest) if body[0] else rest).decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue  # a damaged foreign chunk; ours would then show up as missing
        text[key.decode("latin-1")] = value
        total += len(value)
    return text


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, _MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise zlib.error(f"text chunk inflates beyond {_MAX_TEXT_BYTES} bytes")
    return out


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png_text_chunk(key: str, value: str) -> bytes:
    """tEXt when Latin-1 can hold the value (what ComfyUI/A1111 readers expect), else iTXt.

    Pillow's ``iTXt`` values (read from an iTXt chunk) stay iTXt with their language tags.
    """
    lang, tkey = getattr(value, "lang", None), getattr(value, "tkey", None)
    if lang is None and tkey is None:
        try:
            return _png_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1"))
        except UnicodeEncodeError:
            pass
    return _png_itxt(key, value, lang or "", tkey or "")


def _png_itxt(key: str, value: str, lang: str = "", tkey: str = "") -> bytes:
    # keyword NUL, compression flag 0, method 0, language tag NUL, translated keyword NUL, text
    header = key.encode("latin-1") + b"\x00\x00\x00" + lang.encode() + b"\x00" + tkey.encode() + b"\x00"
    return _png_chunk(b"iTXt", header + value.encode())


def _check_png_keyword(key: str, path: Path) -> None:
    ok = (0 < len(key) < 80 and key == key.strip() and "  " not in key
          and all(32 <= ord(ch) <= 126 or 161 <= ord(ch) <= 255 for ch in key))
    if not ok:
        raise FastattrError(f"{path}: {key!r} cannot be a PNG text keyword "
                            "(1-79 printable Latin-1 characters, no leading/trailing/double spaces)")


def _embed_png(data: bytes, json_text: str, xmp: bytes, text: dict[str, str], path: Path) -> bytes:
    for key in text:
        _check_png_keyword(key, path)
    replaced = {PNG_KEY.encode(), XMP_KEY.encode(), *(key.encode("latin-1") for key in text)}
    kept = []
    for ctype, raw in _png_chunks(data, path):
        if ctype == b"caBX":  # previous C2PA manifest: its hash no longer matches
            continue
        if ctype in _PNG_TEXT_CHUNKS and raw[8:].split(b"\x00", 1)[0] in replaced:
            continue
        kept.append((ctype, raw))
    first_idat = next((i for i, (ctype, _) in enumerate(kept) if ctype == b"IDAT"), None)
    if first_idat is None:
        raise FastattrError(f"{path}: PNG has no image data (IDAT chunk)")
    new = [_png_itxt(PNG_KEY, json_text), _png_itxt(XMP_KEY, xmp.decode()),
           *(_png_text_chunk(key, value) for key, value in text.items())]
    return (_PNG_SIGNATURE + b"".join(raw for _, raw in kept[:first_idat]) + b"".join(new)
            + b"".join(raw for _, raw in kept[first_idat:]))


# ----------------------------------------------------------------------------- JPEG

def _jpeg_segments(data: bytes, path: Path) -> tuple[list[bytes], bytes]:
    """Marker segments between SOI and the first scan, and everything from the scan on."""
    if not data.startswith(b"\xff\xd8"):
        raise FastattrError(f"{path}: not a JPEG file")
    segments, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in (0xDA, 0xD9):  # start of scan / end of image
            return segments, data[pos:]
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            segments.append(data[pos:pos + 2])
            pos += 2
        else:
            end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
            segments.append(data[pos:end])
            pos = end
    raise FastattrError(f"{path}: JPEG is truncated or corrupt (no scan found)")


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _embed_jpeg(data: bytes, attribution: Attribution, xmp: bytes, text: dict[str, str],
                max_json_bytes: int, path: Path) -> bytes:
    segments, scan = _jpeg_segments(data, path)
    existing_exif, kept = None, []
    for segment in segments:
        marker, payload = segment[1], segment[4:]
        if marker == 0xE1 and payload.startswith(_EXIF_HEADER):
            existing_exif = payload
        elif marker == 0xE1 and payload.startswith((_JPEG_XMP_HEADER, _JPEG_XMP_EXTENSION_HEADER)):
            continue
        elif marker == 0xEB:  # APP11 JUMBF: a previous C2PA manifest, stale once anything changes
            continue
        else:
            kept.append(segment)
    exif = _exif_bytes(existing_exif, attribution, text, max_json_bytes, _JPEG_SEGMENT_MAX, path)
    xmp_payload = _JPEG_XMP_HEADER + xmp
    if len(xmp_payload) > _JPEG_SEGMENT_MAX:
        raise FastattrError(f"{path}: the XMP summary does not fit one JPEG segment "
                            "(credit ids or creators are too long); save as PNG")
    app0 = 0
    while app0 < len(kept) and kept[app0][1] == 0xE0:  # JFIF must stay first
        app0 += 1
    new = [_jpeg_segment(0xE1, exif), _jpeg_segment(0xE1, xmp_payload)]
    return b"\xff\xd8" + b"".join(kept[:app0] + new + kept[app0:]) + scan


# ----------------------------------------------------------------------------- WebP

def _riff_chunks(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise FastattrError(f"{path}: not a WebP file")
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        fourcc, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if pos + 8 + size > len(data):
            raise FastattrError(f"{path}: WebP is truncated or corrupt")
        chunks.append((fourcc, data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return chunks


def _embed_webp(data: bytes, attribution: Attribution, xmp: bytes, text: dict[str, str],
                max_json_bytes: int, path: Path) -> bytes:
    chunks = _riff_chunks(data, path)
    existing_exif = next((body for fourcc, body in chunks if fourcc == b"EXIF"), None)
    # C2PA: a previous manifest is stale once anything changes
    chunks = [(fourcc, body) for fourcc, body in chunks if fourcc not in (b"EXIF", b"XMP ", b"C2PA")]
    if chunks[0][0] != b"VP8X":  # simple WebP: metadata needs the extended header
        with Image.open(io.BytesIO(data)) as image:
            (width, height), alpha = image.size, image.mode == "RGBA"
        header = (bytes([0x10 if alpha else 0, 0, 0, 0]) + (width - 1).to_bytes(3, "little")
                  + (height - 1).to_bytes(3, "little"))
        chunks.insert(0, (b"VP8X", header))
    vp8x = chunks[0][1]
    chunks[0] = (b"VP8X", bytes([vp8x[0] | 0x08 | 0x04]) + vp8x[1:])  # EXIF and XMP flags
    exif = _exif_bytes(existing_exif, attribution, text, max_json_bytes, None, path)
    chunks += [(b"EXIF", exif[len(_EXIF_HEADER):]), (b"XMP ", xmp)]
    body = b"WEBP" + b"".join(fourcc + struct.pack("<I", len(chunk)) + chunk + b"\x00" * (len(chunk) & 1)
                              for fourcc, chunk in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ----------------------------------------------------------------------------- EXIF

def _piexif():
    try:
        import piexif
        import piexif.helper
    except ImportError:
        raise FastattrError("JPEG and WebP metadata need piexif: "
                            "pip install 'fastattr[metadata]'") from None
    return piexif


def _load_exif(raw: bytes | None, path: Path) -> dict:
    piexif = _piexif()
    if raw and raw.startswith(_EXIF_HEADER):
        raw = raw[len(_EXIF_HEADER):]
    if not raw:
        return {"0th": {}, "Exif": {}, "GPS": {}, "Interop": {}, "1st": {}, "thumbnail": None}
    if raw[:4] not in (b"II*\x00", b"MM\x00*"):  # piexif would take anything else for a file name
        raise FastattrError(f"{path}: its EXIF block is corrupt; strip it and try again")
    problem = _exif_bounds_problem(raw)
    if problem:  # checked before piexif, which allocates whatever sizes a fuzzed block claims
        raise FastattrError(f"{path}: its EXIF block is corrupt ({problem}); strip it and try again")
    try:
        return piexif.load(raw)
    except (ValueError, struct.error, IndexError) as exc:
        raise FastattrError(f"{path}: its EXIF block cannot be parsed ({exc}); strip it and try again") from None


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_EXIF_POINTERS = (0x8769, 0x8825, 0xA005)  # Exif, GPS and Interop sub-IFDs


def _exif_bounds_problem(raw: bytes) -> str | None:
    """Walk the TIFF IFDs without decoding values: every entry's count x type size must fit in the
    block and no IFD may be visited twice. None when the structure is sound."""
    order = "<" if raw[:2] == b"II" else ">"
    pending, seen = [(struct.unpack(order + "I", raw[4:8])[0], True)], set()
    while pending:
        offset, chained = pending.pop()  # IFD0 links to IFD1 (thumbnail); sub-IFDs may omit the link
        if offset == 0:
            continue
        if offset in seen or len(seen) > 64:
            return "IFD loop"
        seen.add(offset)
        if offset + 2 > len(raw):
            return f"IFD at {offset} beyond the block's {len(raw)} bytes"
        (count,) = struct.unpack(order + "H", raw[offset:offset + 2])
        end = offset + 2 + 12 * count
        if end + (4 if chained else 0) > len(raw):
            return f"IFD at {offset} claims {count} entries"
        for n in range(count):
            tag, kind, items = struct.unpack(order + "HHI", raw[offset + 2 + 12 * n:offset + 10 + 12 * n])
            size = _TIFF_TYPE_SIZES.get(kind, 1) * items
            (value,) = struct.unpack(order + "I", raw[offset + 10 + 12 * n:offset + 14 + 12 * n])
            if size > 4 and value + size > len(raw):
                return f"tag 0x{tag:04X} claims {size} bytes"
            if tag in _EXIF_POINTERS:
                pending.append((value, False))
        if chained and len(seen) == 1:
            pending.append((struct.unpack(order + "I", raw[end:end + 4])[0], False))
    return None


def _user_comment(exif: dict) -> str | None:
    raw = exif["Exif"].get(_piexif().ExifIFD.UserComment)
    if not raw:
        return None
    try:
        text = _piexif().helper.UserComment.load(raw)
    except ValueError:  # undefined or unknown charset prefix: UTF-8 is the common case
        text = raw[8:].decode("utf-8", "replace")
    return text.strip("\x00 \t\r\n") or None  # cameras fill it with NULs or spaces


def _exif_bytes(existing: bytes | None, attribution: Attribution, text: dict[str, str],
                max_json_bytes: int, limit: int | None, path: Path) -> bytes:
    """EXIF (with ``Exif\\0\\0`` header) = existing fields + text + the JSON in UserComment.

    A UserComment that is not ours (A1111 stores its ``parameters`` there) is kept, and then the
    EXIF carrier is skipped: the other carriers still hold the credits.
    """
    piexif = _piexif()
    exif = _load_exif(existing, path)
    free_tags = iter(_EXIF_TEXT_TAGS)
    for key, value in text.items():
        tag = _EXIF_PROMPT_TAG if key == "prompt" else next(free_tags, None)
        if tag is None:
            raise FastattrError(f"{path}: JPEG/WebP EXIF holds 'prompt' and at most "
                                f"{len(_EXIF_TEXT_TAGS)} more text entries, got {sorted(text)}; save as PNG")
        exif["0th"][tag] = f"{key}:{value}".encode()
    comment = _user_comment(exif)
    if comment and not comment.startswith(_OUR_JSON_PREFIX):
        return _dump_exif(exif, limit, path)
    exif["Exif"].pop(piexif.ExifIFD.UserComment, None)
    budget = max_json_bytes
    if limit is not None:  # room left by the other fields, less the UserComment entry and prefix
        budget = min(budget, limit - len(_dump_exif(exif, limit, path)) - 32)
    while True:  # shrink until the dump fits: UTF-16 (non-ASCII JSON) can be larger than UTF-8
        json_text = attribution.truncated_to(budget).to_json()
        charset = "ascii" if json_text.isascii() else "unicode"
        exif["Exif"][piexif.ExifIFD.UserComment] = piexif.helper.UserComment.dump(json_text, charset)
        dumped = _dump_exif(exif, None, path)
        if limit is None or len(dumped) <= limit:
            return dumped
        budget -= len(dumped) - limit


def _dump_exif(exif: dict, limit: int | None, path: Path) -> bytes:
    try:
        dumped = _piexif().dump(exif)
    except (ValueError, struct.error) as exc:
        raise FastattrError(f"{path}: its EXIF cannot be re-written ({exc}); strip it and try again") from None
    if limit is not None and len(dumped) > limit:
        raise FastattrError(f"{path}: its EXIF ({len(dumped)} bytes) leaves no room in the "
                            f"{limit}-byte JPEG segment; strip the EXIF thumbnail or save as PNG")
    return dumped


def _exif_texts(exif: dict) -> dict[str, str]:
    """``key:value`` strings that ComfyUI-style writers put in Model/Make/... of IFD0."""
    found = {}
    for tag in (_EXIF_PROMPT_TAG, *_EXIF_TEXT_TAGS):
        value = exif["0th"].get(tag)
        if isinstance(value, bytes):
            key, sep, rest = value.decode("utf-8", "replace").rstrip("\x00").partition(":")
            if sep and key.isidentifier():
                found[key] = rest
    return found


# ----------------------------------------------------------------------------- XMP

def _xml_clean(value: object) -> str:
    """``value`` without the characters XML 1.0 cannot hold (control characters, U+FFFE, ...)."""
    return _XML_ILLEGAL.sub("", str(value))


def _xml_text(value: object) -> str:
    escaped = _xml_clean(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace('"', "&quot;").replace("\r", "&#13;")


def _xmp_packet(attribution: Attribution) -> bytes:
    """IPTC DigitalSourceType + a summary of the top credits; UTF-8 XMP packet."""
    def prop(name: str, value: object) -> str:
        return f"<fastattr:{name}>{_xml_text(value)}</fastattr:{name}>"

    items = []
    for credit in attribution.credits[:XMP_TOP]:
        fields = [prop("rank", credit.rank), prop("id", credit.id), prop("share", repr(credit.share))]
        if credit.creator is not None:
            fields.append(prop("creator", credit.creator))
        items.append(f'     <rdf:li rdf:parseType="Resource">{"".join(fields)}</rdf:li>')
    lines = [
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>',
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">',
        f' <rdf:RDF xmlns:rdf="{RDF_NS}">',
        f'  <rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{IPTC_EXT_NS}" xmlns:fastattr="{FASTATTR_NS}">',
        f"   <Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>",
        "   " + prop("schema", SCHEMA),
        "   " + prop("k", attribution.k),
        "   " + prop("encoderFingerprint", attribution.encoder.get("fingerprint", "")),
        "   " + prop("bundleFingerprint", attribution.bundle.get("fingerprint", "")),
        "   <fastattr:credits>",
        "    <rdf:Seq>",
        *items,
        "    </rdf:Seq>",
        "   </fastattr:credits>",
        "  </rdf:Description>",
        " </rdf:RDF>",
        "</x:xmpmeta>",
        '<?xpacket end="w"?>',
    ]
    return "\n".join(lines).encode()


def _existing_xmp(data: bytes, fmt: str, path: Path) -> bytes | None:
    """The XMP packet the image already carries (its rights and IPTC fields must survive)."""
    if fmt == "PNG":
        value = _png_text(data, path).get(XMP_KEY)
        return value.encode() if value else None
    if fmt == "JPEG":
        segments, _ = _jpeg_segments(data, path)
        return next((seg[4:][len(_JPEG_XMP_HEADER):] for seg in segments
                     if seg[1] == 0xE1 and seg[4:].startswith(_JPEG_XMP_HEADER)), None)
    return next((body for fourcc, body in _riff_chunks(data, path) if fourcc == b"XMP "), None)


def _safe_xml(packet: str | bytes) -> ET.Element:
    """Parse XMP, refusing DTDs and entities (XMP needs neither; they are how XML bombs expand)."""
    raw = packet.encode() if isinstance(packet, str) else packet
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise ET.ParseError("XMP with a DTD or entities is refused")
    return ET.fromstring(raw)


def _merged_xmp(existing: bytes | None, attribution: Attribution) -> bytes:
    """Our XMP merged into the image's own packet: every other property (dc:creator, dc:rights,
    xmpRights:UsageTerms, IPTC data-mining fields, ...) is kept; ours and DigitalSourceType are
    replaced. An unreadable packet cannot be merged and is replaced."""
    ours = _xmp_packet(attribution)
    if not existing:
        return ours
    try:
        root = _safe_xml(existing)
        names = {uri: prefix for _, (prefix, uri) in ET.iterparse(io.BytesIO(existing), events=("start-ns",))}
    except ET.ParseError:
        return ours
    rdf = root if root.tag == f"{{{RDF_NS}}}RDF" else root.find(f"{{{RDF_NS}}}RDF")
    if rdf is None:
        return ours
    replaced = (f"{{{IPTC_EXT_NS}}}DigitalSourceType",)
    for desc in rdf.findall(f"{{{RDF_NS}}}Description"):
        for child in list(desc):
            if child.tag.startswith(f"{{{FASTATTR_NS}}}") or child.tag in replaced:
                desc.remove(child)
        for key in [k for k in desc.attrib if k.startswith(f"{{{FASTATTR_NS}}}") or k in replaced]:
            del desc.attrib[key]
        if not len(desc) and set(desc.attrib) <= {f"{{{RDF_NS}}}about"}:
            rdf.remove(desc)
    rdf.append(ET.fromstring(ours).find(f".//{{{RDF_NS}}}Description"))
    names.update({"adobe:ns:meta/": "x", RDF_NS: "rdf", IPTC_EXT_NS: "Iptc4xmpExt", FASTATTR_NS: "fastattr"})
    for uri, prefix in names.items():
        if prefix and not re.fullmatch(r"ns\d+", prefix):
            ET.register_namespace(prefix, uri)
    body = ET.tostring(root, encoding="unicode")
    return f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n{body}\n<?xpacket end="w"?>'.encode()


def _parse_xmp(packet: str | bytes) -> dict | None:
    """Our summary from an XMP packet, or None when it has neither our data nor DigitalSourceType."""
    root = _safe_xml(packet)
    source_type, ours = None, None
    for desc in root.iter(f"{{{RDF_NS}}}Description"):
        element = desc.find(f"{{{IPTC_EXT_NS}}}DigitalSourceType")
        if element is not None:
            source_type = element.get(f"{{{RDF_NS}}}resource") or (element.text or "").strip()
        source_type = source_type or desc.get(f"{{{IPTC_EXT_NS}}}DigitalSourceType")
        if desc.find(f"{{{FASTATTR_NS}}}schema") is not None:
            ours = desc
    if ours is None and source_type is None:
        return None
    summary: dict = {"digital_source_type": source_type}
    if ours is not None:
        def get(element: ET.Element, name: str) -> str | None:
            return element.findtext(f"{{{FASTATTR_NS}}}{name}")

        summary.update(
            schema=get(ours, "schema"), k=int(get(ours, "k")),
            encoder_fingerprint=get(ours, "encoderFingerprint") or "",
            bundle_fingerprint=get(ours, "bundleFingerprint") or "",
            credits=[{"rank": int(get(li, "rank")), "id": get(li, "id") or "",
                      "creator": get(li, "creator"), "share": float(get(li, "share"))}
                     for li in ours.iter(f"{{{RDF_NS}}}li")])
    return summary


# ----------------------------------------------------------------------------- C2PA

def _c2pa_module():
    try:
        import c2pa
    except ImportError:
        raise FastattrError("C2PA manifests need c2pa-python: pip install 'fastattr[c2pa]'") from None
    return c2pa


def _c2pa_available() -> bool:
    try:
        _c2pa_module()
    except FastattrError:
        return False
    return True


def _read_pem(file: str | Path, what: str) -> bytes:
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        raise FastattrError(f"C2PA {what} {file} cannot be read ({exc.strerror}); "
                            "point C2paConfig at a PEM file") from None
    if b"-----BEGIN " not in data:
        raise FastattrError(f"C2PA {what} {file} is not PEM; convert it (openssl ... -outform PEM)")
    return data


def _sign_c2pa(data: bytes, fmt: str, attribution: Attribution, config: C2paConfig, path: Path) -> bytes:
    """Embed a signed manifest: ``c2pa.created`` (trainedAlgorithmicMedia) + our assertion."""
    c2pa = _c2pa_module()
    if config.alg.lower() not in _C2PA_ALGS:
        raise FastattrError(f"C2PA signing algorithm {config.alg!r} is not one of {', '.join(_C2PA_ALGS)}")
    chain = _read_pem(config.cert_chain, "certificate chain")
    key = _read_pem(config.private_key, "private key")
    manifest = {
        "claim_generator_info": [{"name": "fastattr", "version": __version__}],
        "title": path.name,
        "format": _MIME[fmt],
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [
                {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE,
                 "softwareAgent": {"name": "fastattr", "version": __version__}}]}},
            {"label": C2PA_LABEL, "data": attribution.to_dict()},
        ],
    }
    signed = io.BytesIO()
    try:
        info = c2pa.C2paSignerInfo(alg=config.alg.lower(), sign_cert=chain, private_key=key,
                                   ta_url=config.ta_url)
        with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest) as builder:
            builder.sign(signer, _MIME[fmt], io.BytesIO(data), signed)
    except (c2pa.C2paError, ValueError) as exc:
        raise FastattrError(f"C2PA signing of {path} failed ({exc}); check that {config.private_key} "
                            f"matches the first certificate in {config.cert_chain} and alg "
                            f"{config.alg!r} fits the key") from None
    return signed.getvalue()


def _read_c2pa(path: Path) -> dict | None:
    c2pa = _c2pa_module()
    try:  # offline: never fetch a manifest that the file only points to by URL
        with c2pa.Context.from_dict({"verify": {"remote_manifest_fetch": False}}) as context:
            reader = c2pa.Reader.try_create(str(path), context=context)
            if reader is None:
                return None
            with reader:
                manifest = reader.get_active_manifest() or {}
                state = reader.get_validation_state()
    except c2pa.C2paError as exc:
        return {"value": None, "error": f"manifest unreadable: {exc}"}
    assertions = manifest.get("assertions", [])
    actions = [action for a in assertions if a.get("label", "").startswith("c2pa.actions")
               for action in a.get("data", {}).get("actions", [])]
    record = {"validation_state": state,
              "digital_source_type": next((a.get("digitalSourceType") for a in actions
                                           if a.get("action") == "c2pa.created"), None)}
    ours = next((a for a in assertions if a.get("label") == C2PA_LABEL), None)
    if ours is None:
        return {**record, "value": None, "note": f"manifest has no {C2PA_LABEL} assertion"}
    return {**record, **_parse_record(lambda: Attribution.from_dict(ours.get("data")))}


# ----------------------------------------------------------------------------- reading

def _parse_record(parse) -> dict:
    """``{"value": parse()}``, or ``{"value": None, "error": why}`` for a corrupt carrier."""
    try:
        return {"value": parse(), "error": None}
    except (FastattrError, ValueError, TypeError, KeyError, AttributeError, ET.ParseError) as exc:
        return {"value": None, "error": str(exc)}  # credits of the wrong types, damaged XML, ...
    except RecursionError:
        return {"value": None, "error": "nested too deeply"}


def _scan(path: Path) -> tuple[str, dict[str, dict], dict[str, str]]:
    """Format, carrier records (``{"value", "error", ...}``) and other text metadata of ``path``."""
    with _open_image(path) as image:
        fmt = _supported_format(image, path)
        if fmt == "PNG":
            others = _png_text(path.read_bytes(), path)
            json_text, xmp = others.get(PNG_KEY), others.get(XMP_KEY)
        else:
            exif = _load_exif(image.info.get("exif"), path)
            comment, xmp, others = _user_comment(exif), image.info.get("xmp"), _exif_texts(exif)
            json_text = comment if comment and comment.startswith(_OUR_JSON_PREFIX) else None
            if comment and json_text is None:
                others["parameters"] = comment  # A1111 keeps its parameters in UserComment
    records: dict[str, dict] = {}
    if json_text is not None:
        records["png" if fmt == "PNG" else "exif"] = _parse_record(lambda: Attribution.from_json(json_text))
    if xmp:
        record = _parse_record(lambda: _parse_xmp(xmp))
        if record["value"] is not None or record["error"]:
            records["xmp"] = record
    side = sidecar_path(path)
    if side.is_file():
        records["sidecar"] = {"path": str(side),
                              **_parse_record(lambda: Attribution.from_json(side.read_bytes()))}
    if _c2pa_available():
        record = _read_c2pa(path)
        if record is not None:
            records["c2pa"] = record
    return fmt, {name: records[name] for name in CARRIERS if name in records}, others


def _authenticated(records: dict[str, dict]) -> bool:
    """A C2PA manifest that validates and carries our assertion: the only carrier nobody can edit
    without the signer's key."""
    record = records.get("c2pa", {})
    return record.get("value") is not None and record.get("validation_state") in ("Valid", "Trusted")


def _best_attribution(records: dict[str, dict]) -> Attribution | None:
    """The reference the other carriers are checked against: a validating C2PA manifest, else
    embedded, then sidecar; an untruncated copy beats a truncated one."""
    if _authenticated(records):
        return records["c2pa"]["value"]
    found = [records[name]["value"] for name in ("png", "exif", "sidecar")
             if name in records and records[name]["value"] is not None]
    return next((a for a in found if not a.truncated), found[0] if found else None)


CREDIT_FIELDS = ("id", "rank", "share", "creator", "caption", "license", "source_url", "score")


def _differences(name: str, copy: Attribution, reference: Attribution) -> list[str]:
    """Every field that carrier ``name`` gives otherwise than the reference, named (a truncated
    copy may hold fewer credits)."""
    out = [f"{name}: {label} {_shown(x)} instead of {_shown(y)}" for label, x, y in (
        ("prompt", copy.prompt, reference.prompt), ("k", copy.k, reference.k),
        ("encoder fingerprint", copy.encoder.get("fingerprint"), reference.encoder.get("fingerprint")),
        ("bundle fingerprint", copy.bundle.get("fingerprint"), reference.bundle.get("fingerprint"))) if x != y]
    shorter = copy if len(copy.credits) < len(reference.credits) else reference
    if len(copy.credits) != len(reference.credits) and not shorter.truncated:
        out.append(f"{name}: {len(copy.credits)} credits instead of {len(reference.credits)}")
    for mine, theirs in zip(copy.credits, reference.credits):
        out += [f"{name}: credit {theirs.rank} {field} {_shown(getattr(mine, field))} instead of "
                f"{_shown(getattr(theirs, field))}"
                for field in CREDIT_FIELDS if getattr(mine, field) != getattr(theirs, field)]
    return out


def _disagreements(records: dict[str, dict], best: Attribution | None) -> list[str]:
    problems = [f"{name}: {record['error']}" for name, record in records.items() if record.get("error")]
    if records.get("c2pa", {}).get("validation_state") == "Invalid":
        problems.append("c2pa: manifest does not validate (the file changed after signing)")
    if best is None:
        return problems
    for name in ("png", "exif", "sidecar", "c2pa"):
        value = records.get(name, {}).get("value")
        if value is not None and value is not best:
            problems += _differences(name, value, best)
    summary = records.get("xmp", {}).get("value")
    if summary is not None:
        if summary["digital_source_type"] != DIGITAL_SOURCE_TYPE:
            problems.append(f"xmp: DigitalSourceType is {summary['digital_source_type']!r}")
        if "credits" in summary:
            for label, x, y in (("k", summary["k"], best.k),
                                ("encoder fingerprint", summary["encoder_fingerprint"],
                                 _xml_clean(best.encoder.get("fingerprint", ""))),
                                ("bundle fingerprint", summary["bundle_fingerprint"],
                                 _xml_clean(best.bundle.get("fingerprint", "")))):
                if x != y:
                    problems.append(f"xmp: {label} {_shown(x)} instead of {_shown(y)}")
            for mine, theirs in zip(summary["credits"], best.credits[:XMP_TOP]):
                expected = {"rank": theirs.rank, "id": _xml_clean(theirs.id), "share": theirs.share,
                            "creator": None if theirs.creator is None else _xml_clean(theirs.creator)}
                problems += [f"xmp: credit {theirs.rank} {field} {_shown(mine[field])} instead of "
                             f"{_shown(value)}" for field, value in expected.items() if mine[field] != value]
    return problems


def _carrier_report(name: str, record: dict | None) -> dict:
    if record is None:
        return {"present": False}
    report = {"present": True, **{k: v for k, v in record.items() if k != "value" and v is not None}}
    value = record["value"]
    if isinstance(value, Attribution):
        report.update(credits=len(value.credits), k=value.k, truncated=value.truncated)
    elif isinstance(value, dict):
        report.update(digital_source_type=value["digital_source_type"],
                      credits=len(value.get("credits", [])), k=value.get("k"))
    return report


def _describe_carrier(name: str, info: dict) -> str:
    if not info["present"]:
        return "not checked (pip install 'fastattr[c2pa]')" if info.get("checked") is False else "absent"
    parts = ["present"]
    if "credits" in info:
        truncated = " (truncated)" if info.get("truncated") else ""
        parts.append(f"{info['credits']} of {info['k']} credits{truncated}")
    if name in ("xmp", "c2pa") and info.get("digital_source_type"):
        parts.append("DigitalSourceType " + info["digital_source_type"].rsplit("/", 1)[-1])
    for key in ("validation_state", "path", "note", "error"):
        if info.get(key):
            parts.append(f"{key.replace('_', ' ')}: {printable(info[key])}")
    return ", ".join(parts)


def _shown(value: object) -> str:
    """A value in a disagreement message: quoted text (control characters escaped), bare numbers."""
    return repr(printable(value)) if isinstance(value, str) else repr(value)


def printable(value: object) -> str:
    """Escape newlines and terminal control sequences that captions/creators may carry."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(value))
