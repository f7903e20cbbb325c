"""The one rule for what fastattr accepts from outside: a text value, an image file. The index build
applies it to every manifest row (``index_tools.manifest``) and ``fastattr attribute`` to the prompt and
images it is given, so a hostile input is an ``InputRejected`` naming it, never a hang, a MemoryError or a
library's traceback.

Messages read ``"<source>: <what is wrong>; <what to do>"``; the manifest adds ", or remove the row".
"""

from __future__ import annotations

import io
import os
import stat

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FastattrError

__all__ = ["InputRejected", "MAX_ASPECT", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MAX_TEXT_CHARS", "as_rgb",
           "check_image_size", "check_text", "decode_image", "open_image", "read_image_bytes"]

MAX_TEXT_CHARS = 100_000  # any text value
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 64 * 2**20  # decoded pixels; checked from the header, before decoding
MAX_ASPECT = 32  # longest side / shortest side: the encoders resize the shortest side up to ~224


class InputRejected(FastattrError):
    """A text or image that cannot be used. ``reason`` is the code a rejects file records (``bad_row``,
    ``missing_image``, ``unreadable_image``, ``corrupt_image``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_text(text: str, source: str, subject: str) -> None:
    """At most ``MAX_TEXT_CHARS`` characters of UTF-8 without NUL bytes: a lone surrogate (a JSON
    ``"\\ud800"`` escape, or a byte that was not UTF-8 read with surrogateescape, as in ``sys.argv``)
    would fail later inside a tokenizer or a JSON writer."""
    if len(text) > MAX_TEXT_CHARS:
        raise InputRejected("bad_row", f"{source}: {subject} is {len(text):,} characters (at most "
                                       f"{MAX_TEXT_CHARS:,}); shorten it")
    if "\x00" in text:
        raise InputRejected("bad_row", f"{source}: {subject} contains a NUL byte; fix the value")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        what = f"the byte 0x{ord(bad) - 0xDC00:02X}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise InputRejected("bad_row", f"{source}: {subject} is not valid UTF-8 text ({what} at character "
                                       f"{exc.start}); re-encode it as UTF-8") from None


def read_image_bytes(path: str, source: str, subject: str, missing: str, offset: int = 0, size: int = -1) -> bytes:
    """At most ``MAX_IMAGE_BYTES`` of a regular file (``size`` bytes from ``offset``, else all of it).
    Opened non-blocking and checked with fstat, so a FIFO, a device (``/dev/zero``) or a folder is an
    error, never a hang. ``missing``: the message when there is no such file."""
    if "\x00" in path:
        raise InputRejected("bad_row", f"{source}: the path contains a NUL byte; fix the path")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InputRejected("unreadable_image", f"{source}: {subject} is not a regular file (a FIFO, "
                                                        f"device or folder); point at the file itself")
            f.seek(offset)
            # read(n) allocates n bytes first: sized from fstat, not the limit (64 MiB for every small image)
            data = f.read(min(info.st_size, MAX_IMAGE_BYTES) + 1 if size < 0 else min(size, MAX_IMAGE_BYTES + 1))
    except FileNotFoundError:
        raise InputRejected("missing_image", f"{source}: {missing}") from None
    except OSError as exc:
        raise InputRejected("unreadable_image", f"{source}: cannot read {subject} ({exc.strerror or exc}); "
                                                f"fix its permissions or path") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise InputRejected("unreadable_image", f"{source}: {subject} is larger than {MAX_IMAGE_BYTES >> 20} MiB; "
                                                f"shrink it")
    return data


def decode_image(data: bytes, source: str, subject: str) -> Image.Image:
    """The image fully decoded as RGB, so a truncated file fails here and not inside a batch."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_image_size(*image.size, source, subject)
            image.load()
            return as_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = "not a known image format" if isinstance(exc, UnidentifiedImageError) else exc
        raise InputRejected("corrupt_image", f"{source}: {subject} cannot be decoded ({detail}); "
                                             f"re-download or re-encode it") from None


def open_image(path: str | os.PathLike) -> Image.Image:
    """An image file given to the runtime (``fastattr attribute``), decoded under the manifest's limits."""
    path = os.fspath(path)
    return decode_image(read_image_bytes(path, path, "the image", "no such file; check the path"), path, "the image")


def check_image_size(width: int, height: int, source: str, subject: str) -> None:
    """From the header alone: a decompression bomb or a 3,000,000 x 1 strip (whose resize to the
    encoder's 224-pixel short side would need gigabytes) is an error, not a MemoryError."""
    if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise InputRejected("corrupt_image", f"{source}: {subject} is {width} x {height} pixels (at most "
                                             f"{MAX_IMAGE_PIXELS >> 20} Mpixels and an aspect ratio of "
                                             f"{MAX_ASPECT}:1); crop or resize it")


def as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB the way a viewer shows the image: EXIF orientation applied, 16- and 32-bit
    greyscale scaled down (Pillow's own ``convert`` clips them to white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() <= 65535 else values.max()
        image = Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")
