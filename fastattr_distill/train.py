"""``fastattr distill train``: the head of method.md section 4, learned from the teacher's rankings.

Pointwise learning to rank: for a query and its M teacher-ranked candidates, the candidate at rank
j gets the label y = j / M (0 = most influential); the prediction is z = scale * cos(f(q), f(x)) +
bias and the loss is binary cross-entropy with logits. With probability ``outlier_rate`` a pair's
item is replaced by a random training item outside the query's candidates (rejection sampling
over int64 pair codes, never a dense queries x items array), labelled 1. ``label_top`` T labels only
the teacher's top T candidates (j / T) and the others 1, like outliers: a stage 1 that keeps what
mAP counts. With whole-set rankings
(every item a candidate, as the linear teacher affords) ``pairs_per_query`` draws a fresh sample of
each query's ranking every epoch instead, and ``block_items`` trains on dense blocks of them (a few
queries x a few hundred items, every pair of the block): the head then embeds ~300 vectors a step
instead of every query and item of a random 4,096-pair batch. Before training, the scalar scale and bias are fitted to
the labels (``calibrate``): with Xavier's random start they otherwise spend most of a small
dataset's steps just flipping sign (measured: validation Spearman 0.04 without, 0.45 with). Backbone features come
from the feature store (``index_tools.features``); batches are index arrays into them (no per-pair
Python), and each distinct query and item of a batch goes through the head once.

With ``ema`` the head validated and kept is an exponential moving average of the weights, the
cheap form of averaging several heads. Deterministic for a seed (epoch e draws from (seed, e)),
resumable per epoch (a checkpoint holds the head, the optimizer, the average and the best head so
far), and data-parallel under ``accelerate launch``: every process builds the same global batch and
takes its share, DDP averages the gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastattr_hook.files import atomic_open, atomic_write_text
from fastattr_hook.config import load_yaml, save_yaml, to_dict
from fastattr_hook.encoder import Encoder, EncoderSpec, relocated_spec
from fastattr_hook.errors import FastattrError
from fastattr_hook.head import AttributionHead, save_head
from index_tools.features import cached_features

from .data import DistillDataset, load_datasets
from .metrics import average_precision, spearman

log = logging.getLogger(__name__)
PATH_KEYS = ("dataset", "encoder", "out", "cache")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 768
    out: int = 768
    depth: int = 3  # hidden layers; 0 = one linear map
    dropout: float = 0.1


@dataclass(frozen=True)
class DistillConfig:
    """One training run; relative paths are relative to the YAML file."""

    dataset: str | list[str]  # distill.npz made by `fastattr teacher merge`, or several of one teacher and model
    encoder: str  # encoder spec whose backbones the head sits on (its own head, if any, is ignored)
    out: str  # folder for head.safetensors, encoder.yaml, train.json and the checkpoint
    name: str = "tuned"  # the tuned encoder's name (recorded in bundles and credits)
    cache: str | None = None  # feature cache folder (default: <out>/cache)
    head: HeadConfig = field(default_factory=HeadConfig)
    epochs: int = 10
    batch_size: int = 4096  # pairs per optimizer step, over all processes
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": epoch e trains at lr * (1 + cos(pi * e / epochs)) / 2
    ema: float | None = None  # d: validate and keep an average of the weights, a <- d * a + (1 - d) * w each step
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    outlier_rate: float = 0.1
    label_top: int | None = None  # None: y = rank / M (method.md); T: y = min(rank / T, 1), only the top T ordered
    pairs_per_query: int | None = None  # per epoch, a fresh random draw of this many candidates per query (None: all)
    block_items: int | None = None  # whole-set rankings: steps of batch_size // block_items queries x block_items items
    label_variants: list[str] = field(default_factory=list)  # teacher variants averaged into train labels where scored
    val_fraction: float = 0.1  # train queries held out to pick the best epoch
    seed: int = 0
    device: str | None = None  # default: accelerate's device for the process, else cuda when available


def load_config(path: str | Path) -> DistillConfig:
    path = Path(path)
    config = load_yaml(DistillConfig, path)
    base = path.parent.resolve()

    def resolve(value: str | list[str]) -> str | list[str]:
        return [resolve(v) for v in value] if isinstance(value, list) else str((base / value).resolve())

    config = dataclasses.replace(config, **{k: resolve(getattr(config, k)) for k in PATH_KEYS
                                            if getattr(config, k) is not None})
    checks = [(config.epochs >= 1, "epochs", ">= 1"), (config.batch_size >= 1, "batch_size", ">= 1"),
              (0 <= config.outlier_rate < 1, "outlier_rate", "in [0, 1)"),
              (0 <= config.val_fraction < 1, "val_fraction", "in [0, 1)"), (len(config.betas) == 2, "betas", "two numbers"),
              (config.block_items is None or 1 <= config.block_items <= config.batch_size, "block_items",
               "null or between 1 and batch_size"),
              (config.label_top is None or config.label_top >= 1, "label_top", "null or >= 1"),
              (config.block_items is None or config.outlier_rate == 0, "outlier_rate",
               "0 with block_items (whole-set rankings have no item outside a query's candidates)"),
              (config.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {list(LR_SCHEDULES)}"),
              (config.ema is None or 0 < config.ema < 1, "ema", "null or in (0, 1)")]
    for ok, key, rule in checks:
        if not ok:
            raise FastattrError(f"{path}: key '{key}' must be {rule}")
    return config


def item_features(encoder: Encoder, data: DistillDataset, cache: str | Path | None) -> np.ndarray:
    """[N, D] backbone features of the dataset's training table (image + its first caption)."""
    from index_tools.manifest import Rejection, iter_manifest, manifest_fingerprint

    recorded = data.meta.get("fingerprints", {}).get("manifest")
    if recorded and manifest_fingerprint(data.manifest) != recorded:
        raise FastattrError(f"{data.manifest}: changed since the teacher scored {data.path} (manifest fingerprint); "
                            f"curate and score the dataset again for this manifest")
    by_id = {row.id: row for row in iter_manifest(data.manifest) if not isinstance(row, Rejection)}
    missing = [i for i in data.train_ids if i not in by_id]
    if missing:
        raise FastattrError(f"{data.manifest}: {len(missing)} items of {data.path} are missing (e.g. '{missing[0]}'); "
                            f"use the manifest the teacher scored")
    rows = [by_id[i] for i in data.train_ids]
    return cached_features(encoder, [row.load_image for row in rows], [row.caption for row in rows],
                           [row.sha256 or row.id for row in rows], cache, desc="training-item features")


