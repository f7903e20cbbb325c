"""The AbU teacher on the shipped default sandbox: self-attribution, the rare-motif check, seconds per query.

    python benchmarks/teacher_checks.py [--self-queries 8] [--fisher-samples 1500]

Self-attribution: a training image with its own caption as the query; where does the teacher rank
that image among all training items? Rare motifs: an image generated for a prompt asking for a
motif that only 6 training images carry; how many of those 6 land in the teacher's top 30
(chance: 6 x 30 / N)?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from fastattr_sandbox import build
from fastattr_sandbox.world import MOTIFS
from fastattr_teacher import (TeacherConfig, UNetAdapter, compute_fisher_diagonal, pretrain_losses, read_training_items,
                              score_query)

MOTIF_PROMPT = "a large red circle in the center on a plain white background with a {motif}"
TOP = 30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--self-queries", type=int, default=8)
    parser.add_argument("--fisher-samples", type=int, default=1500)
    args = parser.parse_args()

    root = build.sandbox_dir()
    adapter = UNetAdapter(build.load_pipeline(root))
    items = read_training_items(root / "data" / "manifest.jsonl")
    config = dataclasses.replace(TeacherConfig(), fisher_samples=args.fisher_samples)
    print(f"default sandbox: {len(items)} training items; {config}; torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    fisher = compute_fisher_diagonal(adapter, items, config)
    print(f"Fisher ({config.fisher_samples} samples): {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    pretrain_losses(adapter, items, config)  # once per configuration, shared by every query
    print(f"pre-training losses of every item: {time.perf_counter() - start:.1f} s", flush=True)

    seconds, ranks = [], []
    for q in np.linspace(0, len(items) - 1, args.self_queries).round().astype(int):
        start = time.perf_counter()
        scores = score_query(adapter, fisher, items, items[q].load_image(), items[q].caption, config)
        seconds.append(time.perf_counter() - start)
        ranks.append(scores.rank_of(items[q].id))
        print(f"self query {items[q].id}: rank {ranks[-1]} ({seconds[-1]:.0f} s)", flush=True)
    top1 = sum(r < 0.01 * len(items) for r in ranks)
    if ranks:
        print(f"self-attribution ranks (0-based, of {len(items)}): {ranks}; "
              f"in the top 1%: {top1}/{len(ranks)} = {top1 / len(ranks):.0%}", flush=True)

    rows = (json.loads(line) for line in (root / "data" / "manifest.jsonl").read_text().splitlines())
    motif_of = {row["id"]: row["attributes"]["motif"] for row in rows}
    hits = []
    for motif in MOTIFS:
        prompt = MOTIF_PROMPT.format(motif=motif)
        [image] = build.generate([prompt], root=root, seed=0)
        start = time.perf_counter()
        scores = score_query(adapter, fisher, items, image, prompt, config)
        seconds.append(time.perf_counter() - start)
        carriers = sum(m == motif for m in motif_of.values())
        found = sum(motif_of[i] == motif for i in scores.top(TOP))
        hits.append(found)
        print(f"rare motif {motif!r}: {found}/{carriers} of its training images in the teacher's top {TOP} "
              f"(chance {carriers * TOP / len(items):.2f})", flush=True)
    print(f"rare motifs: {sum(hits)} of {sum(m is not None for m in motif_of.values())} motif images in the top "
          f"{TOP} over {len(MOTIFS)} queries (chance {sum(m is not None for m in motif_of.values()) * TOP / len(items):.2f})")
    print(f"teacher seconds per query (pre-training losses cached): median {np.median(seconds):.1f} s "
          f"over {len(seconds)} queries")


if __name__ == "__main__":
    main()
