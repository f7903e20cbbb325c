"""The Fisher approximations the Newton step can use, chosen by ``TeacherConfig.preconditioner``:
``diagonal`` (AbU, ``fisher.py``) or ``ekfac`` (AbU+, ``ekfac.py``). Computing and loading go
through here, so the two kinds never import each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from safetensors import SafetensorError, safe_open

from fastattr_hook.errors import FastattrError

from .adapter import TrainingItem, UNetAdapter
from .config import TeacherConfig
from .ekfac import EKFAC, compute_ekfac
from .fisher import META_KEY, FisherDiagonal, Preconditioner, compute_fisher_diagonal


def compute_preconditioner(adapter: UNetAdapter, items: Sequence[TrainingItem], config: TeacherConfig,
                           checkpoint_dir: str | Path | None = None) -> Preconditioner:
    """The Fisher approximation ``config.preconditioner`` asks for; resumable through
    ``checkpoint_dir`` (see ``summed_over_draws``), which the caller may delete once it is saved."""
    if config.preconditioner == "diagonal":
        return compute_fisher_diagonal(adapter, items, config, checkpoint_dir)
    if config.preconditioner == "ekfac":
        return compute_ekfac(adapter, items, config, checkpoint_dir)
    raise FastattrError(f"unknown preconditioner '{config.preconditioner}' (choose from: diagonal, ekfac)")


def load_preconditioner(path: str | Path) -> Preconditioner:
    """A saved Fisher approximation, whichever kind ``save`` wrote (read from the file's metadata)."""
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
