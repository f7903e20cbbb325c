"""What several carriers and both directions share: formats, opening a file, a carrier's record."""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

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
    except (OSError, Image.DecompressionBombError) as exc:
        raise FastattrError(f"{path}: not a readable image ({exc})") from None


def _supported_format(image: Image.Image, path: Path) -> str:
    if image.format not in _MIME:
        raise FastattrError(f"{path}: {image.format} images are not supported; "
                            "fastattr reads and writes PNG, JPEG and WebP (convert it first)")
    return image.format


def _parse_record(parse) -> dict:
    """``{"value": parse()}``, or ``{"value": None, "error": why}`` for a corrupt carrier."""
    try:
        return {"value": parse(), "error": None}
    except (FastattrError, ValueError, TypeError, KeyError, AttributeError, ET.ParseError) as exc:
        return {"value": None, "error": str(exc)}  # credits of the wrong types, damaged XML, ...
    except RecursionError:
        return {"value": None, "error": "nested too deeply"}
