"""SIGKILL at random moments of `fastattr index build`, `add`, `remove` and `compact` (issue 15): the
bundle is always the one before or the one after the change (a build: none, or the whole one),
verifies and serves, and running the command again finishes the change and cleans up what the killed
one left. One kill of add and of remove here, 20 of each command in the slow lane
(`python -m pytest -q -m slow tests/test_kills.py`)."""

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
from index_tools.optout import remove_items
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


def _state(path) -> tuple[int, frozenset] | None:
    """What a change changes: the item count and the removed ids; None without a bundle (before a build)."""
    if not (path / Bundle.MANIFEST).is_file():
        return None
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


def _leftovers(folder, target: str) -> list[str]:
    """What a killed change of ``folder/target`` leaves beside it: staging folders and temp files, and
    a build's or add's resumable ``.partial`` work (the writer's lock file stays by design)."""
    found = [*folder.glob(f".{target}.*"), *folder.glob(f"{target}.*partial")]
    return [p.name for p in found if p.name != f".{target}.lock"]


def _start_until_work(command, target):
    """Start ``command(target)`` and return it once its change has begun (it took the writer lock or
    staged work beside the target) or it has exited, with that moment: start-up (imports) takes most
    of a small change's run, and a kill there tests nothing."""
    process = command(target)
    while process.poll() is None and not ((target.parent / f".{target.name}.lock").exists()
                                          or _leftovers(target.parent, target.name)):
        time.sleep(0.005)
    return process, time.perf_counter()


def _change_seconds(command, target) -> float:
    """Run ``command(target)`` whole; seconds from its change's start to the last moment it had work
    staged (to its exit where none was seen): the exit's interpreter shutdown is no part of the change."""
    process, began = _start_until_work(command, target)
    staged = None
    while process.poll() is None:
        if _leftovers(target.parent, target.name):
            staged = time.perf_counter()
        time.sleep(0.005)
    return (staged or time.perf_counter()) - began


def _kill_at_random_moments(source, tmp_path, name: str, command, kills: int, seed: int,
                            rerun=None) -> dict[str, int]:
    """Run ``command(target)`` on a copy of ``source`` (None: no bundle yet, for a build) once whole
    (how long its change takes, and the 'after' state), then ``kills`` times killed at a random moment
    of its change (or up to 5% of it after the end): each time the target is exactly before or after,
    verifies and serves; then ``rerun(target)`` (default: ``command``) finishes the change and leaves
    nothing of the killed one behind. Targets sit at the source's depth, so its relative encoder paths
    still resolve. Returns the count of each outcome and, apart, of the kills that landed mid-change:
    those that left work behind for the rerun."""
    def fresh(target):
        if source is not None:
            shutil.copytree(source, target)
        return target

    before = _state(source) if source is not None else None
    timed = fresh(tmp_path / f"{name}-timed")
    duration = _change_seconds(command, timed)
    after = _state(timed)
    assert after != before
    rng = np.random.default_rng(seed)
    outcomes = {"before": 0, "after": 0, "mid-change": 0}
    for n in range(kills):
        target = fresh(tmp_path / f"{name}{n}")
        process, _ = _start_until_work(command, target)
        time.sleep(rng.uniform(0, 1.05) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = _state(target)
        assert state in (before, after), state  # all or nothing
        outcomes["after" if state == after else "before"] += 1
        outcomes["mid-change"] += bool(_leftovers(tmp_path, f"{name}{n}"))
        if state is not None:
            assert verify_bundle(target).ok, verify_bundle(target).format()  # checksums never stale
            attributor = Attributor.from_bundle(target, device="cpu")  # no "readonly database", no hot journal
            vectors = np.asarray(Bundle.open(target).vectors()[:4])
            keys, _ = attributor.search(vectors, 3)
            assert (keys >= 0).all()
        assert (rerun or command)(target).wait() == 0
        assert _state(target) == after
        if name == "build":  # resumed, it is the uninterrupted build, file for file
            assert Bundle.open(target).manifest.files == Bundle.open(timed).manifest.files
        assert _leftovers(tmp_path, f"{name}{n}") == []  # the rerun cleaned up what the killed change left
        shutil.rmtree(target)
    return outcomes


def _remove(target):
    return _cli("remove", target, "--ids", *IDS)


@pytest.fixture(scope="module")
def removed(bundle, tmp_path_factory):
    """The bundle with IDS removed: what `index compact` deletes for good."""
    out = tmp_path_factory.mktemp("removed") / "b"
    shutil.copytree(bundle, out)
    remove_items(out, ids=IDS)
    return out


def _commands(micro_sandbox, extra_manifest):
    """name -> (source bundle fixture name or None, command, rerun or None)."""
    manifest, encoder = micro_sandbox / "data" / "manifest.jsonl", micro_sandbox / "encoder.yaml"
    build = ["build", "--manifest", manifest, "--encoder", encoder, "--backend", "exact", "--out"]
    return {
        "build": (None, lambda t: _cli(*build, t), lambda t: _cli(*build, t, "--resume")),
        "add": ("bundle", lambda t: _cli("add", t, "--manifest", extra_manifest),
                lambda t: _cli("add", t, "--manifest", extra_manifest, "--resume")),
        "remove": ("bundle", _remove, None),
        "compact": ("removed", lambda t: _cli("compact", t), None),
    }


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("name", ["add", "remove"])  # build and compact in the slow lane: ~30 s a kill here
def test_a_killed_change_is_all_or_nothing_and_a_rerun_finishes_it(name, request, micro_sandbox, extra_manifest,
                                                                   tmp_path):
    source, command, rerun = _commands(micro_sandbox, extra_manifest)[name]
    source = request.getfixturevalue(source) if source else None
    outcomes = _kill_at_random_moments(source, tmp_path, name, command, kills=1, seed=0, rerun=rerun)
    assert outcomes["before"] + outcomes["after"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("name", ["build", "add", "remove", "compact"])
def test_twenty_kills_of_each_change(name, request, micro_sandbox, extra_manifest, tmp_path):
    source, command, rerun = _commands(micro_sandbox, extra_manifest)[name]
    source = request.getfixturevalue(source) if source else None
    outcomes = _kill_at_random_moments(source, tmp_path, name, command, kills=20, seed=1, rerun=rerun)
    print(f"20 SIGKILLs of `index {name}`: {outcomes}")
    assert outcomes["before"] + outcomes["after"] == 20
