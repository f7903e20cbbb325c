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
from fastattr_hook._io import atomic_open, sha256_file
from fastattr_hook.config import save_yaml, to_dict
from fastattr_hook.errors import FastattrError

from .curate import CurationJob, load_plan

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
}


def merge(job: CurationJob, out: str | Path | None = None, allow_partial: bool = False,
          config_path: str | Path = "JOB.yaml") -> Path:
    """Write the dataset (default ``<out>/distill.npz``, manifest beside it); returns its path.
    Refuses while queries are unscored, unless ``allow_partial`` (then only scored ones go in)."""
    plan = load_plan(job, config_path)
    out = Path(out) if out else Path(job.out) / "distill.npz"
    done = [q for q in plan.queries if job.result_path(q.qid).is_file()]
    missing = [q.qid for q in plan.queries if not job.result_path(q.qid).is_file()]
    if missing and not allow_partial:
        raise FastattrError(f"{job.out}: {len(missing)} of {len(plan.queries)} queries are not scored yet "
                            f"(e.g. {', '.join(missing[:5])}); finish them with `fastattr teacher score --config "
                            f"{config_path}` or merge with --allow-partial")
    if not done:
        raise FastattrError(f"{job.out}: no query is scored yet; run `fastattr teacher score --config {config_path}`")
    results = []
    for query in done:
        with np.load(job.result_path(query.qid), allow_pickle=False) as z:
            result = {name: z[name] for name in ("keys", "ids", "tau", "rank", "seconds")}
        if not np.array_equal(result["keys"], plan.train_keys[query.candidates]):
            raise FastattrError(f"{job.result_path(query.qid)}: its candidates are not the plan's; delete it and "
                                f"rerun `fastattr teacher score --config {config_path}`")
        results.append(result)
    arrays = {
        "query_id": np.array([q.qid for q in done]), "split": np.array([q.split for q in done]),
        "prompt": np.array([q.prompt for q in done]), "seed": np.array([q.seed for q in done], dtype=np.int64),
        "image": np.array([os.path.relpath(job.image_path(q.qid), out.parent) for q in done]),
        "seconds": np.array([float(r["seconds"]) for r in results]),
        "offsets": np.cumsum([0] + [len(r["keys"]) for r in results]).astype(np.int64),
        **{name: np.concatenate([r[field] for r in results]) for name, field in
           (("key", "keys"), ("id", "ids"), ("tau", "tau"), ("rank", "rank"))},
    }
    with atomic_open(out, "wb") as f:
        np.savez(f, **arrays)
    splits = {split: [i for i, q in enumerate(done) if q.split == split] for split in ("train", "test")}
    manifest = {
        "schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__, "file": out.name, "arrays": ARRAYS,
        "job": to_dict(job), "plan": {k: plan.meta[k] for k in ("created", "tool_version")},
        "fingerprints": {"model": plan.meta["model"], "manifest": plan.meta["manifest"],
                         "bundle": plan.meta["bundle"], "fisher": sha256_file(job.fisher_path)},
        "counts": {"queries": len(done), "missing": len(missing), "candidates": int(arrays["offsets"][-1]),
                   "training_items": plan.meta["training_items"], **{split: len(ix) for split, ix in splits.items()}},
        "teacher_seconds": {split: {"total": round(float(arrays["seconds"][ix].sum()), 3),
                                    "per_query": round(float(arrays["seconds"][ix].mean()), 3)}
                            for split, ix in splits.items() if ix},
    }
    save_yaml(manifest, out.with_suffix(".yaml"))
    return out
