"""The one loader of local Stable Diffusion pipelines: curation, the teacher, the counterfactual
retraining, the sandbox and the demo all see exactly the same model. diffusers is imported lazily."""

from __future__ import annotations

from pathlib import Path

from .errors import FastattrError


def load_pipeline(folder: str | Path):
    """A local diffusers ``StableDiffusionPipeline`` folder: local files only (no network), no
    safety checker, no progress bars, diffusers' load-time notices silenced."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    if not (Path(folder) / "model_index.json").is_file():
        raise FastattrError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe
