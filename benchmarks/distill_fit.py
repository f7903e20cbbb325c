"""Train-query against validation-query agreement of a trained head: how much it fits its own labels.

    python benchmarks/distill_fit.py --config datasets/sandbox_distill_1k/train.yaml \\
        [--head fastattr_sandbox/artifacts/default/tuned/head.safetensors] [--train-queries 300]

Uses the training run's own split (``split_queries``) and validation metric (``validate``: mAP of the
teacher's top 0.85% and Spearman) on ``--train-queries`` of the queries the head was trained on and on
the held-out validation queries. A wide gap means the head learns label noise of its train queries;
a narrow one that the features or the head's capacity limit it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from fastattr_distill.data import load_datasets
from fastattr_distill.train import item_features, load_config, query_features, split_queries, validate
from fastattr_hook.encoder import Encoder
from fastattr_hook.head import load_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the train.yaml the head was trained with")
    parser.add_argument("--head", help="default: head.safetensors in the config's 'out'")
    parser.add_argument("--train-queries", type=int, default=300)
    args = parser.parse_args()
    config = load_config(args.config)
    base = Encoder.from_yaml(config.encoder, device="cpu")
    data = load_datasets(config.dataset).with_averaged_labels(config.label_variants, args.config)
    cache = config.cache or f"{config.out}/cache"
    fi = torch.from_numpy(np.array(item_features(base, data, cache)))
    fq = torch.from_numpy(np.array(query_features(base, data, cache)))
    train_q, val_q = split_queries(data, config.val_fraction, config.seed)
    head = load_head(args.head or f"{config.out}/head.safetensors")
    with torch.no_grad():
        result = {"train": validate(head, data, train_q[:args.train_queries], fq, fi),
                  "validation": validate(head, data, val_q, fq, fi)}
    print(json.dumps({"train_queries": min(args.train_queries, len(train_q)), "validation_queries": len(val_q),
                      **result}, indent=1))


if __name__ == "__main__":
    main()
