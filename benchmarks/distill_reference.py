"""Students against each teacher run of the test queries: how much of a student's agreement is the
teacher seed it was trained on.

    python benchmarks/distill_reference.py --dataset datasets/sandbox_distill_1k --variant seed1 --variant seed2 \\
        --encoder fastattr_sandbox/artifacts/default/tuned/encoder.yaml [--encoder OTHER.yaml ...]

The teacher's per-item noise is seeded, so every query scored with one seed shares part of its
error. A student trained on seed-0 labels can learn that shared part, and the usual evaluation
(``fastattr distill eval`` without ``--reference``) compares it with seed-0 test labels too. Here each
``--encoder`` is scored against the main run, against each ``--variant`` (another seed) and against
the mean of all of them, beside the teacher runs themselves (the main run against a variant is the
ceiling ``distill eval`` reports). Prints mAP of the top 0.85% and Spearman, means over the test queries.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from fastattr_distill.data import load_dataset
from fastattr_distill.evaluate import evaluate, full_scores, method_scores
from fastattr_hook.encoder import Encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--variant", action="append", required=True,
                        help="a teacher variant with another seed (repeatable)")
    parser.add_argument("--encoder", action="append", required=True, help="a tuned encoder spec (repeatable)")
    parser.add_argument("--baseline", default="fastattr_sandbox/artifacts/default/encoder.yaml")
    parser.add_argument("--cache", default="datasets/sandbox_distill_1k/cache/features")
    args = parser.parse_args()
    data = load_dataset(args.dataset)
    test = data.queries("test")
    on_test = np.zeros(len(data.tau), dtype=bool)
    for q in test:
        on_test[data.candidates(q)] = True
    runs = {"main run": data.tau, **{f"'{v}'": data.variant_tau[data.variants.index(v)] for v in args.variant}}
    runs["mean of all"] = np.mean(list(runs.values()), axis=0)
    references = {name: dataclasses.replace(data, tau=np.where(on_test, tau, data.tau)) for name, tau in runs.items()}
    baseline = Encoder.from_yaml(args.baseline, device="cpu")
    methods = {f"teacher {name}": np.stack([full_scores(data, q, tau) for q in test])
               for name, tau in runs.items() if name != "mean of all"}
    for spec in args.encoder:
        scores = method_scores(data, Encoder.from_yaml(spec, device="cpu"), baseline, args.cache)
        methods["untuned concatenation"] = scores["untuned concatenation"]
        methods.update({f"{name} [{spec}]": s for name, s in scores.items() if name.startswith("tuned")})
    print(f"{len(test)} test queries; mAP(0.85%) / Spearman against each teacher reference")
    print("| method | " + " | ".join(references) + " |")
    print("|---|" + "---|" * len(references))
    results = {name: evaluate(reference, methods)["methods"] for name, reference in references.items()}
    for method in methods:
        cells = [f"{r[method]['mAP@0.85%'][0]:.3f} / {r[method]['spearman'][0]:.3f}" for r in results.values()]
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
