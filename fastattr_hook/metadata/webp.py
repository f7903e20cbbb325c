"""WebP container: EXIF and XMP as RIFF chunks, flagged in the extended (VP8X) header."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from PIL import Image

from ..attribution import Attribution
from ..errors import FastattrError
from .common import _chunk_limit, _too_many_chunks
from .exif import _EXIF_HEADER, _exif_bytes


def _riff_chunks(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """(fourcc, body) of each chunk; more chunks than the file's size allows are refused."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise FastattrError(f"{path}: not a WebP file")
    chunks, pos, limit = [], 12, _chunk_limit(len(data))
    while pos + 8 <= len(data):
        fourcc, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if pos + 8 + size > len(data):
            raise FastattrError(f"{path}: WebP is truncated or corrupt")
        if len(chunks) == limit:
            raise _too_many_chunks(path, "WebP", len(data))
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
