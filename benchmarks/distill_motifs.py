"""Why the distilled head misses the rare motifs: what its labels say about them, and what it learnt.

    python benchmarks/distill_motifs.py --config datasets/sandbox_distill_1k/train.yaml \\
        --encoder fastattr_sandbox/artifacts/default/tuned/encoder.yaml

Each of the sandbox's 4 rare motifs is carried by 6 of the 1,500 training images (captions name it).
For every train and test query whose prompt asks for a motif, counts how many of that motif's 6
carriers are in the top 30 of: the teacher's label (the train config's ``label_variants`` averaged,
as the head was trained on), the teacher's main run, the tuned head, and the untuned features the head
sits on (chance: 30 x 6 / 1,500 = 0.12). ``distill eval``'s motif check asks the same of one generated
image per motif, on a prompt of its own. Prints a markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np

from fastattr_distill.data import load_datasets
from fastattr_distill.evaluate import MOTIF_TOP, motif_carriers, motif_queries
from fastattr_distill.train import item_features, load_config, query_features
from fastattr_hook.encoder import Encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the train.yaml of the head (datasets, labels, cache)")
    parser.add_argument("--encoder", required=True, help="the tuned encoder.yaml")
    args = parser.parse_args()
    config = load_config(args.config)
    data = load_datasets(config.dataset)
    labels = data.with_averaged_labels(config.label_variants, args.config).tau
    carriers = motif_carriers(data)
    baseline = Encoder.from_yaml(config.encoder, device="cpu")
    tuned = Encoder.from_yaml(args.encoder, device="cpu")
    features_items = np.asarray(item_features(baseline, data, config.cache), dtype=np.float32)
    features_queries = np.asarray(query_features(baseline, data, config.cache), dtype=np.float32)
    embedded = {name: (encoder.embed_features(features_items), encoder) for name, encoder in
                (("tuned head", tuned), ("untuned features", baseline))}

    print(f"carriers of a query's motif (of 6) in the top {MOTIF_TOP}, mean over the queries asking for one\n")
    print("| queries | count | teacher label (averaged runs) | teacher main run | tuned head | untuned features |")
    print("|---|---|---|---|---|---|")
    for split in ("train", "test"):
        found = {name: [] for name in ("label", "main", *embedded)}
        queries = data.queries(split)
        for j, motif in motif_queries(data, carriers, split):
            q = queries[j]
            span = data.candidates(q)
            rows = data.item_rows(data.key[span])
            scores = {"label": labels[span], "main": data.tau[span]}
            for name, (items, encoder) in embedded.items():
                scores[name] = items[rows] @ encoder.embed_features(features_queries[q:q + 1], "query")[0]
            for name, score in scores.items():
                found[name].append(int(np.sum(carriers[rows[np.argsort(-score, kind="stable")[:MOTIF_TOP]]] == motif)))
        cells = " | ".join(f"{np.mean(v):.2f}" for v in found.values())
        print(f"| {split} | {len(found['main'])} | {cells} |")


if __name__ == "__main__":
    main()