def query_features(encoder: Encoder, data: DistillDataset, cache: str | Path | None) -> np.ndarray:
    """[Q, D] backbone features of the dataset's queries (generated image + prompt)."""
    from PIL import Image

    from fastattr_hook.files import sha256_file

    def loader(path: str):
        def load():
            with Image.open(path) as image:
                return image.convert("RGB")
        return load

    for path in data.image:
        if not Path(path).is_file():
            raise FastattrError(f"{path}: query image missing; restore it with `fastattr teacher curate`")
    return cached_features(encoder, [loader(p) for p in data.image], [str(p) for p in data.prompt],
                           [sha256_file(p) for p in data.image], cache, desc="query features")


@dataclass
class Pairs:
    """Flat (query row, item row, label) arrays of the teacher's candidates."""

    query: np.ndarray
    item: np.ndarray
    label: np.ndarray

    @classmethod
    def of(cls, data: DistillDataset, queries: np.ndarray, top: int | None = None) -> "Pairs":
        parts = [(np.full(data.offsets[q + 1] - data.offsets[q], q),
                  data.item_rows(data.key[data.candidates(q)]),
                  rank_labels(data.rank[data.candidates(q)], data.offsets[q + 1] - data.offsets[q], top))
                 for q in queries]
        return cls(*(np.concatenate(p) for p in zip(*parts)))


def rank_labels(rank: np.ndarray, count: int, top: int | None = None) -> np.ndarray:
    """Labels of candidates at 0-based ``rank`` among ``count``: rank / count (method.md), or with
    ``top`` min(rank / top, 1): the teacher's top ``top`` spread over [0, 1) and every other candidate
    labelled 1, like an outlier. On whole-set rankings this puts the loss where mAP looks (sandbox:
    best validation mAP 0.559 with the top 50 of 1,500, against 0.432 with rank / M)."""
    return np.minimum(rank / max(1, top or count), 1.0).astype(np.float32)


@dataclass
class Block:
    """Every pair of some queries x some items (whole-set rankings): ``label`` is [queries, items]."""

    query: np.ndarray
    item: np.ndarray
    label: np.ndarray


