"""EXIF carrier (JPEG/WebP): the attribution JSON in UserComment, other text ComfyUI-style in IFD0.

Read and written with Pillow's ``Image.Exif``; EXIF comes from untrusted files, so a bounds walk
vets every block before Pillow parses it.
"""

from __future__ import annotations

import struct
from pathlib import Path

from PIL import ExifTags, Image, TiffTags

from ..attribution import Attribution
from ..errors import FastattrError

_EXIF_HEADER = b"Exif\x00\x00"
# ComfyUI's convention for text in WebP EXIF: "prompt:<json>" in Model, other keys from Make down.
_EXIF_PROMPT_TAG = ExifTags.Base.Model
_EXIF_TEXT_TAGS = (ExifTags.Base.Make, ExifTags.Base.ImageDescription, ExifTags.Base.DocumentName)
_OUR_JSON_PREFIX = '{"schema": "fastattr/attribution@'  # how Attribution.to_json() starts
# UserComment starts with an 8-byte character code (EXIF spec); all NULs is "undefined".
_ASCII_CODE, _JIS_CODE, _UNICODE_CODE = b"ASCII\x00\x00\x00", b"JIS\x00\x00\x00\x00\x00", b"UNICODE\x00"

# Pillow types an Exif-IFD entry it has no TagInfo for from the value, and writes bytes as BYTE; the
# EXIF spec makes these UNDEFINED, and readers such as piexif (A1111) decode UserComment only then.
# So they go into Pillow's own table (process-wide; only those it lacks).
_UNDEFINED_EXIF_TAGS = (ExifTags.Base.OECF, ExifTags.Base.ComponentsConfiguration, ExifTags.Base.MakerNote,
                        ExifTags.Base.UserComment, ExifTags.Base.SpatialFrequencyResponse,
                        ExifTags.Base.FileSource, ExifTags.Base.SceneType, ExifTags.Base.DeviceSettingDescription)
# Likewise the ASCII ones: their non-ASCII text is given back to Pillow as bytes (see _keep_text_bytes),
# which it would otherwise type as BYTE.
_ASCII_EXIF_TAGS = (ExifTags.Base.SpectralSensitivity, ExifTags.Base.DateTimeOriginal, ExifTags.Base.DateTimeDigitized,
                    ExifTags.Base.OffsetTime, ExifTags.Base.OffsetTimeOriginal, ExifTags.Base.OffsetTimeDigitized,
                    ExifTags.Base.SubsecTime, ExifTags.Base.SubsecTimeOriginal, ExifTags.Base.SubsecTimeDigitized,
                    ExifTags.Base.RelatedSoundFile, ExifTags.Base.ImageUniqueID, ExifTags.Base.CameraOwnerName,
                    ExifTags.Base.BodySerialNumber, ExifTags.Base.LensMake, ExifTags.Base.LensModel,
                    ExifTags.Base.LensSerialNumber)
_EXIF_IFD_TAG_INFO = TiffTags.TAGS_V2_GROUPS[ExifTags.IFD.Exif]
_EXIF_IFD_TAG_INFO.update({int(tag): TiffTags.TagInfo(int(tag), tag.name, TiffTags.UNDEFINED, 1)
                           for tag in _UNDEFINED_EXIF_TAGS if tag not in _EXIF_IFD_TAG_INFO})
_EXIF_IFD_TAG_INFO.update({int(tag): TiffTags.TagInfo(int(tag), tag.name, TiffTags.ASCII, 1)
                           for tag in _ASCII_EXIF_TAGS if tag not in _EXIF_IFD_TAG_INFO})


def _load_exif(raw: bytes | None, path: Path) -> Image.Exif:
    """The parsed block (IFD0 and the Exif IFD decoded now, so a bad entry fails here), or an empty one."""
    exif = Image.Exif()
    if raw and raw.startswith(_EXIF_HEADER):
        raw = raw[len(_EXIF_HEADER):]
    if not raw:
        return exif
    if raw[:4] not in (b"II*\x00", b"MM\x00*"):  # also refuses BigTIFF, which the bounds walk does not know
        raise FastattrError(f"{path}: its EXIF block is corrupt; strip it and try again")
    problem = _exif_bounds_problem(raw)
    if problem:  # checked before Pillow, whose older versions copy every claimed value, overlapping or not
        raise FastattrError(f"{path}: its EXIF block is corrupt ({problem}); strip it and try again")
    try:
        exif.load(raw)
        dict(exif)
        exif.get_ifd(ExifTags.IFD.Exif)
    except (SyntaxError, ValueError, TypeError, struct.error) as exc:
        raise FastattrError(f"{path}: its EXIF block cannot be parsed ({exc}); strip it and try again") from None
    return exif


# Bytes per value of each TIFF type Pillow reads (13: IFD, 16: LONG8); it skips the others.
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_EXIF_POINTERS = (0x8769, 0x8825, 0xA005)  # Exif, GPS and Interop sub-IFDs


def _exif_bounds_problem(raw: bytes) -> str | None:
    """Walk the TIFF IFDs without decoding values: every entry's count x type size must fit in the
    block, all of them together too (entries sharing one region would be copied once each), every
    sub-IFD pointer must be one LONG, and no IFD may be visited twice. None when the structure is sound."""
    order = "<" if raw[:2] == b"II" else ">"
    pending, seen, total = [(struct.unpack(order + "I", raw[4:8])[0], True)], set(), 0
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
            total += size if size > 4 else 0
            if total > len(raw):
                return f"entries claim {total} bytes in all"
            if tag in _EXIF_POINTERS:
                if kind not in (4, 13) or items != 1:  # else Pillow would follow another reading of it
                    return f"tag 0x{tag:04X} is not one LONG offset"
                pending.append((value, False))
        if chained and len(seen) == 1:
            pending.append((struct.unpack(order + "I", raw[end:end + 4])[0], False))
    return None


