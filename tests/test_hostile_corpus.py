"""A generated corpus of hostile inputs, each asserting the outcome it must get (issue 15).

Four families: manifest rows (JSONL and CSV: every column x hostile values, interleaved with good
rows in one manifest per format, so all rows take two passes), whole manifest files, image files the
rows point at, and images with damaged credit metadata given to ``read_attribution``/``inspect_image``.
Everything is generated from a fixed seed and stays small (sizes beyond ~100 KB are only claimed in
headers); each input is its own test id, so a failure names it, and the corpus size is asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tarfile
import threading
import tracemalloc
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastattr_hook.errors import FastattrError
from fastattr_hook.metadata import (format_inspection, inspect_image, printable, read_attribution, sidecar_path,
                                    write_attribution_in_place)
from fastattr_hook.metadata.xmp import _xmp_packet
from index_tools.manifest import MAX_LINE, MAX_TEXT_CHARS, ManifestValidator, Rejection, RowRejected, iter_manifest
from test_hostile_rows import png
from test_metadata import a1111_exif, make_attribution, rgb, tiff

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="the corpus holds FIFOs and /dev/zero")

SEED = 15
COLUMNS = ("id", "image", "caption", "creator", "license", "source_url", "sha256")
TOO_LONG = "x" * (MAX_TEXT_CHARS + 1)
NOT_UTF8 = "is not valid UTF-8 text"


def noise(mode: str = "RGB", size: tuple[int, int] = (16, 16)) -> Image.Image:
    """Seeded random pixels: every byte of the encoded file matters, so a cut anywhere bites."""
    channels = len(mode)
    pixels = np.random.default_rng(SEED).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def smooth(mode: str = "RGB") -> Image.Image:
    """A gradient: lossy formats keep it within a few levels, so their decoding can be checked."""
    ramp = np.arange(16, dtype=np.uint8) * 16
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(128), np.uint8(64)), axis=-1)
    return Image.fromarray(pixels[..., :3], "RGB").convert(mode) if mode != "CMYK" else Image.fromarray(pixels, "CMYK")


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(ctype: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(ctype + body) if crc is None else crc
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 1-bit pixels, with two bytes of image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00\x00"))
            + png_chunk(b"IEND", b""))


def zeros_bomb(mib: int) -> bytes:
    """A zlib stream inflating to ``mib`` MiB of zeros, made from one compressed MiB repeated (a full
    flush makes its deflate blocks independent); readers stop at their cap before its checksum."""
    deflate = zlib.compressobj(9, wbits=-15)
    block = deflate.compress(bytes(1 << 20)) + deflate.flush(zlib.Z_FULL_FLUSH)
    return b"\x78\xda" + block * mib  # the zlib header of level 9


# ---------------------------------------------------------------------------------------------
# Families 1 and 3: manifest rows and the image files they point at.
# A case is (name, row, outcome); the row is a dict (JSON), raw bytes (a JSON line) or a list of
# byte fields (CSV); the outcome is (reason, words of the message) or ("decoded", pixels, tolerance).

# What every text column refuses, in JSON: (label, value, words)
JSON_HOSTILE = [
    ("nul", "a\x00b", "contains a NUL byte"),
    ("high-surrogate", "a\ud800", f"{NOT_UTF8} (U+D800 at character 1)"),
    ("escaped-byte", "caf\udce9", f"{NOT_UTF8} (the byte 0xE9 at character 3)"),
    ("reversed-pair", "\udc00\ud800", f"{NOT_UTF8} (U+DC00 at character 0)"),
    ("overlong", TOO_LONG, "is 100,001 characters (at most 100,000)"),
    ("float", 1.5, "must be text, got float"),
    ("nan", float("nan"), "must be text, got float"),
    ("bool", False, "must be text, got bool"),
    ("object", {"text": "x"}, "must be text, got dict"),
    ("nested-list", [["x"]], "must be text, got list"),
]
# The same in CSV, as raw bytes: (label, bytes, words)
CSV_HOSTILE = [
    ("nul", b"a\x00b", "contains a NUL byte"),
    ("latin-1", b"caf\xe9", f"{NOT_UTF8} (the byte 0xE9 at character 3)"),
    ("byte-ff", b"\xff", f"{NOT_UTF8} (the byte 0xFF at character 0)"),
    ("cesu-surrogate", b"x\xed\xa0\x80", f"{NOT_UTF8} (the byte 0xED at character 1)"),
    ("overlong-utf8", b"\xc0\xaf", f"{NOT_UTF8} (the byte 0xC0 at character 0)"),
    ("overlong", TOO_LONG.encode(), "is 100,001 characters (at most 100,000)"),
]
# Image paths that are no image file, relative to the manifest's folder: (label, path, reason, words)
PATHS = [
    ("directory", "folder.png", "unreadable_image", "cannot read image"),
    ("fifo", "fifo.png", "unreadable_image", "is not a regular file"),
    ("dev-zero", "/dev/zero", "unreadable_image", "is not a regular file"),
    ("missing", "nope.png", "missing_image", "image not found at"),
    ("text-file", "notes.png", "corrupt_image", "not a known image format"),
    ("empty-file", "empty.png", "corrupt_image", "not a known image format"),
    ("dev-null", "/dev/null", "unreadable_image", "is not a regular file"),
    ("link-to-dev-zero", "zero-link.png", "unreadable_image", "is not a regular file"),
    ("dangling-link", "dangling.png", "missing_image", "image not found at"),
    ("link-loop", "loop.png", "unreadable_image", "Too many levels of symbolic links"),
    ("through-a-file", "good.png/x.png", "unreadable_image", "Not a directory"),
    ("name-too-long", "n" * 300 + ".png", "unreadable_image", "File name too long"),
    ("the-folder-itself", ".", "unreadable_image", "cannot read image"),
]


def labelled(column: str, words: str) -> str:
    """Messages about a value name its column first: "'creator' contains a NUL byte"."""
    return f"'{column}' {words}" if words.startswith(("is ", "contains", "must")) else words


def good_row(n: int) -> dict:
    return {"id": f"good-{n}", "image": "good.png", "caption": f"a red square ({n})", "creator": "Ana"}


def bad_row(name: str, **fields) -> dict:
    """A row that is good but for ``fields``; a field given as ``...`` is left out."""
    row = {"id": name, "image": "good.png", "caption": f"a red square ({name})"} | fields
    return {key: value for key, value in row.items() if value is not ...}


def image_cases() -> list[tuple[str, bytes, tuple]]:
    """Image files: cut at many offsets, lying headers, and legitimate formats a scraper meets."""
    source, pixels = noise(), np.asarray(noise())
    png_bytes, jpeg_bytes = encoded(source, "PNG"), encoded(source, "JPEG", quality=95)
    webp_bytes = encoded(source, "WEBP", lossless=True)
    cut = ("corrupt_image", "cannot be decoded")
    cases = [(f"cut-at-{end}.{fmt}", data[:end], cut)
             for data, fmt, offsets in ((png_bytes, "png", (1, 4, 8, 16, 33, 41, 100, 400, -40)),
                                        (jpeg_bytes, "jpg", (1, 2, 3, 20, 100, 300, 600, -200, -2, -1)),
                                        (webp_bytes, "webp", (1, 12, 20, 30, -20, -1)))
             for end in [offset % len(data) for offset in offsets]]
    # cut after the last image data (in its checksum or the end chunk): every pixel is there
    cases += [(f"cut-at-{len(png_bytes) + offset}.png", png_bytes[:offset], ("decoded", pixels, 0))
              for offset in (-13, -12, -4, -1)]
    grey16 = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257
    palette = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "P")
    palette.putpalette([v for n in range(256) for v in (n, 255 - n, n // 2)])
    cases += [
        ("wrong-magic.png", b"\x89PNX" + png_bytes[4:], ("corrupt_image", "not a known image format")),
        ("html-page.jpg", b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
         ("corrupt_image", "not a known image format")),
        ("claims-100000x100000.png", png_claiming(100_000, 100_000), ("corrupt_image", "exceeds limit")),
        ("claims-9000x9000.png", png_claiming(9000, 9000), ("corrupt_image", "Mpixels")),
        ("claims-100000x1.png", png_claiming(100_000, 1), ("corrupt_image", "aspect ratio")),
        ("claims-0x0.png", png_claiming(0, 0), ("corrupt_image", "cannot be decoded")),
        ("bad-header-crc.png", png_bytes[:29] + bytes(4) + png_bytes[33:], ("corrupt_image", "cannot be decoded")),
        ("bad-image-data.png", png_bytes[:41] + bytes(64) + png_bytes[105:], ("corrupt_image", "cannot be decoded")),
        ("png-named-jpg.jpg", png_bytes, ("decoded", pixels, 0)),
        ("grey-16-bit.png", encoded(Image.fromarray(grey16), "PNG"),
         ("decoded", np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2), 0)),
        ("palette-transparency.png", encoded(palette, "PNG", transparency=0),
         ("decoded", np.asarray(palette.convert("RGB")), 0)),
        ("rgba.png", encoded(noise("RGBA"), "PNG"), ("decoded", np.asarray(noise("RGBA"))[..., :3], 0)),
        ("ztxt-bomb.png", png_bytes[:33] + png_chunk(b"zTXt", b"comment\x00\x00" + zeros_bomb(2))
         + png_bytes[33:], ("corrupt_image", "Decompressed data too large")),
        ("cmyk.jpg", encoded(smooth("CMYK"), "JPEG", quality=95),
         ("decoded", np.asarray(smooth("CMYK").convert("RGB")), 8)),
        ("progressive.jpg", encoded(smooth(), "JPEG", quality=95, progressive=True, subsampling=0),
         ("decoded", np.asarray(smooth()), 8)),
        ("grey.jpg", encoded(smooth("L"), "JPEG", quality=95), ("decoded", np.asarray(smooth("L").convert("RGB")), 8)),
        ("lossless.webp", webp_bytes, ("decoded", pixels, 0)),
        ("palette.gif", encoded(palette, "GIF"), ("decoded", np.asarray(palette.convert("RGB")), 0)),
        ("picture.bmp", encoded(source, "BMP"), ("decoded", pixels, 0)),
    ]
    return cases


def jsonl_row_cases() -> list[tuple[str, dict | bytes, tuple]]:
    """Every column x every hostile value, column-specific cases, paths, images and raw lines."""
    cases = [(f"{column}-{label}", bad_row(f"{column}-{label}", **{column: value}),
              ("bad_row", labelled(column, words)))
             for column in COLUMNS for label, value, words in JSON_HOSTILE]
    cases += [
        ("id-absent", bad_row("id-absent", id=...), ("bad_row", "missing 'id'")),
        ("id-empty", bad_row("id-empty", id=""), ("bad_row", "missing 'id'")),
        ("id-blank", bad_row("id-blank", id=" \t "), ("bad_row", "missing 'id'")),
        ("image-absent", bad_row("image-absent", image=...), ("bad_row", "missing 'image'")),
        ("image-empty", bad_row("image-empty", image=""), ("bad_row", "missing 'image'")),
        ("caption-absent", bad_row("caption-absent", caption=...), ("bad_row", "missing 'caption'")),
        ("caption-empty", bad_row("caption-empty", caption=""), ("empty_caption", "caption is empty")),
        ("caption-blank", bad_row("caption-blank", caption="\t\n "), ("empty_caption", "caption is empty")),
        ("caption-null", bad_row("caption-null", caption=None), ("empty_caption", "caption is empty")),
        ("caption-empty-list", bad_row("caption-empty-list", caption=[]), ("empty_caption", "caption is empty")),
        ("caption-blank-list", bad_row("caption-blank-list", caption=["", " "]), ("empty_caption", "caption is empty")),
        ("caption-list-with-object", bad_row("caption-list-with-object", caption=["x", {}]),
         ("bad_row", "'caption' must be text, got dict")),
        ("sha256-short", bad_row("sha256-short", sha256="a" * 63), ("bad_row", "is not 64 hex digits")),
        ("sha256-long", bad_row("sha256-long", sha256="a" * 65), ("bad_row", "is not 64 hex digits")),
        ("sha256-not-hex", bad_row("sha256-not-hex", sha256="g" * 64), ("bad_row", "is not 64 hex digits")),
        ("sha256-prefixed", bad_row("sha256-prefixed", sha256="0x" + "a" * 62), ("bad_row", "is not 64 hex digits")),
        ("sha256-mismatch", bad_row("sha256-mismatch", sha256="0" * 64), ("sha256_mismatch", "but the manifest says")),
        ("duplicate-id", bad_row("good-0"), ("duplicate_id", "id 'good-0' is already used at row 1")),
        ("duplicate-padded-id", bad_row(" good-1\t"), ("duplicate_id", "id 'good-1' is already used at row 3")),
    ]
    cases += [(f"image-{label}", bad_row(f"image-{label}", image=path), (reason, words))
              for label, path, reason, words in PATHS]
    missing = next(n for n, case in enumerate(cases) if case[0] == "image-missing")  # on line 2n + 2
    cases.append(("duplicate-of-a-rejected-row", bad_row("image-missing"),  # a failed image keeps its id claimed
                  ("duplicate_id", f"id 'image-missing' is already used at row {2 * missing + 2}")))
    cases += [(f"image-{name}", bad_row(f"image-{name}", image=name), outcome) for name, _, outcome in IMAGES]
    deep = b'{"id": "deep", "image": "good.png", "caption": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases += [  # raw lines: what only a JSON line can carry
        ("line-not-json", b"id=1 image=good.png", ("bad_row", "not valid JSON (Expecting value")),
        ("line-cut-short", b'{"id": "cut", "image": "good.p', ("bad_row", "not valid JSON (Invalid control character")),
        ("line-list", b'["cut", "good.png", "x"]', ("bad_row", "expected a JSON object, got list")),
        ("line-string", b'"good.png"', ("bad_row", "expected a JSON object, got str")),
        ("line-number", b"12", ("bad_row", "expected a JSON object, got int")),
        ("line-null", b"null", ("bad_row", "expected a JSON object, got NoneType")),
        ("line-deep", deep, ("bad_row", "not valid JSON (nested too deeply)")),
        ("line-huge-int", b'{"id": ' + b"9" * 5000 + b', "image": "good.png", "caption": "x"}',
         ("bad_row", "not valid JSON (Exceeds the limit (4300 digits)")),
        ("line-trailing-garbage", b'{"id": "tail", "image": "good.png", "caption": "x"} !',
         ("bad_row", "not valid JSON (Extra data")),
        ("line-two-objects", b'{"id": "a"} {"id": "b"}', ("bad_row", "not valid JSON (Extra data")),
        ("line-not-utf8", b'{"id": "caf\xe9", "image": "good.png", "caption": "x"}',
         ("bad_row", "not valid JSON ('utf-8' codec can't decode byte 0xe9")),
        ("line-raw-control", b'{"id": "tab\there", "image": "good.png", "caption": "x"}',
         ("bad_row", "not valid JSON (Invalid control character")),
        ("line-nul-bytes", b"\x00" * 8, ("bad_row", "not valid JSON")),
    ]
    return cases


def csv_row_cases() -> list[tuple[str, list[bytes], tuple]]:
    """Every column x every hostile byte string, empty required columns, field counts, paths."""
    def row(name: str, **fields: bytes) -> list[bytes]:
        values = {"id": name.encode(), "image": b"good.png", "caption": b"a red square"} | fields
        return [values.get(column, b"") for column in COLUMNS]

    cases = [(f"{column}-{label}", row(f"{column}-{label}", **{column: value}), ("bad_row", labelled(column, words)))
             for column in COLUMNS for label, value, words in CSV_HOSTILE]
    cases += [
        ("id-empty", row("", id=b""), ("bad_row", "missing 'id'")),
        ("image-empty", row("image-empty", image=b""), ("bad_row", "missing 'image'")),
        ("caption-empty", row("caption-empty", caption=b""), ("empty_caption", "caption is empty")),
        ("caption-blank", row("caption-blank", caption=b"   "), ("empty_caption", "caption is empty")),
        ("sha256-not-hex", row("sha256-not-hex", sha256=b"xyz"), ("bad_row", "is not 64 hex digits")),
        ("sha256-mismatch", row("sha256-mismatch", sha256=b"f" * 64), ("sha256_mismatch", "but the manifest says")),
        ("duplicate-id", row("good-0"), ("duplicate_id", "id 'good-0' is already used at row 2")),
        ("extra-field", row("extra-field") + [b"surplus"], ("bad_row", "8 fields but the header has 7")),
        ("missing-fields", row("missing-fields")[:3], ("bad_row", "3 fields but the header has 7")),
        ("one-field", [b"lonely"], ("bad_row", "1 fields but the header has 7")),
    ]
    cases += [(f"image-{label}", row(f"image-{label}", image=path.encode()), (reason, words))
              for label, path, reason, words in PATHS[:6]]  # the others read files as in JSONL
    return cases


def csv_line(values: list[bytes]) -> bytes:
    quoted = (b'"' + v.replace(b'"', b'""') + b'"' if any(c in v for c in b'",\r\n') else v for v in values)
    return b",".join(quoted) + b"\n"


def write_row_manifests(folder: Path) -> tuple[Path, Path]:
    """One JSONL and one CSV manifest: a good row before every hostile one, and one at the end.
    Hostile JSONL case ``n`` is on line ``2n + 2``, hostile CSV case ``n`` on line ``2n + 3``."""
    lines = []
    for n, (_, row, _) in enumerate(JSONL_ROWS):
        lines += [json.dumps(good_row(n)).encode(), row if isinstance(row, bytes) else json.dumps(row).encode()]
    lines.append(json.dumps(good_row(len(JSONL_ROWS))).encode())
    jsonl = folder / "rows.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    lines = [csv_line([column.encode() for column in COLUMNS])]
    for n, (_, row, _) in enumerate(CSV_ROWS):
        lines += [csv_line([str(good_row(n).get(c, "")).encode() for c in COLUMNS]), csv_line(row)]
    lines.append(csv_line([str(good_row(len(CSV_ROWS)).get(c, "")).encode() for c in COLUMNS]))
    csv = folder / "rows.csv"
    csv.write_bytes(b"".join(lines))
    return jsonl, csv


def make_image_files(folder: Path) -> None:
    """The files that PATHS and IMAGES name: a FIFO, links, a folder, small images."""
    (folder / "good.png").write_bytes(png())
    (folder / "folder.png").mkdir()
    os.mkfifo(folder / "fifo.png")
    os.symlink("/dev/zero", folder / "zero-link.png")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    os.symlink(folder / "loop.png", folder / "loop.png")
    (folder / "notes.png").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    for name, data, _ in IMAGES:
        (folder / name).write_bytes(data)


def validate(manifest: Path) -> tuple[dict[int, dict], dict[int, np.ndarray]]:
    """What ``validate_manifest`` does, keeping the decoded pixels: (rejects file records by row,
    decoded pixels by row)."""
    rejects = manifest.with_name(manifest.stem + "-rejects.jsonl")
    decoded = {}
    with ManifestValidator(rejects) as validator:
        for item in iter_manifest(manifest):
            row = validator.check(item)
            if row is not None:
                try:
                    decoded[row.row] = np.asarray(row.load_image())
                except RowRejected as exc:
                    validator.reject(row, exc)
    records = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    by_row = {record["row"]: record for record in records}
    assert len(by_row) == len(records)  # no row recorded twice
    return by_row, decoded


# ---------------------------------------------------------------------------------------------
# Family 2: whole manifest files. (file name, bytes or a function making the file, outcome): outcome
# is ("error", words of the FastattrError) or the rows as "ok" / the reason of each Rejection.

def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf()


def parquet(columns: dict[str, list]):
    def make(path: Path) -> None:
        pyarrow = pytest.importorskip("pyarrow")
        pytest.importorskip("pyarrow.parquet").write_table(pyarrow.table(columns), path)
    return make


GOOD_LINES = b"".join(json.dumps(good_row(n)).encode() + b"\n" for n in range(3))
GOOD_CSV = b"id,image,caption\n" + b"".join(b"good-%d,good.png,a red square\n" % n for n in range(3))
SHARD = tar_bytes([("a.png", png()), ("a.txt", b"a red square"), ("b.png", png()), ("b.txt", b"a blue ring")])
CLAIMS_4_GIB = SHARD[:2048] + tar_header("b.png", 4 << 30) + png()  # sample a, then a member cut 4 GiB short
GARBAGE = b"\xff" + np.random.default_rng(SEED).integers(0, 256, 2047, dtype=np.uint8).tobytes()


def long_line_between(head: bytes, tail: bytes):
    """``head``, a line of 2 x MAX_LINE NUL bytes (a hole in a sparse file), then ``tail``."""
    def make(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(head)
            f.seek(2 * MAX_LINE, os.SEEK_CUR)
            f.write(b"\n" + tail)
    return make


def garbage_lines(data: bytes) -> list[str]:
    return ["bad_row"] * sum(1 for line in data.split(b"\n") if line.strip())


FILES = [
    ("empty.jsonl", b"", []),
    ("blank-lines.jsonl", b"\n  \n\t\n", []),
    ("garbage.jsonl", GARBAGE, garbage_lines(GARBAGE)),
    ("json-array.jsonl", b'[{"id": "a", "image": "good.png", "caption": "x"}]\n', ("error", "is a JSON array")),
    ("json-array-indented.json", b'[\n  {"id": "a"}\n]\n', ("error", "is a JSON array")),
    ("pretty-printed.jsonl", json.dumps(good_row(0), indent=1).encode(), ["bad_row"] * 6),
    ("utf-16.jsonl", GOOD_LINES.decode().encode("utf-16"), ("error", "is UTF-16 or UTF-32 text, not UTF-8")),
    ("utf-8-bom.jsonl", b"\xef\xbb\xbf" + GOOD_LINES, ["ok"] * 3),
    ("cr-line-ends.jsonl", GOOD_LINES.replace(b"\n", b"\r"), ["bad_row"]),
    ("cut-mid-row.jsonl", GOOD_LINES[:-20], ["ok", "ok", "bad_row"]),
    ("line-over-8-mib.jsonl", long_line_between(GOOD_LINES, GOOD_LINES), ["ok"] * 3 + ["bad_row"] + ["ok"] * 3),
    ("empty.csv", b"", ("error", "lacks required column(s) id, image, caption")),
    ("header-only.csv", b"id,image,caption\n", []),
    ("header-without-newline.csv", b"id,image,caption", []),
    ("capitalised-header.csv", b"ID,Image,Caption\na,good.png,x\n", ("error", "lacks required column(s)")),
    ("semicolons.csv", b"id;image;caption\na;good.png;x\n", ("error", "lacks required column(s)")),
    ("no-header.csv", GOOD_CSV.split(b"\n", 1)[1], ("error", "lacks required column(s)")),
    ("garbage.csv", GARBAGE, ("error", "cannot read the CSV header")),
    ("utf-16.csv", GOOD_CSV.decode().encode("utf-16"), ("error", "cannot read the CSV header")),
    ("latin-1-row.csv", GOOD_CSV + b"cafe,good.png,caf\xe9\n", ["ok", "ok", "ok", "bad_row"]),
    ("cr-line-ends.csv", GOOD_CSV.replace(b"\n", b"\r"), ("error", "lines end with CR alone")),
    ("cut-mid-row.csv", GOOD_CSV[:-20], ["ok", "ok", "bad_row"]),
    ("cut-in-a-quote.csv", GOOD_CSV + b'open,good.png,"a caption cut sh', ["ok", "ok", "ok", "bad_row"]),
    ("cut-in-a-quote-over-lines.csv", GOOD_CSV + b'open,good.png,"a caption\nnext,good.png,cut sh\n',
     ["ok", "ok", "ok", "bad_row", "ok"]),  # the quote's row, then the line it took, read again as a row
    ("quoted-lines-at-the-end.csv", GOOD_CSV + b'last,good.png,"two\nlines"', ["ok"] * 4),
    ("unclosed-quote-in-header.csv", b'id,image,"caption\n' + GOOD_CSV.split(b"\n", 1)[1],
     ("error", "a quote in the header row is not closed")),
    ("line-over-8-mib.csv", long_line_between(GOOD_CSV, GOOD_CSV.split(b"\n", 1)[1]),
     ["ok"] * 3 + ["bad_row"] + ["ok"] * 3),
    ("nul-in-header.csv", b"id,image,caption\x00\na,good.png,x\n", ("error", "lacks required column(s) caption")),
    ("missing.jsonl", None, ("error", "manifest not found")),
    ("manifest.txt", GOOD_LINES, ("error", "unknown manifest type '.txt'")),
    ("fifo.jsonl", os.mkfifo, ("error", "not a regular file")),
    ("dev-zero-link.jsonl", lambda path: os.symlink("/dev/zero", path), ("error", "not a regular file")),
    ("folder.jsonl", Path.mkdir, ("error", "folder has no *.tar shards")),
    ("garbage.tar", GARBAGE, ["corrupt_shard"]),
    ("empty.tar", b"", ["corrupt_shard"]),
    ("cut-mid-member.tar", SHARD[:1200], ["bad_row", "corrupt_shard"]),  # sample a lost its caption
    ("no-end-marker.tar", SHARD[:4 * 1024], ["ok", "ok", "corrupt_shard"]),  # 4 members of one 512-byte block each
    ("member-claims-4-gib.tar", CLAIMS_4_GIB, ["ok", "corrupt_shard"]),
    ("sample-without-image.tar", tar_bytes([("a.txt", b"a red square")]), ["missing_image"]),
    ("caption-not-utf8.tar", tar_bytes([("a.png", png()), ("a.txt", b"caf\xe9")]), ["bad_row"]),
    ("metadata-not-json.tar", tar_bytes([("a.png", png()), ("a.txt", b"x"), ("a.json", b"{id")]), ["bad_row"]),
    ("metadata-a-list.tar", tar_bytes([("a.png", png()), ("a.txt", b"x"), ("a.json", b"[1]")]), ["bad_row"]),
    ("garbage.parquet", GARBAGE, ("error", "not a readable Parquet file")),
    ("no-caption-column.parquet", parquet({"id": ["a"], "image": ["good.png"]}),
     ("error", "missing required column(s) caption")),
    ("wrong-types.parquet", parquet({"id": [[1, 2]], "image": ["good.png"], "caption": [{"text": "x"}]}),
     ["bad_row"]),
]


# ---------------------------------------------------------------------------------------------
# Family 4: images whose credit metadata is damaged. (file name, bytes, sidecar bytes or None, outcome):
# ("refused", words of the FastattrError), ("problem", carrier, words of the carrier's error) or
# ("read", the carriers found, all readable and agreeing).

CREDITS = make_attribution()
JSON_TEXT = CREDITS.to_json().encode()
XMP = _xmp_packet(CREDITS)
PLAIN_PNG = encoded(rgb(), "PNG")  # signature + IHDR (33 bytes), IDAT, IEND (12 bytes)


def png_with(before_idat: Sequence[bytes] = (), after_idat: Sequence[bytes] = ()) -> bytes:
    """A small valid PNG with extra chunks before and after its image data (the IDAT chunk)."""
    return PLAIN_PNG[:33] + b"".join(before_idat) + PLAIN_PNG[33:-12] + b"".join(after_idat) + PLAIN_PNG[-12:]


def itxt(key: bytes, text: bytes, compressed: bool = False, crc: int | None = None) -> bytes:
    """An iTXt chunk: keyword NUL, compression flag, method, language NUL, translated keyword NUL, text."""
    body = key + b"\x00" + (b"\x01\x00" if compressed else b"\x00\x00") + b"\x00\x00"
    return png_chunk(b"iTXt", body + (zlib.compress(text) if compressed else text), crc)


def ours(text: bytes, compressed: bool = False) -> bytes:
    """A PNG carrying ``text`` where our JSON goes."""
    return png_with([itxt(b"fastattr", text, compressed)])


def credits_json(**changes) -> bytes:
    """Our JSON with top-level or first-credit fields changed (``credit_*`` names a credit field;
    ``...`` leaves a field out)."""
    data = CREDITS.to_dict()
    for name, value in changes.items():
        fields, key = (data["credits"][0], name.removeprefix("credit_")) if name.startswith("credit_") else (data, name)
        if value is ...:
            del fields[key]
        else:
            fields[key] = value
    return json.dumps(data).encode()


def comment_exif(text: bytes, code: bytes = b"ASCII\x00\x00\x00") -> bytes:
    return a1111_exif(code + text)


def with_xmp(packet: bytes) -> bytes:
    """A PNG carrying ``packet`` where XMP goes."""
    return png_with([itxt(b"XML:com.adobe.xmp", packet)])


DTD_XMP = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">]>'
           b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&a;</x:xmpmeta>')
LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "lol">'
          + b"".join(b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">' % ((c,) + (c - 1,) * 10)
                     for c in range(ord("b"), ord("k")))
          + b']><x:xmpmeta xmlns:x="adobe:ns:meta/">&j;</x:xmpmeta>')


def metadata_cases() -> list[tuple[str, bytes, bytes | None, tuple]]:
    """Our JSON cut or of the wrong shape (in PNG, EXIF and the sidecar), damaged text chunks, XML
    bombs in XMP, and EXIF blocks whose structure lies (JPEG and WebP)."""
    cases = [(f"png-json-cut-at-{n}.png", ours(JSON_TEXT[:n]), None, ("problem", "png", "JSON does not parse"))
             for n in (0, 1, 40, len(JSON_TEXT) // 2, len(JSON_TEXT) - 1)]
    cases += [(f"exif-json-cut-at-{n}.jpg", encoded(rgb(), "JPEG", exif=comment_exif(JSON_TEXT[:n])), None,
               ("problem", "exif", "JSON does not parse")) for n in (40, len(JSON_TEXT) // 2, len(JSON_TEXT) - 1)]
    wrong = [  # our JSON, parsed, with the wrong shape or types: (label, JSON, words)
        ("deep", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("a-list", b"[1, 2]", "not a fastattr/attribution@1 document (schema: 'list')"),
        ("null", b"null", "not a fastattr/attribution@1 document (schema: 'NoneType')"),
        ("other-schema", credits_json(schema="fastattr/attribution@9"), "(schema: 'fastattr/attribution@9')"),
        ("no-prompt", credits_json(prompt=...), "malformed fastattr/attribution@1 document: 'prompt'"),
        ("credits-an-object", credits_json(credits={"a": 1}), "malformed fastattr/attribution@1 document"),
        ("credits-null", credits_json(credits=None), "malformed fastattr/attribution@1 document"),
        ("credit-unknown-field", credits_json(credit_colour="red"), "unexpected keyword argument 'colour'"),
        ("share-text", credits_json(credit_share="12%"), "credit 1 share is '12%', not a finite number"),
        ("share-huge-int", credits_json(credit_share=10**400), "credit 1 share is 1000000"),
        ("share-infinite", credits_json(credit_share=1e999), "credit 1 share is inf, not a finite number"),
        ("score-nan", credits_json(credit_score=float("nan")), "credit 1 score is nan, not a finite number"),
        ("rank-text", credits_json(credit_rank="first"), "credit 1 rank is 'first', not an integer"),
        ("rank-true", credits_json(credit_rank=True), "credit 1 rank is True, not an integer"),
        ("id-number", credits_json(credit_id=17), "credit 1 id is 17, not text"),
        ("creator-number", credits_json(credit_creator=3), "credit 1 creator is 3, not text or null"),
        ("prompt-list", credits_json(prompt=["a", "cat"]), "prompt is ['a', 'cat'], not text"),
        ("encoder-a-list", credits_json(encoder=["tiny"]), "encoder is ['tiny'], not an object"),
        ("total-text", credits_json(truncated=True, credits_total="9"),
         "credits_total is '9', not an integer or null"),
        ("huge-number", JSON_TEXT.replace(b'"k": 5', b'"k": ' + b"9" * 5000), "Exceeds the limit (4300 digits)"),
        ("not-utf8", JSON_TEXT.replace(b"a cat", b"a c\xe9t"), "can't decode byte 0xe9"),
    ]
    cases += [(f"png-json-{label}.png", ours(data), None, ("problem", "png", words)) for label, data, words in wrong]
    cases += [(f"sidecar-{label}.png", PLAIN_PNG, data, ("problem", "sidecar", words)) for label, data, words in wrong]
    bomb = zeros_bomb(65)  # beyond the 64 MiB that one text chunk may inflate to
    cases += [
        ("sidecar-empty.png", PLAIN_PNG, b"", ("problem", "sidecar", "JSON does not parse")),
        ("sidecar-utf-16.png", PLAIN_PNG, JSON_TEXT.decode().encode("utf-16"), ("read", ["sidecar"])),
        ("png-json-compressed.png", ours(JSON_TEXT, compressed=True), None, ("read", ["png"])),
        ("png-json-in-ztxt.png", png_with([png_chunk(b"zTXt", b"fastattr\x00\x00" + zlib.compress(JSON_TEXT))]),
         None, ("read", ["png"])),
        ("png-json-compressed-garbage.png", png_with([png_chunk(b"iTXt", b"fastattr\x00\x01\x00\x00\x00garbage")]),
         None, ("problem", "png", "damaged iTXt chunk (Error -3 while decompressing data")),
        ("png-itxt-only-a-keyword.png", png_with([png_chunk(b"iTXt", b"fastattr")]), None,
         ("problem", "png", "damaged iTXt chunk (index out of range)")),
        ("png-xmp-not-utf8.png", with_xmp(XMP.replace(b"<fastattr:k>", b"\xff<fastattr:k>")), None,
         ("problem", "xmp", "damaged iTXt chunk ('utf-8' codec can't decode byte 0xff")),
        ("png-ztxt-bomb-after-idat.png", png_with(after_idat=[png_chunk(b"zTXt", b"fastattr\x00\x00" + bomb)]), None,
         ("problem", "png", "damaged zTXt chunk (text chunk inflates beyond 67108864 bytes)")),
        # Pillow reads the chunks before the image data when opening: a bad one makes the file unreadable
        ("png-ztxt-bomb-before-idat.png", png_with([png_chunk(b"zTXt", b"comment\x00\x00" + zeros_bomb(2))]), None,
         ("refused", "not a readable image (Decompressed data too large")),
        ("png-bad-crc-before-idat.png", png_with([itxt(b"fastattr", JSON_TEXT, crc=0)]), None,
         ("refused", "not a readable image")),
        ("png-compressed-cut-before-idat.png", png_with([itxt(b"fastattr", JSON_TEXT, True)[:-60] + bytes(4)]), None,
         ("refused", "not a readable image")),
        # after the image data only our reader looks (Pillow does not check CRCs there): it does
        ("png-bad-crc-after-idat.png", png_with(after_idat=[itxt(b"fastattr", JSON_TEXT, crc=0)]), None,
         ("problem", "png", "damaged iTXt chunk (its CRC does not match")),
        ("png-xmp-bad-crc-after-idat.png", png_with(after_idat=[itxt(b"XML:com.adobe.xmp", XMP, crc=0)]), None,
         ("problem", "xmp", "damaged iTXt chunk (its CRC does not match")),
        ("png-chunk-claims-2-gib.png", png_with(after_idat=[struct.pack(">I4s", 0x7FFFFFFF, b"tEXt")]), None,
         ("refused", "PNG is truncated or corrupt (no IEND chunk)")),
        ("png-no-iend.png", ours(JSON_TEXT)[:-12], None, ("refused", "PNG is truncated or corrupt (no IEND chunk)")),
        ("png-xmp-dtd.png", with_xmp(DTD_XMP), None, ("problem", "xmp", "XMP with a DTD or entities is refused")),
        ("png-xmp-laughs.png", with_xmp(LAUGHS), None, ("problem", "xmp", "XMP with a DTD or entities is refused")),
        ("png-xmp-not-xml.png", with_xmp(b"<x:xmpmeta <<"), None,
         ("problem", "xmp", "not well-formed (invalid token)")),
        ("png-xmp-k-not-a-number.png", with_xmp(XMP.replace(b">5</fastattr:k>", b">five</fastattr:k>")), None,
         ("problem", "xmp", "invalid literal for int() with base 10: 'five'")),
        ("png-xmp-credit-without-rank.png", with_xmp(XMP.replace(b"<fastattr:rank>1</fastattr:rank>", b"")), None,
         ("problem", "xmp", "int() argument must be")),
        ("png-xmp-deep.png", with_xmp(b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b"<a>" * 20_000 + b"</a>" * 20_000
                                      + b"</x:xmpmeta>"), None, ("read", [])),  # nothing of ours in it
        ("jpeg-xmp-dtd.jpg", encoded(rgb(), "JPEG", xmp=DTD_XMP), None,
         ("problem", "xmp", "XMP with a DTD or entities is refused")),
        ("jpeg-xmp-utf-16-laughs.jpg", encoded(rgb(), "JPEG", xmp=LAUGHS.decode().encode("utf-16")), None,
         ("problem", "xmp", "XMP with a DTD or entities is refused")),
        ("webp-xmp-utf-16-be-dtd.webp", encoded(rgb(), "WEBP", xmp=DTD_XMP.decode().encode("utf-16-be")), None,
         ("problem", "xmp", "XMP with a DTD or entities is refused")),
        ("exif-json-deep.jpg", encoded(rgb(), "JPEG", exif=comment_exif(JSON_TEXT[:-1] + b', "x": ' + b"[" * 30_000)),
         None, ("problem", "exif", "nested too deeply")),
        ("exif-json-utf-16-cut.jpg", encoded(rgb(), "JPEG", exif=comment_exif(
            JSON_TEXT.decode().encode("utf-16-be")[:-1], b"UNICODE\x00")), None,
         ("problem", "exif", "JSON does not parse")),
    ]
    bad_exif = [  # EXIF blocks whose structure lies: (label, block, words)
        ("ifd-beyond-block", b"Exif\x00\x00II*\x00" + struct.pack("<I", 4096),
         "IFD at 4096 beyond the block's 8 bytes"),
        ("too-many-entries", b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 0xFFFF), "IFD at 8 claims 65535 entries"),
        ("entry-claims-4-gib", tiff([(0x010F, 4, 0x40000000, 26)]), "tag 0x010F claims 4294967296 bytes"),
        ("ifd-loop", tiff([(0x8769, 4, 1, 8)]), "IFD loop"),
        ("pointer-not-long", tiff([(0x8769, 3, 1, 0x20000)]), "tag 0x8769 is not one LONG offset"),
        ("big-tiff", b"Exif\x00\x00II+\x00\x08\x00\x00\x00" + bytes(16), "its EXIF block is corrupt; strip it"),
        ("not-tiff", b"Exif\x00\x00garbage!", "its EXIF block is corrupt; strip it"),
        ("cut-mid-ifd", tiff([(0x010F, 2, 20, 26)], tail=b"Canon" * 4)[:20], "IFD at 8 claims 1 entries"),
    ]
    cases += [(f"exif-{label}.{ext}", encoded(rgb(), fmt, exif=block), None, ("refused", words))
              for label, block, words in bad_exif for fmt, ext in (("JPEG", "jpg"), ("WEBP", "webp"))]
    return cases


IMAGES = image_cases()
JSONL_ROWS = jsonl_row_cases()
CSV_ROWS = csv_row_cases()
METADATA = metadata_cases()


def test_the_corpus_holds_at_least_200_distinct_inputs():
    """The corpus cannot silently shrink: each family keeps its size, and every name is unique."""
    sizes = {"rows": len(JSONL_ROWS) - len(IMAGES) + len(CSV_ROWS), "files": len(FILES), "images": len(IMAGES),
             "metadata": len(METADATA)}
    floors = {"rows": 174, "files": 40, "images": 48, "metadata": 91}
    assert all(sizes[family] >= floor for family, floor in floors.items()), sizes
    assert sum(sizes.values()) >= 200
    for cases in (JSONL_ROWS, CSV_ROWS, FILES, METADATA):
        assert len({case[0] for case in cases}) == len(cases)


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> dict[str, tuple[Path, dict[int, dict], dict[int, np.ndarray]]]:
    """Both row manifests, each validated in one pass: {format: (manifest, rejects, decoded pixels)}."""
    folder = tmp_path_factory.mktemp("rows")
    make_image_files(folder)
    jsonl, csv = write_row_manifests(folder)
    return {"jsonl": (jsonl, *validate(jsonl)), "csv": (csv, *validate(csv))}


def check_row(manifest: Path, records: dict[int, dict], decoded: dict[int, np.ndarray], line: int,
              outcome: tuple) -> None:
    if outcome[0] == "decoded":
        _, pixels, tolerance = outcome
        assert line not in records, records.get(line)
        assert decoded[line].shape == pixels.shape
        assert np.abs(decoded[line].astype(int) - pixels).max() <= tolerance
        return
    reason, words = outcome
    assert line in records, f"{manifest.name}:{line} was accepted"
    message = records[line]["message"]
    assert records[line]["reason"] == reason, message
    assert message.startswith(f"{manifest.name}:{line}: ") and words in message, message


@pytest.mark.parametrize("n", range(len(JSONL_ROWS)), ids=[c[0] for c in JSONL_ROWS])
def test_hostile_jsonl_row(n, validated):
    check_row(*validated["jsonl"], 2 * n + 2, JSONL_ROWS[n][2])


@pytest.mark.parametrize("n", range(len(CSV_ROWS)), ids=[c[0] for c in CSV_ROWS])
def test_hostile_csv_row(n, validated):
    check_row(*validated["csv"], 2 * n + 3, CSV_ROWS[n][2])


@pytest.mark.parametrize("fmt, cases, first", [("jsonl", JSONL_ROWS, 1), ("csv", CSV_ROWS, 2)], ids=["jsonl", "csv"])
def test_the_good_rows_between_hostile_ones_are_all_accepted(fmt, cases, first, validated):
    """And nothing else is rejected: the rejects file holds exactly the hostile rows, once each."""
    _, records, decoded = validated[fmt]
    good = [first + 2 * n for n in range(len(cases) + 1)]
    assert all(decoded[line].shape == (8, 8, 3) for line in good)
    assert set(records) == {first + 1 + 2 * n for n, (_, _, outcome) in enumerate(cases) if outcome[0] != "decoded"}


@contextlib.contextmanager
def writers_coming_and_going(fifo: Path) -> Iterator[None]:
    """Should a reader block on ``fifo``, a writer that opens and closes it every second ends each
    wait (with end of file): a regression fails instead of hanging the suite."""
    stop = threading.Event()

    def visit() -> None:
        while not stop.wait(1):
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=visit, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("name, content, outcome", FILES, ids=[c[0] for c in FILES])
def test_hostile_manifest_file(name, content, outcome, tmp_path):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        content(path)
    with writers_coming_and_going(path) if name == "fifo.jsonl" else contextlib.nullcontext():
        if isinstance(outcome, list):
            items = list(iter_manifest(path))
            assert [item.reason if isinstance(item, Rejection) else "ok" for item in items] == outcome
            assert all(item.message.startswith(name) for item in items if isinstance(item, Rejection))
        else:
            with pytest.raises(FastattrError) as error:
                list(iter_manifest(path))
            assert str(error.value).startswith(f"{path}: ") and outcome[1] in str(error.value), str(error.value)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning", "ignore:Tag data larger than file:UserWarning")
@pytest.mark.parametrize("name, data, sidecar, outcome", METADATA, ids=[c[0] for c in METADATA])
def test_damaged_credit_metadata(name, data, sidecar, outcome, tmp_path):
    """Refused with a FastattrError naming the file, or reported as that carrier's problem (the
    report and its text naming the file); never another exception."""
    path = tmp_path / name
    path.write_bytes(data)
    if sidecar is not None:
        sidecar_path(path).write_bytes(sidecar)
    if outcome[0] == "refused":
        for read in (read_attribution, inspect_image):
            with pytest.raises(FastattrError) as error:
                read(path)
            assert str(error.value).startswith(f"{path}: ") and outcome[1] in str(error.value), str(error.value)
        return
    found, report = read_attribution(path), inspect_image(path)
    text = format_inspection(report)
    assert report["path"] == str(path) and text.startswith(printable(path))
    if outcome[0] == "problem":
        _, carrier, words = outcome
        assert found[carrier] is None  # present, but unreadable
        assert any(problem.startswith(f"{carrier}: ") and words in problem for problem in report["disagreements"]), \
            report["disagreements"]
        assert "carriers agree: NO" in text
    else:
        assert sorted(found) == outcome[1] and None not in found.values()
        assert report["agree"] is True


# ----------------------------------------------------------------------------- reading stays bounded
# Files whose reading would cost time or memory out of proportion: refused, or their carrier
# reported, by name and limit; inspect goes on with the next file of a batch.

def many_bombs() -> bytes:
    """Three text chunks each inflating past the 64 MiB cap: each alone is a damaged chunk, but the
    cap holds in total, so the second is not inflated (each cost the whole cap: 100 of them, 38 s)."""
    return png_with(after_idat=[png_chunk(b"zTXt", b"k%d\x00\x00" % n + zeros_bomb(65)) for n in range(3)])


def many_png_chunks(before_idat: bool) -> bytes:
    """20,000 empty chunks in 240 KB: Pillow walks those before the image data one by one, c2pa all of
    them (2 million: 80 s together)."""
    chunks = [png_chunk(b"abCd", b"")] * 20_000
    return png_with(chunks) if before_idat else png_with(after_idat=chunks)


def many_webp_chunks() -> bytes:
    body = encoded(rgb(), "WEBP")[12:] + b"abcd\x00\x00\x00\x00" * 20_000
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


BOUNDED = [
    ("bombs.png", many_bombs, "text chunks inflate beyond 67108864 bytes in total"),
    ("chunks-before-idat.png", lambda: many_png_chunks(True), "more than 10,000 PNG chunks in 240,"),
    ("chunks-after-idat.png", lambda: many_png_chunks(False), "more than 10,000 PNG chunks in 240,"),
    ("chunks.webp", many_webp_chunks, "more than 10,000 WebP chunks in 160,"),
]


@pytest.mark.parametrize("name, make, words", BOUNDED, ids=[case[0] for case in BOUNDED])
def test_files_that_would_take_unbounded_time_are_refused_by_name(name, make, words, tmp_path):
    path = tmp_path / name
    path.write_bytes(make())
    for call in (inspect_image, lambda p: write_attribution_in_place(p, make_attribution())):
        with pytest.raises(FastattrError, match=rf"^{path}: {words}"):
            call(path)


def test_an_image_file_past_the_size_cap_is_refused_unread(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(PLAIN_PNG)
    os.truncate(path, (256 << 20) + 1)  # a sparse file: no disk used
    message = rf"^{path}: 268,435,457 bytes, more than the 268,435,456 bytes fastattr reads from an image"
    for call in (inspect_image, lambda p: write_attribution_in_place(p, make_attribution())):
        with pytest.raises(FastattrError, match=message):
            call(path)


def test_a_sidecar_past_its_size_cap_is_reported_unread(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(ours(JSON_TEXT))
    side = sidecar_path(path)
    side.touch()
    os.truncate(side, 1 << 30)  # 1 GiB sparse: read whole, it cost 1.3 GB
    tracemalloc.start()
    try:
        report = inspect_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, peak
    assert report["disagreements"] == [f"sidecar: {side}: 1,073,741,824 bytes, more than the 16,777,216 bytes "
                                       "fastattr reads from a sidecar; it was not read"]
    assert report["attribution"] == CREDITS.to_dict()  # the other carriers are still read


def test_a_batch_goes_on_past_every_refused_file(tmp_path, capsys):
    from fastattr_cli import main

    files = []
    for name, make, _ in BOUNDED:
        files.append(tmp_path / name)
        files[-1].write_bytes(make())
    good = tmp_path / "good.png"
    good.write_bytes(ours(JSON_TEXT))
    assert main(["inspect", *map(str, files), str(good)]) == 1
    out = capsys.readouterr().out
    for path, (_, _, words) in zip(files, BOUNDED):
        assert f"{path}: {words}" in out
    assert out.count("carriers agree: yes") == 1 and f"{good} (PNG)" in out
