"""Training manifests: stream rows out of JSONL, CSV, Parquet or webdataset ``.tar`` shards.

The index build reads millions of rows, so everything here is a generator: no manifest and no
image is held in memory beyond the row at hand. A bad row never stops a build; it becomes a
``Rejection`` (structural problems, found while reading) or a ``RowRejected`` (image problems,
found by ``ManifestRow.load_image``), and ``ManifestValidator`` records it in a JSONL rejects file.
Only a manifest that cannot be read at all raises ``FastattrError``.

Columns: ``id`` (unique), ``image`` (path, relative to the manifest's folder or absolute) and
``caption`` are required; ``creator``, ``license``, ``source_url`` and ``sha256`` (hex digest of
the image file bytes) are optional; other columns are ignored. In JSONL, Parquet and shard metadata
``caption`` may be a list (MSCOCO has 5 per image): the first is the one the index embeds, the
teacher uses them all. Webdataset/img2dataset shards group members by key (``00001.jpg`` +
``00001.txt`` caption + ``00001.json`` metadata).

Rejection reasons: ``bad_row``, ``empty_caption``, ``duplicate_id``, ``missing_image``,
``unreadable_image``, ``corrupt_image``, ``sha256_mismatch`` and ``corrupt_shard`` (a tar shard
that cannot be read further; its remaining samples are skipped).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, TextIO

from PIL import Image
from tqdm import tqdm

from fastattr_hook.errors import FastattrError
from fastattr_hook.files import sha256_file
from fastattr_hook.inputs import (MAX_IMAGE_BYTES, MAX_TEXT_CHARS, InputRejected, check_text, decode_image,
                                  read_image_bytes)
from fastattr_hook.items import FIELDS, Item

__all__ = [
    "ImageRef",
    "ManifestRow",
    "ManifestValidator",
    "Rejection",
    "RowRejected",
    "iter_manifest",
    "manifest_fingerprint",
    "validate_manifest",
]

REQUIRED_COLUMNS = ("id", "image", "caption")
OPTIONAL_COLUMNS = ("creator", "license", "source_url", "sha256")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PARQUET_BATCH_ROWS = 4096
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".tar": "tar"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Read limits: one hostile row must never exhaust memory or hang a build (each is a rejected row). Text
# values and images follow ``fastattr_hook.inputs``, the rule ``fastattr attribute`` applies to its inputs too.
# One JSONL line (bytes) or CSV line (characters), read in pieces of this size: a multi-GB line is never
# held whole. Room for several captions of MAX_TEXT_CHARS even \u-escaped (6 bytes a character). A shard's
# .json metadata member is held to it as well.
MAX_LINE = 8 * 2**20
MAX_TEXT_BYTES = 4 * MAX_TEXT_CHARS  # a shard's .txt caption member: UTF-8 takes at most 4 bytes a character
_TEXT_MEMBER_BYTES = {"txt": MAX_TEXT_BYTES, "json": MAX_LINE}  # what a shard's text members are read up to


class RowRejected(Exception):
    """One row cannot be used. ``reason`` is a short code for the rejects file; the message
    names the file and row and says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Rejection:
    """A row turned away; this is exactly one record of the rejects file."""

    row: int
    source: str
    id: str | None
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where an item's image bytes live: a file, or a member of a tar shard at a byte span (one
    seek, not a tar scan). Stored whole as text in a bundle's items store (see ``__str__``)."""

    path: str  # a file, or the shard holding ``member``
    member: str | None = None
    span: tuple[int, int] | None = None  # (offset, size) of the member's bytes in the shard

    def __str__(self) -> str:
        """``path``, or ``shard.tar::member@offset:size``."""
        if self.member is None:
            return self.path
        return f"{self.path}::{self.member}" + (f"@{self.span[0]}:{self.span[1]}" if self.span else "")

    @classmethod
    def parse(cls, text: str, base: str | Path | None = None) -> ImageRef:
        """The inverse of ``str``; a relative path is resolved against ``base`` (e.g. the bundle)."""
        path, sep, rest = text.partition("::")
        if base is not None and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(base, path))
        if not sep:
            return cls(path)
        member, at, span = rest.rpartition("@")
        if at and re.fullmatch(r"\d+:\d+", span):
            offset, size = span.split(":")
            return cls(path, member, (int(offset), int(size)))
        return cls(path, rest)  # bundles written before spans were stored

    def relative_to(self, base: str | Path) -> ImageRef:
        return ImageRef(os.path.relpath(self.path, base), self.member, self.span)

    def read(self, source: str) -> bytes:
        """The image's bytes; every failure is a ``RowRejected`` naming ``source``."""
        if self.member is None:
            return _read_file(self.path, source, "image", "relative paths are resolved against the manifest's "
                                                          "folder; fix the path")
        if self.span is None:
            return self._scan(source)
        offset, size = self.span
        data = _read_file(self.path, source, "tar shard", "it moved after the manifest was read; restore it or "
                                                          "rebuild", offset=offset, size=size)
        if len(data) != size:
            raise RowRejected("corrupt_image", f"{source}: member {self.member} is cut short in {self.path} "
                                               f"(truncated shard); re-download or re-create the shard")
        return data

    def _scan(self, source: str) -> bytes:
        _read_file(self.path, source, "tar shard", "restore it or rebuild", size=0)  # the same checks first
        try:
            with tarfile.open(self.path, "r:") as tar:
                member = tar.getmember(self.member)
                if member.size > MAX_IMAGE_BYTES:
                    raise RowRejected("unreadable_image", f"{source}: member {self.member} of {self.path} is larger "
                                                          f"than {MAX_IMAGE_BYTES >> 20} MiB")
                return tar.extractfile(member).read()
        except (KeyError, tarfile.TarError, OSError) as exc:
            raise RowRejected("missing_image", f"{source}: member {self.member} not readable in {self.path} "
                                               f"({exc}); restore the shard or rebuild") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestRow(Item):
    """One training item as a manifest lists it: the ``Item`` fields, its image as an ``ImageRef``,
    and where the row is. Cheap to hold: the image is only read by ``load_image``."""

    row: int  # 1-based: line number (JSONL/CSV), row index (Parquet), sample index (tar shards)
    source: str  # "train.jsonl:12", "shard-0003.tar:000123"
    image: ImageRef  # absolute
    more_captions: tuple[str, ...] = ()  # the captions after the first, where the manifest lists several

    def item(self) -> Item:
        """The record a bundle stores for this row: the ``Item`` fields, the image reference as text."""
        values = {name: getattr(self, name) for name in FIELDS}
        return Item(**values | {"image": str(self.image)})

    @property
    def captions(self) -> tuple[str, ...]:
        """Every caption of the item, ``caption`` first."""
        return (self.caption, *self.more_captions)

    def load_image(self) -> Image.Image:
        """The image fully decoded as RGB under the limits of ``fastattr_hook.inputs``, so truncated
        files and bombs fail here and not inside a batch."""
        data = self.image.read(self.source)
        if self.sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != self.sha256:
                raise RowRejected(
                    "sha256_mismatch",
                    f"{self.source}: image {self.image} has sha256 {actual} but the manifest "
                    f"says {self.sha256}; the image changed after the manifest was written: "
                    f"restore the image or fix the sha256, or remove the row",
                )
        try:
            return decode_image(data, self.source, f"image {self.image}")
        except InputRejected as exc:
            raise _row_error(exc) from None


