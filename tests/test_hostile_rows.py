"""One bad row never kills, hangs or exhausts a build: a corpus of hostile rows, each in every
manifest format it can be written in, each asserting its named outcome (issue 15)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import struct
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastattr_hook.errors import FastattrError
from index_tools.manifest import MAX_LINE, MAX_TEXT_CHARS, ManifestRow, Rejection, RowRejected, iter_manifest


def png(size=(8, 8), mode="RGB", color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(folder: Path) -> dict[str, str]:
    """Hostile image files; the keys name them in the cases below."""
    folder.mkdir(exist_ok=True)
    (folder / "good.png").write_bytes(png())
    (folder / "strip.png").write_bytes(png((3_000_000, 1), mode="1"))  # a few KB, 3 Mpixels, aspect 3,000,000:1
    (folder / "bomb.png").write_bytes(png((9000, 9000), mode="1"))  # 81 Mpixels from a small file
    with open(folder / "huge.png", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: 65 MiB of zeros, larger than any image we read
    (folder / "folder.png").mkdir(exist_ok=True)
    fifo = folder / "fifo.png"
    if hasattr(os, "mkfifo") and not fifo.exists():
        os.mkfifo(fifo)
    return {name: str(folder / name) for name in ("good.png", "strip.png", "bomb.png", "huge.png", "folder.png",
                                                  "fifo.png")} | {"dev-zero": "/dev/zero"}


# (case, fields of the row, reason, words of the message). Text values go through every format.
TEXT_CASES = [
    ("nul-in-path", {"image": "good\x00.png"}, "bad_row", "NUL byte"),
    ("nul-in-caption", {"caption": "a red\x00 circle"}, "bad_row", "NUL byte"),
    ("surrogate-id", {"id": "x\ud800"}, "bad_row", "UTF-8"),
    ("surrogate-creator", {"creator": "Ana \udcff"}, "bad_row", "UTF-8"),
    ("surrogate-caption", {"caption": "a \ud83d circle"}, "bad_row", "UTF-8"),
    ("long-caption", {"caption": "a" * (MAX_TEXT_CHARS + 1)}, "bad_row", "characters (at most"),
    ("long-id", {"id": "i" * (MAX_TEXT_CHARS + 1)}, "bad_row", "characters (at most"),
    ("empty-caption", {"caption": "   "}, "empty_caption", "caption is empty"),
    ("missing-id", {"id": ""}, "bad_row", "missing 'id'"),
    ("bad-sha", {"sha256": "xyz"}, "bad_row", "not 64 hex digits"),
]
IMAGE_CASES = [
    ("fifo", "fifo.png", "unreadable_image", "not a regular file"),
    ("dev-zero", "dev-zero", "unreadable_image", "not a regular file"),
    ("folder", "folder.png", "unreadable_image", "cannot read image"),
    ("huge-file", "huge.png", "unreadable_image", "larger than 64 MiB"),
    ("strip", "strip.png", "corrupt_image", "aspect ratio"),
    ("bomb", "bomb.png", "corrupt_image", "Mpixels"),
    ("missing", "nope.png", "missing_image", "not found"),
]
JSON_ONLY_CASES = [  # raw lines: what only a JSON line can carry
    ("deep-nesting", '{"id": "deep", "image": "good.png", "caption": "x", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "bad_row", "nested too deeply"),
    ("caption-object", '{"id": "obj", "image": "good.png", "caption": {"text": "x"}}', "bad_row", "must be text"),
    ("list-row", '["a", "b"]', "bad_row", "expected a JSON object"),
    ("truncated-line", '{"id": "cut", "image": "good.png", "capt', "bad_row", "not valid JSON"),
]


def _row(case: str, **fields) -> dict:
    return {"id": case, "image": "good.png", "caption": f"a red circle ({case})", **fields}


def _write(fmt: str, folder: Path, rows: list[dict]) -> Path:
    if fmt == "jsonl":
        path = folder / "m.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        path = folder / "m.csv"
        with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "image", "caption", "creator", "sha256"])
            for r in rows:
                writer.writerow([r.get(k, "") for k in ("id", "image", "caption", "creator", "sha256")])
    else:  # a webdataset shard: image member, .txt caption, .json metadata
        path = folder / "m.tar"
        with tarfile.open(path, "w") as tar:
            for n, r in enumerate(rows):
                with open(folder / r["image"], "rb") as f:
                    data = f.read()
                meta = {k: r[k] for k in ("id", "creator", "sha256") if k in r}
                for name, payload in ((f"{n:05d}.png", data), (f"{n:05d}.txt", r["caption"].encode("utf-8", "surrogatepass")),
                                      (f"{n:05d}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return path


def _outcome(path: Path) -> list[ManifestRow | Rejection]:
    out = []
    for item in iter_manifest(path):
        if isinstance(item, ManifestRow):
            try:
                item.load_image()
            except RowRejected as exc:
                item = Rejection(item.row, item.source, item.id, exc.reason, exc.message)
        out.append(item)
    return out


def _check_between_good_rows(fmt: str, folder: Path, bad: dict, reason: str, words: str) -> None:
    path = _write(fmt, folder, [_row("before"), bad, _row("after")])
    first, rejected, last = _outcome(path)
    assert isinstance(first, ManifestRow) and first.id == "before"
    assert isinstance(last, ManifestRow) and last.id == "after"  # nothing after the bad row is lost
    assert isinstance(rejected, Rejection), f"{fmt}: {bad!r} was accepted"
    assert rejected.reason == reason and words in rejected.message, rejected.message
    assert rejected.message.startswith(path.name)  # names the file and the row


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tar"])
@pytest.mark.parametrize("case, fields, reason, words", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_hostile_text_is_one_rejected_row(fmt, case, fields, reason, words, images, tmp_path):
    if fmt == "tar" and "image" in fields:
        pytest.skip("a shard locates images by member, not by path")
    if fmt == "tar" and case == "missing-id":
        pytest.skip("a shard sample without an id is named by its key")
    for name in ("good.png",):
        (tmp_path / name).write_bytes(Path(images[name]).read_bytes())
    _check_between_good_rows(fmt, tmp_path, _row(case, **fields), reason, words)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("case, image, reason, words", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_hostile_image_is_one_rejected_row(fmt, case, image, reason, words, images, tmp_path):
    if image == "fifo.png" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    (tmp_path / "good.png").write_bytes(Path(images["good.png"]).read_bytes())
    _check_between_good_rows(fmt, tmp_path, _row(case, image=images.get(image, str(tmp_path / image))), reason, words)


@pytest.mark.parametrize("case, line, reason, words", JSON_ONLY_CASES, ids=[c[0] for c in JSON_ONLY_CASES])
def test_hostile_json_lines(case, line, reason, words, images, tmp_path):
    (tmp_path / "good.png").write_bytes(Path(images["good.png"]).read_bytes())
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([json.dumps(_row("before")), line, json.dumps(_row("after"))]) + "\n")
    first, rejected, last = _outcome(path)
    assert (first.id, last.id) == ("before", "after")
    assert isinstance(rejected, Rejection) and rejected.reason == reason and words in rejected.message


def test_a_non_utf8_byte_in_one_csv_row_rejects_that_row_only(images, tmp_path):
    (tmp_path / "good.png").write_bytes(Path(images["good.png"]).read_bytes())
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,image,caption\nbefore,good.png,a red circle\nlatin,good.png,caf\xe9\n"
                     b"after,good.png,a blue ring\n")
    first, rejected, last = _outcome(path)
    assert (first.id, last.id) == ("before", "after")
    assert rejected.row == 3 and "m.csv:3" in rejected.message and "the byte 0xE9" in rejected.message


def test_an_unclosed_csv_quote_rejects_its_row_and_keeps_the_rows_it_swallowed(images, tmp_path):
    (tmp_path / "good.png").write_bytes(Path(images["good.png"]).read_bytes())
    path = tmp_path / "m.csv"
    path.write_text('id,image,caption\nbefore,good.png,a red circle\nopen,good.png,"an unclosed quote\n'
                    'next,good.png,a blue ring\nlast,good.png,a green square\n')
    found = _outcome(path)
    assert [(type(r).__name__, r.id if isinstance(r, ManifestRow) else r.row) for r in found] == [
        ("ManifestRow", "before"), ("Rejection", 3), ("ManifestRow", "next"), ("ManifestRow", "last")]
    assert "quote opened here is not closed" in found[1].message
    assert [r.row for r in found if isinstance(r, ManifestRow)] == [2, 4, 5]  # line numbers stay right


@pytest.mark.parametrize("tail, ids", [
    ('open,good.png,"cut off here', ["before", 3]),  # the last line, no line end
    ('open,good.png,"cut off\nhere\n', ["before", 3, 4]),  # over two lines to the end of the file
    ('open,good.png,"cut off\nlast,good.png,a blue ring\n', ["before", 3, "last"]),  # a real row inside
])
def test_a_csv_quote_still_open_at_the_end_of_the_file_rejects_its_row(tail, ids, images, tmp_path):
    """Not a row holding the rest of the file as its caption: the quote's row is rejected, naming the
    line it opened on, and every later line is read again as its own row."""
    (tmp_path / "good.png").write_bytes(Path(images["good.png"]).read_bytes())
    path = tmp_path / "m.csv"
    path.write_text("id,image,caption\nbefore,good.png,a red circle\n" + tail)
    found = _outcome(path)
    assert [r.id if isinstance(r, ManifestRow) else r.row for r in found] == ids
    assert found[1].message == ("m.csv:3: a quote opened here is not closed (the field ran to the end of the "
                                "file); close the quote or remove the row")


def test_an_unclosed_csv_quote_past_the_csv_field_limit_loses_no_row(tmp_path):
    """Past 131,072 characters the csv module ends the open field with an error; the lines it took
    (240 KB here) are still read as rows of their own: every line is an accepted or a rejected row."""
    path = tmp_path / "m.csv"
    rows = [f"r{n},good.png,a perfectly fine caption number {n} " + "y" * 40 for n in range(3000)]
    path.write_text('id,image,caption\nopen,good.png,"an unclosed quote\n' + "\n".join(rows) + "\n")
    found = list(iter_manifest(path))
    rejected = [r for r in found if isinstance(r, Rejection)]
    assert sorted(r.row for r in found) == list(range(2, 3003))  # each line of the file, once
    assert [r.id for r in found if isinstance(r, ManifestRow)] == [f"r{n}" for n in range(3000)]
    assert [r.row for r in rejected] == [2] and rejected[0].message.startswith(
        "m.csv:2: a quote opened here is not closed (the field ran over ")
    assert "field limit" in rejected[0].message


def test_an_unclosed_csv_quote_closed_by_a_later_rows_quoted_field_swallows_no_row(tmp_path):
    """The quote opened on line 2 closes at the start of line 3's quoted caption: one record with the
    header's 4 fields, but its quote closes where no field ends, so it is not taken as one row."""
    path = tmp_path / "m.csv"
    path.write_text('id,image,caption,creator\na,x.png,"unclosed,me\nb,x.png,"quoted",you\n'
                    'c,x.png,plain,them\n')
    found = list(iter_manifest(path))
    assert [r.id if isinstance(r, ManifestRow) else r.row for r in found] == [2, "b", "c"]
    assert "quote opened here is not closed" in found[0].message
    assert found[1].caption == "quoted"


