"""The teacher's hyperparameters, one YAML file per run (validated by ``fastattr_hook.config``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastattr_hook.config import load_yaml

ParamSelection = Literal["cross_attn_kv", "cross_attn", "all_attn", "all"]
PreconditionerKind = Literal["diagonal", "ekfac"]
Scoring = Literal["exact", "linear"]


@dataclass(frozen=True)
class TeacherConfig:
    """AbU settings. Defaults are tuned on the micro sandbox, not on MSCOCO/SD.

    ``alpha`` is the Newton step in ``theta += (alpha / N) F^-1 g`` with N the training-set size;
    ``damping`` is relative: ``F + damping * mean(F)`` per parameter tensor (the AbU+ convention,
    "0.1 x mean eigenvalue per layer"), so one value fits layers whose Fisher scales differ.
    On the micro sandbox alpha 1e-6..1e-4 (updates of 1%-100% of the K/V weights' norm) give the
    same self-attribution ranks, as expected of a step small enough to act linearly; 1e-1 (updates
    100x the weights) ranks the query's own image near last. The published 0.01 assumes another
    Fisher normalisation, so it does not carry over. Damping 0.1 ranked slightly better than 1.

    ``preconditioner`` picks the Fisher: ``diagonal`` (AbU) or ``ekfac`` (AbU+: eigenvalue-corrected
    Kronecker factors, the better teacher in the paper; Linear weights only, so ``cross_attn_kv``).
    With ``ekfac`` the damping is relative to each layer's mean corrected eigenvalue; the same alpha
    fits (micro sandbox: update norms within 15% of the diagonal's, ranks unchanged over 1e-6..1e-4).

    ``scoring``: ``exact`` evaluates every item's loss after unlearning (T forward passes per item
    and flip, per query); ``linear`` uses the first-order Taylor term of the same loss difference,
    ``tau ~= grad L(z, theta0) . (theta_unlearned - theta0)``, with each item's gradient (same noise,
    timesteps and captions) computed once and cached, so a query costs its Newton step plus one
    matrix-vector product. Exact while the step is small (the regime AbU works in); how closely it
    agrees with ``exact`` is measured in benchmarks/results/teacher_linear_vs_exact.md. Linear
    weights only (as EK-FAC), and it stores selected-parameters x flips floats per item.
    """

    params: ParamSelection = "cross_attn_kv"
    preconditioner: PreconditionerKind = "diagonal"
    alpha: float = 1e-5
    damping: float = 0.1
    newton_steps: int = 1
    query_pairs: int = 512  # S: (noise, timestep) pairs averaged in the query gradient
    timesteps: int = 10  # T: equally spaced timesteps in each training item's loss
    flips: bool = True  # also score the horizontally flipped image and keep the max
    fisher_samples: int = 1000
    seed: int = 0
    batch_size: int = 32
    scoring: Scoring = "exact"


def load_teacher_config(path: str | Path) -> TeacherConfig:
    return load_yaml(TeacherConfig, path)