def _row_error(exc: InputRejected) -> RowRejected:
    """The shared input rule's verdict on a row: its message, plus the row's own way out."""
    return RowRejected(exc.reason, f"{exc}, or remove the row")


def _read_file(path: str, source: str, what: str, fix: str, offset: int = 0, size: int = -1) -> bytes:
    """``read_image_bytes`` for a row: a FIFO, a device, a folder or a file over ``MAX_IMAGE_BYTES`` is a
    rejected row, never a hang."""
    try:
        return read_image_bytes(path, source, f"{what} {path}", f"{what} not found at {path}; {fix}", offset, size)
    except InputRejected as exc:
        raise _row_error(exc) from None


# ---------------------------------------------------------------------------------------------
# Reading manifests


def iter_manifest(path: str | Path) -> Iterator[ManifestRow | Rejection]:
    """Rows in manifest order, streamed; structurally bad rows come out as ``Rejection``.

    The checks that make a manifest unreadable (missing file, unknown type, CSV header, Parquet
    schema) run now, before the first row, so a build fails fast instead of mid-stream.
    """
    kind, files = _manifest_files(path)
    if kind == "jsonl":
        _check_jsonl(files[0])
        return _iter_jsonl(files[0])
    if kind == "csv":
        return _iter_csv(files[0], _csv_header(files[0]))
    if kind == "parquet":
        return _iter_parquet(files[0], _parquet_columns(files[0]))
    return _iter_tar(files)


