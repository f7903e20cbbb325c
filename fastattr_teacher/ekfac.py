"""AbU+'s Fisher: eigenvalue-corrected Kronecker factors (EK-FAC) of the selected Linear weights.

A Linear layer's per-sample weight gradient is dW = sum_t g_t a_t^T (a: the layer input, g: the loss
gradient at its output, t: tokens). K-FAC approximates the Fisher E[vec dW vec dW^T] by the
Kronecker product of G = E[sum_t g g^T] and A = E[sum_t a a^T]; EK-FAC keeps the eigenbases Q_G,
Q_A of those factors but replaces the eigenvalue products by Lambda = E[(Q_G^T dW Q_A)^2], the
Fisher's exact diagonal in that basis (the closest fit of that form, so at least as close as
K-FAC). Unlike the diagonal Fisher it captures correlations between weights, yet inverting it costs
only two rotations and a division per layer. a and g come from one batched backward pass with
forward hooks (samples do not interact in the UNet, so each sample's g is its own); the two passes
(factors, then eigenvalues) see the same seeded draws as the diagonal Fisher.

``kronfluence`` is not used because it needs its own Task/Dataset/Analyzer API that wraps the
model's modules in place, and its wheel installs top-level ``tests``/``examples`` packages that
collide with ours, while the math here is a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from fastattr_hook.config import to_dict
from fastattr_hook.errors import FastattrError

from .adapter import TrainingItem, UNetAdapter
from .config import TeacherConfig
from .fisher import check_coverage, read_fisher_file, summed_over_draws, write_fisher_file
from .params import select_parameters

# Per layer (parameter name): the inputs a [B, T, in] and output gradients g [B, T, out], float64.
Captures = dict[str, tuple[torch.Tensor, torch.Tensor]]
PARTS = ("basis_out", "basis_in", "eigenvalues")  # tensor name suffixes in the saved file


@dataclass
class EKFAC:
    """Per selected weight [out, in]: the eigenbases Q_G [out, out] of the output-gradient factor and
    Q_A [in, in] of the input factor, and the corrected eigenvalues Lambda [out, in] (float32 at rest)."""

    basis_out: dict[str, torch.Tensor]
    basis_in: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]
    num_train: int
    meta: dict = field(default_factory=dict)

    def inverse_apply(self, grads: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        """Q_G [(Q_G^T g Q_A) / (Lambda + damping * mean(Lambda))] Q_A^T per layer, in float64: the
        damping is relative to the layer's mean eigenvalue (AbU+'s "0.1 x mean eigenvalue per layer")."""
        check_coverage(self.eigenvalues, grads)
        out = {}
        for name, g in grads.items():
            q_out, q_in, lam = (t.to(device=g.device, dtype=torch.float64)
                                for t in (self.basis_out[name], self.basis_in[name], self.eigenvalues[name]))
            rotated = q_out.T @ g.to(torch.float64) @ q_in
            out[name] = q_out @ (rotated / (lam + damping * lam.mean())) @ q_in.T
        return out

    def save(self, path: str | Path) -> None:
        tensors = {f"{name}.{part}": getattr(self, part)[name] for name in self.eigenvalues for part in PARTS}
        write_fisher_file(path, tensors, "ekfac", self.num_train, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> "EKFAC":
        tensors, meta = read_fisher_file(path, "ekfac")
        parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
        for key, tensor in tensors.items():
            name, part = key.rsplit(".", 1)
            parts[part][name] = tensor
        return cls(parts["basis_out"], parts["basis_in"], parts["eigenvalues"], int(meta["num_train"]), meta)


def linear_layers(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` owning each selected parameter, which must be its ``.weight``: the Kronecker
    factorisation exists for those only."""
    modules = dict(model.named_modules())
    layers = {}
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf != "weight" or not isinstance(module, torch.nn.Linear):
            raise FastattrError(f"EK-FAC covers only the weights of nn.Linear layers, and '{name}' is not one; "
                                f"select Linear weights (params: cross_attn_kv) or use preconditioner: diagonal")
        layers[name] = module
    return layers


