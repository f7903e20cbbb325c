"""Which UNet parameters the teacher unlearns, chosen by name pattern.

AbU updates only the cross-attention key/value projections (best in its ablation, and the text
conditioning is where a training caption leaves its mark); the wider selections are for ablations.
Patterns follow diffusers ``UNet2DConditionModel`` names (``...transformer_blocks.0.attn2.to_k.weight``).
"""

from __future__ import annotations

import re

import torch

from fastattr_hook.errors import FastattrError

from .config import ParamSelection

PARAM_PATTERNS: dict[str, str] = {
    "cross_attn_kv": r"(^|\.)attn2\.to_[kv]\.weight$",
    "cross_attn": r"(^|\.)attn2\.",
    "all_attn": r"(^|\.)attn[12]\.",
    "all": r".",
}


def select_parameters(model: torch.nn.Module, selection: ParamSelection) -> dict[str, torch.nn.Parameter]:
    """The named parameters matching ``selection``, in the model's own order."""
    if selection not in PARAM_PATTERNS:
        raise FastattrError(f"unknown parameter selection '{selection}' (choose from: {', '.join(PARAM_PATTERNS)})")
    pattern = re.compile(PARAM_PATTERNS[selection])
    chosen = {name: p for name, p in model.named_parameters() if pattern.search(name)}
    if not chosen:
        raise FastattrError(
            f"parameter selection '{selection}' matches no parameter of {type(model).__name__}; "
            f"the teacher expects a diffusers UNet2DConditionModel with cross-attention (attn2) blocks"
        )
    return chosen
