"""Sharded bundles (issue 13, item 3): `index add` writes a shard, search merges the shards exactly,
`index compact` merges them and deletes opted-out items for good, mismatched or missing shards are
refused by name, and single-index bundles open as before."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sqlite3

import numpy as np
import pytest

from fastattr_hook.attributor import Attributor
from fastattr_hook.bundle import Bundle, read_manifest, write_manifest
from fastattr_hook.errors import FastattrError
from fastattr_hook.search import ShardedIndex, create_index, recall_at_k
from index_tools.build import BuildOptions, add_to_bundle, build_bundle, compact_bundle
from index_tools.optout import remove_items
from index_tools.verify import verify_bundle

SPLITS = (0, 100, 130, 160)  # the micro manifest's rows: a build, then two adds


def _options(**kw):
    return BuildOptions(progress=False, chunk_size=64, **kw)


def _manifest(path, rows, data):
    path.write_text("".join(json.dumps(dict(r, image=str(data / r["image"]))) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rows(micro_sandbox):
    return [json.loads(line) for line in (micro_sandbox / "data" / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sharded(micro_sandbox, rows, tmp_path_factory):
    """The micro manifest as a build of its first 100 rows and two adds: index/ and two shards."""
    folder, data = tmp_path_factory.mktemp("shards"), micro_sandbox / "data"
    parts = [_manifest(folder / f"part{n}.jsonl", rows[a:b], data) for n, (a, b) in enumerate(itertools.pairwise(SPLITS))]
    out = folder / "b"
    build_bundle(parts[0], micro_sandbox / "encoder.yaml", out, _options(backend="exact"))
    index_file = out / "index" / "vectors.npy"
    inode = os.stat(index_file).st_ino
    for part in parts[1:]:
        add_to_bundle(out, part, _options())
    assert os.stat(index_file).st_ino == inode  # index/ was hard-linked into each new bundle, never rewritten
    return out


def _copy(bundle, tmp_path, name="b"):
    """A copy at the depth of the ``sharded`` bundle, so its relative encoder and image paths still resolve."""
    target = tmp_path / name
    shutil.copytree(bundle, target)
    return target


def test_adds_write_shards_whose_merged_search_equals_exact_search(sharded, micro_sandbox, rows):
    manifest = read_manifest(sharded)
    assert [(s.name, s.items, s.first_key, s.last_key, s.backend) for s in manifest.shards] == [
        ("0001", 30, 100, 129, "exact"), ("0002", 30, 130, 159, "exact")]
    assert manifest.items == manifest.manifest.accepted == len(rows)
    index = Bundle.open(sharded).index()
    assert isinstance(index, ShardedIndex) and [len(s) for s in index.shards] == [100, 30, 30]
    vectors = np.load(sharded / "vectors.npy")
    assert np.allclose(vectors, np.load(micro_sandbox / "bundle" / "vectors.npy"), atol=1e-6)  # = one build
    reference = create_index("exact", vectors.shape[1])
    reference.add(np.arange(len(vectors)), vectors)
    queries = np.concatenate([vectors[::7], np.random.default_rng(0).standard_normal((8, vectors.shape[1]))])
    exclude = np.array([1, 105, 140, 150])
    for k, skip in ((1, None), (10, None), (25, exclude), (len(vectors) + 5, exclude)):
        got_keys, got_scores = index.search(queries, k, exclude=skip)
        want_keys, want_scores = reference.search(queries, k, exclude=skip)
        assert np.array_equal(got_keys, want_keys), k
        assert np.allclose(got_scores, want_scores, atol=1e-6)
    report = verify_bundle(sharded, deep=True, sample=12)
    assert report.ok and report.figures["recall_at_10"] == 1.0, report.format()
    served, _ = Bundle.open(sharded).serve()
    assert len(served) == len(rows)


def test_sharded_index_merges_any_backends_and_is_read_only():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((600, 32)).astype(np.float32)
    parts = []
    for backend, rows in (("exact", slice(0, 300)), ("usearch", slice(300, 600))):
        part = create_index(backend, 32)
        part.add(np.arange(600)[rows], vectors[rows])
        parts.append(part)
    merged, reference = ShardedIndex(parts), create_index("exact", 32)
    reference.add(np.arange(600), vectors)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    assert len(merged) == 600
    found, scores = merged.search(queries, 10)
    # the merge is exact: the best 10 of the shards' own top 10s
    own = [part.search(queries, 10) for part in parts]
    keys, own_scores = np.concatenate([k for k, _ in own], axis=1), np.concatenate([s for _, s in own], axis=1)
    best = np.argsort(-own_scores, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found, np.take_along_axis(keys, best, axis=1))
    np.testing.assert_allclose(scores, np.take_along_axis(own_scores, best, axis=1), atol=1e-6)
    # usearch's graph is built on every core, so its shard's recall varies a little between runs on these
    # 32-d Gaussian vectors (a fresh CI run measured 0.9875 at k = 10)
    exact, _ = reference.search(queries, 10)
    assert recall_at_k(found, exact, 10) >= 0.98
    with pytest.raises(FastattrError, match="sharded index is read-only.*index compact"):
        merged.add(np.array([600]), vectors[:1])
    with pytest.raises(FastattrError, match="one dimension"):
        ShardedIndex([parts[0], create_index("exact", 16)])
    lossy = create_index("usearch", 32, {"dtype": "i8"})  # one lossy shard: the merged index is re-ranked
    lossy.add(np.arange(300, 600), vectors[300:])
    merged = ShardedIndex([parts[0], lossy])
    assert merged.lossy and not ShardedIndex(parts).lossy
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    found, scores = merged.rerank_with(unit).search(queries, 10)
    # every score is re-computed on float32 vectors, in order; the lossy shard's graph search may still miss
    # a neighbour now and then (a CI run missed 1 of 400), so its recall is bounded, not exact
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", unit_queries, unit[found]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert recall_at_k(found, exact, 10) >= 0.98


def test_compact_deletes_removed_items_for_good_and_keeps_keys_and_results(sharded, micro_sandbox, rows, tmp_path):
    bundle = _copy(sharded, tmp_path)
    gone = [rows[n]["id"] for n in (2, 110, 159)]  # one in index/, one in each shard (159: the last key)
    remove_items(bundle, ids=gone)
    with sqlite3.connect(bundle / "items.sqlite") as db:
        keys_before = dict(db.execute("SELECT id, key FROM items WHERE removed = 0"))
        gone_keys = [k for (k,) in db.execute(f"SELECT key FROM items WHERE id IN ({','.join('?' * 3)})", gone)]
    attributor = Attributor.from_bundle(bundle, device="cpu")
    queries = np.load(bundle / "vectors.npy")[::5]
    keys_served, scores_served = attributor.search(queries, 10)

    done = compact_bundle(bundle)
    assert (done.changed, done.items_before, done.indexes_before, done.deleted, done.items_after) == (
        True, 160, 3, 3, 157)
    manifest = read_manifest(bundle)
    assert manifest.shards == [] and not (bundle / "shards").exists()
    assert (manifest.items, manifest.dropped, manifest.manifest.accepted) == (157, 3, 160)
    with sqlite3.connect(bundle / "items.sqlite") as db:
        assert db.execute(f"SELECT COUNT(*) FROM items WHERE id IN ({','.join('?' * 3)})", gone).fetchone()[0] == 0
        assert dict(db.execute("SELECT id, key FROM items")) == keys_before  # every other key unchanged
    raw = (bundle / "items.sqlite").read_bytes()
    assert not any(i.encode() in raw for i in gone)  # VACUUM: not even in free pages
    vectors, keys = np.load(bundle / "vectors.npy"), np.load(bundle / "keys.npy")
    assert len(vectors) == len(keys) == 157 and not np.isin(gone_keys, keys).any()
    old = np.load(sharded / "vectors.npy")
    assert np.array_equal(vectors, np.delete(old, gone_keys, axis=0))  # the removed vectors are gone
    assert len(Bundle.open(bundle).index()) == 157

    attributor.refresh()  # follows the compacted bundle
    keys_now, scores_now = attributor.search(queries, 10)
    assert np.array_equal(keys_now, keys_served) and np.allclose(scores_now, scores_served, atol=1e-6)
    report = verify_bundle(bundle, deep=True, sample=12)
    assert report.ok and report.figures["recall_at_10"] == 1.0, report.format()

    # adding after a compaction: rows at their keys no more (keys.npy grows), and no key is reused
    add_to_bundle(bundle, _manifest(tmp_path / "more.jsonl", [dict(rows[0], id="again")], micro_sandbox / "data"),
                  _options())
    assert read_manifest(bundle).shards[0].first_key == 160  # not 159, the key of a deleted item
    assert np.load(bundle / "keys.npy")[-2:].tolist() == [158, 160]
    report = verify_bundle(bundle, deep=True, sample=12)
    assert report.ok, report.format()


def test_compact_with_nothing_to_do_is_a_no_op_and_an_all_removed_bundle_is_refused(micro_sandbox, tmp_path, capsys):
    from fastattr_cli import main

    bundle = _copy(micro_sandbox / "bundle", tmp_path)
    files = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    # What a change killed after its swap, while deleting the old copy, leaves: the rerun is this no-op.
    (tmp_path / f".{bundle.name}.killed.tmp" / "index").mkdir(parents=True)
    assert main(["index", "compact", str(bundle)]) == 0
    assert "nothing to compact (160 items in one exact index, none removed)" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == files
    assert not list(tmp_path.glob(f".{bundle.name}.*.tmp"))  # cleared, as by any writer
    with Bundle.open(bundle).items() as store:
        ids = list(store.ids())
    remove_items(bundle, ids=ids)
    with pytest.raises(FastattrError, match="every item is removed.*delete the bundle instead"):
        compact_bundle(bundle)


def test_cli_compact_and_info_report_the_shards(sharded, tmp_path, capsys):
    from fastattr_cli import main

    bundle = _copy(sharded, tmp_path)
    assert main(["index", "info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "shards: 2 beside index/" in out and "0002: 30 items, keys 130-159, backend exact {}, dtype f32" in out
    assert main(["index", "remove", str(bundle), "--ids", "sbx-00004"]) == 0
    assert main(["index", "compact", str(bundle), "--backend", "usearch", "--backend-param", "dtype=f16"]) == 0
    assert "160 items in 3 index shards -> 159 items in one usearch index; 1 removed items deleted" in \
        capsys.readouterr().out
    manifest = read_manifest(bundle)
    assert (manifest.backend, manifest.dtype, manifest.backend_params["dtype"]) == ("usearch", "f16", "f16")
    assert main(["index", "verify", str(bundle)]) == 0


@pytest.mark.parametrize("field,value,message", [
    ("encoder", "sha256:" + "0" * 64, r"shard '0001' was built with encoder fingerprint sha256:0000000000"),
    ("dim", 64, r"shard '0001' was built with dim 64 \(the bundle's: 128\)"),
    ("metric", "l2", r"shard '0001' was built with metric l2"),
])
def test_a_shard_that_does_not_match_the_bundle_is_refused_by_name(sharded, tmp_path, field, value, message):
    bundle = _copy(sharded, tmp_path)
    manifest = read_manifest(bundle)
    setattr(manifest.shards[0], field, value)
    write_manifest(bundle, manifest)  # re-sealed: only the shard's record disagrees
    with pytest.raises(FastattrError, match=message):
        Bundle.open(bundle).index()
    with pytest.raises(FastattrError, match=message):
        Attributor.from_bundle(bundle, device="cpu")
    report = verify_bundle(bundle)
    assert not report.ok and "shard '0001' was built with" in report.format()


def test_a_missing_shard_folder_is_named(sharded, tmp_path):
    bundle = _copy(sharded, tmp_path)
    shutil.rmtree(bundle / "shards" / "0002")
    with pytest.raises(FastattrError, match=r"shards/0002: shard '0002' listed in .*bundle.yaml is missing"):
        Attributor.from_bundle(bundle, device="cpu")
    assert "shards/0002/vectors.npy missing" in verify_bundle(bundle).format()


@pytest.mark.parametrize("name", ["micro", "default"])
def test_single_index_bundles_open_and_are_written_as_before(name, tmp_path):
    from fastattr_sandbox import build

    shipped = build.DEFAULT_SANDBOX.parent / name / "bundle"
    if not (shipped / "bundle.yaml").is_file():
        pytest.skip(f"no shipped {name} bundle")
    bundle = Bundle.open(shipped)  # read only: the shipped bundles are never changed
    assert bundle.manifest.shards == [] and bundle.manifest.dropped == 0
    index, store = bundle.serve()
    assert not isinstance(index, ShardedIndex) and len(index) == bundle.manifest.items == store.count()
    store.close()
    copy = tmp_path / "bundle.yaml"
    write_manifest(tmp_path, read_manifest(shipped))  # same fields: same bytes, same seal
    assert copy.read_bytes() == (shipped / "bundle.yaml").read_bytes()