def capture_linear_io(layers: dict[str, torch.nn.Linear], batch_loss: Callable[[], torch.Tensor]) -> Captures:
    """Inputs and output gradients of ``layers`` for one batch. ``batch_loss`` returns per-sample
    losses [B] computed with weights that require grad; as samples do not interact, the gradient of
    their sum at a layer's output holds each sample's own g."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def record(module, args, output):
            if name in outputs:  # a shared layer's gradient would need its calls paired up
                raise FastattrError(f"'{name}' ran twice in one forward pass; EK-FAC expects each layer once")
            inputs[name], outputs[name] = args[0].detach(), output
        return record

    handles = [layer.register_forward_hook(recorder(name)) for name, layer in layers.items()]
    try:
        loss = batch_loss().sum()
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(loss, [outputs[name] for name in layers])

    def tokens(x: torch.Tensor) -> torch.Tensor:  # [B, ..., features] -> [B, T, features]
        return x.reshape(x.shape[0], -1, x.shape[-1]).to(torch.float64)

    return {name: (tokens(inputs[name]), tokens(g)) for name, g in zip(layers, grads)}


def factor_sums(captures: Captures) -> dict[str, torch.Tensor]:
    """One batch's share of the Kronecker factors: sum_n sum_t g g^T ('<layer>.factor_out') and
    sum_n sum_t a a^T ('<layer>.factor_in')."""
    out = {}
    for name, (a, g) in captures.items():
        a, g = a.flatten(0, 1), g.flatten(0, 1)
        out[f"{name}.factor_out"], out[f"{name}.factor_in"] = g.T @ g, a.T @ a
    return out


def kronecker_bases(factors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(Q_G, Q_A) per layer: the eigenvectors of the summed factors (their scale does not matter)."""
    names = [key.removesuffix(".factor_out") for key in factors if key.endswith(".factor_out")]
    return {name: (torch.linalg.eigh(factors[f"{name}.factor_out"]).eigenvectors,
                   torch.linalg.eigh(factors[f"{name}.factor_in"]).eigenvectors) for name in names}


def rotated_squares(captures: Captures, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
                    ) -> dict[str, torch.Tensor]:
    """One batch's sum over samples of (Q_G^T dW Q_A)^2 per layer, with dW = sum_t g_t a_t^T; their
    mean over all samples is the corrected eigenvalues Lambda."""
    out = {}
    for name, (a, g) in captures.items():
        q_out, q_in = bases[name]
        out[name] = torch.einsum("bto,bti->boi", g @ q_out, a @ q_in).pow(2).sum(0)
    return out


def compute_ekfac(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig,
                  checkpoint_dir: str | Path | None = None) -> EKFAC:
    """EK-FAC of the selected Linear weights over the ``training_draws``: one pass for the factors'
    eigenbases, a second over the same draws for the corrected eigenvalues (each resumable)."""
    params = select_parameters(adapter.unet, config.params)
    layers = linear_layers(adapter.unet, params)
    live = {name: p.detach().requires_grad_(True) for name, p in params.items()}

    def captured(noisy, t, text, target) -> Captures:
        return capture_linear_io(layers, lambda: adapter.prediction_loss(noisy, t, text, target, live))

    bases = kronecker_bases(summed_over_draws(adapter, items, config, "ekfac-factors",
                                              lambda *batch: factor_sums(captured(*batch)), checkpoint_dir))
    sums = summed_over_draws(adapter, items, config, "ekfac-eigenvalues",
                             lambda *batch: rotated_squares(captured(*batch), bases), checkpoint_dir)
    meta = {"config": to_dict(config), "num_samples": config.fisher_samples, "model": adapter.fingerprint()}
    return EKFAC({name: q_out.float() for name, (q_out, _) in bases.items()},
                 {name: q_in.float() for name, (_, q_in) in bases.items()},
                 {name: (s / config.fisher_samples).float() for name, s in sums.items()}, len(items), meta)