def subsample(pairs: Pairs, per_query: int | None, rng: np.random.Generator) -> Pairs:
    """At most ``per_query`` pairs of each query, drawn at random (all when None): with whole-set
    rankings, each epoch sees another sample of every query's ranking, at a fixed cost per epoch."""
    if per_query is None:
        return pairs
    order = np.lexsort((rng.random(len(pairs.query)), pairs.query))
    starts = np.searchsorted(pairs.query[order], pairs.query[order], side="left")
    keep = np.sort(order[np.arange(len(order)) - starts < per_query])
    return Pairs(pairs.query[keep], pairs.item[keep], pairs.label[keep])


def with_outliers(pairs: Pairs, rate: float, num_items: int, rng: np.random.Generator) -> Pairs:
    """Replace a ``rate`` share of the pairs' items by random items outside their query's
    candidates (label 1): rejection sampling against sorted int64 codes query * N + item."""
    codes = np.sort(pairs.query.astype(np.int64) * num_items + pairs.item)
    chosen = np.flatnonzero(rng.random(len(pairs.label)) < rate)
    items = pairs.item.copy()
    todo = chosen
    for _ in range(100):
        if not len(todo):
            break
        items[todo] = rng.integers(0, num_items, len(todo))
        pair = pairs.query[todo].astype(np.int64) * num_items + items[todo]
        at = np.minimum(np.searchsorted(codes, pair), len(codes) - 1)
        todo = todo[codes[at] == pair]
    else:  # a query whose candidates cover (almost) every item keeps its own pair
        items[todo] = pairs.item[todo]
        chosen = np.setdiff1d(chosen, todo)
    labels = pairs.label.astype(np.float32)
    labels[chosen] = 1.0
    return Pairs(pairs.query, items, labels)


def rank_table(data: DistillDataset, queries: np.ndarray, top: int | None = None) -> np.ndarray:
    """[len(queries), N] labels (``rank_labels``) of whole-set rankings, rows in the order of ``queries``:
    what block batches index. Refused, naming the query, where a ranking does not cover every item."""
    labels = np.empty((len(queries), len(data.train_keys)), dtype=np.float32)
    for row, q in enumerate(queries):
        span = data.candidates(q)
        if span.stop - span.start != len(data.train_keys):
            raise FastattrError(f"{data.path}: query '{data.query_id[q]}' ranks {span.stop - span.start} of "
                                f"{len(data.train_keys)} items; block_items needs whole-set rankings, set it to null")
        labels[row, data.item_rows(data.key[span])] = rank_labels(data.rank[span], len(data.train_keys), top)
    return labels


