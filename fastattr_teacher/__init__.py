"""The attribution teacher (AbU): unlearn a query with Fisher-damped Newton steps, then score every
training item by how much its loss rose. Training-only machinery; ``fastattr_hook`` never imports it.

Names load on first use (PEP 562), so importing the package (e.g. for ``fastattr --help``, which
registers ``fastattr_teacher.cli``) does not import torch and diffusers.
"""

import importlib

_SOURCES = {
    "adapter": ("TrainingItem", "UNetAdapter", "read_training_items"),
    "config": ("TeacherConfig", "load_teacher_config"),
    "ekfac": ("EKFAC", "capture_linear_io", "compute_ekfac", "factor_sums", "kronecker_bases", "linear_layers",
              "rotated_squares"),
    "fisher": ("FisherDiagonal", "Preconditioner", "compute_fisher_diagonal", "per_sample_grads", "summed_over_draws",
               "training_draws"),
    "preconditioner": ("compute_preconditioner", "load_preconditioner"),
    "params": ("PARAM_PATTERNS", "select_parameters"),
    "score": ("Scores", "item_losses", "pretrain_losses", "score_query"),
    "unlearn": ("add_update", "newton_update", "query_gradient", "restored", "unlearned"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fastattr_teacher' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
