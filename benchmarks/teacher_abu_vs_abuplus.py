"""AbU (diagonal Fisher) vs AbU+ (EK-FAC): do the two teachers rank the training set alike?

    python benchmarks/teacher_abu_vs_abuplus.py [--queries 4] [--fisher-samples 1500]

On the shipped default sandbox, for images generated from held-out prompts, both teachers score
all training items; prints per query the Spearman correlation of the two score vectors and the
overlap of their top 10 and top 1% (15 of 1,500), plus each teacher's Fisher and per-query seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from fastattr_distill.metrics import recall_at as overlap, spearman
from fastattr_sandbox import build
from fastattr_teacher import TeacherConfig, UNetAdapter, compute_preconditioner, read_training_items, score_query


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--fisher-samples", type=int, default=1500)
    args = parser.parse_args()

    root = build.sandbox_dir()
    pipe = build.load_pipeline(root)
    adapter = UNetAdapter(pipe)
    items = read_training_items(root / "data" / "manifest.jsonl")
    lines = (root / "data" / "query_prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines[::len(lines) // args.queries][:args.queries]]
    images = build.generate(prompts, root=root, seed=0, pipe=pipe)
    print(f"default sandbox: {len(items)} training items, {len(prompts)} generated queries (held-out prompts), "
          f"torch threads {torch.get_num_threads()}")

    scores, seconds = {}, {}
    for kind in ("diagonal", "ekfac"):
        config = dataclasses.replace(TeacherConfig(), preconditioner=kind, fisher_samples=args.fisher_samples)
        start = time.perf_counter()
        fisher = compute_preconditioner(adapter, items, config)
        print(f"{kind}: Fisher from {config.fisher_samples} samples in {time.perf_counter() - start:.1f} s")
        scores[kind], seconds[kind] = [], []
        for image, prompt in zip(images, prompts):
            start = time.perf_counter()
            scores[kind].append(score_query(adapter, fisher, items, image, prompt, config).tau)
            seconds[kind].append(time.perf_counter() - start)
        print(f"{kind}: median {np.median(seconds[kind]):.1f} s per query (first includes pre-training losses: "
              f"{seconds[kind][0]:.1f} s)")
    top1pct = max(1, len(items) // 100)
    rows = []
    for prompt, a, b in zip(prompts, scores["diagonal"], scores["ekfac"]):
        rows.append((spearman(a, b), overlap(a, b, 10), overlap(a, b, top1pct)))
        print(f"{prompt[:60]:<60} Spearman {rows[-1][0]:.3f}  top-10 overlap {rows[-1][1]:.1f}  "
              f"top-{top1pct} overlap {rows[-1][2]:.2f}")
    mean = np.mean(rows, axis=0)
    print(f"mean over {len(rows)} queries: Spearman {mean[0]:.3f}, top-10 overlap {mean[1]:.2f}, "
          f"top-{top1pct} overlap {mean[2]:.2f}")


if __name__ == "__main__":
    main()
