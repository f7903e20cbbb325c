"""Issue 12's GPU setting: leave-K-out retraining of the default sandbox on all 48 test queries.

    python benchmarks/counterfactual_gpu.py [--seconds 420] [--workers 8] [--config ...] [--out ...]

Plans ``datasets/sandbox_distill_1k/counterfactual/gpu.yaml`` (merging the teacher's committed
per-query results into its dataset first when ``distill.npz`` is missing, as on a fresh clone; only the
test queries are read, so a copy without the train queries' results, 121 MiB of the checkout, works too;
its random removals are drawn for other dataset rows, so keep to one kind of copy for one plan),
starts ``--workers`` plain ``fastattr distill counterfactual train`` processes that share the pending
runs (each claims one run at a time; the sandbox UNet is far too small to keep a GPU busy alone),
stops them after ``--seconds`` if given, and writes the readout of every finished run (partial until
all are done) to ``--out`` (.md, .json, .png). A stopped run resumes from its last checkpoint; commit
the result files under ``.../counterfactual/gpu/results/`` and a rerun continues.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def fastattr(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fastattr_cli", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="datasets/sandbox_distill_1k/counterfactual/gpu.yaml")
    parser.add_argument("--workers", type=int, default=8, help="train processes sharing the runs (default 8)")
    parser.add_argument("--seconds", type=float, default=None, help="stop the workers after this long")
    parser.add_argument("--out", default="benchmarks/results/counterfactual_gpu", help="report path, no suffix")
    args = parser.parse_args()

    from fastattr_distill import counterfactual as cf

    job = cf.load_job(args.config)
    if not Path(job.dataset).is_file():
        fastattr("teacher", "merge", "--allow-partial", "--config", str(Path(job.dataset).with_name("job.yaml")))
    fastattr("distill", "counterfactual", "plan", "--config", args.config)
    start = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.workers))}
    workers = [subprocess.Popen([sys.executable, "-m", "fastattr_cli", "distill", "counterfactual", "train",
                                 "--config", args.config], env=env) for _ in range(args.workers)]
    try:
        for worker in workers:
            left = None if args.seconds is None else max(0.0, args.seconds - (time.monotonic() - start))
            worker.wait(timeout=left)
    except subprocess.TimeoutExpired:
        print(f"--seconds {args.seconds:g} reached: stopping the workers (finished runs are kept)", file=sys.stderr)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait()
    meta = cf.load_plan(job, args.config)
    finished = sum(cf.result_path(job, meta, run).is_file() for run in meta["runs"])
    print(f"{finished} of {len(meta['runs'])} runs finished; {args.workers} workers, "
          f"{time.monotonic() - start:.0f} s of training", file=sys.stderr)
    if not cf.done(job, meta, "reference"):
        print("the reference run has not finished, so there is nothing to compare yet; run again (the work done "
              "is kept)", file=sys.stderr)
        return 1
    fastattr("distill", "counterfactual", "report", "--config", args.config, "--partial", "--out", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
