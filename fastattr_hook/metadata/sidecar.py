"""Sidecar carrier: the full JSON next to the image, the one carrier that survives re-encoding."""

from __future__ import annotations

from pathlib import Path

from ..attribution import Attribution
from ..files import atomic_write_text

SIDECAR_SUFFIX = ".attribution.json"


def sidecar_path(image_path: str | Path) -> Path:
    """``out.png`` -> ``out.attribution.json``: by stem, so it still matches after a format change."""
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + SIDECAR_SUFFIX)


def _write_sidecar(path: Path, attribution: Attribution) -> None:
    atomic_write_text(sidecar_path(path), attribution.to_json(indent=2) + "\n")