def test_a_multi_line_csv_record_with_the_wrong_field_count_reads_its_lines_again(tmp_path):
    """The quote opened on line 2 closes inside line 4: one record of 5 fields. Not one row, so the
    quote's row is rejected and lines 3 and 4 are read again (line 3 has too few fields of its own)."""
    path = tmp_path / "m.csv"
    path.write_text('id,image,caption,creator\na,x.png,"unclosed quote,me\nb,x.png,cap b\n'
                    'c,x.png,"cap, c",you\nd,x.png,cap d,him\n')
    found = list(iter_manifest(path))
    assert [r.id if isinstance(r, ManifestRow) else r.row for r in found] == [2, 3, "c", "d"]
    assert found[0].message == ("m.csv:2: a quote opened here is not closed (the field ran over 2 more lines, "
                                "leaving 5 fields where the header has 4); close the quote or remove the row")
    assert "3 fields but the header has 4" in found[1].message


def test_a_closed_multi_line_csv_caption_at_the_end_of_the_file_is_kept(images, tmp_path):
    (tmp_path / "good.png").write_bytes(Path(images["good.png"]).read_bytes())
    path = tmp_path / "m.csv"
    path.write_text('id,image,caption\nbefore,good.png,a red circle\nlast,good.png,"two\r\nlines, one ""quote"""')
    _, last = _outcome(path)
    assert (last.id, last.row, last.caption) == ("last", 3, 'two\r\nlines, one "quote"')


