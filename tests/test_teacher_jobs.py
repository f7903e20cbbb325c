"""Curation jobs on the micro sandbox: the plan (stage 1 + 2), the merged dataset, and the
determinism the issue asks for (same config twice, 2 processes = 1, killed + resumed = uninterrupted)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastattr_hook.bundle import read_manifest
from fastattr_hook.errors import FastattrError
from fastattr_hook.files import claim, sha256_file
from fastattr_teacher.curate import Plan, curate, load_job, load_plan, run_fisher, score_queue
from fastattr_teacher.merge import merge

# 3 train queries (M=4 of K=12 candidates), 1 test query over all 160 items; a tiny teacher.
JOB = {"train_queries": 3, "test_queries": 1, "candidates": 12, "scored": 4, "steps": 4,
       "teacher": {"fisher_samples": 32, "query_pairs": 16, "timesteps": 1, "batch_size": 16}}
# CPU only, one thread per process: the same kernels as the in-process reference run, so the same bits.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}


def write_job(folder: Path, sandbox: Path, **changes) -> Path:
    """A job YAML in ``folder`` whose results go to ``folder/run``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"sandbox": str(sandbox), "out": "run", **JOB, **changes}))
    return path


def copy_run(reference: Path, folder: Path, sandbox: Path, keep: tuple[str, ...]) -> Path:
    """A new job folder holding the ``keep`` parts of the reference run."""
    path = write_job(folder, sandbox)
    (folder / "run").mkdir()
    for name in keep:
        source = reference / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, folder / "run" / name)
    return path


