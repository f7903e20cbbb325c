"""What limits the distilled head: the labels, or what the backbones tell about each training item?

    python benchmarks/distill_headroom.py --config datasets/sandbox_distill_1k/train.yaml \\
        --encoder fastattr_sandbox/artifacts/default/tuned/encoder.yaml --reference seed2

Scores the test queries against one teacher run (``--reference``, best a seed no label was made
with) for:
- the trained head (``--encoder``);
- nearest train queries: a test query takes the mean label of its k nearest train queries (by the
  head's query embedding, and by the untuned one). It needs no item features at all, only the
  teacher's rankings of similar queries;
- the same head trained here on the same labels and blocks as ``distill train`` (same loss,
  optimiser, 16-query x 256-item blocks, validation split and best-epoch rule), once with the items
  embedded by the head from their backbone features (the method) and once with a free vector per
  training item learnt in their place: what a head could reach if the backbones told it everything
  the teacher distinguishes about each item. The head on item features starts calibrated, as in
  ``distill train``; the free vectors from scale -5 (calibration needs the head's item vectors);
- with ``--attributes``, the method's head once more on backbone features plus the world's true
  attributes (one-hot shape, colour, size, position, texture, background, motif): of each training
  item from its manifest row, of each query from its prompt's row in the job's prompts.jsonl. An
  oracle for the sandbox: what backbones that read every attribute exactly would give the head.
Prints a markdown table: mAP(0.85%) +- standard error and Spearman.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastattr_distill.data import load_datasets
from fastattr_distill.evaluate import evaluate
from fastattr_distill.train import (Pairs, calibrate, item_features, load_config, query_features, rank_table,
                                    split_queries, validate)
from fastattr_hook.encoder import Encoder
from fastattr_hook.head import AttributionHead


class FreeItems(torch.nn.Module):
    """The head for queries; a learnt vector per training item instead of the head on its features."""

    def __init__(self, head: AttributionHead, num_items: int):
        super().__init__()
        self.head = head
        self.items = torch.nn.Parameter(torch.randn(num_items, head.out_features) / head.out_features ** 0.5)

    def embed(self, queries: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(queries), self.items[items]


class FeatureItems(torch.nn.Module):
    """The method: the same head embeds queries and items."""

    def __init__(self, head: AttributionHead):
        super().__init__()
        self.head = head

    def embed(self, queries: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(queries), self.head(items)


def fit(model, fq: torch.Tensor, fi: torch.Tensor, labels: np.ndarray, train_q: np.ndarray, data, val_q,
        epochs: int, lr: float, weight_decay: float, block_items: int, seed: int) -> tuple[np.ndarray, int]:
    """Train on dense 16-query x ``block_items`` blocks; returns the [test, N] scores of the best
    validation epoch and that epoch."""
    free = isinstance(model, FreeItems)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rng, num_items = np.random.default_rng(seed), len(fi)
    test = data.queries("test")
    best, best_epoch, best_scores = -1.0, 0, None
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(train_q))
        blocks = [(order[s:s + 16], items) for s in range(0, len(order), 16)
                  for items in np.array_split(rng.permutation(num_items), -(-num_items // block_items))]
        for b in tqdm(rng.permutation(len(blocks)), desc=f"{type(model).__name__} epoch {epoch + 1}", leave=False):
            q_rows, items = blocks[b]
            items_t = torch.from_numpy(items)
            vq, vi = model.embed(fq[torch.from_numpy(train_q[q_rows])], items_t if free else fi[items_t])
            z = model.head.calibrated(F.normalize(vq, dim=-1) @ F.normalize(vi, dim=-1).T)
            loss = F.binary_cross_entropy_with_logits(z, torch.from_numpy(labels[np.ix_(q_rows, items)]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            vi = model.items if free else model.head(fi)
            score = validate(model.head, data, val_q, fq, fi, item_vectors=vi)["map"]
            if score > best:
                vq = model.head(fq[torch.from_numpy(test)])
                cosine = F.normalize(vq, dim=-1) @ F.normalize(vi, dim=-1).T
                best, best_epoch, best_scores = score, epoch + 1, (-model.head.calibrated(cosine)).numpy()
        print(f"{type(model).__name__} epoch {epoch + 1}: validation mAP {score:.4f}", flush=True)
    return best_scores, best_epoch


ATTRIBUTES = ("shape", "colour", "size", "position", "texture", "bg", "motif")


def attribute_features(data, fi: torch.Tensor, fq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot true attributes appended to the item and query features, the block scaled to the
    features' mean norm."""
    items = {row["id"]: row["attributes"] for row in map(json.loads, data.manifest.read_text().splitlines())}
    prompts = {}
    for part in data.parts or (data.path,):
        prompts_file = Path(part).parent / "prompts.jsonl"
        prompts |= {row["prompt"]: row["attributes"] for row in map(json.loads, prompts_file.read_text().splitlines())}
    item_rows = [items[i] for i in data.train_ids]
    query_rows = [prompts[p] for p in data.prompt]
    vocab = sorted({(k, str(row.get(k))) for row in item_rows + query_rows for k in ATTRIBUTES})
    column = {v: j for j, v in enumerate(vocab)}

    def one_hot(rows: list[dict], norm: float) -> torch.Tensor:
        out = torch.zeros(len(rows), len(vocab))
        for r, row in enumerate(rows):
            out[r, [column[(k, str(row.get(k)))] for k in ATTRIBUTES]] = norm / len(ATTRIBUTES) ** 0.5
        return out

    return (torch.cat([fi, one_hot(item_rows, float(fi.norm(dim=1).mean()))], 1),
            torch.cat([fq, one_hot(query_rows, float(fq.norm(dim=1).mean()))], 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the train.yaml of the head (datasets, labels, cache)")
    parser.add_argument("--encoder", required=True, help="the head trained from it (tuned encoder spec)")
    parser.add_argument("--reference", default="seed2", help="the teacher variant of the test queries to judge by")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--skip-method", action="store_true", help="skip the method's own run (it costs what "
                        "`distill train` does)")
    parser.add_argument("--skip-free", action="store_true", help="skip the free-vector run")
    parser.add_argument("--attributes", action="store_true",
                        help="also train the method's head with the true attributes appended (a sandbox oracle)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(args.config)
    data = load_datasets(config.dataset).with_averaged_labels(config.label_variants, args.config)
    judged = data.with_reference(args.reference)
    tuned = Encoder.from_yaml(args.encoder, device="cpu")
    baseline = Encoder.from_yaml(config.encoder, device="cpu")
    fi = torch.from_numpy(np.asarray(item_features(baseline, data, config.cache), dtype=np.float32))
    fq = torch.from_numpy(np.asarray(query_features(baseline, data, config.cache), dtype=np.float32))
    train_q, val_q = split_queries(data, config.val_fraction, config.seed)
    test = data.queries("test")
    labels = rank_table(data, train_q, config.label_top)  # the labels the head trains on, 0 = most influential
    methods = {f"head [{args.encoder}]": tuned.embed_features(fq[test].numpy(), "query")
               @ tuned.embed_features(fi.numpy()).T}
    for name, encoder in (("head", tuned), ("untuned", baseline)):
        vq = encoder.embed_features(fq.numpy(), "query")
        near = np.argsort(-(vq[test] @ vq[train_q].T), axis=1)
        for k in (1, 5, 20):
            methods[f"mean label of the {k} nearest train queries ({name} embedding)"] = \
                -labels[near[:, :k]].mean(axis=1)
    h = config.head
    runs = {}  # name -> (model, query features, item features)
    if not args.skip_free:
        runs["head + a free vector per item"] = (FreeItems(AttributionHead(fq.shape[1], h.hidden, h.out, h.depth,
                                                                           h.dropout), len(fi)), fq, fi)
    if not args.skip_method:
        runs["head on item features (method)"] = (FeatureItems(AttributionHead(fq.shape[1], h.hidden, h.out, h.depth,
                                                                               h.dropout)), fq, fi)
    if args.attributes:
        ai, aq = attribute_features(data, fi, fq)
        runs["head on item features + true attributes (oracle)"] = (
            FeatureItems(AttributionHead(aq.shape[1], h.hidden, h.out, h.depth, h.dropout)), aq, ai)
    for name, (model, fq_run, fi_run) in runs.items():
        if isinstance(model, FeatureItems):  # as distill train: scale and bias fitted to the labels first
            calibrate(model.head, fq_run, fi_run, Pairs.of(data, train_q, config.label_top))
        else:
            model.head.scale.data.fill_(-5.0)  # low z = influential: high cosine must lower the logit
        scores, epoch = fit(model, fq_run, fi_run, labels, train_q, data, val_q, args.epochs, config.lr,
                            config.weight_decay, config.block_items or 256, config.seed)
        methods[f"{name}, trained here (best epoch {epoch} of {args.epochs})"] = scores
    report = evaluate(judged, methods, reference=args.reference)
    print(f"\n{report['test_queries']} test queries against teacher run '{args.reference}'; labels: main run"
          f"{' + ' + ', '.join(config.label_variants) if config.label_variants else ''}\n")
    print("| method | mAP(0.85%) | Spearman |\n|---|---|---|")
    for name, row in report["methods"].items():
        print(f"| {name} | {row['mAP@0.85%'][0]:.3f} +- {row['mAP@0.85%'][1]:.3f} | {row['spearman'][0]:.3f} |")


if __name__ == "__main__":
    main()