def test_an_unclosed_quote_in_the_csv_header_is_refused_not_a_file_of_no_rows(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,image,"caption\na,good.png,a red circle\n')
    with pytest.raises(FastattrError, match="a quote in the header row is not closed; close it"):
        iter_manifest(path)


def _with_long_line(path: Path, head: bytes, tail: bytes) -> None:
    """``head``, a line of 8 x MAX_LINE NUL bytes (a hole in a sparse file, so no disk), ``tail``."""
    with open(path, "wb") as f:
        f.write(head)
        f.seek(8 * MAX_LINE, os.SEEK_CUR)
        f.write(b"\n" + tail)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_over_long_line_is_one_rejected_row_read_in_bounded_memory(fmt, images, tmp_path):
    (tmp_path / "good.png").write_bytes(Path(images["good.png"]).read_bytes())
    path = tmp_path / f"m.{fmt}"
    if fmt == "jsonl":
        before, after = (json.dumps(_row(case)).encode() + b"\n" for case in ("before", "after"))
        _with_long_line(path, before, after)
    else:
        _with_long_line(path, b"id,image,caption\nbefore,good.png,a red circle\n", b"after,good.png,a blue ring\n")
    tracemalloc.start()
    try:
        found = list(iter_manifest(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_LINE  # the 64 MiB line is never held whole
    first, rejected, last = found
    assert (first.id, last.id) == ("before", "after") and isinstance(rejected, Rejection)
    line, unit = (2, "bytes") if fmt == "jsonl" else (3, "characters")
    assert (rejected.row, rejected.reason) == (line, "bad_row") and last.row == line + 1
    assert rejected.message == (f"m.{fmt}:{line}: the line is {8 * MAX_LINE + 1:,} {unit} (at most {MAX_LINE:,}); "
                                f"shorten its values or remove the row")


def test_an_over_long_line_inside_a_quoted_csv_caption_rejects_the_row(tmp_path):
    """The quote's row is rejected, then every line it ran over, the long one too, is a row of its own."""
    path = tmp_path / "m.csv"
    _with_long_line(path, b'id,image,caption\nopen,good.png,"a caption over\nnext,good.png,two\n',
                    b'lines"\nafter,good.png,x\n')
    rejected, swallowed, long_line, fragment, last = iter_manifest(path)
    assert rejected.row == 2 and rejected.message.startswith(
        f"m.csv:2: a quote opened here is still open at line 4, which is {8 * MAX_LINE + 1:,} characters")
    assert (swallowed.id, swallowed.row) == ("next", 3)
    assert long_line.row == 4 and long_line.message.startswith(f"m.csv:4: the line is {8 * MAX_LINE + 1:,} ")
    assert fragment.row == 5 and "1 fields but the header has 3" in fragment.message  # the rest: `lines"`
    assert (last.id, last.row) == ("after", 6)


def test_16_bit_greyscale_and_exif_orientation_decode_as_a_viewer_shows_them(tmp_path):
    grey = np.full((4, 6), 32768, dtype=np.uint16)  # mid grey
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    wide = Image.new("RGB", (6, 4), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 3, 4))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    wide.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    rows = [_row("grey", image="grey16.png"), _row("rotated", image="rotated.jpg")]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grey_row, rotated_row = iter_manifest(path)
    pixels = np.asarray(grey_row.load_image())
    assert pixels.shape == (4, 6, 3) and abs(int(pixels.mean()) - 128) <= 1  # not clipped to white
    shown = rotated_row.load_image()
    assert shown.size == (4, 6)  # portrait after orientation
    top = np.asarray(shown)[0].mean(axis=0)
    assert top[2] > 200 and top[0] < 60  # the blue half is on top after a clockwise turn


def test_a_build_with_every_hostile_row_completes(micro_sandbox, images, tmp_path):
    """The whole corpus in one manifest: the build finishes, indexes the good rows and records
    every other row in its rejects file with its reason."""
    from index_tools.build import BuildOptions, build_bundle
    from index_tools.verify import verify_bundle

    data = micro_sandbox / "data"
    good = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()[:6]]
    lines = [json.dumps(dict(r, image=str(data / r["image"]))) for r in good]
    expected = {}
    for case, fields, reason, _ in TEXT_CASES:
        row = _row(case, **fields)
        row["image"] = str(data / good[0]["image"]) if "image" not in fields else row["image"]
        lines.append(json.dumps(row))
        expected[case] = reason
    for case, image, reason, _ in IMAGE_CASES:
        lines.append(json.dumps(_row(case, image=images.get(image, str(tmp_path / image)))))
        expected[case] = reason
    lines += [line for _, line, _, _ in JSON_ONLY_CASES]
    manifest = tmp_path / "hostile.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    built = build_bundle(manifest, micro_sandbox / "encoder.yaml", tmp_path / "b",
                         BuildOptions(progress=False, chunk_size=8, backend="exact"))
    assert built.items == len(good)
    rejects = [json.loads(line) for line in (tmp_path / "b" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == len(TEXT_CASES) + len(IMAGE_CASES) + len(JSON_ONLY_CASES)
    by_row = {r["row"]: r["reason"] for r in rejects}
    ordered = list(expected.values())
    assert [by_row[len(good) + 1 + i] for i in range(len(ordered))] == ordered
    assert verify_bundle(tmp_path / "b").ok


# `fastattr attribute`: the user's own image and prompt, under the same limits as a manifest's rows


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and which holds no pixels (Pillow refuses it on opening)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _unblocked(fifo: str) -> contextlib.AbstractContextManager:
    """A reader that blocks on ``fifo`` (a regression) fails the test instead of hanging it."""
    from test_hostile_corpus import writers_coming_and_going

    return writers_coming_and_going(Path(fifo)) if os.path.exists(fifo) else contextlib.nullcontext()


CLI_IMAGE_CASES = [
    ("bomb-30000", "claims-30000.png", "cannot be decoded"),  # Pillow's own check: a DecompressionBombError
    ("bomb", "bomb.png", "Mpixels"),
    ("strip", "strip.png", "aspect ratio"),  # a few KB; resizing it was a MemoryError
    ("fifo", "fifo.png", "not a regular file"),  # reading it hung
    ("dev-zero", "dev-zero", "not a regular file"),
    ("huge-file", "huge.png", "larger than 64 MiB"),
    ("folder", "folder.png", "cannot read the image"),
    ("missing", "nope.png", "no such file"),
    ("not-an-image", "notes.png", "not a known image format"),
]


@pytest.mark.parametrize("case, image, words", CLI_IMAGE_CASES, ids=[c[0] for c in CLI_IMAGE_CASES])
def test_attribute_refuses_a_hostile_image_by_name(case, image, words, images, micro_sandbox, tmp_path, capsys):
    from fastattr_cli import main

    if image == "fifo.png" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    (tmp_path / "claims-30000.png").write_bytes(png_claiming(30000, 30000))
    (tmp_path / "notes.png").write_text("not an image\n")
    path = images.get(image, str(tmp_path / image))
    with _unblocked(images["fifo.png"]):
        assert main(["attribute", path, "--prompt", "a red circle", "--bundle", str(micro_sandbox / "bundle")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {path}: ") and words in err, err  # refused before the bundle loads
    assert "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("prompt, words", [
    ("caf\udce9", "is not valid UTF-8 text (the byte 0xE9 at character 3); re-encode it as UTF-8"),  # argv: b"\xe9"
    ("a" * (MAX_TEXT_CHARS + 1), "is 100,001 characters (at most 100,000); shorten it"),
])
def test_attribute_refuses_a_prompt_a_manifest_caption_could_not_be(prompt, words, images, micro_sandbox, capsys):
    from fastattr_cli import main

    assert main(["attribute", images["good.png"], "--prompt", prompt, "--bundle", str(micro_sandbox / "bundle")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --prompt: the prompt {words}\n"


def test_attribute_goes_on_past_a_bad_image_in_a_batch(micro_sandbox, images, capsys):
    """Each bad image is named on stderr and has an error entry in --json; the others are attributed;
    the exit code says something was refused."""
    from fastattr_cli import main

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    data = micro_sandbox / "data"
    first, second = (json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()[:2])
    paths = [str(data / first["image"]), images["fifo.png"], images["strip.png"], str(data / second["image"])]
    args = ["attribute", *paths, "--prompt", first["caption"], "--bundle", str(micro_sandbox / "bundle"), "--k", "2"]
    with _unblocked(images["fifo.png"]):
        assert main(args + ["--json"]) == 2
    out, err = capsys.readouterr()
    printed = json.loads(out)
    schema = "fastattr/attribution@1"
    assert [entry.get("schema") for entry in printed] == [schema, None, None, schema]
    assert printed[0]["credits"][0]["id"] == first["id"]
    assert [entry["path"] for entry in printed[1:3]] == paths[1:3]
    assert "not a regular file" in printed[1]["error"] and "aspect ratio" in printed[2]["error"]
    assert f"error: {paths[1]}: " in err and f"error: {paths[2]}: " in err and "Traceback" not in err
    with _unblocked(images["fifo.png"]):
        assert main(args) == 2  # the text form: the good images only
    out = capsys.readouterr().out
    assert out.count("score") == 4 and paths[0] in out and paths[3] in out and "fifo" not in out


def test_write_metadata_goes_on_past_an_image_that_cannot_take_credits(micro_sandbox, tmp_path, capsys):
    """An image whose XMP holds a DTD is refused by name (neither expanded nor dropped), the images
    after it still get their credits, every result is printed, the exit code is 2, and no copy
    without credits is left under --out."""
    from PIL import PngImagePlugin

    from fastattr_cli import main
    from fastattr_hook.metadata import read_attribution

    data = micro_sandbox / "data"
    first = json.loads((data / "manifest.jsonl").read_text().splitlines()[0])
    good, later, dtd = tmp_path / "good.png", tmp_path / "later.png", tmp_path / "dtd.png"
    for path in (good, later):
        path.write_bytes((data / first["image"]).read_bytes())
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "a">]>'
                                       '<x:xmpmeta xmlns:x="adobe:ns:meta/">&a;</x:xmpmeta>')
    with Image.open(good) as image:
        image.save(dtd, pnginfo=info)
    out = tmp_path / "out"
    args = ["attribute", str(good), str(dtd), str(later), "--prompt", first["caption"],
            "--bundle", str(micro_sandbox / "bundle"), "--k", "2", "--write-metadata"]
    assert main(args + ["--out", str(out), "--json"]) == 2
    printed = json.loads(capsys.readouterr().out)
    assert [entry.get("schema") for entry in printed] == ["fastattr/attribution@1"] * 3  # all attributed
    assert sorted(p.name for p in out.iterdir()) == [
        "good.attribution.json", "good.png", "later.attribution.json", "later.png"]
    assert all(read_attribution(out / name) is not None for name in ("good.png", "later.png"))
    original = dtd.read_bytes()
    assert main(args) == 2  # in place: the same, and the refused image is left as it was
    err = capsys.readouterr().err
    assert f"error: credits not written: {dtd}: " in err and "DTD" in err and "Traceback" not in err
    assert dtd.read_bytes() == original and read_attribution(later) is not None
