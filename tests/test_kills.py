"""SIGKILL at random moments of `fastattr index remove` (issue 15): the bundle is always the one
before or the one after the removal, verifies, and serves. A few kills here, 20 in the slow lane."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastattr_hook.attributor import Attributor
from fastattr_hook.bundle import Bundle
from index_tools.build import BuildOptions, build_bundle
from index_tools.verify import verify_bundle


@pytest.fixture(scope="module")
def bundle(micro_sandbox, tmp_path_factory):
    out = tmp_path_factory.mktemp("kills") / "b"
    build_bundle(micro_sandbox / "data" / "manifest.jsonl", micro_sandbox / "encoder.yaml", out,
                 BuildOptions(progress=False, backend="exact"))
    return out


def _remove(path, ids):
    return subprocess.Popen([sys.executable, "-m", "fastattr_cli", "index", "remove", str(path), "--ids", *ids],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _removed(path) -> set[str]:
    b = Bundle.open(path)
    with b.items() as store:
        return {item.id for item in store.get(store.removed_keys()).values()}


def _kill_at_random_moments(bundle, tmp_path, kills: int, seed: int) -> dict[str, int]:
    ids = [f"sbx-{n:05d}" for n in (3, 5, 8)]
    shutil.copytree(bundle, tmp_path / "timed")
    start = time.perf_counter()
    _remove(tmp_path / "timed", ids).wait()  # how long a whole run takes on this machine
    duration = time.perf_counter() - start
    shutil.rmtree(tmp_path / "timed")
    rng = np.random.default_rng(seed)
    outcomes = {"before": 0, "after": 0}
    for n in range(kills):
        target = tmp_path / f"k{n}"
        shutil.copytree(bundle, target)
        process = _remove(target, ids)
        time.sleep(rng.uniform(0.5, 1.05) * duration)  # imports take the first half
        process.send_signal(signal.SIGKILL)
        process.wait()
        removed = _removed(target)
        assert removed in (set(), set(ids)), removed  # all or nothing
        outcomes["after" if removed else "before"] += 1
        assert verify_bundle(target).ok, verify_bundle(target).format()  # checksums never stale
        attributor = Attributor.from_bundle(target, device="cpu")  # no "readonly database", no hot journal
        vectors = np.asarray(Bundle.open(target).vectors()[:4])
        keys, _ = attributor.search(vectors, 3)
        assert (keys >= 0).all()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".k{n}.")]
        for name in leftovers:  # a killed update may leave its staging folder beside the bundle, never inside
            shutil.rmtree(tmp_path / name)
        shutil.rmtree(target)
    return outcomes


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_remove_changes_all_or_nothing(bundle, tmp_path):
    outcomes = _kill_at_random_moments(bundle, tmp_path, kills=3, seed=0)
    assert sum(outcomes.values()) == 3


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_twenty_kills_of_remove(bundle, tmp_path):
    outcomes = _kill_at_random_moments(bundle, tmp_path, kills=20, seed=1)
    print(f"20 SIGKILLs of `index remove`: {outcomes}")
    assert sum(outcomes.values()) == 20
