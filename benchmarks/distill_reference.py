"""Students against each teacher run of the test queries: how much of a student's agreement is the
teacher seed it was trained on.

    python benchmarks/distill_reference.py --dataset datasets/sandbox_distill_1k --variant seed1 \\
        --encoder fastattr_sandbox/artifacts/default/tuned/encoder.yaml [--encoder OTHER.yaml ...]

The teacher's per-item noise is seeded, so every query scored with one seed shares part of its
error. A student trained on seed-0 labels can learn that shared part, and the usual evaluation
(``fastattr distill eval``) compares it with seed-0 test labels too. Here each ``--encoder`` is scored
against the main run, against ``--variant`` (another seed) and against their mean, beside the main
run itself (its agreement with the variant is the ceiling ``distill eval`` reports). Prints mAP of
the top 0.85% and Spearman, means over the test queries.
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
    parser.add_argument("--variant", default="seed1", help="the teacher variant with another seed")
    parser.add_argument("--encoder", action="append", required=True, help="a tuned encoder spec (repeatable)")
    parser.add_argument("--baseline", default="fastattr_sandbox/artifacts/default/encoder.yaml")
    parser.add_argument("--cache", default="datasets/sandbox_distill_1k/cache/features")
    args = parser.parse_args()
    data = load_dataset(args.dataset)
    test = data.queries("test")
    on_test = np.zeros(len(data.tau), dtype=bool)
    for q in test:
        on_test[data.candidates(q)] = True
    other = data.variant_tau[data.variants.index(args.variant)]
    references = {"main run": data,
                  f"'{args.variant}'": dataclasses.replace(data, tau=np.where(on_test, other, data.tau)),
                  "mean of both": dataclasses.replace(data, tau=np.where(on_test, (data.tau + other) / 2, data.tau))}
    baseline = Encoder.from_yaml(args.baseline, device="cpu")
    methods = {"teacher main run": np.stack([full_scores(data, q, data.tau) for q in test])}
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
