"""What several carriers and both directions share: formats, opening a file, a carrier's record."""

from __future__ import annotations

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


def _open_image(path: Path) -> Image.Image:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise FastattrError(f"{path}: not a regular file")
        return Image.open(path)
    except FileNotFoundError:
        raise FastattrError(f"{path}: no such file") from None
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
