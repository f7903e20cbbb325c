"""Pick the head's training settings on the validation split (never on the test queries).

    python benchmarks/distill_sweep.py --config datasets/sandbox_distill_1k/distill.yaml

Trains one head per setting below (each into a temporary folder, all sharing the config's feature
cache) and prints the best validation Spearman (held-out train queries, over their candidates),
the epoch it came at, and the training seconds.
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

SETTINGS = {
    "paper (768/768, 10 epochs, batch 4096)": {},
    "output 128": {"head": HeadConfig(out=128)},
    "batch 512": {"batch_size": 512},
    "batch 512, 30 epochs": {"batch_size": 512, "epochs": 30},
    "batch 512, 30 epochs, lr 3e-4": {"batch_size": 512, "epochs": 30, "lr": 3e-4},
    "batch 512, 30 epochs, output 128": {"batch_size": 512, "epochs": 30, "head": HeadConfig(out=128)},
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
        print(f"{name:<40} best validation Spearman {report['best_val_spearman']:.4f} at epoch "
              f"{report['best_epoch']}/{config.epochs}  ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