def epoch_batches(config: DistillConfig, pairs: Pairs, labels: np.ndarray | None, queries: np.ndarray,
                  num_items: int, rng: np.random.Generator) -> tuple[int, Iterator[Pairs | Block]]:
    """The epoch's batches and their pair count: random batches of pairs, or (``block_items``) dense
    blocks of ``labels`` in random order, each query meeting ``pairs_per_query`` (all) of the items."""
    if config.block_items is None:
        epoch = with_outliers(subsample(pairs, config.pairs_per_query, rng), config.outlier_rate, num_items, rng)
        order = rng.permutation(len(epoch.label))
        chunks = (order[b:b + config.batch_size] for b in range(0, len(order), config.batch_size))
        return len(order), (Pairs(epoch.query[c], epoch.item[c], epoch.label[c]) for c in chunks)
    per_block = max(1, config.batch_size // config.block_items)
    reach = min(num_items, config.pairs_per_query or num_items)
    blocks = []
    shuffled = rng.permutation(len(queries))
    for start in range(0, len(shuffled), per_block):
        rows = shuffled[start:start + per_block]
        items = rng.permutation(num_items)[:reach]
        blocks += [(rows, items[b:b + config.block_items]) for b in range(0, reach, config.block_items)]
    order = rng.permutation(len(blocks))
    batches = (Block(queries[blocks[i][0]], blocks[i][1], labels[np.ix_(*blocks[i])]) for i in order)
    return len(queries) * reach, batches


def split_queries(data: DistillDataset, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    train = data.queries("train")
    if not len(train):
        raise FastattrError(f"{data.path}: no train query (split 'train'); score train queries and merge again")
    order = np.random.default_rng([seed, 7]).permutation(train)
    val = np.sort(order[:int(round(len(train) * val_fraction))])
    return np.sort(order[len(val):]), val


class PairScorer(torch.nn.Module):
    """The calibrated logits z = scale * cos(f(q), f(x)) + bias of pairs, or of every query x item
    pair (a block: one matrix product, 3x faster than gathering pairs), embedding each distinct query
    and item of a batch once (one forward, as DDP wants)."""

    def __init__(self, head: AttributionHead):
        super().__init__()
        self.head = head

    def forward(self, queries: torch.Tensor, items: torch.Tensor, query_of_pair: torch.Tensor | None = None,
                item_of_pair: torch.Tensor | None = None) -> torch.Tensor:
        return self.head.calibrated(self.cosine(queries, items, query_of_pair, item_of_pair))

    def cosine(self, queries: torch.Tensor, items: torch.Tensor, query_of_pair: torch.Tensor | None = None,
               item_of_pair: torch.Tensor | None = None) -> torch.Tensor:
        vectors = self.head(torch.cat([queries, items]))
        q, x = vectors[:len(queries)], vectors[len(queries):]
        if query_of_pair is None:
            return F.normalize(q, dim=-1) @ F.normalize(x, dim=-1).T
        return F.cosine_similarity(q[query_of_pair], x[item_of_pair], dim=-1)


def batch_loss(scorer, fq: torch.Tensor, fi: torch.Tensor, batch: Pairs | Block, rank: int,
               world: int) -> tuple[torch.Tensor, int]:
    """This process's share (every world-th pair or block query) of the batch's summed BCE loss,
    scaled so that DDP's average over processes is the batch mean, and how many pairs it holds."""
    device = fq.device
    if isinstance(batch, Block):
        mine = torch.from_numpy(batch.query[rank::world]).to(device)
        z = scorer(fq[mine], fi[torch.from_numpy(batch.item).to(device)])
        y = torch.from_numpy(batch.label[rank::world]).to(device)
    else:
        uq, qi = np.unique(batch.query[rank::world], return_inverse=True)
        ui, ii = np.unique(batch.item[rank::world], return_inverse=True)
        z = scorer(fq[torch.from_numpy(uq).to(device)], fi[torch.from_numpy(ui).to(device)],
                   torch.from_numpy(qi).to(device), torch.from_numpy(ii).to(device))
        y = torch.from_numpy(batch.label[rank::world]).to(device)
    return F.binary_cross_entropy_with_logits(z, y, reduction="sum") * world / batch.label.size, y.numel()


@torch.no_grad()
def calibrate(head: AttributionHead, fq: torch.Tensor, fi: torch.Tensor, pairs: Pairs, sample: int = 20_000,
              steps: int = 50) -> None:
    """Fit the scalar scale and bias of ``z = scale * cos + bias`` to the labels of a sample of pairs
    (Newton steps on the 2-parameter logistic loss) before training: the head starts with the right
    orientation and spread, instead of spending thousands of steps moving two scalars."""
    head.eval()
    rows = np.random.default_rng(0).permutation(len(pairs.label))[:sample]
    cosine = PairScorer(head).cosine(fq, fi, torch.from_numpy(pairs.query[rows]).to(fq.device),
                                     torch.from_numpy(pairs.item[rows]).to(fq.device))
    x = torch.stack([cosine.double(), torch.ones_like(cosine, dtype=torch.float64)], dim=1)
    y = torch.from_numpy(pairs.label[rows]).to(x)
    theta = torch.zeros(2, dtype=torch.float64, device=x.device)
    for _ in range(steps):
        p = torch.sigmoid(x @ theta)
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + 1e-6 * torch.eye(2, dtype=x.dtype, device=x.device)
        theta -= torch.linalg.solve(hessian, x.T @ (p - y))
    head.scale.fill_(float(theta[0]))
    head.bias.fill_(float(theta[1]))


VALIDATION_TOP = 0.0085  # mAP of the teacher's top 0.85% of each query's candidates: the published figure (method.md 6)


@torch.no_grad()
def validate(head: AttributionHead, data: DistillDataset, queries: np.ndarray, fq: torch.Tensor,
             fi: torch.Tensor, item_vectors: torch.Tensor | None = None) -> dict[str, float]:
    """Mean mAP(top 0.85%) and Spearman over held-out train queries, each ranking its candidates by
    -z (low z = influential). Every item and query goes through the head once; ``item_vectors``
    (one per training-table row) replace the items' embeddings where they are learnt directly."""
    if not len(queries):
        return {"map": float("nan"), "spearman": float("nan")}
    head.eval()
    vq = F.normalize(head(fq[torch.from_numpy(queries).to(fq.device)]), dim=-1)
    vi = F.normalize(head(fi) if item_vectors is None else item_vectors, dim=-1)
    scores = (-head.calibrated(vq @ vi.T)).cpu().numpy()
    maps, spearmans = [], []
    for row, q in enumerate(queries):
        teacher = data.tau[data.candidates(q)]
        student = scores[row, data.item_rows(data.key[data.candidates(q)])]
        maps.append(average_precision(teacher, student, max(1, round(VALIDATION_TOP * len(teacher)))))
        spearmans.append(spearman(student, teacher))
    return {"map": float(np.mean(maps)), "spearman": float(np.mean(spearmans))}


def train(config: DistillConfig, config_path: str | Path = "DISTILL.yaml") -> Path:
    """Train (or resume) the head; returns the tuned encoder spec's path (on every process)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=config.device == "cpu")
    device = torch.device(config.device) if config.device and accelerator.num_processes == 1 else accelerator.device
    out = Path(config.out)
    spec_path = Path(config.encoder)
    base = Encoder.from_yaml(spec_path, device=device)
    data = load_datasets(config.dataset).with_averaged_labels(config.label_variants, str(config_path))
    cache = config.cache or out / "cache"
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()  # the main process fills the feature store, the others then read it
    fi = torch.from_numpy(np.array(item_features(base, data, cache))).to(device)
    fq = torch.from_numpy(np.array(query_features(base, data, cache))).to(device)
    if accelerator.is_main_process:
        accelerator.wait_for_everyone()
    train_q, val_q = split_queries(data, config.val_fraction, config.seed)
    pairs = Pairs.of(data, train_q, config.label_top)
    labels = rank_table(data, train_q, config.label_top) if config.block_items else None

    torch.manual_seed(config.seed)
    head = AttributionHead(base.feature_dim, config.head.hidden, config.head.out, config.head.depth,
                           config.head.dropout).to(device)
    calibration_rng = np.random.default_rng([config.seed, 2**31])
    calibrate(head, fq, fi, with_outliers(subsample(pairs, config.pairs_per_query, calibration_rng),
                                          config.outlier_rate, len(data.train_keys), calibration_rng))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, betas=tuple(config.betas),
                                  weight_decay=config.weight_decay)
    checkpoint_path = out / "checkpoint.pt"
    # Epoch 0 is the initial head: training is kept only where it beats it on validation mAP.
    initial = validate(head, data, val_q, fq, fi)
    state = {"epoch": 0, "best": initial["map"], "best_epoch": 0, "initial_validation": initial, "history": []}
    best_head = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    average = {k: v.detach().clone() for k, v in head.state_dict().items()} if config.ema else None
    settings = _settings(config, data)
    if checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)  # never unpickles objects
        if saved["settings"] != json.dumps(settings, sort_keys=True):
            raise FastattrError(f"{checkpoint_path}: made with other settings or data; delete it to start over "
                                f"or use another 'out' in {config_path}")
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        best_head = saved["best_head"]
        if average is not None:
            average = {k: v.to(device) for k, v in saved["average"].items()}
        state = json.loads(saved["state"])
        log.info("%s: resuming after epoch %d", checkpoint_path, state["epoch"])
    scorer, optimizer = accelerator.prepare(PairScorer(head), optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    module = accelerator.unwrap_model(scorer).head
    for epoch in range(state["epoch"], config.epochs):
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch * 101 + rank)  # dropout
        count, batches = epoch_batches(config, pairs, labels, train_q, len(data.train_keys), rng)
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config, epoch)
        scorer.train()
        total, seen, start = 0.0, 0, time.perf_counter()
        bar = tqdm(total=count, desc=f"epoch {epoch + 1}/{config.epochs}", unit="pair", unit_scale=True,
                   disable=not accelerator.is_main_process)
        for batch in batches:
            loss, share = batch_loss(scorer, fq, fi, batch, rank, world)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            if average is not None:
                with torch.no_grad():
                    for key, value in module.state_dict().items():
                        average[key].lerp_(value, 1 - config.ema)
            total += float(loss.detach()) * batch.label.size / world
            seen += share
            bar.update(batch.label.size)
            bar.set_postfix(loss=f"{total / seen:.4f}", pairs_per_s=f"{bar.n / (time.perf_counter() - start):.0f}")
        bar.close()
        judged = module if average is None else _with_weights(module, average)
        val = validate(judged, data, val_q, fq, fi)
        state["history"].append({"epoch": epoch + 1, "train_loss": round(total / max(seen, 1), 6),
                                 "val_map": round(val["map"], 6), "val_spearman": round(val["spearman"], 6),
                                 "seconds": round(time.perf_counter() - start, 2)})
        if val["map"] > state["best"] or not len(val_q):
            state["best"], state["best_epoch"] = val["map"], epoch + 1
            best_head = {k: v.detach().cpu().clone() for k, v in judged.state_dict().items()}
        state["epoch"] = epoch + 1
        log.info("epoch %d: train loss %.4f, validation mAP %.4f, Spearman %.4f", epoch + 1, total / max(seen, 1),
                 val["map"], val["spearman"])
        if accelerator.is_main_process:
            with atomic_open(checkpoint_path, "wb") as f:
                torch.save({"head": {k: v.cpu() for k, v in module.state_dict().items()},
                            "optimizer": optimizer.state_dict(), "best_head": best_head,
                            **({} if average is None else {"average": {k: v.cpu() for k, v in average.items()}}),
                            "state": json.dumps(state), "settings": json.dumps(settings, sort_keys=True)}, f)
        accelerator.wait_for_everyone()
    tuned = out / "encoder.yaml"
    if accelerator.is_main_process:
        final = AttributionHead(base.feature_dim, config.head.hidden, config.head.out, config.head.depth)
        final.load_state_dict(best_head)
        save_head(final, out / "head.safetensors")
        save_yaml(_tuned_spec(base.spec, spec_path.parent, out, config.name), tuned)
        atomic_write_text(out / "train.json", json.dumps({
            "settings": settings, "best_epoch": state["best_epoch"], "best_val_map": state["best"],
            "initial_validation": state["initial_validation"],
            "history": state["history"], "train_queries": len(train_q), "val_queries": len(val_q),
            "pairs_per_epoch": len(subsample(pairs, config.pairs_per_query, np.random.default_rng(0)).label),
            "label_runs": {str(k): int(v) for k, v in zip(*np.unique(data.label_runs(config.label_variants)[
                np.concatenate([train_q, val_q])], return_counts=True))},
            "backbones": base.backbone_fingerprint,
            "manifest": data.meta.get("fingerprints", {}).get("manifest")}, indent=1))
    accelerator.wait_for_everyone()
    return tuned


def _with_weights(head: AttributionHead, weights: dict[str, torch.Tensor]) -> AttributionHead:
    """A copy of ``head`` holding ``weights`` (the ``ema`` average)."""
    averaged = copy.deepcopy(head)
    averaged.load_state_dict(weights)
    return averaged


def epoch_lr(config: DistillConfig, epoch: int) -> float:
    """The learning rate of (0-based) ``epoch``: constant, or a cosine decay per epoch that ends near 0
    (a function of the epoch alone, so a resumed run continues the same schedule)."""
    if config.lr_schedule == "cosine":
        return config.lr * (1 + math.cos(math.pi * epoch / config.epochs)) / 2
    return config.lr


def _settings(config: DistillConfig, data: DistillDataset) -> dict:
    """What the trained head depends on (paths excluded): a checkpoint with others is not resumed.
    With a constant learning rate ``epochs`` is not among them: epoch e draws from (seed, e), so raising
    ``epochs`` continues a finished run exactly as a longer run would have gone (a cosine schedule
    depends on it)."""
    ignored = (*PATH_KEYS, "device", "name") + (("epochs",) if config.lr_schedule == "constant" else ())
    values = {k: v for k, v in to_dict(config).items() if k not in ignored}
    return {**values, "dataset": data.fingerprint}


def _tuned_spec(spec: EncoderSpec, spec_dir: Path, out: Path, name: str) -> dict:
    """The backbones of ``spec`` (local paths rewritten relative to ``out``) plus the new head."""
    return {**relocated_spec(spec, spec_dir, out), "name": name, "head": "head.safetensors"}
