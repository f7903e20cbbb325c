"""Pick the head's training settings on the validation split (never on the test queries).

    python benchmarks/distill_sweep.py --config datasets/sandbox_distill_1k/train.yaml

Trains one head per setting below (each into a temporary folder, all sharing the config's feature
cache) and prints the best validation mAP(top 0.85%) (held-out train queries, over their candidates),
the epoch it came at, the training seconds and the validation mAP after every epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastattr_distill.train import HeadConfig, load_config, train  # noqa: E402

SETTINGS = {  # the optimizer steps (epochs x pairs / batch) and the head width set the cost on a CPU
    # No learning-rate schedule and per-epoch seeded draws: epoch 10 of this run IS the paper's 10-epoch run.
    "head 768/768 (paper), batch 4096, 30 epochs": {"epochs": 30},
    "head 256/128, batch 4096, 30 epochs": {"head": HeadConfig(hidden=256, out=128), "epochs": 30},
    "head 256/128, batch 1024, 30 epochs": {"head": HeadConfig(hidden=256, out=128), "epochs": 30, "batch_size": 1024},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--only", action="append", help="run only the settings whose name contains this")
    args = parser.parse_args()
    base = load_config(args.config)
    for name, changes in SETTINGS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            config = dataclasses.replace(base, out=tmp, **changes)
            start = time.perf_counter()
            spec = train(config, args.config)
            seconds = time.perf_counter() - start
            report = json.loads((spec.parent / "train.json").read_text())
        curve = " ".join(f"{h['val_map']:.3f}" for h in report["history"])
        print(f"{name:<46} best validation mAP {report['best_val_map']:.4f} at epoch "
              f"{report['best_epoch']}/{config.epochs} ({seconds:.0f} s); by epoch: {curve}", flush=True)


if __name__ == "__main__":
    main()
