"""How closely the linear teacher (``scoring: linear``) agrees with the exact one, and how much faster.

    python benchmarks/teacher_linear_vs_exact.py [--dataset datasets/sandbox_default_distill] [--queries 12]

The dataset's test queries were scored by the exact teacher against every training item. This
script recomputes the same teacher (same model, Fisher settings, seeds) with ``scoring: linear`` and
compares per query: Spearman over all items, overlap of the top 0.85% and AP of the linear ranking
with the exact top 0.85% (the distillation metric), plus seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastattr_distill.metrics import average_precision, mean_and_stderr, recall_at, spearman  # noqa: E402
from fastattr_teacher import compute_preconditioner, score_query  # noqa: E402
from fastattr_teacher.curate import _query_image, _teacher_inputs, load_job, load_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="datasets/sandbox_default_distill")
    parser.add_argument("--queries", type=int, default=12)
    args = parser.parse_args()
    job_path = Path(args.dataset) / "job.yaml"
    job = load_job(job_path)
    plan = load_plan(job, job_path)
    adapter, items = _teacher_inputs(job, plan, "cpu")
    with np.load(Path(args.dataset) / "distill.npz", allow_pickle=False) as z:
        data = {k: z[k] for k in ("query_id", "split", "offsets", "tau", "key")}
    test = [i for i, s in enumerate(data["split"]) if s == "test"][:args.queries]
    config = dataclasses.replace(job.teacher, scoring="linear")
    start = time.perf_counter()
    fisher = compute_preconditioner(adapter, items, config)
    print(f"Fisher ({config.fisher_samples} samples): {time.perf_counter() - start:.1f} s")
    cache = tempfile.mkdtemp(prefix="fastattr-linear-")
    from fastattr_teacher.score import item_gradients
    start = time.perf_counter()
    item_gradients(adapter, items, config, cache)
    print(f"item gradients of all {len(items)} items (once per model): {time.perf_counter() - start:.1f} s")
    by_qid = {q.qid: q for q in plan.queries}
    count = max(1, round(0.0085 * len(items)))
    rows = []
    for i in test:
        query = by_qid[str(data["query_id"][i])]
        exact = data["tau"][data["offsets"][i]:data["offsets"][i + 1]]
        assert np.array_equal(data["key"][data["offsets"][i]:data["offsets"][i + 1]], plan.train_keys)
        start = time.perf_counter()
        linear = score_query(adapter, fisher, items, _query_image(job, query), query.prompt, config, cache).tau
        seconds = time.perf_counter() - start
        rows.append((spearman(exact, linear), recall_at(exact, linear, count), average_precision(exact, linear, count),
                     seconds))
        print(f"{query.qid}: Spearman {rows[-1][0]:.4f}  top-{count} overlap {rows[-1][1]:.3f}  "
              f"AP@{count} {rows[-1][2]:.3f}  {seconds:.1f} s", flush=True)
    for name, column in zip(("Spearman", f"top-{count} overlap", f"mAP({count})", "seconds/query"), zip(*rows)):
        mean, err = mean_and_stderr(column)
        print(f"mean over {len(rows)} queries: {name} {mean:.4f} +- {err:.4f}")
    exact_seconds = float(np.median(np.load(Path(args.dataset) / "distill.npz")["seconds"][test]))
    print(f"exact teacher seconds per test query (median, from the dataset): {exact_seconds:.1f}")


if __name__ == "__main__":
    main()
