"""Manifest layer: every format streams rows, bad rows are rejected with a reason, never fatal."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastattr_hook.errors import FastattrError
from index_tools.manifest import (
    MAX_LINE,
    MAX_TEXT_BYTES,
    MAX_TEXT_CHARS,
    ManifestRow,
    ManifestValidator,
    Rejection,
    RowRejected,
    iter_manifest,
    manifest_fingerprint,
    validate_manifest,
)


def image_bytes(color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG", size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format=fmt)
    return buffer.getvalue()


def noise_png() -> bytes:
    """A PNG big enough that cutting it in half loses pixel data."""
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --- formats --------------------------------------------------------------------------------


def test_jsonl_relative_and_absolute_paths(tmp_path: Path) -> None:
    write(tmp_path / "data" / "imgs" / "a.png", image_bytes((255, 0, 0)))
    outside = write(tmp_path / "elsewhere" / "b.jpg", image_bytes((0, 0, 255), "JPEG"))
    manifest = write_jsonl(tmp_path / "data" / "train.jsonl", [
        {"id": "a", "image": "imgs/a.png", "caption": " a red square ", "creator": "ann",
         "license": "CC-BY-4.0", "source_url": "https://example.invalid/a",
         "attributes": {"shape": "square"}},
        "",
        {"id": 7, "image": str(outside), "caption": "a blue square", "creator": ""},
    ])

    items = list(iter_manifest(manifest))

    assert [type(item) for item in items] == [ManifestRow, ManifestRow]
    a, b = items
    assert (a.row, a.source, a.id, a.caption) == (1, "train.jsonl:1", "a", "a red square")
    assert (a.creator, a.license, a.source_url, a.sha256) == (
        "ann", "CC-BY-4.0", "https://example.invalid/a", None)
    assert str(a.image) == str(tmp_path / "data" / "imgs" / "a.png")
    assert not hasattr(a, "attributes")
    assert (b.row, b.id, b.creator, str(b.image)) == (3, "7", None, str(outside))
    red, blue = a.load_image(), b.load_image()
    assert red.mode == "RGB" and red.size == (8, 8) and red.getpixel((0, 0)) == (255, 0, 0)
    assert blue.mode == "RGB" and blue.getpixel((4, 4))[2] > 200


def test_csv_rows_with_header_bom_multiline_caption_and_extra_columns(tmp_path: Path) -> None:
    png = write(tmp_path / "imgs" / "a.png", image_bytes())
    digest = hashlib.sha256(png.read_bytes()).hexdigest()
    manifest = tmp_path / "train.csv"
    with open(manifest, "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "caption", "notes", "sha256", "creator"])
        writer.writerow(["r1", "imgs/a.png", "line one\nline two", "ignored", digest.upper(), ""])
        writer.writerow(["r2", str(png), "second", "", "", "bob"])

    first, second = iter_manifest(manifest)

    assert (first.row, first.source, first.caption) == (2, "train.csv:2", "line one\nline two")
    assert first.sha256 == digest and first.creator is None
    assert (second.row, second.source, second.creator, second.sha256) == (4, "train.csv:4", "bob", None)
    assert first.image == second.image and str(first.image) == str(png)
    assert first.load_image().size == (8, 8)


def test_parquet_reads_row_groups_in_order(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    write(tmp_path / "imgs" / "a.png", image_bytes())
    table = pa.table({
        "id": list(range(1, 6)),
        "image": ["imgs/a.png"] * 5,
        "caption": [f"caption {i}" for i in range(1, 6)],
        "license": ["CC0", None, "CC0", None, "CC0"],
        "pixels": [b"\x00" * 16] * 5,
    })
    manifest = tmp_path / "train.parquet"
    pq.write_table(table, manifest, row_group_size=2)
    assert pq.ParquetFile(manifest).num_row_groups == 3

    rows = list(iter_manifest(manifest))

    assert [r.id for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r.row for r in rows] == [1, 2, 3, 4, 5]
    assert rows[3].source == "train.parquet:4"
    assert [r.license for r in rows] == ["CC0", None, "CC0", None, "CC0"]
    assert str(rows[0].image) == str(tmp_path / "imgs" / "a.png")
    assert rows[4].load_image().mode == "RGB"


def test_parquet_without_pyarrow_suggests_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write(tmp_path / "train.parquet", b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(FastattrError, match=r"pip install 'fastattr\[parquet\]'"):
        iter_manifest(manifest)


def write_shards(folder: Path) -> tuple[bytes, bytes]:
    """Two img2dataset-style shards; returns the jpg and png bytes used."""
    folder.mkdir()
    jpg, png = image_bytes((10, 200, 10), "JPEG"), image_bytes((10, 10, 200))
    with tarfile.open(folder / "shard-00000.tar", "w") as tar:
        add_member(tar, "00000.jpg", jpg)
        add_member(tar, "00000.txt", b"a green square\n")
        add_member(tar, "00000.json", json.dumps({
            "key": "000000000", "url": "https://example.invalid/0", "creator": "cy",
            "license": "CC-BY", "sha256": hashlib.sha256(jpg).hexdigest(), "status": "success",
        }).encode())
        add_member(tar, "00001.png", png)
        add_member(tar, "00001.txt", b"a blue square")
        add_member(tar, "00002.txt", b"caption without image")
    with tarfile.open(folder / "shard-00001.tar", "w") as tar:
        add_member(tar, "00000.json", json.dumps({
            "id": "custom", "source_url": "https://example.invalid/src", "url": "https://x.invalid",
            "caption": "caption from json"}).encode())
        add_member(tar, "00000.webp", image_bytes(fmt="WEBP"))
    return jpg, png


def test_webdataset_shard_folder_and_glob(tmp_path: Path) -> None:
    jpg, _ = write_shards(tmp_path / "shards")

    items = list(iter_manifest(tmp_path / "shards"))

    assert [type(item) for item in items] == [ManifestRow, ManifestRow, Rejection, ManifestRow]
    first, second, no_image, third = items
    assert [first.row, second.row, no_image.row, third.row] == [1, 2, 3, 4]
    shard0 = tmp_path / "shards" / "shard-00000.tar"
    assert (first.id, first.source, first.caption) == ("000000000", "shard-00000.tar:00000", "a green square")
    assert (first.source_url, first.creator, first.license) == ("https://example.invalid/0", "cy", "CC-BY")
    assert first.sha256 == hashlib.sha256(jpg).hexdigest()
    assert (first.image.path, first.image.member) == (str(shard0), "00000.jpg")
    assert (second.id, second.source_url, second.sha256) == ("shard-00000/00001", None, None)
    assert (no_image.reason, no_image.source) == ("missing_image", "shard-00000.tar:00002")
    assert (third.id, third.caption, third.source_url) == ("custom", "caption from json", "https://example.invalid/src")
    assert first.load_image().getpixel((4, 4))[1] > 150
    assert second.load_image().getpixel((4, 4)) == (10, 10, 200)
    assert third.load_image().size == (8, 8)
    globbed = list(iter_manifest(tmp_path / "shards" / "shard-*.tar"))
    assert [getattr(item, "id", None) for item in globbed] == [getattr(item, "id", None) for item in items]


@pytest.mark.parametrize("cut_before, kept", [("00000.txt", 0), ("00001.png", 1)])
def test_truncated_shard_is_rejected_and_the_next_shard_still_read(
        tmp_path: Path, cut_before: str, kept: int) -> None:
    write_shards(tmp_path / "shards")
    shard = tmp_path / "shards" / "shard-00000.tar"
    with tarfile.open(shard) as tar:
        header = tar.getmember(cut_before).offset
    # Cut inside the previous member's data, or exactly at a header boundary.
    shard.write_bytes(shard.read_bytes()[: header - 100 if kept == 0 else header])

    items = list(iter_manifest(tmp_path / "shards"))

    assert [type(item) for item in items] == [ManifestRow] * kept + [Rejection, ManifestRow]
    broken = items[kept]
    assert (broken.reason, broken.source, broken.id) == ("corrupt_shard", "shard-00000.tar", None)
    assert f"after {kept} samples" in broken.message and "re-download" in broken.message
    assert items[-1].id == "custom"  # shard-00001 is unaffected
    assert [item.row for item in items] == list(range(1, kept + 3))


def test_truncated_tar_member_is_a_corrupt_image(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    data = noise_png()
    with tarfile.open(folder / "one.tar", "w") as tar:
        add_member(tar, "k.png", data)
        add_member(tar, "k.txt", b"noise")
    (row,) = iter_manifest(folder / "one.tar")
    whole = (folder / "one.tar").read_bytes()
    (folder / "one.tar").write_bytes(whole[: row.image.span[0] + 100])

    with pytest.raises(RowRejected) as info:
        row.load_image()
    assert info.value.reason == "corrupt_image" and "truncated shard" in info.value.message
    (folder / "one.tar").unlink()
    with pytest.raises(RowRejected) as info:
        row.load_image()
    assert info.value.reason == "missing_image" and f"tar shard not found at {folder / 'one.tar'}" in info.value.message


def test_an_over_long_tar_caption_is_too_long_even_when_cut_inside_a_character(tmp_path: Path) -> None:
    """A .txt member is read up to MAX_TEXT_BYTES + 1 bytes: 100,001 emoji (400,004 bytes) are cut inside
    a character there. That caption is too long, not text that is not UTF-8; 100,000 emoji fit."""
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, caption in (("long", "\U0001F600" * (MAX_TEXT_CHARS + 1)), ("full", "\U0001F600" * MAX_TEXT_CHARS)):
            add_member(tar, f"{key}.png", image_bytes())
            add_member(tar, f"{key}.txt", caption.encode())
    rejected, kept = iter_manifest(shard)
    assert (rejected.reason, rejected.message) == ("bad_row", (
        f"s.tar:long: long.txt is over {MAX_TEXT_BYTES:,} bytes, more than a caption can hold (at most "
        f"{MAX_TEXT_CHARS:,} characters); shorten it or drop the sample"))
    assert len(kept.caption) == MAX_TEXT_CHARS


def test_a_tar_metadata_member_is_read_like_a_jsonl_line(tmp_path: Path) -> None:
    """Up to MAX_LINE bytes, room for several captions of MAX_TEXT_CHARS (read whole, not cut at 400 KB
    and called invalid JSON); a longer one is a row too long, not invalid JSON."""
    captions = [letter * MAX_TEXT_CHARS for letter in "abcde"]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, meta in (("five", {"caption": captions}), ("huge", {"caption": "x" * MAX_LINE})):
            add_member(tar, f"{key}.png", image_bytes())
            add_member(tar, f"{key}.json", json.dumps(meta).encode())
    kept, rejected = iter_manifest(shard)
    assert kept.captions == tuple(captions)
    assert (rejected.reason, rejected.message) == ("bad_row", f"s.tar:huge: huge.json is over {MAX_LINE:,} bytes; "
                                                              f"shorten its values or drop the sample")


def test_iter_manifest_streams_instead_of_reading_the_whole_file(tmp_path: Path) -> None:
    write(tmp_path / "a.png", image_bytes())
    jsonl = write_jsonl(tmp_path / "train.jsonl", [{"id": "1", "image": "a.png", "caption": "one"}])
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("id,image,caption\n1,a.png,one\n", encoding="utf-8")
    jsonl_rows, csv_rows = iter_manifest(jsonl), iter_manifest(csv_path)

    assert next(jsonl_rows).id == "1" and next(csv_rows).id == "1"
    # Lines added after the first row was read still come out: the reader had not slurped the file.
    with open(jsonl, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "2", "image": "a.png", "caption": "two"}) + "\n")
    with open(csv_path, "a", encoding="utf-8") as f:
        f.write("2,a.png,two\n")

    assert [r.id for r in jsonl_rows] == ["2"]
    assert [r.id for r in csv_rows] == ["2"]


# --- bad rows -------------------------------------------------------------------------------


def bad_manifest(tmp_path: Path) -> Path:
    """Three good rows and one row per rejection reason."""
    good = write(tmp_path / "imgs" / "good.png", image_bytes())
    write(tmp_path / "imgs" / "good.jpg", image_bytes(fmt="JPEG"))
    write(tmp_path / "imgs" / "corrupt.png", b"this is not an image")
    noise = noise_png()
    write(tmp_path / "imgs" / "truncated.png", noise[: len(noise) // 2])
    return write_jsonl(tmp_path / "train.jsonl", [
        {"id": "good-1", "image": "imgs/good.png", "caption": "fine",
         "sha256": hashlib.sha256(good.read_bytes()).hexdigest()},
        {"id": "corrupt", "image": "imgs/corrupt.png", "caption": "garbage bytes"},
        {"id": "truncated", "image": "imgs/truncated.png", "caption": "half a png"},
        {"id": "missing", "image": "imgs/nope.png", "caption": "no file"},
        {"id": "good-1", "image": "imgs/good.jpg", "caption": "same id again"},
        {"id": "empty", "image": "imgs/good.png", "caption": "   "},
        '{"id": "broken", "image": ',
        {"id": "hash", "image": "imgs/good.png", "caption": "wrong hash", "sha256": "0" * 64},
        {"id": "noimage", "caption": "no image field"},
        {"id": "good-2", "image": "imgs/good.jpg", "caption": "also fine"},
        {"id": "good-3", "image": str(good), "caption": "absolute"},
    ])


EXPECTED_REJECTS = [
    (2, "corrupt", "corrupt_image"),
    (3, "truncated", "corrupt_image"),
    (4, "missing", "missing_image"),
    (5, "good-1", "duplicate_id"),
    (6, "empty", "empty_caption"),
    (7, None, "bad_row"),
    (8, "hash", "sha256_mismatch"),
    (9, "noimage", "bad_row"),
]


def test_validate_manifest_rejects_each_bad_row_with_its_reason(tmp_path: Path) -> None:
    manifest = bad_manifest(tmp_path)
    rejects = tmp_path / "out" / "rejects.jsonl"

    summary = validate_manifest(manifest, rejects, progress=False)

    assert summary == {
        "accepted": 3,
        "already_indexed": 0,
        "rejected": 8,
        "by_reason": {"bad_row": 2, "corrupt_image": 2, "duplicate_id": 1, "empty_caption": 1,
                      "missing_image": 1, "sha256_mismatch": 1},
        "rejects_file": str(rejects),
    }
    records = read_rejects(rejects)
    assert [(r["row"], r["id"], r["reason"]) for r in records] == EXPECTED_REJECTS
    assert all(set(r) == {"row", "source", "id", "reason", "message"} for r in records)
    assert all(r["source"] == f"train.jsonl:{r['row']}" for r in records)
    assert all(r["message"].startswith(f"train.jsonl:{r['row']}: ") for r in records)
    by_id = {r["id"]: r["message"] for r in records}
    assert f"not found at {tmp_path / 'imgs' / 'nope.png'}" in by_id["missing"]
    assert "fix the path, or remove the row" in by_id["missing"]
    assert "already used at row 1" in by_id["good-1"]
    assert "truncated" in by_id["truncated"]
    assert "not valid JSON" in records[5]["message"]


def test_validate_without_images_only_checks_structure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = validate_manifest(bad_manifest(tmp_path), check_images=False, progress=True)

    assert summary["accepted"] == 7  # image problems are not looked for
    assert summary["by_reason"] == {"bad_row": 2, "duplicate_id": 1, "empty_caption": 1}
    assert summary["rejects_file"] is None
    assert "validate train.jsonl" in capsys.readouterr().err  # the tqdm bar


def test_several_captions_per_item(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    jsonl = write_jsonl(tmp_path / "train.jsonl", [
        {"id": "coco", "image": "a.png", "caption": [" a dog ", "", "a brown dog on grass", "a puppy"]},
        {"id": "one", "image": "a.png", "caption": "a cat"},
        {"id": "none", "image": "a.png", "caption": ["", " "]},
        {"id": "bad", "image": "a.png", "caption": ["a bird", {"text": "nested"}]},
    ])
    pq.write_table(pa.table({"id": ["p"], "image": ["a.png"], "caption": [["first", "second"]]}),
                   tmp_path / "train.parquet")

    coco, one, none, bad = iter_manifest(jsonl)
    (parquet,) = iter_manifest(tmp_path / "train.parquet")

    # The first caption is the one the index embeds; the teacher averages over all of them.
    assert coco.caption == "a dog" and coco.captions == ("a dog", "a brown dog on grass", "a puppy")
    assert one.captions == ("a cat",) and parquet.captions == ("first", "second")
    assert (none.reason, bad.reason) == ("empty_caption", "bad_row")
    assert "'caption' must be text, got dict" in bad.message


def test_bad_values_and_csv_field_count_are_bad_rows(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "train.jsonl", [
        '["not", "an", "object"]',
        {"id": ["x"], "image": "a.png", "caption": "list id"},
        {"id": "", "image": "a.png", "caption": "empty id"},
        {"id": "s", "image": "a.png", "caption": "bad hash", "sha256": "xyz"},
        {"id": "c", "image": "a.png"},
        {"id": "n", "image": "a.png", "caption": None},
    ])
    (tmp_path / "train.csv").write_text('id,image,caption\nx,a.png,"a, b",extra\n', encoding="utf-8")

    jsonl_items = list(iter_manifest(jsonl))
    (csv_item,) = iter_manifest(tmp_path / "train.csv")

    assert [(i.reason, i.id) for i in jsonl_items] == [
        ("bad_row", None), ("bad_row", None), ("bad_row", None), ("bad_row", "s"),
        ("bad_row", "c"), ("empty_caption", "n")]
    assert "expected a JSON object" in jsonl_items[0].message
    assert "'id' must be text" in jsonl_items[1].message
    assert "not 64 hex digits" in jsonl_items[3].message
    assert "missing 'caption'" in jsonl_items[4].message
    assert (csv_item.reason, csv_item.row) == ("bad_row", 2)
    assert "4 fields but the header has 3" in csv_item.message


def test_unreadable_image_file(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "d", "image": "dir.png", "caption": "c"}])
    (row,) = iter_manifest(manifest)
    with pytest.raises(RowRejected) as info:
        row.load_image()
    assert info.value.reason == "unreadable_image" and info.value.message.startswith("m.jsonl:1: ")


# --- validator: append and resume -----------------------------------------------------------


def test_seen_ids_from_the_bundle_are_duplicates_when_appending(tmp_path: Path) -> None:
    write(tmp_path / "a.png", image_bytes())
    manifest = write_jsonl(tmp_path / "more.jsonl", [
        {"id": "old", "image": "a.png", "caption": "x"},
        {"id": "new", "image": "a.png", "caption": "y"},
    ])
    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text('{"stale": true}\n', encoding="utf-8")  # a fresh validator starts over

    with ManifestValidator(rejects, seen_ids=["old"]) as validator:
        kept = [validator.check(item) for item in iter_manifest(manifest)]

    assert kept[0] is None and kept[1].id == "new"
    (record,) = read_rejects(rejects)
    assert record["reason"] == "duplicate_id" and "already in the bundle" in record["message"]
    assert validator.summary["accepted"] == 1 and validator.summary["rejected"] == 1


def test_resume_keeps_rejects_without_duplicating_them(tmp_path: Path) -> None:
    manifest = bad_manifest(tmp_path)
    rejects = tmp_path / "rejects.jsonl"

    # A build that dies after row 6, mid-way through writing a record.
    indexed = []
    validator = ManifestValidator(rejects)
    for item in iter_manifest(manifest):
        if item.row > 6:
            break
        row = validator.check(item)
        if row is not None:
            try:
                row.load_image()
                indexed.append(row.id)
            except RowRejected as exc:
                validator.reject(row, exc)
    validator.close()
    assert indexed == ["good-1"] and len(read_rejects(rejects)) == 5
    with open(rejects, "a", encoding="utf-8") as f:
        f.write('{"row": 7, "sour')

    # The resumed build walks the whole manifest again.
    with ManifestValidator(rejects, seen_ids=indexed, resume=True) as resumed:
        for item in iter_manifest(manifest):
            row = resumed.check(item)
            if row is not None:
                try:
                    row.load_image()
                except RowRejected as exc:
                    resumed.reject(row, exc)

    records = read_rejects(rejects)
    assert [(r["row"], r["id"], r["reason"]) for r in records] == EXPECTED_REJECTS
    summary = resumed.summary
    assert (summary["accepted"], summary["already_indexed"], summary["rejected"]) == (2, 1, 8)


def test_resuming_a_finished_build_says_so_on_the_command_line(micro_sandbox: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Not the summary of a build that just ran: the command line shows no log, so it says it itself."""
    from fastattr_cli import main
    from fastattr_hook.bundle import read_manifest

    bundle = micro_sandbox / "bundle"  # built from this manifest and encoder
    items = read_manifest(bundle).items
    assert main(["index", "build", "--manifest", str(micro_sandbox / "data" / "manifest.jsonl"), "--encoder",
                 str(micro_sandbox / "encoder.yaml"), "--out", str(bundle), "--resume"]) == 0
    assert capsys.readouterr().out == f"{bundle}: already complete ({items} items); nothing to do\n"


