"""Scoring: how much unlearning the query raised each training item's loss.

``tau(query, z) = L(z, theta_unlearned) - L(z, theta0)``, with both losses on IDENTICAL noise and
timesteps (else the noise swamps the signal), averaged over T equally spaced timesteps and the
item's captions, max over the unflipped and horizontally flipped image. The noise is seeded by
(seed, item id) and each item is evaluated in its own batch, so any shard of the training set
reproduces the full run's numbers bit for bit. The theta0 losses do not depend on the query: they
are computed once per configuration hash and kept in memory (and on disk when given a cache folder).
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

from fastattr_hook._io import atomic_write_bytes

from .adapter import TrainingItem, UNetAdapter
from .config import TeacherConfig
from .fisher import Preconditioner
from .unlearn import unlearned


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


@torch.no_grad()
def item_losses(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig,
                desc: str = "losses") -> np.ndarray:
    """[n, flips] loss of every item under the current weights, averaged over the T timesteps and
    the item's captions."""
    flips = item_flips(config)
    timesteps = eval_timesteps(config.timesteps, adapter.num_train_timesteps).to(adapter.device)
    out = np.empty((len(items), len(flips)))
    for i, item in enumerate(tqdm(items, desc=desc, unit="item")):
        latents, text = adapter.encode_item(item, flips)
        noise = torch.randn((config.timesteps, *latents.shape[1:]),
                            generator=torch.Generator().manual_seed(item_seed(config.seed, item.id)))
        repeats = len(flips) * len(text)  # (flip, caption, timestep) order; all see the same noise and timesteps
        n = repeats * config.timesteps
        lat = latents.repeat_interleave(len(text) * config.timesteps, 0)
        txt = text.repeat_interleave(config.timesteps, 0).repeat(len(flips), 1, 1)
        eps, ts = noise.to(adapter.device).repeat(repeats, 1, 1, 1), timesteps.repeat(repeats)
        losses = torch.cat([adapter.loss(lat[s:s + config.batch_size], txt[s:s + config.batch_size],
                                         eps[s:s + config.batch_size], ts[s:s + config.batch_size])
                            for s in range(0, n, config.batch_size)])
        out[i] = losses.view(len(flips), -1).to(torch.float64).mean(1).cpu().numpy()
    return out


def loss_config_hash(adapter: UNetAdapter, config: TeacherConfig) -> str:
    """What the theta0 losses depend on: the model, the evaluation noise/timesteps/flips, and the
    batching and device (which can change the last bits)."""
    key = {"model": adapter.fingerprint(), "seed": config.seed, "timesteps": config.timesteps,
           "flips": config.flips, "batch_size": config.batch_size, "device": adapter.device.type}
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
    before = pretrain_losses(adapter, items, config, cache_dir)
    with unlearned(adapter, fisher, image, prompt, config):
        after = item_losses(adapter, items, config, desc="score")
    return Scores([item.id for item in items], (after - before).max(axis=1))