def _user_comment(exif: Image.Exif) -> str | None:
    """UserComment decoded by its character code; None when absent or blank."""
    raw = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(raw, str):  # typed ASCII by some writers: Pillow decodes those as Latin-1
        raw = raw.encode("latin-1")
    if not isinstance(raw, bytes):
        return None
    code, body = raw[:8], raw[8:]
    if code == _UNICODE_CODE:  # UTF-16 in the block's byte order, as exiv2 reads it
        text = body.decode("utf-16-le" if exif.endian == "<" else "utf-16-be", "replace")
    elif code == _JIS_CODE:
        text = body.decode("shift_jis", "replace")  # as piexif decoded it
    elif code == _ASCII_CODE:
        text = body.decode("ascii", "replace")
    else:  # undefined or unknown character code: UTF-8 is the common case
        text = body.decode("utf-8", "replace")
    return text.strip("\x00 \t\r\n") or None  # cameras fill it with NULs or spaces


def _exif_bytes(existing: bytes | None, attribution: Attribution, text: dict[str, str],
                max_json_bytes: int, limit: int | None, path: Path) -> bytes:
    """EXIF (with ``Exif\\0\\0`` header) = existing fields + text + the JSON in UserComment.

    A UserComment that is not ours (A1111 stores its ``parameters`` there) is kept, and then the
    EXIF carrier is skipped: the other carriers still hold the credits.
    """
    exif = _load_exif(existing, path)
    _keep_text_bytes(exif, path)
    free_tags = iter(_EXIF_TEXT_TAGS)
    for key, value in text.items():
        tag = _EXIF_PROMPT_TAG if key == "prompt" else next(free_tags, None)
        if tag is None:
            raise FastattrError(f"{path}: JPEG/WebP EXIF holds 'prompt' and at most "
                                f"{len(_EXIF_TEXT_TAGS)} more text entries, got {sorted(text)}; save as PNG")
        exif[tag] = f"{key}:{value}".encode()
    comment = _user_comment(exif)
    if comment and not comment.startswith(_OUR_JSON_PREFIX):
        return _dump_exif(exif, limit, path)
    exif.endian = ">"  # big-endian: piexif reads UNICODE as UTF-16BE, exiv2 in the block's order; both agree
    exif_ifd = exif.get_ifd(ExifTags.IFD.Exif)
    exif_ifd.pop(ExifTags.Base.UserComment, None)
    budget = max_json_bytes
    if limit is not None:  # room left by the other fields, less the UserComment entry and prefix
        budget = min(budget, limit - len(_dump_exif(exif, limit, path)) - 32)
    while True:  # shrink until the dump fits: UTF-16 (non-ASCII JSON) can be larger than UTF-8
        json_text = attribution.truncated_to(budget).to_json()
        if json_text.isascii():
            exif_ifd[ExifTags.Base.UserComment] = _ASCII_CODE + json_text.encode("ascii")
        else:
            exif_ifd[ExifTags.Base.UserComment] = _UNICODE_CODE + json_text.encode("utf-16-be")
        dumped = _dump_exif(exif, None, path)
        if limit is None or len(dumped) <= limit:
            return dumped
        budget -= len(dumped) - limit


def _keep_text_bytes(exif: Image.Exif, path: Path) -> None:
    """Pillow reads ASCII entries as Latin-1 and would write them as ASCII, '?' for the rest: give every
    IFD (IFD0, Exif, GPS, Interop) back the bytes the file held, UTF-8 text such as ours among them."""
    # GPS and Interop only where the block has them: get_ifd adds a missing IFD, which would be written empty
    ifds = [exif, exif.get_ifd(ExifTags.IFD.Exif)]
    try:
        if ExifTags.IFD.GPSInfo in exif:
            ifds.append(exif.get_ifd(ExifTags.IFD.GPSInfo))
        if ExifTags.IFD.Interop in ifds[1]:
            ifds.append(exif.get_ifd(ExifTags.IFD.Interop))
    except (SyntaxError, ValueError, TypeError, struct.error) as exc:
        raise FastattrError(f"{path}: its EXIF block cannot be parsed ({exc}); strip it and try again") from None
    for ifd in ifds:
        for tag, value in list(ifd.items()):
            if isinstance(value, str) and not value.isascii():
                ifd[tag] = value.encode("latin-1")


def _dump_exif(exif: Image.Exif, limit: int | None, path: Path) -> bytes:
    try:
        dumped = exif.tobytes()
    except (ValueError, TypeError, AttributeError, struct.error) as exc:  # a value its tag's type cannot hold
        raise FastattrError(f"{path}: its EXIF cannot be re-written ({exc}); strip it and try again") from None
    if limit is not None and len(dumped) > limit:
        raise FastattrError(f"{path}: its EXIF ({len(dumped)} bytes) leaves no room in the "
                            f"{limit}-byte JPEG segment; save as PNG, or strip the image's EXIF first")
    return dumped


def _exif_texts(exif: Image.Exif) -> dict[str, str]:
    """``key:value`` strings that ComfyUI-style writers put in Model/Make/... of IFD0."""
    found = {}
    for tag in (_EXIF_PROMPT_TAG, *_EXIF_TEXT_TAGS):
        value = exif.get(tag)
        if isinstance(value, str):  # Pillow decodes ASCII entries as Latin-1; ours hold UTF-8
            value = value.encode("latin-1")
        if isinstance(value, bytes):
            key, sep, rest = value.decode("utf-8", "replace").rstrip("\x00").partition(":")
            if sep and key.isidentifier():
                found[key] = rest
    return found
