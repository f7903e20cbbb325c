"""SIGKILL at random moments of `fastattr index remove` and `index add` (issue 15): the bundle is
always the one before or the one after the change, verifies, and serves. A few kills here, 20 of
each in the slow lane."""

from __future__ import annotations

import json
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


IDS = [f"sbx-{n:05d}" for n in (3, 5, 8)]


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "fastattr_cli", "index", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _state(path) -> tuple[int, frozenset]:
    """What a remove or an add changes: the item count and the removed ids."""
    b = Bundle.open(path)
    with b.items() as store:
        return store.count(), frozenset(item.id for item in store.get(store.removed_keys()).values())


@pytest.fixture(scope="module")
def extra_manifest(micro_sandbox, tmp_path_factory):
    """Six rows the bundle does not hold yet (new ids for known images), for `index add`."""
    data = micro_sandbox / "data"
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()[:6]]
    path = tmp_path_factory.mktemp("extra") / "more.jsonl"
    path.write_text("".join(json.dumps(dict(r, id=r["id"] + "-again", image=str(data / r["image"]))) + "\n"
                            for r in rows))
    return path


def _kill_at_random_moments(bundle, tmp_path, name: str, command, kills: int, seed: int) -> dict[str, int]:
    """Run ``command(bundle copy)`` once whole (its duration and the 'after' state), then ``kills``
    times killed at a random moment: each time the copy is exactly before or after, verifies, serves.
    Copies sit at the bundle's depth, so its relative encoder paths still resolve."""
    before = _state(bundle)
    timed = tmp_path / f"{name}-timed"
    shutil.copytree(bundle, timed)
    start = time.perf_counter()
    command(timed).wait()
    duration = time.perf_counter() - start
    after = _state(timed)
    assert after != before
    rng = np.random.default_rng(seed)
    outcomes = {"before": 0, "after": 0}
    for n in range(kills):
        target = tmp_path / f"{name}{n}"
        shutil.copytree(bundle, target)
        process = command(target)
        time.sleep(rng.uniform(0.5, 1.05) * duration)  # imports take the first half
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = _state(target)
        assert state in (before, after), state  # all or nothing
        outcomes["after" if state == after else "before"] += 1
        assert verify_bundle(target).ok, verify_bundle(target).format()  # checksums never stale
        attributor = Attributor.from_bundle(target, device="cpu")  # no "readonly database", no hot journal
        vectors = np.asarray(Bundle.open(target).vectors()[:4])
        keys, _ = attributor.search(vectors, 3)
        assert (keys >= 0).all()
        for leftover in tmp_path.glob(f".{name}{n}.*"):  # a killed update may leave its staging folder beside the
            shutil.rmtree(leftover)                  # bundle (and add its resumable work), never inside it
        shutil.rmtree(tmp_path / f"{name}{n}.add.partial", ignore_errors=True)
        shutil.rmtree(target)
    return outcomes


def _remove(target):
    return _cli("remove", target, "--ids", *IDS)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_remove_or_add_changes_all_or_nothing(bundle, extra_manifest, tmp_path):
    assert sum(_kill_at_random_moments(bundle, tmp_path, "remove", _remove, kills=3, seed=0).values()) == 3
    add = lambda target: _cli("add", target, "--manifest", extra_manifest)  # noqa: E731
    assert sum(_kill_at_random_moments(bundle, tmp_path, "add", add, kills=3, seed=0).values()) == 3


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_twenty_kills_of_remove_and_of_add(bundle, extra_manifest, tmp_path):
    removes = _kill_at_random_moments(bundle, tmp_path, "remove", _remove, kills=20, seed=1)
    add = lambda target: _cli("add", target, "--manifest", extra_manifest)  # noqa: E731
    adds = _kill_at_random_moments(bundle, tmp_path, "add", add, kills=20, seed=1)
    print(f"20 SIGKILLs of `index remove`: {removes}; 20 of `index add`: {adds}")
    assert sum(removes.values()) == sum(adds.values()) == 20
