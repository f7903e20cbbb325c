"""EXIF carrier (JPEG/WebP): the attribution JSON in UserComment, other text ComfyUI-style in IFD0."""

from __future__ import annotations

import struct
from pathlib import Path

from ..attribution import Attribution
from ..errors import FastattrError

_EXIF_HEADER = b"Exif\x00\x00"
# ComfyUI's convention for text in WebP EXIF: "prompt:<json>" in Model, other keys from Make down.
_EXIF_PROMPT_TAG = 0x0110
_EXIF_TEXT_TAGS = (0x010F, 0x010E, 0x010D)
_OUR_JSON_PREFIX = '{"schema": "fastattr/attribution@'  # how Attribution.to_json() starts


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
