"""Scoring: how much unlearning the query raised each training item's loss.

``tau(query, z) = L(z, theta_unlearned) - L(z, theta0)``, with both losses on IDENTICAL noise and
timesteps (else the noise swamps the signal), averaged over T equally spaced timesteps and the
item's captions, max over the unflipped and horizontally flipped image. The noise is seeded by
(seed, item id) and each item is evaluated in its own batch, so any shard of the training set
reproduces the full run's numbers bit for bit. The theta0 losses do not depend on the query: they
are computed once per configuration hash and kept in memory (and on disk when given a cache folder).

``scoring: linear`` replaces the after-unlearning losses by their first-order Taylor term around
theta0: each item's loss gradient (the same rows: noise, timesteps, captions, flips) is computed
once, and a query's scores are one product with its Newton update.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from fastattr_hook.files import atomic_write_bytes

from .adapter import TrainingItem, UNetAdapter
from .config import TeacherConfig
from .ekfac import capture_linear_io, linear_layers
from .fisher import Preconditioner
from .params import select_parameters
from .unlearn import unlearned

GRADIENT_CHUNK = 128  # items per memory-mapped chunk of the item-gradient cache


@dataclass(frozen=True)
class Scores:
    """Teacher scores of one query; higher tau = more influential."""

    ids: list[str]
    tau: np.ndarray  # float64 [n]

    @property
    def ranking(self) -> np.ndarray:
        """Item indices, most influential first (ties keep item order)."""
        return np.argsort(-self.tau, kind="stable")

    def rank_of(self, item_id: str) -> int:
        """0-based rank of an item (0 = most influential)."""
        return int(np.flatnonzero(self.ranking == self.ids.index(item_id))[0])

    def top(self, k: int) -> list[str]:
        return [self.ids[i] for i in self.ranking[:k]]


def item_seed(seed: int, item_id: str) -> int:
    """A noise seed that depends only on (seed, item id), not on position or shard."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[:8], "little") >> 1


def eval_timesteps(count: int, num_train_timesteps: int) -> torch.Tensor:
    """``count`` equally spaced timesteps, centred in their bins (50, 150, ..., 950 for 10 of 1000)."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count).long()


def item_flips(config: TeacherConfig) -> tuple[bool, ...]:
    """The image orientations each training item is scored in (max over them)."""
    return (False, True) if config.flips else (False,)


def _item_rows(adapter: UNetAdapter, item: TrainingItem, config: TeacherConfig, timesteps: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
    """(latents, text, noise, timesteps) rows of one item in (flip, caption, timestep) order: every
    flip and caption sees the same seeded noise and timesteps."""
    flips = item_flips(config)
    latents, text = adapter.encode_item(item, flips)
    noise = torch.randn((config.timesteps, *latents.shape[1:]),
                        generator=torch.Generator().manual_seed(item_seed(config.seed, item.id)))
    repeats = len(flips) * len(text)
    lat = latents.repeat_interleave(len(text) * config.timesteps, 0)
    txt = text.repeat_interleave(config.timesteps, 0).repeat(len(flips), 1, 1)
    return lat, txt, noise.to(adapter.device).repeat(repeats, 1, 1, 1), timesteps.repeat(repeats)


@torch.no_grad()
def item_losses(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig,
                desc: str = "losses") -> np.ndarray:
    """[n, flips] loss of every item under the current weights, averaged over the T timesteps and
    the item's captions."""
    timesteps = eval_timesteps(config.timesteps, adapter.num_train_timesteps).to(adapter.device)
    out = np.empty((len(items), len(item_flips(config))))
    for i, item in enumerate(tqdm(items, desc=desc, unit="item")):
        lat, txt, eps, ts = _item_rows(adapter, item, config, timesteps)
        step = config.batch_size
        losses = torch.cat([adapter.loss(lat[s:s + step], txt[s:s + step], eps[s:s + step], ts[s:s + step])
                            for s in range(0, len(ts), step)])
        out[i] = losses.view(out.shape[1], -1).to(torch.float64).mean(1).cpu().numpy()
    return out


