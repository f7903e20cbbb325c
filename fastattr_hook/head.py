"""The tuned MLP head of method.md section 4, loadable from the authors' published layout.

State-dict layout (published, ~11 MB for 1280 -> 768): ``mlp.layers.{i}.{weight,bias}``,
``mlp.output_layer.{weight,bias}``, ``scale``, ``bias``. Widths are read from the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import FastattrError


class _MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int, depth: int, dropout: float):
        super().__init__()
        widths = [in_features] + [hidden] * depth  # depth 0: the output layer alone, a linear map
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.output_layer = nn.Linear(widths[-1], out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.dropout(torch.relu(layer(x)))
        return self.output_layer(x)


class AttributionHead(nn.Module):
    """depth x (Linear -> ReLU -> Dropout) then Linear; learnable scale/bias on the cosine.

    The calibrated logit ``scale * cos + bias`` predicts the rank fraction (0 = most influential).
    """

    def __init__(self, in_features: int, hidden: int = 768, out_features: int = 768, depth: int = 3,
                 dropout: float = 0.1):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mlp = _MLP(in_features, hidden, out_features, depth, dropout)
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)

    def calibrated(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.scale * cosine + self.bias


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FastattrError(f"head weights not found: {path}; fix 'head' in the encoder spec")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # never unpickle arbitrary objects
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise FastattrError(f"{path}: not a loadable torch state_dict ({exc.__class__.__name__}: {exc})") from None
    for wrapper in ("state_dict", "model", "head"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise FastattrError(f"{path}: expected a state_dict, found {type(state).__name__}")
    return state


def load_head(path: str | Path) -> AttributionHead:
    """Load our safetensors heads and the published ``torch.save`` state_dict alike."""
    path = Path(path)
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    try:
        depth = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("mlp.layers.")), default=-1)
        out = state["mlp.output_layer.weight"]
        first = state["mlp.layers.0.weight"] if depth else out  # depth 0: one Linear map
    except (KeyError, ValueError):
        raise FastattrError(
            f"{path}: not an attribution head (expected keys mlp.layers.{{i}}.weight, "
            f"mlp.output_layer.weight, scale, bias; found {sorted(state)[:6]}...)") from None
    head = AttributionHead(first.shape[1], first.shape[0] if depth else out.shape[1], out.shape[0], depth)
    state["scale"] = state["scale"].reshape(())
    state["bias"] = state["bias"].reshape(())
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FastattrError(f"{path}: head keys do not match (missing {missing}, unexpected {unexpected})")
    return head.eval()


def save_head(head: AttributionHead, path: str | Path) -> None:
    from safetensors.torch import save

    from .files import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in head.state_dict().items()}))
