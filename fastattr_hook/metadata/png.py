"""PNG carrier: the attribution JSON, the XMP packet and other text as chunks before the image data."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import FastattrError
from .common import _chunk_limit, _too_many_chunks

PNG_KEY = "fastattr"
XMP_KEY = "XML:com.adobe.xmp"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_MAX_TEXT_BYTES = 64 << 20  # cap on the text a file's chunks may inflate to, one chunk or all (decompression bombs)


class _BeyondCap(zlib.error):
    """A text chunk inflates past what is left of ``_MAX_TEXT_BYTES``."""


def _png_spans(data: bytes, path: Path) -> Iterator[tuple[bytes, int, int]]:
    """(type, start, end) of each whole chunk up to IEND, stopping where one is cut; more chunks than
    the file's size allows are refused."""
    limit, pos, count = _chunk_limit(len(data)), len(_PNG_SIGNATURE), 0
    while pos + 12 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return
        count += 1
        if count > limit:
            raise _too_many_chunks(path, "PNG", len(data))
        yield ctype, pos, end
        if ctype == b"IEND":
            return
        pos = end


def _check_png_chunks(data: bytes, path: Path) -> None:
    """Refuse absurd chunk counts before Pillow walks the chunks one by one (2 million take 30 s)."""
    for _ in _png_spans(data, path):
        pass


def _png_chunks(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """(type, raw chunk bytes incl. length and CRC) up to IEND; raw bytes are re-used untouched."""
    if not data.startswith(_PNG_SIGNATURE):
        raise FastattrError(f"{path}: not a PNG file")
    chunks = [(ctype, data[start:end]) for ctype, start, end in _png_spans(data, path)]
    if not chunks or chunks[-1][0] != b"IEND":
        raise FastattrError(f"{path}: PNG is truncated or corrupt (no IEND chunk)")
    return chunks


def _crc_ok(raw: bytes) -> bool:
    return zlib.crc32(raw[4:-4]) == struct.unpack(">I", raw[-4:])[0]


def _png_text(data: bytes, path: Path, damaged: dict[str, str] | None = None) -> dict[str, str]:
    """Every tEXt/zTXt/iTXt chunk, read without decoding pixels (so damaged image data is fine).
    A chunk that fails its CRC or whose text cannot be decoded is skipped; ``damaged`` gets its
    keyword and why. The text read, and the output of inflations that failed, count toward one cap:
    else each chunk inflating past it would cost the whole cap again (100 of them: 38 s)."""
    text, spent = {}, 0
    for ctype, raw in _png_chunks(data, path):
        if ctype not in _PNG_TEXT_CHUNKS:
            continue
        if spent >= _MAX_TEXT_BYTES:
            raise _text_beyond_cap(path)
        key, _, body = raw[8:-4].partition(b"\x00")
        left = _MAX_TEXT_BYTES - spent
        try:
            if not _crc_ok(raw):
                raise ValueError("its CRC does not match: the file was damaged or edited byte by byte")
            value = _chunk_text(ctype, body, left)
        except (zlib.error, UnicodeDecodeError, IndexError, ValueError) as exc:
            if isinstance(exc, _BeyondCap):
                if left < _MAX_TEXT_BYTES:  # past what the chunks before it left over
                    raise _text_beyond_cap(path) from None
                spent = _MAX_TEXT_BYTES
            if damaged is not None:
                damaged[key.decode("latin-1")] = f"damaged {ctype.decode()} chunk ({exc})"
            continue
        text[key.decode("latin-1")] = value
        spent += len(value)
    return text


def _text_beyond_cap(path: Path) -> FastattrError:
    return FastattrError(f"{path}: text chunks inflate beyond {_MAX_TEXT_BYTES} bytes in total, the most fastattr "
                         "inflates in one file; strip them to read or write its credits")


def _chunk_text(ctype: bytes, body: bytes, limit: int) -> str:
    """The text of one chunk (``body``: after the keyword), inflating at most ``limit`` bytes."""
    if ctype == b"tEXt":
        return body.decode("latin-1")
    if ctype == b"zTXt":
        return _inflate(body[1:], limit).decode("latin-1")
    # iTXt: compression flag, method, language NUL, translated keyword NUL, text
    _, _, rest = body[2:].partition(b"\x00")
    _, _, rest = rest.partition(b"\x00")
    return (_inflate(rest, limit) if body[0] else rest).decode("utf-8")


def _inflate(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, limit)
    if inflater.unconsumed_tail:
        raise _BeyondCap(f"text chunk inflates beyond {limit} bytes")
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
        if not _crc_ok(raw):  # copied as it is, it would carry the damage into the credited file
            raise FastattrError(f"{path}: its PNG {ctype.decode('latin-1')!r} chunk fails its CRC (the file is "
                                "damaged); re-save the image, then write the credits")
        kept.append((ctype, raw))
    first_idat = next((i for i, (ctype, _) in enumerate(kept) if ctype == b"IDAT"), None)
    if first_idat is None:
        raise FastattrError(f"{path}: PNG has no image data (IDAT chunk)")
    new = [_png_itxt(PNG_KEY, json_text), _png_itxt(XMP_KEY, xmp.decode()),
           *(_png_text_chunk(key, value) for key, value in text.items())]
    return (_PNG_SIGNATURE + b"".join(raw for _, raw in kept[:first_idat]) + b"".join(new)
            + b"".join(raw for _, raw in kept[first_idat:]))