def _manifest_files(path: str | Path) -> tuple[str, list[Path]]:
    """The format and the absolute file(s) behind a manifest path (file, shard folder or glob)."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FastattrError(
                f"{path}: folder has no *.tar shards; point at a .jsonl/.csv/.parquet manifest "
                f"or a folder of webdataset .tar shards"
            )
        return "tar", _regular_files(shards)
    if not path.exists():
        if any(ch in str(path) for ch in "*?["):
            shards = sorted(Path(p) for p in glob.glob(str(path)) if p.endswith(".tar"))
            if not shards:
                raise FastattrError(f"{path}: no .tar shards match this pattern; check the glob")
            return "tar", _regular_files(shards)
        raise FastattrError(f"{path}: manifest not found; check the path")
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise FastattrError(
            f"{path}: unknown manifest type '{path.suffix}'; use .jsonl/.json (JSON lines), "
            f".csv, .parquet, a .tar shard or a folder of .tar shards"
        )
    return kind, _regular_files([path])


def _regular_files(files: list[Path]) -> list[Path]:
    """Refuse a FIFO (reading it would block the build) or a device such as /dev/zero (never ends)."""
    for file in files:
        if not file.is_file():
            raise FastattrError(f"{file}: not a regular file; point at a manifest file or a folder of .tar shards")
    return files


def _check_jsonl(path: Path) -> None:
    try:
        with open(path, "rb") as f:  # the start of the first non-blank line is enough, read in small pieces
            first = next((piece for piece in iter(lambda: f.readline(4096), b"") if piece.strip()), b"")
    except OSError as exc:
        raise FastattrError(f"{path}: cannot read manifest ({exc.strerror or exc})") from None
    if first.startswith((b"\xff\xfe", b"\xfe\xff")):  # its lines would split inside characters
        raise FastattrError(f"{path}: this is UTF-16 or UTF-32 text, not UTF-8; re-save it as UTF-8")
    head = first.strip().removeprefix(b"\xef\xbb\xbf").lstrip()
    if head == b"[" or head.startswith(b"[{"):  # json.dump of a list, indented or on one line
        raise FastattrError(
            f"{path}: this is a JSON array, not JSON lines; write one JSON object per line"
        )


def _iter_jsonl(path: Path) -> Iterator[ManifestRow | Rejection]:
    with open(path, "rb") as f:
        number = 0
        while line := f.readline(MAX_LINE + 1):
            number += 1
            source = f"{path.name}:{number}"
            if len(line) > MAX_LINE:
                size = len(line) + _skip_rest_of_line(f, line)
                yield Rejection(number, source, None, "bad_row",
                                f"{source}: the line is {size:,} bytes (at most {MAX_LINE:,}); shorten its "
                                f"values or remove the row")
                continue
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except (ValueError, RecursionError) as exc:
                detail = "nested too deeply" if isinstance(exc, RecursionError) else exc
                yield Rejection(number, source, None, "bad_row",
                                f"{source}: not valid JSON ({detail}); fix the line or remove it")
                continue
            if not isinstance(fields, dict):
                yield Rejection(number, source, None, "bad_row",
                                f"{source}: expected a JSON object, got {type(fields).__name__}; "
                                f"fix the line or remove it")
                continue
            yield _file_row(fields, number, source, path.parent)


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:  # only the first line: a bad byte further down is that row's problem
            first = f.readline(MAX_TEXT_CHARS)
        if b"\r" in first.rstrip(b"\r\n"):  # CR alone ends no line for Python: the file would be one row
            raise FastattrError(f"{path}: lines end with CR alone (classic Mac); save it with LF or CRLF line ends")
        lines = _Lines(io.StringIO(first.decode("utf-8-sig")))
        header = next(csv.reader(lines), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FastattrError(f"{path}: cannot read the CSV header ({exc}); save it as UTF-8 CSV") from None
    if header and lines.ended:  # left open, the quote would make the whole file one header record
        raise FastattrError(f"{path}: a quote in the header row is not closed; close it (the first line "
                            f"must name the columns, e.g. id,image,caption)")
    header = [name.strip() for name in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise FastattrError(
            f"{path}: the header row lacks required column(s) {', '.join(missing)} "
            f"(first line: {', '.join(header)[:200]!r}); the first line must name the columns, "
            f"e.g. id,image,caption"
        )
    return header


def _skip_rest_of_line(f: BinaryIO | TextIO, start: bytes | str) -> int:
    """Read past the rest of an over-long line (``start`` is its first piece) in 64 KiB pieces, so
    that it is never held whole; the number of bytes or characters skipped."""
    skipped, piece = 0, start
    while piece and not piece.endswith(("\n", "\r") if isinstance(piece, str) else b"\n"):
        piece = f.readline(2**16)
        skipped += len(piece)
    return skipped


class _LineTooLong(Exception):
    """A CSV line over ``MAX_LINE`` characters, already skipped; raised through the CSV reader."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _Lines:
    """A file's lines with push-back, so that the CSV reader can parse lines again (an over-long line
    is pushed back as its ``_LineTooLong``, raised again). ``taken``: the lines of the record being read.
    ``ended``: the reader asked for a line past the end of the file; if it still returns a record, a
    quote was left open."""

    def __init__(self, file: TextIO) -> None:
        self.file, self.taken, self.ended = file, [], False
        self.pushed: deque[str | _LineTooLong] = deque()

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pushed:
            line = self.pushed.popleft()
            if isinstance(line, _LineTooLong):
                raise line
        else:
            line = self.file.readline(MAX_LINE + 1)
            if not line:
                self.ended = True
                raise StopIteration
            if len(line) > MAX_LINE:
                raise _LineTooLong(len(line) + _skip_rest_of_line(self.file, line))
        self.taken.append(line)
        return line


