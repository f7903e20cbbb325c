"""Cost of one training step of the distilled head: random pairs vs dense blocks, side by side.

    OMP_NUM_THREADS=1 python benchmarks/distill_step.py [--queries 1800] [--items 1500] [--repeats 7]

Both modes run the trainer's own code (``epoch_batches``, ``batch_loss``, AdamW) on the shipped
head's shape (256-d tiny-CLIP features in, 3 x 768 hidden, 768 out) at batch 4,096 pairs over
random features of whole-set rankings of the given size (the sandbox's: 1,800 train queries x 1,500
items). Repeats are interleaved; the medians of seconds per step and the ratio are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastattr_distill.train import DistillConfig, Pairs, PairScorer, batch_loss, epoch_batches  # noqa: E402
from fastattr_hook.head import AttributionHead  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=1800)
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=10, help="steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    queries = np.arange(args.queries)
    labels = np.argsort(rng.random((args.queries, args.items)), axis=1).astype(np.float32) / args.items
    pairs = Pairs(np.repeat(queries, args.items), np.tile(np.arange(args.items), args.queries), labels.ravel())
    fq, fi = torch.randn(args.queries, 256), torch.randn(args.items, 256)
    base = DistillConfig(dataset="-", encoder="-", out="-", outlier_rate=0.0)
    modes = {"random pairs": base, "blocks of 256 items": dataclasses.replace(base, block_items=256)}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, config in modes.items():
            torch.manual_seed(0)
            scorer = PairScorer(AttributionHead(256, 768, 768, 3, 0.1))
            optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3)
            _, batches = epoch_batches(config, pairs, labels, queries, args.items, np.random.default_rng(repeat))
            start = time.perf_counter()
            for _, batch in zip(range(args.steps), batches):
                loss, _ = batch_loss(scorer, fq, fi, batch, 0, 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if repeat:
                seconds[name].append((time.perf_counter() - start) / args.steps)
    print(f"{args.queries} queries x {args.items} items, batch 4096 pairs, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} x {args.steps} steps")
    print("| batches | seconds per step | pairs per second |\n|---|---|---|")
    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in median.items():
        print(f"| {name} | {value:.3f} | {4096 / value:,.0f} |")
    print(f"\nblocks are {median['random pairs'] / median['blocks of 256 items']:.1f}x faster a step")


if __name__ == "__main__":
    main()