def results(run: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted((run / "queries").glob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            out[path.stem] = {k: z[k] for k in ("keys", "ids", "tau", "rank")}
    return out


def assert_same_results(a: Path, b: Path) -> None:
    ra, rb = results(a), results(b)
    assert ra.keys() == rb.keys() and len(ra) == 4
    for qid in ra:
        for name in ("keys", "ids", "tau", "rank"):
            assert np.array_equal(ra[qid][name], rb[qid][name]), (qid, name)


def assert_same_plan(a: Path, b: Path) -> None:
    pa, pb = Plan.load(a / "plan.npz"), Plan.load(b / "plan.npz")
    for key in ("settings", "model", "manifest", "bundle", "training_items"):
        assert pa.meta[key] == pb.meta[key], key
    assert np.array_equal(pa.train_keys, pb.train_keys) and np.array_equal(pa.train_ids, pb.train_ids)
    for qa, qb in zip(pa.queries, pb.queries, strict=True):
        assert (qa.qid, qa.split, qa.prompt, qa.seed) == (qb.qid, qb.split, qb.prompt, qb.seed)
        assert np.array_equal(qa.candidates, qb.candidates)
        assert (a / "images" / f"{qa.qid}.png").read_bytes() == (b / "images" / f"{qb.qid}.png").read_bytes()


def run_cli(*args: str, launch: bool = False) -> subprocess.CompletedProcess:
    # accelerate 1.x starts ONE process for `--cpu --num_processes 2`; `--multi_gpu` starts two
    # (torchrun), which fall back to CPU + gloo without a visible GPU.
    prefix = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"] if launch else []
    return subprocess.run([sys.executable, *prefix, "-m", "fastattr_cli", *args], capture_output=True,
                          text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def reference(micro_sandbox, tmp_path_factory):
    """One uninterrupted in-process run of every step: the run the others must reproduce."""
    torch.set_num_threads(1)  # the subprocess runs use OMP_NUM_THREADS=1: same kernels, same bits
    job = load_job(write_job(tmp_path_factory.mktemp("reference"), micro_sandbox))
    curate(job)
    run_fisher(job)
    assert not (job.cache_dir / "fisher-passes").exists()  # dropped once the Fisher is saved
    with claim(job.cache_dir / "claims" / "train-00000.claim") as held:  # as another process would hold it
        assert held and score_queue(job) == ["test-00000", "train-00001", "train-00002"]
    assert score_queue(job) == ["train-00000"]  # released: the rest of the queue
    merge(job)
    return Path(job.out)


def test_plan_and_merged_dataset(reference, micro_sandbox, tmp_path):
    from fastattr_hook.attributor import Attributor

    plan = Plan.load(reference / "plan.npz")
    prompts = {json.loads(line)["prompt"] for line in (micro_sandbox / "data" / "query_prompts.jsonl").open()}
    assert [q.split for q in plan.queries] == ["train"] * 3 + ["test"]
    assert all(q.prompt in prompts for q in plan.queries) and len({q.seed for q in plan.queries}) == 4
    assert plan.queries[3].prompt not in {q.prompt for q in plan.queries[:3]}  # test prompts are held out of train
    # Stage 2 picks M=4 distinct items among the query's K=12 nearest in the baseline bundle (stage 1).
    attributor = Attributor.from_bundle(micro_sandbox / "bundle", device="cpu")
    train = plan.queries[:3]
    images = [Image.open(reference / "images" / f"{q.qid}.png").convert("RGB") for q in train]
    nearest, _ = attributor.search(attributor.encoder.embed(images, [q.prompt for q in train], role="query"), 12)
    for query, row in zip(train, nearest):
        keys = plan.train_keys[query.candidates]
        assert len(set(keys.tolist())) == 4 and set(keys.tolist()) <= set(row.tolist())
    assert len({tuple(plan.train_keys[q.candidates]) for q in train}) > 1  # the picks depend on the query

    data = np.load(reference / "distill.npz", allow_pickle=False)
    assert data["query_id"].tolist() == ["train-00000", "train-00001", "train-00002", "test-00000"]
    assert data["offsets"].tolist() == [0, 4, 8, 12, 12 + 160]
    assert len(data["key"]) == len(data["id"]) == len(data["tau"]) == len(data["rank"]) == 172
    assert np.isfinite(data["tau"]).all() and (data["seconds"] > 0).all()
    for i in range(4):
        part = slice(data["offsets"][i], data["offsets"][i + 1])
        tau, rank = data["tau"][part], data["rank"][part]
        assert sorted(rank.tolist()) == list(range(len(tau)))
        assert (np.diff(tau[np.argsort(rank)]) <= 0).all()  # rank 0 has the highest tau, and so on
        image = Image.open(reference / data["image"][i])
        assert image.size == (32, 32) and image.format == "PNG"
    # The test query is scored against the whole training set, keys matching the bundle's ids.
    test = slice(data["offsets"][3], data["offsets"][4])
    assert sorted(data["key"][test].tolist()) == list(range(160))
    store = attributor.store.get(data["key"][test].tolist())
    assert all(store[int(k)].id == i for k, i in zip(data["key"][test], data["id"][test]))
    made = yaml.safe_load((reference / "distill.yaml").read_text())
    assert made["schema"] == "fastattr/distill@1" and made["job"]["teacher"]["query_pairs"] == 16
    assert made["counts"] == {"queries": 4, "missing": 0, "candidates": 172, "training_items": 160, "train": 3,
                              "test": 1}
    assert made["fingerprints"]["bundle"]["fingerprint"] == read_manifest(micro_sandbox / "bundle").fingerprint
    assert made["fingerprints"]["fisher"] == sha256_file(reference / "fisher.safetensors")
    assert made["teacher_seconds"]["test"]["per_query"] > made["teacher_seconds"]["train"]["per_query"]

    # A partial merge is refused, naming what is missing, unless asked for.
    job = load_job(copy_run(reference, tmp_path, micro_sandbox, ("plan.npz", "fisher.safetensors", "queries")))
    (Path(job.out) / "queries" / "test-00000.npz").unlink()
    with pytest.raises(FastattrError, match=r"1 of 4 queries are not scored yet \(e\.g\. test-00000\)"):
        merge(job)
    partial = np.load(merge(job, allow_partial=True))
    assert partial["query_id"].tolist() == data["query_id"].tolist()[:3]
    assert np.array_equal(partial["tau"], data["tau"][:12])

    # A fresh clone holds the results, not the Fisher: the merge carries its fingerprint over from the
    # previous manifest, and without one names the missing file and the command that remakes it.
    (Path(job.out) / "fisher.safetensors").unlink()
    merge(job, allow_partial=True)
    assert yaml.safe_load((Path(job.out) / "distill.yaml").read_text())["fingerprints"] == made["fingerprints"]
    (Path(job.out) / "distill.yaml").unlink()
    (Path(job.out) / "distill.npz").unlink()
    with pytest.raises(FastattrError, match=r"fisher\.safetensors: missing, and no previous distill\.yaml records "
                                            r"its fingerprint; run `fastattr teacher fisher"):
        merge(job, allow_partial=True)
    assert not (Path(job.out) / "distill.npz").exists()  # refused before anything is written


@pytest.mark.slow  # the README command stays under 5 minutes; .ci/run runs the slow lane after it
def test_same_config_twice_gives_identical_results(reference, micro_sandbox, tmp_path):
    job = load_job(write_job(tmp_path, micro_sandbox))
    curate(job)
    run_fisher(job)
    score_queue(job)
    assert_same_plan(reference, Path(job.out))
    assert (reference / "fisher.safetensors").read_bytes() == Path(job.fisher_path).read_bytes()
    assert_same_results(reference, Path(job.out))
    assert score_queue(job) == []  # everything done: nothing is redone
    job.image_path("train-00001").unlink()  # curate restores a lost query image, bit for bit
    assert curate(job) is not None
    assert job.image_path("train-00001").read_bytes() == (reference / "images" / "train-00001.png").read_bytes()


@pytest.mark.slow  # the README command stays under 5 minutes; .ci/run runs the slow lane after it
def test_two_processes_equal_one(reference, micro_sandbox, tmp_path):
    # The Fisher and loss cache come from the reference: they are single-process steps (checked above).
    config = copy_run(reference, tmp_path, micro_sandbox, ("fisher.safetensors", "cache"))
    for step in ("curate", "score"):
        result = run_cli("teacher", step, "--config", str(config), launch=True)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "process 1/2" in result.stderr and "process 2/2" in result.stderr  # both shared the queue
    assert_same_plan(reference, tmp_path / "run")
    assert_same_results(reference, tmp_path / "run")


def test_killed_run_resumes_to_the_same_results(reference, micro_sandbox, tmp_path):
    config = copy_run(reference, tmp_path, micro_sandbox, ("plan.npz", "images", "fisher.safetensors", "cache"))
    queries = tmp_path / "run" / "queries"
    proc = subprocess.Popen([sys.executable, "-m", "fastattr_cli", "teacher", "score", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 300
    while not list(queries.glob("*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in queries.glob("*.npz")}
    assert 1 <= len(before) < 4, before
    assert len(results(tmp_path / "run")) == len(before)  # every result file on disk is complete

    resumed = score_queue(load_job(config))
    assert sorted(resumed) == sorted({"train-00000", "train-00001", "train-00002", "test-00000"}
                                     - {name.removesuffix(".npz") for name in before})
    assert all((queries / name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    assert_same_results(reference, tmp_path / "run")


QUERIES = ("test-00000", "train-00000", "train-00001", "train-00002")  # the order `score` takes them in
KEPT = ("plan.npz", "images", "fisher.safetensors", "cache")  # what `score` reads and must leave as it is


def _files(run: Path) -> dict[str, str]:
    """The sha256 of every file of a run outside ``queries/``, less the hidden temp files of atomic
    writes a kill may leave."""
    return {str(p.relative_to(run)): sha256_file(p) for p in sorted(run.rglob("*")) if p.is_file()
            and p.relative_to(run).parts[0] != "queries" and not re.fullmatch(r"\..+\.tmp", p.name)}


def _check_killed_run(reference: Path, run: Path, finished: dict[str, int], kept: dict) -> tuple[list[str], list[str]]:
    """What a SIGKILL of `teacher score` may leave: whole results, in the order they are scored, each
    equal to the reference's and never rewritten (``finished``: name -> mtime, updated here), the
    inputs untouched, and at most the hidden temp file of the write it cut, which nothing reads as a
    result. Returns (results, temp files)."""
    queries = run / "queries"
    names = sorted(p.name for p in queries.iterdir()) if queries.is_dir() else []
    done = [n for n in names if not n.startswith(".")]
    temps = [n for n in names if n.startswith(".")]
    assert all(re.fullmatch(r"\.(test|train)-\d{5}\.npz\.[\w-]+\.tmp", n) for n in temps), temps
    assert done == [f"{q}.npz" for q in QUERIES[:len(done)]], done  # nothing skipped, nothing extra
    expected = results(reference)
    for name in done:
        with np.load(queries / name, allow_pickle=False) as z:  # loads whole: no partial file
            assert str(z["query_id"]) == name.removesuffix(".npz") and float(z["seconds"]) > 0
            for key in ("keys", "ids", "tau", "rank"):
                assert np.array_equal(z[key], expected[name.removesuffix(".npz")][key]), (name, key)
        mtime = (queries / name).stat().st_mtime_ns
        assert finished.setdefault(name, mtime) == mtime, f"{name} was rewritten"
    assert _files(run) == kept
    return done, temps


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process not yet waited for (Linux): the clock of the kill moments,
    which a busy machine does not stretch as it does the wall clock."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow  # the README command stays under 5 minutes; .ci/run runs the slow lane after it
@pytest.mark.skipif(not (hasattr(signal, "SIGKILL") and Path("/proc/self/stat").is_file()), reason="needs Linux")
def test_twenty_kills_of_teacher_score(reference, micro_sandbox, tmp_path):
    """20 SIGKILLs of `fastattr teacher score` at seeded random moments, each run resuming the folder
    the last one was killed in: 16 at a random share of the CPU time the rest of the run takes (the
    model loading, a query's scoring, a result's write, the exit after the last one: wherever it
    falls), 4 the moment a result's temp file appears (its write under way). A folder with every
    result is checked whole and a fresh copy of the reference inputs takes its place."""
    def fresh(n: int) -> tuple[Path, Path, dict, dict]:
        config = copy_run(reference, tmp_path / f"run{n}", micro_sandbox, KEPT)
        return config, tmp_path / f"run{n}" / "run", {}, _files(tmp_path / f"run{n}" / "run")

    def start(config: Path, log: Path) -> subprocess.Popen:
        with log.open("wb") as err:
            return subprocess.Popen([sys.executable, "-m", "fastattr_cli", "teacher", "score", "--config",
                                     str(config)], stdout=subprocess.DEVNULL, stderr=err, env=ENV)

    def scored(run: Path) -> int:
        return len(list((run / "queries").glob("*.npz")))

    def loaded(log: Path) -> bool:  # the model is loaded once the queries' progress bar shows
        return "teacher queries" in log.read_text(errors="replace")

    # One whole run, timed in CPU seconds: when the model is loaded and each result is written.
    config, run, finished, kept = fresh(0)
    process, marks = start(config, tmp_path / "timed.log"), {}
    while process.poll() is None:
        marks["end"] = cpu = _cpu_seconds(process.pid)
        if "loaded" not in marks and loaded(tmp_path / "timed.log"):
            marks["loaded"] = cpu
        marks.setdefault(scored(run), cpu)
        if scored(run) == len(QUERIES) and "tail" not in marks:
            marks["tail"] = time.monotonic()
        time.sleep(0.01)
    assert process.returncode == 0 and len(marks) == len(QUERIES) + 4, marks
    tail = time.monotonic() - marks["tail"]  # the exit, in wall seconds
    assert _check_killed_run(reference, run, finished, kept) == ([f"{q}.npz" for q in QUERIES], [])

    rng = np.random.default_rng(15)
    # -1: a write; the last kill cuts one, so the final run below has a temp file to ignore and work left
    aims = [*rng.permutation([-1.0] * 3 + list((np.arange(16) + rng.random(16)) / 16)).tolist(), -1.0]
    exits = rng.uniform(0.05, 0.8, size=20).tolist()  # where in the exit, should the run get that far
    config, run, finished, kept = fresh(1)
    landed, at_kill, at_cpu, folders, ended = {"loading": 0, "scoring": 0, "writing": 0, "exiting": 0}, [], [], 1, 0
    for _ in range(40):  # a run may end before its kill (then no kill); never this often
        if not aims:
            break
        queries, log = run / "queries", tmp_path / f"kill{len(at_kill)}.log"
        temps_before, done_before = set(queries.glob(".*.tmp")), scored(run)
        # What is left: the whole run less the queries done after the first (which also warms up).
        left = marks["end"] - (marks[done_before] - marks[1] if done_before else 0.0)
        process, aim, cpu, exit_at = start(config, log), aims[0], 0.0, None
        first_write = marks[1] if done_before == 0 else marks["loaded"]  # in CPU s, about
        while process.poll() is None:
            cpu = _cpu_seconds(process.pid)
            if aim < 0 and (set(queries.glob(".*.tmp")) - temps_before or scored(run) > done_before):
                break  # a write is under way (or just done: the poll came late)
            if aim >= 0 and exit_at is None and scored(run) == len(QUERIES):
                exit_at = time.monotonic() + exits[len(at_kill)] * tail  # all written: kill in the exit
            if aim >= 0 and (cpu >= aim * left or (exit_at is not None and time.monotonic() >= exit_at)):
                break
            time.sleep(0.0005 if aim < 0 and cpu > 0.8 * first_write else 0.01)  # poll fast near a write
        alive = process.poll() is None
        process.send_signal(signal.SIGKILL)  # no cleanup code runs
        process.wait()
        done, _ = _check_killed_run(reference, run, finished, kept)
        if not alive:  # it ended first: no kill, and a whole folder
            assert process.returncode == 0 and len(done) == len(QUERIES), log.read_text()[-3000:]
            ended += 1
        else:
            aims.pop(0)
            at_kill.append(len(done))
            at_cpu.append(round(cpu, 1))
            if set(queries.glob(".*.tmp")) - temps_before:  # the write it cut left its temp file
                landed["writing"] += 1
            elif not loaded(log):
                landed["loading"] += 1
            else:
                landed["exiting" if len(done) == len(QUERIES) else "scoring"] += 1
        if len(done) == len(QUERIES) and aims:  # nothing left to kill in this folder
            assert_same_results(reference, run)
            folders += 1
            config, run, finished, kept = fresh(folders)
    assert not aims, (landed, at_kill)

    # A last uninterrupted run scores exactly what is missing; temp files left by kills are ignored.
    rest = [q for q in QUERIES if f"{q}.npz" not in finished]
    assert sorted(score_queue(load_job(config))) == sorted(rest)
    _check_killed_run(reference, run, finished, kept)
    assert_same_results(reference, run)
    merged, expected = np.load(merge(load_job(config))), np.load(reference / "distill.npz")
    for key in ("query_id", "offsets", "key", "id", "tau", "rank"):
        assert np.array_equal(merged[key], expected[key]), key
    print(f"\n20 SIGKILLs of `teacher score` (a whole run: {marks['end']:.1f} CPU s, the model loaded at "
          f"{marks['loaded']:.1f}, results at {[marks[n] for n in range(1, len(QUERIES) + 1)]}) in {folders} "
          f"run folders: {landed}; CPU s at each kill {at_cpu}; results on disk after it {at_kill}; {ended} runs "
          f"ended before their kill; the last run scored {rest}")
    assert len(at_kill) == 20 and sum(landed.values()) == 20


def test_bad_configs_are_named_errors(reference, micro_sandbox, tmp_path):
    path = write_job(tmp_path / "typo", micro_sandbox, teacher={"alpha": 1e-5, "stepsize": 3})
    result = run_cli("teacher", "score", "--config", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}: unknown key 'teacher.stepsize'" in result.stderr
    with pytest.raises(FastattrError, match=r"keys 'scored' \(M=20\) and 'candidates' \(K=12\)"):
        load_job(write_job(tmp_path / "m", micro_sandbox, scored=20))
    with pytest.raises(FastattrError, match=r"key 'bundle': .*nowhere/bundle\.yaml not found"):
        load_job(write_job(tmp_path / "b", micro_sandbox, bundle="nowhere"))
    with pytest.raises(FastattrError, match="cannot give 30 test prompts"):
        curate(load_job(write_job(tmp_path / "t", micro_sandbox, test_queries=30)))
    # Steps refuse a plan made with other settings, and scoring before the Fisher.
    changed = load_job(copy_run(reference, tmp_path / "c", micro_sandbox, ("plan.npz",)))
    with pytest.raises(FastattrError, match="run `fastattr teacher fisher"):
        score_queue(changed)
    other = write_job(tmp_path / "c", micro_sandbox, candidates=16)
    with pytest.raises(FastattrError, match="key 'candidates' differs from the plan"):
        load_plan(load_job(other), other)