def _swallowed_rows(values: list[str], width: int) -> bool:
    """A quoted field whose later lines parse as whole records: an unclosed quote took them."""
    return any(len(next(csv.reader([line]), [])) == width for v in values for line in v.splitlines()[1:])


def _closes_mid_field(lines: list[str]) -> bool:
    """A quote that closes where no field ends (an open quote closed by a later row's ``"quoted"``
    field): strict CSV refuses the record that the lenient reader took as one row."""
    try:
        list(csv.reader(lines, strict=True))
    except csv.Error:
        return True
    return False


def _open_quote(values: list[str] | None, error: csv.Error | None, lines: _Lines, width: int) -> str | None:
    """How far a quote left open ran (for the message), or None. A record over several lines is kept
    only when it reads as one good record; else its quote took lines that are rows of their own."""
    span = len(lines.taken)
    if lines.ended:
        return "to the end of the file"
    if span < 2:
        return None
    ran = f"over {span - 1:,} more lines"
    if error is not None:  # e.g. "field larger than field limit (131072)": 128 KiB of swallowed lines
        return f"{ran}: {error}"
    if _swallowed_rows(values, width):
        return ran
    if len(values) != width:
        return f"{ran}, leaving {len(values)} fields where the header has {width}"
    return f"{ran}, closing where no field ends" if _closes_mid_field(lines.taken) else None