def test_resume_refuses_a_file_that_is_not_a_rejects_file(tmp_path: Path) -> None:
    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text("hello\n", encoding="utf-8")
    with pytest.raises(FastattrError, match="not a rejects record"):
        ManifestValidator(rejects, resume=True)


# --- manifests that cannot be read at all ---------------------------------------------------


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "manifest not found"),
    ("train.txt", b"id,image,caption\n", "unknown manifest type '.txt'"),
    ("train.csv", b"a1,imgs/a.png,a cat\n", "lacks required column(s) id, image, caption"),
    ("train.csv", b"id,caption\n1,x\n", "lacks required column(s) image"),
    ("train.csv", b"", "lacks required column(s)"),
    ("train.json", b'[\n {"id": "a"}\n]\n', "JSON array, not JSON lines"),
    ("train.jsonl", b'[{"id": "a"}, {"id": "b"}]', "JSON array, not JSON lines"),
    ("train.parquet", b"not parquet at all", "not a readable Parquet file"),
])
def test_unreadable_manifest_raises_at_once(tmp_path: Path, name: str, content: bytes | None,
                                            message: str) -> None:
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FastattrError) as info:
        iter_manifest(path)  # no next(): the error comes before the first row
    assert message in str(info.value) and name in str(info.value)


def test_parquet_missing_columns_and_empty_shard_folder(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": ["a"], "caption": ["c"]}), tmp_path / "m.parquet")
    (tmp_path / "empty").mkdir()

    with pytest.raises(FastattrError, match="missing required column.s. image"):
        iter_manifest(tmp_path / "m.parquet")
    with pytest.raises(FastattrError, match="no \\*.tar shards"):
        iter_manifest(tmp_path / "empty")
    with pytest.raises(FastattrError, match="no .tar shards match"):
        iter_manifest(tmp_path / "empty" / "*.tar")


# --- fingerprint ----------------------------------------------------------------------------


def test_manifest_fingerprint(tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "image": "a.png", "caption": "c"}])
    assert manifest_fingerprint(manifest) == hashlib.sha256(manifest.read_bytes()).hexdigest()
    write_shards(tmp_path / "shards")
    before = manifest_fingerprint(tmp_path / "shards")
    assert manifest_fingerprint(tmp_path / "shards" / "*.tar") == before

    (tmp_path / "shards" / "shard-00001.tar").rename(tmp_path / "shards" / "shard-00009.tar")

    assert manifest_fingerprint(tmp_path / "shards") != before
