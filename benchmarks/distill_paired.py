"""Two tuned heads on the same test queries, paired: the mean per-query difference of their
average precision, with its standard error. Two heads' mAPs each carry a standard error of
~0.03 on 48 queries, mostly from how hard each query is; the paired difference removes that.

    python benchmarks/distill_paired.py --before OLD/encoder.yaml --after fastattr_sandbox/artifacts/default/tuned/encoder.yaml \\
        --dataset datasets/sandbox_distill_1k --dataset datasets/sandbox_distill_motifs --reference seed2

Prints, per dataset, both heads' mAP of the teacher's top 0.85% and the paired difference after - before.
Several --after heads are an ensemble: their cosine scores averaged (what one encoder whose output is
their unit vectors concatenated and divided by sqrt(n) would give).
"""

from __future__ import annotations

import argparse

import numpy as np

from fastattr_distill.data import load_dataset
from fastattr_distill.evaluate import full_scores
from fastattr_distill.metrics import average_precision, mean_and_stderr
from fastattr_distill.train import item_features, query_features
from fastattr_hook.encoder import Encoder


def per_query_ap(encoders: list[Encoder], data, cache: str, fraction: float = 0.0085) -> np.ndarray:
    """Average precision per test query of the mean of the encoders' cosine scores."""
    test = data.queries("test")
    teacher = np.stack([full_scores(data, q, data.tau) for q in test])
    scores = 0.0
    for encoder in encoders:
        items = encoder.embed_features(np.asarray(item_features(encoder, data, cache)))
        queries = encoder.embed_features(np.asarray(query_features(encoder, data, cache))[test], "query")
        scores = scores + queries @ items.T / len(encoders)
    count = max(1, round(fraction * teacher.shape[1]))
    return np.array([average_precision(t, s, count) for t, s in zip(teacher, scores)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="encoder spec of the first head")
    parser.add_argument("--after", action="append", required=True,
                        help="encoder spec of the second head (repeat it for an ensemble of heads)")
    parser.add_argument("--dataset", action="append", required=True, help="a dataset with test queries (repeatable)")
    parser.add_argument("--reference", help="judge against this teacher variant (as distill eval --reference)")
    parser.add_argument("--cache", default="datasets/sandbox_distill_1k/cache/features")
    args = parser.parse_args()
    before, after = [Encoder.from_yaml(args.before)], [Encoder.from_yaml(p) for p in args.after]
    print("| dataset | queries | mAP(0.85%) before | after | paired after - before |\n|---|---|---|---|---|")
    for path in args.dataset:
        data = load_dataset(path)
        data = data.with_reference(args.reference) if args.reference else data
        a, b = per_query_ap(before, data, args.cache), per_query_ap(after, data, args.cache)
        print(f"| {path} | {len(a)} | {a.mean():.3f} | {b.mean():.3f} | {'%+.3f +- %.3f' % mean_and_stderr(b - a)} |")


if __name__ == "__main__":
    main()