def _iter_csv(path: Path, header: list[str]) -> Iterator[ManifestRow | Rejection]:
    """Every line ends up in an accepted or a rejected row: a record that cannot be one row rejects
    only its first line, and its other lines are read again as rows of their own."""
    # Bytes that are not UTF-8 decode to lone surrogates, rejected with their row by ``check_text``.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        lines = _Lines(f)
        reader = csv.reader(lines)
        next(reader)  # the header, checked by _csv_header
        number = 2  # first line of the next record (records may span lines)
        while True:
            source = f"{path.name}:{number}"
            lines.taken, lines.ended = [], False
            values, error = None, None
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                error = exc
            except _LineTooLong as exc:
                yield _long_line(exc, lines, number, source)
                number += 1
                continue
            ran = _open_quote(values, error, lines, len(header))
            if ran is not None:
                lines.pushed.extendleft(reversed(lines.taken[1:]))  # read those lines again as their own rows
                yield Rejection(number, source, None, "bad_row",
                                f"{source}: a quote opened here is not closed (the field ran {ran}); "
                                f"close the quote or remove the row")
                number += 1
                continue
            span = max(1, len(lines.taken))
            number += span
            if error is not None:
                yield Rejection(number - span, source, None, "bad_row",
                                f"{source}: not valid CSV ({error}); fix the quoting or remove the row")
            elif values and len(values) != len(header):
                yield Rejection(number - span, source, None, "bad_row",
                                f"{source}: {len(values)} fields but the header has {len(header)}; "
                                f"quote fields that contain commas, or remove the row")
            elif values:  # not a blank line
                yield _file_row(dict(zip(header, values)), number - span, source, path.parent)


def _long_line(exc: _LineTooLong, lines: _Lines, number: int, source: str) -> Rejection:
    """The rejection for line ``number``, when it or a later line of its record is over ``MAX_LINE``
    (already skipped). In the later case the lines in between, then the long line, are read again."""
    if not lines.taken:
        return Rejection(number, source, None, "bad_row", f"{source}: the line is {exc.size:,} characters (at most "
                                                          f"{MAX_LINE:,}); shorten its values or remove the row")
    lines.pushed.extendleft(reversed([*lines.taken[1:], exc]))
    return Rejection(number, source, None, "bad_row",
                     f"{source}: a quote opened here is still open at line {number + len(lines.taken)}, which is "
                     f"{exc.size:,} characters (at most {MAX_LINE:,}); close the quote or remove the row")


def _parquet_file(path: Path) -> Any:
    """Open with pyarrow, imported only here because it is an optional extra."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise FastattrError(
            f"{path}: reading Parquet manifests needs pyarrow; run: pip install 'fastattr[parquet]'"
        ) from None
    try:
        return pyarrow.parquet.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as exc:
        raise FastattrError(f"{path}: not a readable Parquet file ({exc}); re-export it") from None


def _parquet_columns(path: Path) -> list[str]:
    """The manifest columns present, so only they are read (a table may also carry pixels)."""
    with _parquet_file(path) as parquet:
        names = parquet.schema_arrow.names
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise FastattrError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(names)[:200]}); add them or rename the columns"
        )
    return [name for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if name in names]


def _iter_parquet(path: Path, columns: list[str]) -> Iterator[ManifestRow | Rejection]:
    number = 0
    with _parquet_file(path) as parquet:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for fields in batch.to_pylist():
                number += 1
                yield _file_row(fields, number, f"{path.name}:{number}", path.parent)


def _iter_tar(shards: list[Path]) -> Iterator[ManifestRow | Rejection]:
    number = 0  # counts samples across all shards, so ``row`` is unique in the manifest
    for shard in shards:
        samples = 0
        try:
            for key, parts in _tar_samples(shard):
                number += 1
                samples += 1
                yield _tar_row(shard, key, parts, number)
        except (tarfile.TarError, OSError) as exc:
            number += 1
            yield Rejection(number, shard.name, None, "corrupt_shard",
                            f"{shard.name}: cannot read the tar shard after {samples} samples "
                            f"({exc}); re-download or re-create it (its remaining samples are skipped)")


def _tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Webdataset grouping: consecutive members sharing a key (path up to the first dot of the
    file name) form one sample. Captions and metadata are read; images are only located."""
    key: str | None = None
    parts: dict[str, Any] = {}
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            folder, _, name = member.name.rpartition("/")
            if not member.isfile() or name.startswith(".") or "." not in name:
                continue
            stem, _, extension = name.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key:
                if key is not None:
                    yield key, parts
                key, parts = member_key, {}
            extension = extension.lower()
            if extension in _TEXT_MEMBER_BYTES:  # capped: a huge member is a rejected row, not a MemoryError
                parts[extension] = tar.extractfile(member).read(_TEXT_MEMBER_BYTES[extension] + 1)
            elif extension in IMAGE_EXTENSIONS and "image" not in parts:
                parts["image"] = member
        if key is not None:
            yield key, parts
        # tarfile reads a shard cut at a header boundary as a clean end; a real end has two zero blocks.
        if shard.stat().st_size < tar.offset + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError("no end-of-archive marker, the shard is truncated")


