"""The Fisher that keeps unlearning close to the trained weights (AbU's EWC term).

AbU uses the diagonal empirical Fisher: the mean of squared per-sample gradients of the training
loss, each sample with a random timestep and fresh noise. Per-sample gradients come from
``torch.func`` (``vmap`` over ``grad``): about 3-4x faster than a loop of single-sample backward
passes on the sandbox UNet. Memory grows with batch size x selected parameters, so lower
``batch_size`` for the ``all`` selection on large models.

Anything with ``num_train`` and ``inverse_apply`` (``Preconditioner``) can drive the Newton step;
AbU+'s EK-FAC (``ekfac.py``) is the second implementation, chosen by ``TeacherConfig.preconditioner``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch.func import grad, vmap
from tqdm.auto import tqdm

from fastattr_hook._io import atomic_write_bytes
from fastattr_hook.config import to_dict
from fastattr_hook.errors import FastattrError

from .adapter import TrainingItem, UNetAdapter
from .config import TeacherConfig
from .params import select_parameters

META_KEY = "fastattr_teacher"


class Preconditioner(Protocol):
    """A Fisher approximation the Newton step can invert."""

    num_train: int  # N in theta += (alpha / N) F^-1 g: the training-set size the Fisher came from

    def inverse_apply(self, grads: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]: ...

    def save(self, path: str | Path) -> None: ...


def check_coverage(covered: Iterable[str], grads: dict[str, torch.Tensor]) -> None:
    """A Fisher inverts only the parameters it was computed for: a mismatch means another selection."""
    covered = set(covered)
    if set(grads) != covered:
        raise FastattrError(
            f"the Fisher covers {len(covered)} parameters but the gradient has {len(grads)} "
            f"(e.g. '{next(iter(set(grads) ^ covered))}'); recompute the Fisher with the "
            f"same 'params' selection as the teacher config")


@dataclass
class FisherDiagonal:
    """Diagonal empirical Fisher, one tensor per selected parameter (float32 at rest)."""

    diagonal: dict[str, torch.Tensor]
    num_train: int
    meta: dict = field(default_factory=dict)

    def inverse_apply(self, grads: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        """(F + damping * mean(F))^-1 g per tensor, in float64. Damping is relative to each tensor's
        mean Fisher so that one value suits layers whose gradient scales differ by orders of magnitude."""
        check_coverage(self.diagonal, grads)
        out = {}
        for name, g in grads.items():
            f = self.diagonal[name].to(device=g.device, dtype=torch.float64)
            out[name] = g.to(torch.float64) / (f + damping * f.mean())
        return out

    def save(self, path: str | Path) -> None:
        write_fisher_file(path, self.diagonal, "fisher_diagonal", self.num_train, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> "FisherDiagonal":
        diagonal, meta = read_fisher_file(path, "fisher_diagonal")
        return cls(diagonal, int(meta["num_train"]), meta)


def write_fisher_file(path: str | Path, tensors: dict[str, torch.Tensor], kind: str, num_train: int,
                      meta: dict) -> None:
    """Tensors as float32 safetensors with our metadata (kind, N, how it was made); atomic."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    meta = {**meta, "kind": kind, "num_train": num_train}
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: json.dumps(meta)}))


def read_fisher_file(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file ``write_fisher_file`` wrote with this ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise FastattrError(f"{path}: Fisher file not found; compute it first")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        if meta.get("kind") != kind:
            raise FastattrError(f"{path}: not a '{kind}' Fisher written by fastattr_teacher; recompute it")
        return {name: f.get_tensor(name) for name in f.keys()}, meta


def per_sample_grads(loss_fn: Callable[..., torch.Tensor], params: dict[str, torch.Tensor],
                     *batched: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of ``loss_fn(params, *sample)`` for every sample of ``batched`` (leading dim B);
    returns {name: [B, *param.shape]}."""
    return vmap(grad(loss_fn), in_dims=(None,) + (0,) * len(batched))(params, *batched)


def training_draws(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The Fisher's ``config.fisher_samples`` draws in batches of (noisy latents, timesteps, text,
    target): items in seeded shuffled epochs, each with a uniform random timestep and fresh noise
    (unflipped, as in training). Every Fisher kind, and every pass of one, sees the same draws."""
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    while len(order) < config.fisher_samples:
        order += torch.randperm(len(items), generator=gen).tolist()
    order = order[:config.fisher_samples]
    for start in range(0, len(order), config.batch_size):
        batch = [items[i] for i in order[start:start + config.batch_size]]
        encoded = [adapter.encode_item(item) for item in batch]
        latents = torch.cat([lat for lat, _ in encoded])
        text = torch.stack([txt for _, txt in encoded])
        noise = torch.randn(latents.shape, generator=gen).to(adapter.device)
        t = torch.randint(0, adapter.num_train_timesteps, (len(batch),), generator=gen).to(adapter.device)
        noisy, target = adapter.prepare(latents, noise, t)
        yield noisy, t, text, target


def compute_fisher_diagonal(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig
                            ) -> FisherDiagonal:
    """Mean squared per-sample gradient over the ``training_draws``."""
    params = {name: p.detach() for name, p in select_parameters(adapter.unet, config.params).items()}

    def sample_loss(p, noisy, t, text, target):
        return adapter.prediction_loss(noisy[None], t[None], text[None], target[None], p)[0]

    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    bar = tqdm(total=config.fisher_samples, desc="fisher", unit="sample")
    for noisy, t, text, target in training_draws(adapter, items, config):
        with warnings.catch_warnings():  # vmap loops attention per sample; still ~3.7x a plain loop
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            grads = per_sample_grads(sample_loss, params, noisy, t, text, target)
        for name, g in grads.items():
            sums[name] += g.to(torch.float64).pow(2).sum(0)
        bar.update(len(t))
    bar.close()
    meta = {"config": to_dict(config), "num_samples": config.fisher_samples, "model": adapter.fingerprint()}
    return FisherDiagonal({name: (s / config.fisher_samples).float() for name, s in sums.items()}, len(items), meta)


def compute_preconditioner(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig
                           ) -> Preconditioner:
    """The Fisher approximation ``config.preconditioner`` asks for."""
    from .ekfac import compute_ekfac  # imported here because ekfac.py builds on this module

    if config.preconditioner == "diagonal":
        return compute_fisher_diagonal(adapter, items, config)
    if config.preconditioner == "ekfac":
        return compute_ekfac(adapter, items, config)
    raise FastattrError(f"unknown preconditioner '{config.preconditioner}' (choose from: diagonal, ekfac)")


def load_preconditioner(path: str | Path) -> Preconditioner:
    """A saved Fisher approximation, whichever kind ``save`` wrote (read from the file's metadata)."""
    from .ekfac import EKFAC  # imported here because ekfac.py builds on this module

    path = Path(path)
    if not path.is_file():
        raise FastattrError(f"{path}: Fisher file not found; compute it first")
    try:
        with safe_open(str(path), framework="pt") as f:
            kind = json.loads((f.metadata() or {}).get(META_KEY, "{}")).get("kind")
    except (SafetensorError, json.JSONDecodeError) as exc:
        raise FastattrError(f"{path}: not a Fisher file written by fastattr_teacher ({exc}); recompute it") from exc
    loaders = {"fisher_diagonal": FisherDiagonal.load, "ekfac": EKFAC.load}
    if kind not in loaders:
        raise FastattrError(f"{path}: not a Fisher file written by fastattr_teacher (kind {kind!r}, expected one "
                            f"of {', '.join(loaders)}); recompute it")
    return loaders[kind](path)
