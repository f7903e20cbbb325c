"""Unlearning one query: Newton steps on the Fisher-penalised objective, undone exactly afterwards.

Maximising ``L(query)`` with the penalty ``(N/2)(theta-theta0)^T F (theta-theta0)`` gives the step
``theta <- theta + (alpha/N) F^-1 grad L(query)``. The gradient is averaged over S (noise,
timestep) pairs in float64; the update is added in float64 and rounded once to the weight dtype.
The original weights are saved and copied back, so after the block they are bit-identical.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from PIL import Image

from fastattr_hook.errors import FastattrError

from .adapter import UNetAdapter
from .config import TeacherConfig
from .fisher import Preconditioner
from .params import select_parameters

log = logging.getLogger(__name__)


def query_gradient(adapter: UNetAdapter, latents: torch.Tensor, text: torch.Tensor, config: TeacherConfig,
                   step: int = 0) -> dict[str, torch.Tensor]:
    """Gradient of the query's loss averaged over ``config.query_pairs`` seeded (noise, timestep)
    pairs, accumulated in batches; float64. ``step`` draws fresh pairs for each Newton step."""
    params = select_parameters(adapter.unet, config.params)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    for start in range(0, config.query_pairs, config.batch_size):
        b = min(config.batch_size, config.query_pairs - start)
        noise = torch.randn((b, *latents.shape[1:]), generator=gen).to(adapter.device)
        t = torch.randint(0, adapter.num_train_timesteps, (b,), generator=gen).to(adapter.device)
        live = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        loss = adapter.loss(latents.expand(b, -1, -1, -1), text.expand(b, -1, -1), noise, t, live).sum()
        for name, g in zip(live, torch.autograd.grad(loss, list(live.values()))):
            total[name] += g.to(torch.float64)
    return {name: g / config.query_pairs for name, g in total.items()}


def newton_update(fisher: Preconditioner, grads: dict[str, torch.Tensor], alpha: float, damping: float
                  ) -> dict[str, torch.Tensor]:
    """(alpha / N) (F + damping)^-1 g, float64."""
    return {name: (alpha / fisher.num_train) * v for name, v in fisher.inverse_apply(grads, damping).items()}


@torch.no_grad()
def add_update(params: dict[str, torch.nn.Parameter], update: dict[str, torch.Tensor]) -> None:
    """theta += update, summed in float64 and rounded once to the parameter dtype."""
    for name, p in params.items():
        p.copy_((p.to(torch.float64) + update[name]).to(p.dtype))


@contextlib.contextmanager
def restored(params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
    """Whatever the block does to ``params``, they are copied back bit for bit on exit."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def _norm(tensors) -> float:
    return float(sum(t.to(torch.float64).pow(2).sum() for t in tensors) ** 0.5)


@contextlib.contextmanager
def unlearned(adapter: UNetAdapter, fisher: Preconditioner, image: Image.Image, prompt: str,
              config: TeacherConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block the UNet holds theta_unlearned for the query (image, prompt); the block
    receives the total update theta_unlearned - theta0 (float64, before rounding to the weights)."""
    if adapter.weights_modified:
        raise FastattrError("unlearned() blocks cannot be nested: the weights are already unlearned")
    params = select_parameters(adapter.unet, config.params)
    latents, text = adapter.encode_query(image, prompt)
    adapter.weights_modified = True
    try:
        with restored(params):
            total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
            for step in range(config.newton_steps):
                grads = query_gradient(adapter, latents, text, config, step)
                update = newton_update(fisher, grads, config.alpha, config.damping)
                add_update(params, update)
                total = {name: total[name] + update[name] for name in total}
                log.info("Newton step %d: |update| / |theta| = %.3g (small keeps the step linear)", step,
                         _norm(update.values()) / _norm(p.detach() for p in params.values()))
            yield total
    finally:
        adapter.weights_modified = False