def _tar_row(shard: Path, key: str, parts: dict[str, Any], number: int) -> ManifestRow | Rejection:
    source = f"{shard.name}:{key}"
    fields: dict[str, Any] = {}
    try:
        meta = _tar_json(parts.get("json"), source, f"{key}.json")
        fields = {name: meta.get(name) for name in OPTIONAL_COLUMNS}
        fields["id"] = _first(meta, "id", "key")
        if fields["id"] is None:
            fields["id"] = f"{shard.stem}/{key}"
        fields["source_url"] = _first(meta, "source_url", "url")
        if "txt" in parts:
            fields["caption"] = _tar_caption(parts["txt"], f"{key}.txt", source)
        elif "caption" in meta:
            fields["caption"] = meta["caption"]
        member = parts.get("image")
        if member is None:
            raise RowRejected("missing_image", f"{source}: sample has no .jpg/.jpeg/.png/.webp "
                                               f"member; add the image or drop the sample")
        return _build_row(fields, number, source, ImageRef(str(shard), member.name, (member.offset_data, member.size)))
    except RowRejected as exc:
        return Rejection(number, source, _id_or_none(fields), exc.reason, exc.message)


def _tar_caption(data: bytes, name: str, source: str) -> str:
    """A .txt member read up to ``MAX_TEXT_BYTES + 1``: more is too long for any caption, whatever it
    holds (the cut may fall inside a character, which is no reason to call the text not UTF-8)."""
    if len(data) > MAX_TEXT_BYTES:
        raise RowRejected("bad_row", f"{source}: {name} is over {MAX_TEXT_BYTES:,} bytes, more than a caption "
                                     f"can hold (at most {MAX_TEXT_CHARS:,} characters); shorten it or drop the sample")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RowRejected("bad_row", f"{source}: {name} is not UTF-8 text; re-save the caption as UTF-8") from None


def _tar_json(data: bytes | None, source: str, name: str) -> dict[str, Any]:
    """A .json member read up to ``MAX_LINE + 1`` (as a JSONL line): more is too long, not invalid JSON."""
    if data is None:
        return {}
    if len(data) > MAX_LINE:
        raise RowRejected("bad_row", f"{source}: {name} is over {MAX_LINE:,} bytes; shorten its values or drop "
                                     f"the sample")
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise RowRejected("bad_row", f"{source}: metadata .json is not valid JSON ({detail}); "
                                     f"fix it or drop the sample") from None
    if not isinstance(meta, dict):
        raise RowRejected("bad_row", f"{source}: metadata .json is not a JSON object; "
                                     f"fix it or drop the sample")
    return meta


def _first(meta: Mapping[str, Any], *names: str) -> Any:
    return next((meta[name] for name in names if meta.get(name) not in (None, "")), None)


# ---------------------------------------------------------------------------------------------
# One row's fields -> ManifestRow or Rejection


def _file_row(fields: Mapping[str, Any], number: int, source: str, base: Path) -> ManifestRow | Rejection:
    """A row of a JSONL/CSV/Parquet manifest, whose ``image`` is a path."""
    try:
        image = _text(fields, "image", source, required=True)
        return _build_row(fields, number, source, ImageRef(os.path.normpath(os.path.join(base, image))))
    except RowRejected as exc:
        return Rejection(number, source, _id_or_none(fields), exc.reason, exc.message)


