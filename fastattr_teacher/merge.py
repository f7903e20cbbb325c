"""``merge``: the per-query teacher results of a curation job -> one distillation dataset.

``distill.npz`` holds flat arrays, candidates of query i at ``offsets[i]:offsets[i + 1]``;
``distill.yaml`` says how it was made (settings, fingerprints of model, manifest, bundle and
Fisher, counts, teacher seconds). Both are written atomically; rerunning replaces them.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np

from fastattr_hook import __version__
from fastattr_hook.files import atomic_open, sha256_file
from fastattr_hook.config import read_yaml, save_yaml, to_dict
from fastattr_hook.errors import FastattrError

from .curate import PATH_KEYS, CurationJob, load_plan

SCHEMA = "fastattr/distill@1"
ARRAYS = {
    "query_id": "[Q] query ids (train-NNNNN, test-NNNNN)",
    "split": "[Q] train (stage-2 candidates) or test (the whole training set)",
    "prompt": "[Q] the query prompt",
    "seed": "[Q] generation seed of the query image",
    "image": "[Q] the query image (PNG), relative to this file",
    "seconds": "[Q] teacher seconds of the query",
    "offsets": "[Q+1] candidates of query i are offsets[i]:offsets[i+1]",
    "key": "[C] bundle key of the candidate training item",
    "id": "[C] its training id",
    "tau": "[C] teacher score (loss rise after unlearning the query; higher = more influential)",
    "rank": "[C] 0-based rank among the query's candidates by tau (0 = most influential)",
    "train_keys": "[N] the training table: bundle keys of every item the teacher may score, key order",
    "train_ids": "[N] their training ids",
    "variants": "[V] names of the extra teacher runs of the test queries (job key 'variants')",
    "variant_tau": "[V, C] each variant's tau of every candidate (NaN where it did not run: train queries "
                   "only for job key 'train_variants', and only once scored)",
}


def merge(job: CurationJob, out: str | Path | None = None, allow_partial: bool = False,
          config_path: str | Path = "JOB.yaml") -> Path:
    """Write the dataset (default ``<out>/distill.npz``, manifest beside it); returns its path.
    Refuses while queries are unscored, unless ``allow_partial`` (then only scored ones go in)."""
    plan = load_plan(job, config_path)
    out = Path(out) if out else Path(job.out) / "distill.npz"
    variants = list(job.variants)

    def complete(q) -> bool:
        return all(job.result_path(q.qid, v).is_file() for v in [None, *(variants if q.split == "test" else [])])

    done = [q for q in plan.queries if complete(q)]
    missing = [q.qid for q in plan.queries if not complete(q)]
    if missing and not allow_partial:
        raise FastattrError(f"{job.out}: {len(missing)} of {len(plan.queries)} queries are not scored yet "
                            f"(e.g. {', '.join(missing[:5])}); finish them with `fastattr teacher score --config "
                            f"{config_path}` or merge with --allow-partial")
    if not done:
        raise FastattrError(f"{job.out}: no query is scored yet; run `fastattr teacher score --config {config_path}`")
    def read(query, variant=None) -> dict:
        path = job.result_path(query.qid, variant)
        with np.load(path, allow_pickle=False) as z:
            result = {name: z[name] for name in ("keys", "ids", "tau", "rank", "seconds")}
        if not np.array_equal(result["keys"], plan.train_keys[query.candidates]):
            raise FastattrError(f"{path}: its candidates are not the plan's; delete it and "
                                f"rerun `fastattr teacher score --config {config_path}`")
        return result

    results = [read(query) for query in done]
    variant_tau = np.full((len(variants), sum(len(r["keys"]) for r in results)), np.nan)
    start = 0
    for query, result in zip(done, results):
        for v, variant in enumerate(variants):
            if query.split == "test" or job.result_path(query.qid, variant).is_file():  # a train query's: if scored
                variant_tau[v, start:start + len(result["keys"])] = read(query, variant)["tau"]
        start += len(result["keys"])
    arrays = {
        "query_id": np.array([q.qid for q in done]), "split": np.array([q.split for q in done]),
        "prompt": np.array([q.prompt for q in done]), "seed": np.array([q.seed for q in done], dtype=np.int64),
        "image": np.array([os.path.relpath(job.image_path(q.qid), out.parent) for q in done]),
        "seconds": np.array([float(r["seconds"]) for r in results]),
        "offsets": np.cumsum([0] + [len(r["keys"]) for r in results]).astype(np.int64),
        **{name: np.concatenate([r[field] for r in results]) for name, field in
           (("key", "keys"), ("id", "ids"), ("tau", "tau"), ("rank", "rank"))},
        "train_keys": plan.train_keys, "train_ids": plan.train_ids,
        "variants": np.array(variants, dtype=str), "variant_tau": variant_tau,
    }
    fishers = _fisher_fingerprints(job, variants, out.with_suffix(".yaml"), config_path)
    with atomic_open(out, "wb") as f:
        np.savez(f, **arrays)
    splits = {split: [i for i, q in enumerate(done) if q.split == split] for split in ("train", "test")}
    prompts = {split: {q.prompt for q in plan.queries if q.split == split} for split in ("train", "test")}
    job_paths = {key: os.path.relpath(value, out.parent) if key in PATH_KEYS and value else value
                 for key, value in to_dict(job).items()}
    manifest = {
        "schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__, "file": out.name, "arrays": ARRAYS,
        "job": job_paths, "plan": {k: plan.meta[k] for k in ("created", "tool_version")},
        "prompt_split": {
            "rule": "the distinct prompts of the job's prompts file are shuffled with the job seed; the first "
                    "'test_queries' are the test prompts (one query each), train queries cycle through the "
                    "others with a new generation seed each: no test prompt is a train prompt",
            "distinct_prompts": {split: len(p) for split, p in prompts.items()},
            "shared": len(prompts["train"] & prompts["test"])},
        "fingerprints": {"model": plan.meta["model"], "manifest": plan.meta["manifest"],
                         "bundle": plan.meta["bundle"], **fishers},
        "counts": {"queries": len(done), "missing": len(missing), "candidates": int(arrays["offsets"][-1]),
                   "training_items": plan.meta["training_items"], **{split: len(ix) for split, ix in splits.items()},
                   **({"train_variants": {v: sum(job.result_path(done[i].qid, v).is_file() for i in splits["train"])
                                          for v in job.train_variants}} if job.train_variants else {})},
        "teacher_seconds": {split: {"total": round(float(arrays["seconds"][ix].sum()), 3),
                                    "per_query": round(float(arrays["seconds"][ix].mean()), 3)}
                            for split, ix in splits.items() if ix},
    }
    save_yaml(manifest, out.with_suffix(".yaml"))
    return out


def _fisher_fingerprints(job: CurationJob, variants: list[str], manifest: Path, config_path: str | Path) -> dict:
    """sha256 of each Fisher the results were scored with. The Fisher files are not committed (results
    are), so on a fresh clone a fingerprint is carried over from the dataset's previous manifest."""
    try:
        previous = read_yaml(manifest, "this merge rewrites it")["fingerprints"]
    except (OSError, FastattrError, TypeError, KeyError):  # no usable previous manifest: nothing to carry over
        previous = {}
    if not isinstance(previous, dict):
        previous = {}
    fingerprints = {}
    for name, path in [("fisher", job.fisher_path), *((f"fisher@{v}", job.fisher_path_for(v)) for v in variants)]:
        if path.is_file():
            fingerprints[name] = sha256_file(path)
        elif isinstance(previous.get(name), str):
            fingerprints[name] = previous[name]
        else:
            raise FastattrError(f"{path}: missing, and no previous {manifest.name} records its fingerprint; run "
                                f"`fastattr teacher fisher --config {config_path}` (it recomputes the same Fisher)")
    return fingerprints
