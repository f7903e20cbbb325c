"""JPEG container: EXIF and XMP as APP1 segments after JFIF; the scan data is kept byte for byte."""

from __future__ import annotations

import struct
from pathlib import Path

from ..attribution import Attribution
from ..errors import FastattrError
from .exif import _EXIF_HEADER, _exif_bytes

_JPEG_SEGMENT_MAX = 65533  # bytes after the 2-byte length field of one JPEG APPn segment
_JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_JPEG_XMP_EXTENSION_HEADER = b"http://ns.adobe.com/xmp/extension/\x00"


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