def _build_row(fields: Mapping[str, Any], number: int, source: str, image: ImageRef) -> ManifestRow:
    ident = _text(fields, "id", source, required=True)
    if "caption" not in fields:
        raise RowRejected("bad_row", f"{source}: missing 'caption'; add a caption or remove the row")
    captions = _captions(fields, source)
    if not captions:
        raise RowRejected("empty_caption", f"{source}: caption is empty; write a caption or remove the row")
    sha256 = _text(fields, "sha256", source)
    if sha256 is not None:
        sha256 = sha256.lower()
        if not _SHA256.fullmatch(sha256):
            raise RowRejected("bad_row", f"{source}: sha256 {sha256[:80]!r} is not 64 hex digits; "
                                         f"fix it or leave it empty")
    return ManifestRow(
        row=number,
        source=source,
        id=ident,
        caption=captions[0],
        creator=_text(fields, "creator", source),
        license=_text(fields, "license", source),
        source_url=_text(fields, "source_url", source),
        sha256=sha256,
        image=image,
        more_captions=captions[1:],
    )


def _captions(fields: Mapping[str, Any], source: str) -> tuple[str, ...]:
    """The non-empty captions of a row: ``caption`` is one text or a list of them."""
    value = fields["caption"]
    values = value if isinstance(value, (list, tuple)) else [value]
    texts = [_text({"caption": v}, "caption", source) for v in values]
    return tuple(text for text in texts if text is not None)


def _text(fields: Mapping[str, Any], name: str, source: str, required: bool = False) -> str | None:
    """A stripped text value; empty and null count as absent. Integers are accepted (numeric ids)."""
    value = fields.get(name)
    if isinstance(value, bool) or not isinstance(value, (str, int, type(None))):
        raise RowRejected("bad_row", f"{source}: '{name}' must be text, got {type(value).__name__}; "
                                     f"fix the value or remove the row")
    text = None if value is None else str(value).strip() or None
    if text is not None:
        _check_text(text, name, source)
    if text is None and required:
        raise RowRejected("bad_row", f"{source}: missing '{name}'; fill it in or remove the row")
    return text


def _check_text(text: str, name: str, source: str) -> None:
    try:
        check_text(text, source, f"'{name}'")
    except InputRejected as exc:
        raise _row_error(exc) from None


def _id_or_none(fields: Mapping[str, Any]) -> str | None:
    """The id for a rejects record, when the row has a usable one."""
    value = fields.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    try:
        check_text(str(value), "", "'id'")
    except InputRejected:
        return None
    return str(value).strip() or None


# ---------------------------------------------------------------------------------------------
# Validation: de-duplication and the rejects file


