"""The Fisher that keeps unlearning close to the trained weights (AbU's EWC term).

AbU uses the diagonal empirical Fisher: the mean of squared per-sample gradients of the training
loss, each sample with a random timestep and fresh noise. Per-sample gradients come from
``torch.func`` (``vmap`` over ``grad``): about 3-4x faster than a loop of single-sample backward
passes on the sandbox UNet. Memory grows with batch size x selected parameters, so lower
``batch_size`` for the ``all`` selection on large models.

Anything with ``num_train`` and ``inverse_apply`` (``Preconditioner``) can drive the Newton step;
AbU+'s EK-FAC (``ekfac.py``) is the second implementation; ``preconditioner.py`` picks one by
``TeacherConfig.preconditioner``. This module also holds what both kinds share (seeded draws,
resumable sums, the file format).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch.func import grad, vmap
from tqdm.auto import tqdm

from fastattr_hook.files import atomic_write_bytes
from fastattr_hook.config import to_dict
from fastattr_hook.errors import FastattrError

from .adapter import TrainingItem, UNetAdapter
from .config import TeacherConfig
from .params import select_parameters

log = logging.getLogger(__name__)

META_KEY = "fastattr_teacher"
CHECKPOINT_SECONDS = 300.0  # a running Fisher pass saves its sums this often
FISHER_FIELDS = ("params", "preconditioner", "fisher_samples", "seed", "batch_size")  # what the draws depend on


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


def training_draws(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig, skip: int = 0
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The Fisher's ``config.fisher_samples`` draws in batches of (noisy latents, timesteps, text,
    target): items in seeded shuffled epochs, each with a uniform random timestep and fresh noise
    (unflipped, as in training), and a random caption where it has several. Every Fisher kind, and
    every pass of one, sees the same draws. ``skip`` batches are drawn from the generator but not
    encoded or yielded (a resumed pass)."""
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    while len(order) < config.fisher_samples:
        order += torch.randperm(len(items), generator=gen).tolist()
    order = order[:config.fisher_samples]
    for index, start in enumerate(range(0, len(order), config.batch_size)):
        batch = [items[i] for i in order[start:start + config.batch_size]]
        noise = torch.randn((len(batch), *adapter.latent_shape), generator=gen).to(adapter.device)
        t = torch.randint(0, adapter.num_train_timesteps, (len(batch),), generator=gen).to(adapter.device)
        caption = [int(torch.randint(len(item.captions), (1,), generator=gen)) if len(item.captions) > 1 else 0
                   for item in batch]
        if index < skip:
            continue
        encoded = [adapter.encode_item(item) for item in batch]
        latents = torch.cat([lat for lat, _ in encoded])
        text = torch.stack([txt[k] for (_, txt), k in zip(encoded, caption)])
        noisy, target = adapter.prepare(latents, noise, t)
        yield noisy, t, text, target


def summed_over_draws(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig, name: str,
                      batch_sums: Callable[..., dict[str, torch.Tensor]],
                      checkpoint_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """float64 sums of ``batch_sums(noisy, t, text, target)`` over the ``training_draws``: one
    Fisher pass. With a ``checkpoint_dir``, the running sums go to ``<name>.safetensors`` there every
    ``CHECKPOINT_SECONDS`` and at the end, and a rerun continues after the last saved batch: the same
    additions in the same order, so the same bits as an uninterrupted pass."""
    path = Path(checkpoint_dir) / f"{name}.safetensors" if checkpoint_dir else None
    key = _pass_key(adapter, items, config, name)
    sums, done = _read_checkpoint(path, key) if path else ({}, 0)
    sums = {part: s.to(adapter.device) for part, s in sums.items()}
    batches = math.ceil(config.fisher_samples / config.batch_size)
    bar = tqdm(total=config.fisher_samples, initial=min(done * config.batch_size, config.fisher_samples),
               desc=name, unit="sample")
    saved = time.monotonic()
    for index, (noisy, t, text, target) in enumerate(training_draws(adapter, items, config, done), start=done):
        for part, value in batch_sums(noisy, t, text, target).items():
            value = value.to(torch.float64)
            sums[part] = sums[part] + value if part in sums else value
        bar.update(len(t))
        if path and (index + 1 == batches or time.monotonic() - saved >= CHECKPOINT_SECONDS):
            meta = {META_KEY: json.dumps({"pass": key, "batches_done": index + 1})}
            atomic_write_bytes(path, save({part: s.cpu().contiguous() for part, s in sums.items()}, metadata=meta))
            saved = time.monotonic()
    bar.close()
    return sums


def _pass_key(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig, name: str) -> str:
    """What a pass's sums depend on (the captions too: they steer the draws): a checkpoint made with
    anything else is not resumed."""
    key = {"pass": name, "model": adapter.fingerprint(), "device": adapter.device.type,
           "items": hashlib.sha256(json.dumps([[item.id, *item.captions] for item in items]).encode()).hexdigest(),
           **{field: getattr(config, field) for field in FISHER_FIELDS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_checkpoint(path: Path, key: str) -> tuple[dict[str, torch.Tensor], int]:
    """(sums, batches done) of a pass checkpoint made with ``key``; nothing when absent or stale."""
    if not path.is_file():
        return {}, 0
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            sums = {part: f.get_tensor(part) for part in f.keys()}
    except (SafetensorError, json.JSONDecodeError) as exc:
        raise FastattrError(f"{path}: unreadable Fisher checkpoint ({exc}); delete it to start this pass over") from exc
    if meta.get("pass") != key:
        log.warning("%s: made with another model, training set or Fisher settings; starting this pass over", path)
        return {}, 0
    log.info("%s: resuming after batch %d", path, meta["batches_done"])
    return sums, int(meta["batches_done"])


def compute_fisher_diagonal(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig,
                            checkpoint_dir: str | Path | None = None) -> FisherDiagonal:
    """Mean squared per-sample gradient over the ``training_draws``."""
    params = {name: p.detach() for name, p in select_parameters(adapter.unet, config.params).items()}

    def sample_loss(p, noisy, t, text, target):
        return adapter.prediction_loss(noisy[None], t[None], text[None], target[None], p)[0]

    def squared_grads(noisy, t, text, target):
        with warnings.catch_warnings():  # vmap loops attention per sample; still ~3.7x a plain loop
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            grads = per_sample_grads(sample_loss, params, noisy, t, text, target)
        return {name: g.to(torch.float64).pow(2).sum(0) for name, g in grads.items()}

    sums = summed_over_draws(adapter, items, config, "fisher", squared_grads, checkpoint_dir)
    meta = {"config": to_dict(config), "num_samples": config.fisher_samples, "model": adapter.fingerprint()}
    return FisherDiagonal({name: (s / config.fisher_samples).float() for name, s in sums.items()}, len(items), meta)
