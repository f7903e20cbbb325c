"""The attribution teacher (AbU): unlearn a query with Fisher-damped Newton steps, then score every
training item by how much its loss rose. Training-only machinery; ``fastattr_hook`` never imports it.
"""

from .adapter import TrainingItem, UNetAdapter, read_training_items
from .config import TeacherConfig, load_teacher_config
from .ekfac import (EKFAC, capture_linear_io, compute_ekfac, factor_sums, kronecker_bases, linear_layers,
                    rotated_squares)
from .fisher import (FisherDiagonal, Preconditioner, compute_fisher_diagonal, per_sample_grads, summed_over_draws,
                     training_draws)
from .preconditioner import compute_preconditioner, load_preconditioner
from .params import PARAM_PATTERNS, select_parameters
from .score import Scores, item_losses, pretrain_losses, score_query
from .unlearn import add_update, newton_update, query_gradient, restored, unlearned

__all__ = [
    "EKFAC", "FisherDiagonal", "PARAM_PATTERNS", "Preconditioner", "Scores", "TeacherConfig", "TrainingItem",
    "UNetAdapter", "add_update", "capture_linear_io", "compute_ekfac", "compute_fisher_diagonal",
    "compute_preconditioner", "factor_sums", "item_losses", "kronecker_bases", "linear_layers",
    "load_preconditioner", "load_teacher_config", "newton_update", "per_sample_grads", "pretrain_losses",
    "query_gradient", "read_training_items", "restored", "rotated_squares", "score_query", "select_parameters",
    "summed_over_draws", "training_draws", "unlearned",
]