def _item_gradient_rows(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig
                        ) -> np.ndarray:
    """[n, flips, P] float32: the gradient of each item's loss (the rows ``item_losses`` averages)
    with respect to the selected weights, flattened in ``select_parameters`` order. One item per
    backward pass, so an item's gradient never depends on its neighbours."""
    params = select_parameters(adapter.unet, config.params)
    layers = linear_layers(adapter.unet, params)
    live = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    timesteps = eval_timesteps(config.timesteps, adapter.num_train_timesteps).to(adapter.device)
    flips = len(item_flips(config))
    out = np.empty((len(items), flips, sum(p.numel() for p in params.values())), dtype=np.float32)
    for i, item in enumerate(items):
        lat, txt, eps, ts = _item_rows(adapter, item, config, timesteps)
        total = {name: torch.zeros((flips, *p.shape), dtype=torch.float64, device=adapter.device)
                 for name, p in params.items()}
        for s in range(0, len(ts), config.batch_size):
            rows = slice(s, s + config.batch_size)
            captured = capture_linear_io(layers, lambda: adapter.loss(lat[rows], txt[rows], eps[rows], ts[rows], live))
            flip = torch.arange(s, min(s + config.batch_size, len(ts)), device=adapter.device) // (len(ts) // flips)
            for name, (a, g) in captured.items():  # dW per row = sum over tokens of g a^T
                total[name].index_add_(0, flip, torch.einsum("rto,rti->roi", g, a))
        out[i] = torch.cat([t.flatten(1) for t in total.values()], dim=1).div(len(ts) // flips).float().cpu().numpy()
    return out


def item_gradients(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig,
                   cache_dir: str | Path | None = None) -> np.ndarray:
    """[n, flips, P] theta0 gradients of the items' losses (``scoring: linear``), computed once per
    configuration. With ``cache_dir`` they are kept in memory-mapped chunks of ``GRADIENT_CHUNK``
    items, each written atomically (its ids file last), so a killed pass resumes and every process
    and shard reuses them."""
    from index_tools.features import ChunkStore

    key = loss_config_hash(adapter, config, params=config.params)
    memo = adapter.base_gradients.setdefault(key, {})
    store = ChunkStore(Path(cache_dir) / f"item-gradients-{key[:16]}") if cache_dir else None
    missing = list({item.id: item for item in items if item.id not in memo}.values())
    if store is not None:
        memo.update((item.id, store.get([item.id])[0]) for item in missing if item.id in store)
        missing = [item for item in missing if item.id not in memo]
    chunk = GRADIENT_CHUNK if store is not None else max(1, len(missing))
    bar = tqdm(total=len(missing), desc="item gradients", unit="item", disable=not missing)
    for start in range(0, len(missing), chunk):
        part = missing[start:start + chunk]
        grads = _item_gradient_rows(adapter, part, config)
        if store is not None:
            store.put([item.id for item in part], grads)
        memo.update(zip([item.id for item in part], grads))
        bar.update(len(part))
    bar.close()
    return np.stack([memo[item.id] for item in items])


def loss_config_hash(adapter: UNetAdapter, config: TeacherConfig, **extra) -> str:
    """What the theta0 losses (and, with ``params``, their gradients) depend on: the model, the
    evaluation noise/timesteps/flips, and the batching and device (which can change the last bits)."""
    key = {"model": adapter.fingerprint(), "seed": config.seed, "timesteps": config.timesteps,
           "flips": config.flips, "batch_size": config.batch_size, "device": adapter.device.type, **extra}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def pretrain_losses(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig,
                    cache_dir: str | Path | None = None) -> np.ndarray:
    """[n, flips] theta0 losses; computed once per configuration hash, only for items not cached."""
    key = loss_config_hash(adapter, config)
    memo = adapter.base_losses.setdefault(key, {})
    path = Path(cache_dir) / f"pretrain-losses-{key[:16]}.safetensors" if cache_dir else None
    if path and path.is_file() and not memo:
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads(f.metadata()["ids"])
            memo.update(zip(ids, f.get_tensor("losses").numpy()))
    missing = [item for item in items if item.id not in memo]
    if missing:
        memo.update(zip([item.id for item in missing], item_losses(adapter, missing, config, "pre-training losses")))
        if path:
            ids = list(memo)
            atomic_write_bytes(path, save({"losses": torch.from_numpy(np.stack([memo[i] for i in ids]))},
                                          metadata={"ids": json.dumps(ids), "config_hash": key}))
    return np.stack([memo[item.id] for item in items])


def score_query(adapter: UNetAdapter, fisher: Preconditioner, items: Sequence[TrainingItem], image: Image.Image,
                prompt: str, config: TeacherConfig, cache_dir: str | Path | None = None) -> Scores:
    """Teacher scores of ``items`` (the training set or a candidate subset) for one query."""
    if config.scoring == "linear":
        grads = item_gradients(adapter, items, config, cache_dir)
        with unlearned(adapter, fisher, image, prompt, config) as update:
            step = torch.cat([u.flatten() for u in update.values()]).float().cpu().numpy()
        return Scores([item.id for item in items], (grads @ step).astype(np.float64).max(axis=1))
    before = pretrain_losses(adapter, items, config, cache_dir)
    with unlearned(adapter, fisher, image, prompt, config):
        after = item_losses(adapter, items, config, desc="score")
    return Scores([item.id for item in items], (after - before).max(axis=1))