class ManifestValidator:
    """Streaming de-duplication by id plus the rejects file (JSONL, one ``Rejection`` a line).

    Every record is written and flushed as it happens, so the file is complete up to the last
    row even if the build is killed. ``seen_ids`` are ids already in the bundle.

    * ``resume=False`` (new bundle, or appending a manifest): the rejects file starts empty and
      a row whose id is in ``seen_ids`` is a ``duplicate_id``.
    * ``resume=True`` (re-running a killed build of the same manifest from its first row): the
      rejects file is kept, rows it already records are not written again, and a trailing
      half-written line is cut off. ``seen_ids`` are the rows indexed before the kill: the first
      row with such an id is skipped (``check`` returns None, counted as ``already_indexed``);
      a later row with the same id is still a duplicate.
    """

    def __init__(self, rejects_path: str | Path | None, seen_ids: Iterable[str] = (), *,
                 resume: bool = False) -> None:
        self.rejects_path = Path(rejects_path) if rejects_path is not None else None
        self.accepted = 0
        self.already_indexed = 0
        self.by_reason: Counter[str] = Counter()
        self._rejected_rows: set[int] = set()
        # id -> row that claimed it; 0 = already in the bundle (for the duplicate message)
        self._ids: dict[str, int] = {} if resume else dict.fromkeys(seen_ids, 0)
        self._indexed: set[str] = set(seen_ids) if resume else set()
        self._file: TextIO | None = None
        if self.rejects_path is not None:
            self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
            if resume and self.rejects_path.exists():
                self._load_rejects(self.rejects_path)
            self._file = open(self.rejects_path, "a" if resume else "w", encoding="utf-8")

    def check(self, item: ManifestRow | Rejection) -> ManifestRow | None:
        """The row if it may be indexed; None if rejected (recorded) or already indexed."""
        if isinstance(item, Rejection):
            self._record(item)
            return None
        claimed_by = self._ids.get(item.id)
        if claimed_by is not None:
            where = "is already in the bundle" if claimed_by == 0 else f"is already used at row {claimed_by}"
            self._record(Rejection(item.row, item.source, item.id, "duplicate_id",
                                   f"{item.source}: id '{item.id}' {where}; give every row a "
                                   f"unique id or remove the duplicate"))
            return None
        self._ids[item.id] = item.row
        if item.id in self._indexed:
            self._indexed.discard(item.id)
            self.already_indexed += 1
            return None
        self.accepted += 1
        return item

    def reject(self, row: ManifestRow, exc: RowRejected) -> None:
        """Record a row that ``check`` accepted but whose image then failed to load.

        Its id stays claimed, so a later row with the same id is still a duplicate.
        """
        self.accepted -= 1
        self._record(Rejection(row.row, row.source, row.id, exc.reason, exc.message))

    @property
    def summary(self) -> dict:
        """Counts for the whole manifest; on resume ``rejected`` includes the earlier records."""
        return {
            "accepted": self.accepted,
            "already_indexed": self.already_indexed,
            "rejected": sum(self.by_reason.values()),
            "by_reason": dict(sorted(self.by_reason.items())),
            "rejects_file": str(self.rejects_path) if self.rejects_path is not None else None,
        }

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ManifestValidator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _record(self, rejection: Rejection) -> None:
        if rejection.row in self._rejected_rows:
            return  # recorded before a resume
        self._rejected_rows.add(rejection.row)
        self.by_reason[rejection.reason] += 1
        if self._file is not None:
            self._file.write(json.dumps(rejection.__dict__, ensure_ascii=False) + "\n")
            self._file.flush()

    def _load_rejects(self, path: Path) -> None:
        """Take over the records of a killed build; cut a half-written last line."""
        complete = 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                    self._rejected_rows.add(int(record["row"]))
                    self.by_reason[str(record["reason"])] += 1
                except (ValueError, KeyError, TypeError):
                    raise FastattrError(
                        f"{path}:{number}: not a rejects record; delete the file and rebuild "
                        f"without resuming"
                    ) from None
                complete += len(line)
        if complete != path.stat().st_size:
            os.truncate(path, complete)


def validate_manifest(path: str | Path, rejects_path: str | Path | None = None,
                      check_images: bool = True, progress: bool = True) -> dict:
    """Read the whole manifest the way the index build does (optionally decoding every image)
    and return the validator's summary, so problems surface before hours of encoding."""
    with ManifestValidator(rejects_path) as validator:
        items = iter_manifest(path)
        for item in tqdm(items, desc=f"validate {Path(path).name}", unit="row", disable=not progress):
            row = validator.check(item)
            if row is not None and check_images:
                try:
                    row.load_image().close()
                except RowRejected as exc:
                    validator.reject(row, exc)
    return validator.summary


def manifest_fingerprint(path: str | Path) -> str:
    """sha256 of the manifest bytes, to refuse resuming a build over a changed manifest.

    A single file gives its plain sha256 (what ``sha256sum`` prints). Tar shards give the sha256
    of their ``name<TAB>sha256`` lines, so renaming, adding or removing a shard changes it too.
    """
    kind, files = _manifest_files(path)
    if kind != "tar":
        return sha256_file(files[0])
    listing = "".join(f"{shard.name}\t{sha256_file(shard)}\n" for shard in files)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()
