"""``fastattr index build --ray``: chunks embedded by Ray actors give the single-process bundle.

Ray starts twice, in the slow lane only (about 35 s each on 2 busy cores): in the CLI test (a
local instance started by the command) and for the in-process tests (``local_ray``, 2 CPUs: 2 workers).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from fastattr_hook.bundle import read_manifest
from fastattr_hook.errors import FastattrError
from index_tools import build as build_mod
from index_tools.build import BuildOptions, add_to_bundle, build_bundle
from index_tools.ray_build import RayChunkPool, check_reachable

ray = pytest.importorskip("ray")

CHUNKS = 6  # 42 rows reach the chunks (40 good, a missing and a corrupt image), 8 per chunk


def _options(**kw) -> BuildOptions:
    return BuildOptions(progress=False, **{"chunk_size": 8, **kw})


@pytest.fixture(scope="module")
def manifest(micro_sandbox, tmp_path_factory):
    """40 good rows and 3 rejected ones: one by the driver's checks, two by the workers'."""
    folder = tmp_path_factory.mktemp("ray-manifest")
    data = micro_sandbox / "data"
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    lines = [dict(r, image=str(data / r["image"])) for r in rows[:40]]
    lines.insert(5, dict(rows[40], id="missing", image=str(folder / "nope.png")))
    lines.insert(20, dict(rows[41], id="corrupt", image=str(folder / "corrupt.png"), sha256=None))
    lines.append(dict(rows[42], id=rows[0]["id"], image=str(data / rows[42]["image"])))  # duplicate id
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def encoder(micro_sandbox):
    return micro_sandbox / "encoder.yaml"


@pytest.fixture(scope="module")
def single(manifest, encoder, tmp_path_factory):
    """The reference: the same manifest built in this process."""
    out = tmp_path_factory.mktemp("single") / "b"
    build_bundle(manifest, encoder, out, _options())
    return out


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _assert_same_bundle(a, b) -> None:
    assert np.allclose(np.load(a / "vectors.npy"), np.load(b / "vectors.npy"), atol=1e-6)
    query = "SELECT key, id, caption, creator, license, source_url, sha256, image, thumbnail FROM items ORDER BY key"
    with sqlite3.connect(a / "items.sqlite") as x, sqlite3.connect(b / "items.sqlite") as y:
        assert x.execute(query).fetchall() == y.execute(query).fetchall()
    assert (a / "rejects.jsonl").read_text() == (b / "rejects.jsonl").read_text()
    ma, mb = read_manifest(a), read_manifest(b)
    assert (ma.items, ma.manifest.rejected, ma.encoder.fingerprint) == (mb.items, mb.manifest.rejected,
                                                                        mb.encoder.fingerprint)


def _cli_build(manifest, encoder, out, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "fastattr_cli", "index", "build", "--manifest", str(manifest),
                           "--encoder", str(encoder), "--out", str(out), "--chunk-size", "8", *flags],
                          capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})


def test_unreachable_cluster_address_fails_within_seconds(manifest, encoder, tmp_path):
    with socket.socket() as s:  # a port nobody listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = _cli_build(manifest, encoder, tmp_path / "b", "--ray", "--ray-address", f"127.0.0.1:{port}")
    assert result.returncode == 2 and f"Ray cluster at 127.0.0.1:{port} not reachable" in result.stderr
    assert time.monotonic() - start < 30  # ray.init alone retries such an address for minutes
    assert not (tmp_path / "b.partial").exists()
    with pytest.raises(FastattrError, match="expected HOST:PORT"):
        check_reachable("headnode")


@pytest.mark.slow
def test_cli_ray_build_on_a_local_ray_equals_the_single_process_build(manifest, encoder, single, tmp_path):
    out = tmp_path / "b"
    result = _cli_build(manifest, encoder, out, "--ray", "--ray-workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_bundle(out, single)
    assert not out.with_name("b.partial").exists()


@pytest.mark.slow
def test_killed_ray_build_resumes_without_redoing_finished_chunks(local_ray, manifest, encoder, single, tmp_path,
                                                                  monkeypatch):
    def not_here(*args, **kwargs):
        raise AssertionError("with --ray the driver embeds nothing itself")

    def killed(work, accepted):
        raise KeyboardInterrupt  # killed after the embedding, before the merge

    real_merge, real_submit = build_mod._merge_chunks, RayChunkPool.submit
    monkeypatch.setattr(build_mod, "_embed_chunk", not_here)
    monkeypatch.setattr(build_mod, "_merge_chunks", killed)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        build_bundle(manifest, encoder, out, _options(ray=True))  # default: one worker per CPU, 2
    chunks = tmp_path / "b.partial" / "chunks"
    assert sorted(p.name for p in chunks.glob("*.npz")) == [f"{i:06d}.npz" for i in range(CHUNKS)]
    for i in (1, 4):  # as if the job had died before these two finished
        (chunks / f"{i:06d}.npz").unlink()

    def files():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks.glob("*.npz")}

    kept, at_merge, submitted = files(), {}, []

    def merge(work, accepted):
        at_merge.update(files())
        return real_merge(work, accepted)

    def submit(self, chunk_index, rows):
        submitted.append(chunk_index)
        return real_submit(self, chunk_index, rows)

    monkeypatch.setattr(build_mod, "_merge_chunks", merge)
    monkeypatch.setattr(RayChunkPool, "submit", submit)
    with pytest.raises(FastattrError, match="--resume"):
        build_bundle(manifest, encoder, out, _options(ray=True))
    build_bundle(manifest, encoder, out, _options(ray=True), resume=True)
    assert submitted == [1, 4]
    assert {name: at_merge[name] for name in kept} == kept  # finished chunks were not written again
    _assert_same_bundle(out, single)
    assert not (tmp_path / "b.partial").exists()


@pytest.mark.slow
def test_what_a_cluster_cannot_do_is_said_by_name(local_ray, manifest, encoder, tmp_path):
    with pytest.raises(FastattrError, match="--ray-workers 3: the Ray cluster has 2 CPUs"):
        build_bundle(manifest, encoder, tmp_path / "b", _options(ray=True, ray_workers=3))
    pool = RayChunkPool(encoder, tmp_path / "elsewhere.partial", _options(ray=True, ray_workers=1))
    with pool, pytest.raises(FastattrError, match="elsewhere.partial is not visible on Ray node"):
        pool.submit(0, [])  # a worker on a node without the shared work dir
        pool.drain()


def test_ray_is_refused_where_it_does_not_apply(manifest, encoder, tmp_path, monkeypatch, capsys):
    from fastattr_cli import main

    with pytest.raises(FastattrError, match="--device cuda does not apply with --ray"):
        build_bundle(manifest, encoder, tmp_path / "c", _options(ray=True, device="cuda"))
    with pytest.raises(FastattrError, match="for `fastattr index build` only"):
        add_to_bundle(tmp_path / "bundle", manifest, _options(ray=True))
    assert main(["index", "build", "--manifest", str(manifest), "--encoder", str(encoder), "--out",
                 str(tmp_path / "d"), "--ray-workers", "2"]) == 2
    assert "--ray-workers only applies with --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(FastattrError, match=r"pip install 'fastattr\[ray\]'"):
        build_bundle(manifest, encoder, tmp_path / "f", _options(ray=True))
    monkeypatch.setattr(build_mod, "distributed", lambda: (0, 2, lambda: None, None))
    with pytest.raises(FastattrError, match="accelerate launch / torchrun"):
        build_bundle(manifest, encoder, tmp_path / "e", _options(ray=True))
