"""What several carriers and both directions share: formats, reading and opening a file within
bounds, a carrier's record."""

from __future__ import annotations

import io
import math
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from ..attribution import Attribution
from ..errors import FastattrError

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

# Reading metadata stays bounded in time and memory whatever a file holds: image files are read
# whole (and c2pa walks every PNG/WebP chunk, ~35 us each), so their size and chunk count are capped.
_MAX_IMAGE_BYTES = 256 << 20
_MAX_CHUNKS = 10_000      # chunks any PNG/WebP may have; larger files one more per _BYTES_PER_CHUNK
_BYTES_PER_CHUNK = 4096   # (encoders write image data in chunks of 8 KiB or more)


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    """The whole of ``path`` when it is a regular file of at most ``limit`` bytes: a FIFO would block,
    and a huge (or sparse) file would cost its size in memory before anything could look at it."""
    try:  # opened non-blocking and checked with fstat: no window in which the path becomes a FIFO
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise FastattrError(f"{path}: not a regular file")
            if info.st_size > limit:
                raise FastattrError(f"{path}: {info.st_size:,} bytes, more than the {limit:,} bytes fastattr "
                                    f"reads {what}; it was not read")
            data = f.read(info.st_size + 1)  # not read(limit): that allocates the limit up front
    except FileNotFoundError:
        raise FastattrError(f"{path}: no such file") from None
    except OSError as exc:
        raise FastattrError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(data) != info.st_size:
        raise FastattrError(f"{path}: changed while it was read; read it again once it is written")
    return data


def _read_image(path: Path) -> bytes:
    return _read_capped(path, _MAX_IMAGE_BYTES, "from an image")


def _chunk_limit(size: int) -> int:
    return max(_MAX_CHUNKS, size // _BYTES_PER_CHUNK)


def _too_many_chunks(path: Path, kind: str, size: int) -> FastattrError:
    return FastattrError(f"{path}: more than {_chunk_limit(size):,} {kind} chunks in {size:,} bytes; fastattr "
                         f"reads at most {_MAX_CHUNKS:,} chunks, or one per {_BYTES_PER_CHUNK:,} bytes in larger "
                         "files (each costs C2PA validation time); re-save the image to merge them")


def _open_image(path: Path, data: bytes) -> Image.Image:
    """``data``, the bytes of ``path`` (the very bytes every carrier is then read from)."""
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # ValueError: a zTXt bomb before the pixels
        raise FastattrError(f"{path}: not a readable image ({exc})") from None


def _supported_format(image: Image.Image, path: Path) -> str:
    if image.format not in _MIME:
        raise FastattrError(f"{path}: {image.format} images are not supported; "
                            "fastattr reads and writes PNG, JPEG and WebP (convert it first)")
    return image.format


def _parse_record(parse) -> dict:
    """``{"value": parse()}``, or ``{"value": None, "error": why}`` for a corrupt carrier."""
    try:
        value = parse()
        if isinstance(value, Attribution):
            _check_types(value)
        return {"value": value, "error": None}
    except (FastattrError, ValueError, TypeError, KeyError, AttributeError, ET.ParseError) as exc:
        return {"value": None, "error": str(exc)}  # credits of the wrong types, damaged XML, ...
    except RecursionError:
        return {"value": None, "error": "nested too deeply"}


_NULL = type(None)
# The types the schema declares: (Python types, what the error calls them)
_ATTRIBUTION_TYPES = {"prompt": ((str,), "text"), "created": ((str,), "text"), "encoder": ((dict,), "an object"),
                      "bundle": ((dict,), "an object"), "share_rule": ((dict,), "an object"),
                      "timing_ms": ((dict,), "an object"), "credits_total": ((int, _NULL), "an integer or null")}
_CREDIT_TYPES = {"rank": ((int,), "an integer"), "key": ((int,), "an integer"), "id": ((str,), "text"),
                 "score": ((int, float), "a finite number"), "share": ((int, float), "a finite number"),
                 "caption": ((str,), "text"), "creator": ((str, _NULL), "text or null"),
                 "license": ((str, _NULL), "text or null"), "source_url": ((str, _NULL), "text or null")}


def _check_types(attribution: Attribution) -> None:
    """JSON from a file can hold anything: a share given as text, or as an integer beyond any float,
    would break the creator sums and the report later, so each field must have its declared type."""
    fields = [(name, getattr(attribution, name), kind) for name, kind in _ATTRIBUTION_TYPES.items()]
    fields += [(f"credit {n} {name}", getattr(credit, name), kind)
               for n, credit in enumerate(attribution.credits, 1) for name, kind in _CREDIT_TYPES.items()]
    for name, value, (types, what) in fields:
        if _wrong_type(value, types):
            raise FastattrError(f"{name} is {value!r:.80}, not {what}")


def _wrong_type(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) or not isinstance(value, types):  # JSON's true/false are no numbers
        return True
    try:
        return isinstance(value, (int, float)) and not math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return True
