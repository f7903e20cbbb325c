"""Index bundles end to end on the micro sandbox: build, verify, resume, tamper, opt-out, attribute."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastattr_hook.attributor import Attributor
from fastattr_hook.bundle import Bundle, read_manifest
from fastattr_hook.errors import FastattrError
from fastattr_hook.files import writer_lock
from index_tools import build as build_mod
from index_tools.build import BuildOptions, add_to_bundle, build_bundle, compact_bundle
from index_tools.optout import remove_items
from index_tools.verify import verify_bundle


@pytest.fixture(scope="module")
def sandbox(micro_sandbox):
    return micro_sandbox


@pytest.fixture(scope="module")
def rows(sandbox):
    return [json.loads(line) for line in (sandbox / "data" / "manifest.jsonl").read_text().splitlines()]


def _options(**kw):
    return BuildOptions(progress=False, **{"chunk_size": 64, **kw})


@pytest.fixture(scope="module")
def exact_bundle(sandbox, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "exact"
    build_bundle(sandbox / "data" / "manifest.jsonl", sandbox / "encoder.yaml", out, _options(backend="exact"))
    return out


@pytest.mark.parametrize("backend,params,dtype", [
    ("exact", None, "f32"), ("usearch", None, "f16"), ("usearch", {"dtype": "f32"}, "f32"),
    ("faiss", {"factory": "HNSW32"}, "f32"),
    ("usearch", {"dtype": "i8"}, "i8"), ("faiss", {"factory": "HNSW32,SQ8"}, "SQ8")])  # lossy: re-ranked
def test_each_backend_builds_verifies_and_matches_exact(sandbox, exact_bundle, tmp_path, rows, backend, params, dtype):
    if backend == "faiss":
        pytest.importorskip("faiss")
    out = tmp_path / backend
    manifest = build_bundle(sandbox / "data" / "manifest.jsonl", sandbox / "encoder.yaml", out,
                            _options(backend=backend, backend_params=params))
    assert manifest.items == len(rows) and manifest.manifest.rejected == 0
    assert manifest.dtype == dtype
    assert (Bundle.open(out).index()._exact is not None) == (dtype in ("i8", "SQ8"))  # served re-ranked
    assert manifest.recall_at_10 >= (0.99 if backend != "exact" else 1.0)  # tuned to RECALL_TARGET on its own data
    assert read_manifest(out).recall_at_10 == manifest.recall_at_10
    report = verify_bundle(out, deep=True, sample=24)
    assert report.ok, report.format()
    assert report.figures["self_found_first"] == 1.0 and report.figures["recall_at_10"] >= 0.99
    exact = Attributor.from_bundle(exact_bundle)
    approx = Attributor.from_bundle(out)
    queries = np.load(exact_bundle / "vectors.npy")[:40]
    got, _ = approx.search(queries, 10)
    want, _ = exact.search(queries, 10)
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)]) >= 0.99


def test_training_image_with_its_caption_attributes_to_itself(exact_bundle, sandbox, rows):
    attributor = Attributor.from_bundle(exact_bundle)
    sample = rows[:12]
    images = [Image.open(sandbox / "data" / r["image"]) for r in sample]
    results = attributor.attribute(images, [r["caption"] for r in sample], k=5)
    for row, result in zip(sample, results):
        assert result.credits[0].id == row["id"]
        assert result.credits[0].creator == row["creator"] and result.credits[0].license == row["license"]
        assert [c.rank for c in result.credits] == [1, 2, 3, 4, 5]
        assert sum(c.share for c in result.credits) == pytest.approx(1.0, abs=1e-4)
        assert all(a.score >= b.score for a, b in zip(result.credits, result.credits[1:]))
        doc = json.loads(result.to_json())
        assert doc["schema"] == "fastattr/attribution@1" and doc["bundle"]["fingerprint"].startswith("sha256:")
        assert doc["encoder"]["fingerprint"] == attributor.encoder.fingerprint


def test_cli_attribute_writes_signed_credits_that_inspect_reads(exact_bundle, sandbox, rows, tmp_path, capsys):
    pytest.importorskip("c2pa")
    from test_metadata import make_signing_credentials, trust_anchors_of

    from fastattr_cli import main

    signing = make_signing_credentials(tmp_path)
    image = sandbox / "data" / rows[3]["image"]
    args = ["attribute", str(image), "--prompt", rows[3]["caption"], "--bundle", str(exact_bundle), "--k", "3",
            "--write-metadata", "--out", str(tmp_path / "out"), "--json"]
    assert main(args + ["--c2pa-cert", str(signing.cert_chain)]) == 2  # a key is needed too
    capsys.readouterr()
    assert main(args + ["--c2pa-cert", str(signing.cert_chain), "--c2pa-key", str(signing.private_key)]) == 0
    [printed] = json.loads(capsys.readouterr().out)
    assert printed["credits"][0]["id"] == rows[3]["id"]
    copy = tmp_path / "out" / image.name
    assert main(["inspect", str(copy), "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report["agree"] is True and report["carriers"]["c2pa"]["validation_state"] == "Valid"
    assert report["authenticated"] is False  # a valid signature, but nobody said whose signatures to trust
    assert {"png", "xmp", "sidecar", "c2pa"} <= {name for name, c in report["carriers"].items() if c["present"]}
    assert main(["inspect", str(copy), "--trust-anchors", str(trust_anchors_of(signing))]) == 0
    assert "credits authenticated: yes (C2PA manifest signed by CN=" in capsys.readouterr().out
    assert "fastattr" not in Image.open(image).info  # the source image is untouched


def test_attribute_refuses_a_prompt_or_image_beyond_the_manifest_limits(exact_bundle):
    attributor, image = Attributor.from_bundle(exact_bundle), Image.new("RGB", (32, 32))
    with pytest.raises(FastattrError, match=r"prompts\[1\]: the prompt is not valid UTF-8 text \(the byte 0xFF"):
        attributor.attribute([image, image], ["a red circle", "a blue \udcff ring"])  # argv's surrogateescape
    with pytest.raises(FastattrError, match=r"prompts\[0\]: the prompt contains a NUL byte"):
        attributor.attribute([image], "a red\x00 circle")
    strip = np.zeros((1, 3000, 3), np.uint8)  # images in memory: the manifest's pixel and aspect limits too
    with pytest.raises(FastattrError, match=r"image to embed: it is 3000 x 1 pixels \(at most 64 Mpixels and an "
                                            r"aspect ratio of 32:1\)"):
        attributor.attribute([Image.fromarray(strip)], "a red circle")
    with pytest.raises(FastattrError, match=r"it is 3000 x 1 pixels"):
        attributor.attribute([strip], "a red circle")


def test_attributor_is_thread_safe(exact_bundle, sandbox, rows):
    attributor = Attributor.from_bundle(exact_bundle)
    images = [Image.open(sandbox / "data" / r["image"]) for r in rows[:8]]
    captions = [r["caption"] for r in rows[:8]]
    expected = [[c.id for c in a.credits] for a in attributor.attribute(images, captions, k=5)]
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = [[c.id for c in a.credits] for a in attributor.attribute(images, captions, k=5)]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r == expected for r in results.values())


@pytest.mark.parametrize("fmt", ["csv", "parquet", "tar"])
def test_other_manifest_formats_build_the_same_bundle_and_verify_deep(sandbox, exact_bundle, tmp_path, rows, fmt):
    data = sandbox / "data"
    rows = rows[:40]
    fields = ["id", "image", "caption", "creator", "license", "source_url", "sha256"]
    if fmt == "csv":
        manifest = tmp_path / "train.csv"
        with open(manifest, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: r[k] for k in fields} | {"image": str(data / r["image"])})
    elif fmt == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow

        manifest = tmp_path / "train.parquet"
        pq.write_table(pyarrow.Table.from_pylist([{k: r[k] for k in fields} | {"image": str(data / r["image"])}
                                                  for r in rows]), manifest)
    else:  # webdataset shards: image member + .txt caption + .json metadata, two shards
        import io
        import tarfile

        manifest = tmp_path / "shards"
        manifest.mkdir()
        for shard in range(2):
            with tarfile.open(manifest / f"shard-{shard:05d}.tar", "w") as tar:
                for n, r in enumerate(rows[shard::2]):
                    meta = json.dumps({k: r[k] for k in fields if k not in ("image", "caption")}).encode()
                    for name, payload in ((f"{n:05d}.png", (data / r["image"]).read_bytes()),
                                          (f"{n:05d}.txt", r["caption"].encode()), (f"{n:05d}.json", meta)):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    built = build_bundle(manifest, sandbox / "encoder.yaml", tmp_path / fmt, _options(backend="exact"))
    assert built.items == len(rows)
    order = [r["id"] for r in rows] if fmt != "tar" else [r["id"] for r in rows[0::2] + rows[1::2]]
    expected = np.load(exact_bundle / "vectors.npy")[[int(i.split("-")[1]) for i in order]]
    assert np.allclose(np.load(tmp_path / fmt / "vectors.npy"), expected, atol=1e-6)
    report = verify_bundle(tmp_path / fmt, deep=True, sample=8)  # re-reads the images from their sources
    assert report.ok, report.format()


def test_bad_rows_are_rejected_and_the_build_continues(sandbox, tmp_path, rows):
    data = sandbox / "data"
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = (data / rows[0]["image"]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    lines = [dict(r, image=str(data / r["image"])) for r in rows[:20]]
    lines += [
        dict(rows[20], id="corrupt", image=str(tmp_path / "corrupt.png"), sha256=None),
        dict(rows[21], id="truncated", image=str(tmp_path / "truncated.png"), sha256=None),
        dict(rows[22], id="missing", image=str(tmp_path / "nope.png")),
        dict(rows[23], id=rows[0]["id"], image=str(data / rows[23]["image"])),  # duplicate id
        dict(rows[24], id="empty-caption", caption="  ", image=str(data / rows[24]["image"])),
        dict(rows[25], id="bad-sha", sha256="0" * 64, image=str(data / rows[25]["image"])),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{not json\n")
    built = build_bundle(manifest, sandbox / "encoder.yaml", tmp_path / "b", _options(chunk_size=8))
    assert built.items == 20 and built.manifest.rejected == 7
    rejects = [json.loads(line) for line in (tmp_path / "b" / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["missing"] == "missing_image" and reasons["bad-sha"] == "sha256_mismatch"
    assert reasons["corrupt"] == reasons["truncated"] == "corrupt_image"
    assert reasons["empty-caption"] == "empty_caption" and reasons[rows[0]["id"]] == "duplicate_id"
    assert [r["row"] for r in rejects] == sorted(r["row"] for r in rejects) and rejects[-1]["row"] == 27
    assert verify_bundle(tmp_path / "b").ok


def test_killed_build_resumes_without_redoing_work(sandbox, exact_bundle, tmp_path, monkeypatch):
    calls, killed = [], []
    real = build_mod._embed_chunk

    def dying(chunk_index, *args, **kwargs):
        calls.append(chunk_index)
        if chunk_index == 2 and not killed:
            killed.append(chunk_index)
            raise KeyboardInterrupt  # killed mid-build
        return real(chunk_index, *args, **kwargs)

    monkeypatch.setattr(build_mod, "_embed_chunk", dying)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        build_bundle(sandbox / "data" / "manifest.jsonl", sandbox / "encoder.yaml", out, _options(chunk_size=32))
    assert not out.exists() and calls == [0, 1, 2]
    with pytest.raises(FastattrError, match="--resume"):
        build_bundle(sandbox / "data" / "manifest.jsonl", sandbox / "encoder.yaml", out, _options(chunk_size=32))
    state = out.with_name("b.partial") / "state.yaml"
    good = state.read_bytes()
    for damage, why in ((b"\xff", "not UTF-8"), (b"chunk_size: [", "not valid YAML"), (b"- 32", "not a build state")):
        state.write_bytes(damage)  # a damaged state file is named, not a traceback, and the chunks are kept
        with pytest.raises(FastattrError, match=rf"(?s)b\.partial/state\.yaml: {why}.*delete .*b\.partial to start"):
            build_bundle(sandbox / "data" / "manifest.jsonl", sandbox / "encoder.yaml", out, _options(chunk_size=32),
                         resume=True)
    state.write_bytes(good)
    calls.clear()
    build_bundle(sandbox / "data" / "manifest.jsonl", sandbox / "encoder.yaml", out, _options(chunk_size=32),
                 resume=True)
    assert calls == [2, 3, 4]  # chunks 0 and 1 were not embedded again
    assert np.array_equal(np.load(out / "vectors.npy"), np.load(exact_bundle / "vectors.npy"))
    assert not out.with_name("b.partial").exists()


def test_tampering_and_wrong_encoder_are_detected(exact_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(exact_bundle, copy)
    with sqlite3.connect(copy / "items.sqlite") as conn:
        conn.execute("UPDATE items SET creator = 'Mallory' WHERE key = 3")
    report = verify_bundle(copy)
    assert not report.ok and "items.sqlite changed (checksum mismatch)" in report.format()
    with pytest.raises(FastattrError, match="items.sqlite: changed since the bundle was written; run `fastattr index "
                                            "verify"):
        Attributor.from_bundle(copy)  # a small file: checked on every open
    # a change never re-seals a tampered items store (the remove would vouch for Mallory)
    with pytest.raises(FastattrError, match="items.sqlite: changed since the bundle was written, so the bundle "
                                            "cannot be changed"):
        remove_items(copy, ids=["any"])
    assert not verify_bundle(copy).ok

    shutil.rmtree(copy)
    shutil.copytree(exact_bundle, copy)
    keys = np.load(copy / "index" / "keys.npy")
    np.save(copy / "index" / "keys.npy", keys[::-1])  # every credit to the wrong item, silently
    with pytest.raises(FastattrError, match=r"index/keys.npy: changed since the bundle was written"):
        Attributor.from_bundle(copy)
    np.save(copy / "vectors.npy", np.load(copy / "vectors.npy")[::-1])  # what compact and add read back
    with pytest.raises(FastattrError, match="vectors.npy: changed since the bundle was written, so the bundle cannot "
                                            "be changed"):
        compact_bundle(copy, backend="exact")

    shutil.rmtree(copy)
    shutil.copytree(exact_bundle, copy)
    manifest = (copy / "bundle.yaml").read_text()
    unsealed = re.sub(r"(?m)^seal: .*\n", "", manifest).replace("temperature: ", "temperature: 1")
    (copy / "bundle.yaml").write_text(unsealed)  # the seal line deleted with the edit it would reveal
    with pytest.raises(FastattrError, match="bundle.yaml: edited after the bundle was written \\(its seal is missing\\)"):
        Attributor.from_bundle(copy)

    shutil.rmtree(copy)
    shutil.copytree(exact_bundle, copy)
    (copy / "stray.bin").write_bytes(b"x")
    assert "stray.bin not listed" in verify_bundle(copy).format()

    shutil.rmtree(copy)
    shutil.copytree(exact_bundle, copy)
    spec = (copy / "encoder.yaml").read_text()
    (copy / "encoder.yaml").write_text(spec.replace("sandbox-tiny-clip-untuned", "another-encoder"))
    assert not verify_bundle(copy).ok
    with pytest.raises(FastattrError, match="encoder.yaml: changed since the bundle was written"):
        Attributor.from_bundle(copy)

    result = subprocess.run([sys.executable, "-m", "fastattr_cli", "index", "verify", str(copy)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "FAIL" in result.stdout


def test_opt_out_takes_effect_at_once(exact_bundle, sandbox, tmp_path, rows):
    copy = tmp_path / "b"
    shutil.copytree(exact_bundle, copy)
    creator = rows[0]["creator"]
    attributor = Attributor.from_bundle(copy)
    images = [Image.open(sandbox / "data" / r["image"]) for r in rows[:6]]
    captions = [r["caption"] for r in rows[:6]]
    removed = remove_items(copy, creator=creator)
    assert removed == sum(r["creator"] == creator for r in rows)
    remove_items(copy, ids=[rows[1]["id"]])
    attributor.refresh()
    for result in attributor.attribute(images, captions, k=20):
        assert len(result.credits) == 20
        assert all(c.creator != creator and c.id != rows[1]["id"] for c in result.credits)
    assert verify_bundle(copy).ok  # checksums were refreshed


def test_refresh_follows_a_bundle_replaced_by_add(exact_bundle, sandbox, tmp_path, rows):
    copy = tmp_path / "b"
    shutil.copytree(exact_bundle, copy)
    attributor, stale = Attributor.from_bundle(copy), Bundle.open(copy)
    data = sandbox / "data"
    extra = [dict(r, id=r["id"] + "-again", image=str(data / r["image"])) for r in rows[:3]]
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    add_to_bundle(copy, tmp_path / "more.jsonl", _options())  # swaps in a new bundle folder
    index, _ = stale.serve()  # bundle.yaml read just before the swap: the bundle as it is now, not "damaged"
    assert len(index) == stale.manifest.items == len(rows) + 3
    remove_items(copy, ids=[rows[0]["id"], extra[0]["id"]])  # ... and opts out of two items in it
    attributor.refresh()
    assert attributor.manifest.items == len(rows) + 3
    image = Image.open(data / rows[0]["image"])
    credits = attributor.attribute([image], [rows[0]["caption"]], k=5)[0].credits
    assert {c.id for c in credits}.isdisjoint({rows[0]["id"], extra[0]["id"]})  # an item removed after add stays out
    assert [p.name for p in copy.parent.glob(".b.*")] == [".b.lock"]  # no leftover of the swap; the writers' lock stays


def test_concurrent_writers_queue_and_no_opt_out_is_lost(exact_bundle, sandbox, tmp_path, rows, monkeypatch):
    copy = tmp_path / "b"
    shutil.copytree(exact_bundle, copy)
    with writer_lock(copy):  # another writer holds the bundle: a remove waits for it, then applies to the latest
        waiting = threading.Thread(target=remove_items, args=(copy,), kwargs={"ids": [rows[0]["id"]]})
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive()
    waiting.join()

    # An opt-out that lands while an add embeds survives the add's swap.
    data = sandbox / "data"
    extra = [dict(r, id=r["id"] + "-again", image=str(data / r["image"])) for r in rows[:3]]
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    merge = build_mod._merge_chunks

    def opt_out_meanwhile(*args):
        remove_items(copy, ids=[rows[1]["id"]])
        return merge(*args)

    monkeypatch.setattr(build_mod, "_merge_chunks", opt_out_meanwhile)
    add_to_bundle(copy, tmp_path / "more.jsonl", _options())
    with Bundle.open(copy).items() as store:
        assert {i.id for i in store.get(store.removed_keys()).values()} == {rows[0]["id"], rows[1]["id"]}
        assert store.count() == len(rows) + 3
    assert verify_bundle(copy).ok

    # Items added meanwhile by another writer (a second add resuming this one's work folder) took the keys
    # this add was given: refused rather than two items under one key.
    def add_meanwhile(*args):
        with Bundle.change(copy) as staged:
            staged.manifest.manifest.accepted += 1
        return merge(*args)

    monkeypatch.setattr(build_mod, "_merge_chunks", add_meanwhile)
    extra = [dict(r, id=r["id"] + "-third", image=str(data / r["image"])) for r in rows[:2]]
    (tmp_path / "third.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    with pytest.raises(FastattrError, match="another `fastattr index add` changed it while this one embedded"):
        add_to_bundle(copy, tmp_path / "third.jsonl", _options())


def test_add_killed_after_its_change_landed_resumes_as_done(exact_bundle, sandbox, tmp_path, rows, monkeypatch):
    """A kill between the add's commit and the deletion of its work folder: the rows are in, and
    `--resume` (what the kill tests rerun) finds them there instead of refusing the changed bundle."""
    copy = tmp_path / "b"
    shutil.copytree(exact_bundle, copy)
    data = sandbox / "data"
    extra = [dict(r, id=r["id"] + "-again", image=str(data / r["image"])) for r in rows[:3]]
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))

    def killed(work):
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(build_mod, "_delete_work", killed)
    with pytest.raises(KeyboardInterrupt):
        add_to_bundle(copy, tmp_path / "more.jsonl", _options())
    monkeypatch.undo()
    landed = read_manifest(copy)
    assert landed.items == len(rows) + 3 and (tmp_path / "b.add.partial").is_dir()
    assert add_to_bundle(copy, tmp_path / "more.jsonl", _options(), resume=True).files == landed.files
    assert read_manifest(copy).files == landed.files and not (tmp_path / "b.add.partial").exists()

    # Killed while its work folder was being deleted (a slow-lane kill found it): half of it is gone. The
    # folder was renamed before deletion, so --resume sees no unfinished work; it deletes the rest and,
    # finding every row already in, leaves the bundle as it is.
    again = [dict(r, id=r["id"] + "-fourth", image=str(data / r["image"])) for r in rows[:2]]
    (tmp_path / "fourth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in again))
    rmtree = shutil.rmtree

    def killed_midway(path, **kw):
        if Path(path).is_dir() and Path(path).name == ".b.add.partial.deleting":
            rmtree(Path(path) / "chunks")
            raise KeyboardInterrupt
        return rmtree(path, **kw)

    monkeypatch.setattr(build_mod.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        add_to_bundle(copy, tmp_path / "fourth.jsonl", _options())
    monkeypatch.undo()
    landed = read_manifest(copy)
    assert landed.items == len(rows) + 5 and (tmp_path / ".b.add.partial.deleting" / "state.yaml").is_file()
    assert add_to_bundle(copy, tmp_path / "fourth.jsonl", _options(), resume=True).files == landed.files
    assert read_manifest(copy).files == landed.files
    assert not [p.name for p in tmp_path.iterdir() if ".add." in p.name]  # nothing of the add is left

    # Work whose rows are not in the bundle that changed under it is still refused.
    third = [dict(r, id=r["id"] + "-third", image=str(data / r["image"])) for r in rows[:2]]
    (tmp_path / "third.jsonl").write_text("".join(json.dumps(r) + "\n" for r in third))
    monkeypatch.setattr(build_mod, "_merge_chunks", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        add_to_bundle(copy, tmp_path / "third.jsonl", _options())
    monkeypatch.undo()
    remove_items(copy, ids=[rows[0]["id"]])
    with pytest.raises(FastattrError, match="cannot resume: 'bundle' changed since the build started"):
        add_to_bundle(copy, tmp_path / "third.jsonl", _options(), resume=True)


def test_append_adds_new_items_and_rejects_known_ids(exact_bundle, sandbox, tmp_path, rows):
    copy = tmp_path / "b"
    shutil.copytree(exact_bundle, copy)
    data = sandbox / "data"
    extra = [dict(r, id=r["id"] + "-again", image=str(data / r["image"])) for r in rows[:5]]
    extra.append(dict(rows[5], image=str(data / rows[5]["image"])))  # already in the bundle
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    manifest = add_to_bundle(copy, tmp_path / "more.jsonl", _options())
    assert manifest.items == len(rows) + 5
    report = verify_bundle(copy)
    assert report.ok, report.format()
    attributor = Attributor.from_bundle(copy)
    result = attributor.attribute([Image.open(data / rows[0]["image"])], [rows[0]["caption"]], k=2)[0]
    assert {c.id for c in result.credits} == {rows[0]["id"], rows[0]["id"] + "-again"}


@pytest.mark.slow  # the README command stays under 5 minutes; .ci/run runs the slow lane after it
def test_two_accelerate_processes_build_the_same_bundle(sandbox, exact_bundle, tmp_path):
    out = tmp_path / "dist"
    result = subprocess.run(
        # `--multi_gpu` starts 2 processes (CPU + gloo without a GPU); `--cpu` would start only one.
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastattr_cli", "index", "build",
         "--manifest", str(sandbox / "data" / "manifest.jsonl"), "--encoder", str(sandbox / "encoder.yaml"),
         "--out", str(out), "--backend", "exact", "--chunk-size", "32"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embed [0/2]" in result.stderr and "embed [1/2]" in result.stderr  # both processes embedded
    assert np.array_equal(np.load(out / "vectors.npy"), np.load(exact_bundle / "vectors.npy"))
    with sqlite3.connect(out / "items.sqlite") as a, sqlite3.connect(exact_bundle / "items.sqlite") as b:
        query = "SELECT key, id, caption, creator, sha256 FROM items ORDER BY key"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()
    assert read_manifest(out).items == read_manifest(exact_bundle).items


def test_resume_on_a_finished_build_says_complete_and_empty_inputs_are_errors(sandbox, exact_bundle, rows, tmp_path):
    manifest = sandbox / "data" / "manifest.jsonl"
    before = (exact_bundle / "bundle.yaml").read_bytes()
    again = build_bundle(manifest, sandbox / "encoder.yaml", exact_bundle, _options(backend="exact"), resume=True)
    assert again.fingerprint == read_manifest(exact_bundle).fingerprint
    assert (exact_bundle / "bundle.yaml").read_bytes() == before
    with pytest.raises(FastattrError, match="already exists"):  # without --resume it still refuses
        build_bundle(manifest, sandbox / "encoder.yaml", exact_bundle, _options(backend="exact"))
    for text in ("", "\n\n"):
        empty = tmp_path / f"empty{len(text)}.jsonl"
        empty.write_text(text)
        with pytest.raises(FastattrError, match="no usable row, so no bundle was made"):
            build_bundle(empty, sandbox / "encoder.yaml", tmp_path / f"b{len(text)}", _options(backend="exact"))
        assert not (tmp_path / f"b{len(text)}").exists()


def test_add_with_nothing_new_leaves_the_bundle_unchanged(sandbox, exact_bundle, rows, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(exact_bundle, bundle)
    files = {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    same = tmp_path / "same.jsonl"  # every id is already in the bundle
    same.write_text("".join(json.dumps({**r, "image": str(sandbox / "data" / r["image"])}) + "\n" for r in rows[:5]))
    result = add_to_bundle(bundle, same, _options())
    assert result.items == len(rows)
    assert {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == files
    assert not (tmp_path / "bundle.add.partial").exists()


def test_serving_refuses_a_damaged_bundle_by_name(exact_bundle, tmp_path, monkeypatch):
    def copy(name):
        target = tmp_path / name
        shutil.copytree(exact_bundle, target)
        return target

    edited = copy("edited")  # an edited share temperature changes every share: bundle.yaml is sealed
    text = (edited / "bundle.yaml").read_text()
    (edited / "bundle.yaml").write_text(text.replace("temperature: ", "temperature: 1", 1))
    with pytest.raises(FastattrError, match="bundle.yaml: edited after the bundle was written"):
        Attributor.from_bundle(edited, device="cpu")
    assert not verify_bundle(edited).ok

    for damage in (b"schema: \xff\n", b"schema: " + b"[" * 100_000):  # not UTF-8; nested past recursion
        (edited / "bundle.yaml").write_bytes(damage)
        with pytest.raises(FastattrError, match="edited/bundle.yaml: (not UTF-8|nested too deeply).*rebuild"):
            Attributor.from_bundle(edited, device="cpu")
        assert not verify_bundle(edited).ok

    corrupt = copy("corrupt")  # small files are checksummed on every open
    (corrupt / "items.sqlite").write_bytes(b"SQLite format 3\0" + b"\xff" * 4096)
    with pytest.raises(FastattrError, match="corrupt/items.sqlite: changed since .*run `fastattr index verify"):
        Attributor.from_bundle(corrupt, device="cpu")

    # Files too large to hash on every open (here: all of them) get the structural checks.
    monkeypatch.setattr(Bundle, "CHECKED_ON_OPEN", -1)
    with pytest.raises(FastattrError, match="items.sqlite: damaged items store .*run `fastattr index verify"):
        Attributor.from_bundle(corrupt, device="cpu")  # not sqlite's bare "file is not a database"

    short = copy("short")  # rows deleted behind the bundle's back
    with sqlite3.connect(short / "items.sqlite") as db:
        db.execute("DELETE FROM items WHERE key < 3")
    with pytest.raises(FastattrError, match="items store 157 disagree"):
        Attributor.from_bundle(short, device="cpu")

    pages = copy("pages")  # the table's pages damaged: found on open or by the first lookup, named either way
    with sqlite3.connect(pages / "items.sqlite") as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'items'").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    with open(pages / "items.sqlite", "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xff" * page_size)
    with pytest.raises(FastattrError, match="pages/items.sqlite: damaged items store .*run `fastattr index verify"):
        Attributor.from_bundle(pages, device="cpu").attribute([Image.new("RGB", (32, 32))], ["a red circle"], k=5)

