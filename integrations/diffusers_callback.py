"""diffusers integration: attribute every image a pipeline makes.

Two ways in:

- ``AttributionCallback``: a ``diffusers.callbacks.PipelineCallback``. At the last denoising step
  it decodes the final latents the way the pipeline does and attributes each image of the batch.
  Composes with other callbacks through ``MultiPipelineCallbacks``; changes nothing the pipeline
  computes. Costs one extra VAE decode (callbacks see latents, not images).
- ``with_attribution(pipe, bundle=...)``: the common case. Runs the pipeline as usual and
  attributes the images it returns (no second decode); ``output.attributions`` holds the results
  and each returned PIL image carries its attribution in ``image.info["fastattr"]``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers.callbacks import PipelineCallback

from fastattr_hook.attribution import Attribution
from fastattr_hook.attributor import Attributor
from fastattr_hook.errors import FastattrError


def _attributor(source: Attributor | str | Path, device: str | None = None) -> Attributor:
    return source if isinstance(source, Attributor) else Attributor.from_bundle(source, device=device)


def check_k(k, attributor: Attributor) -> int:
    """``k`` checked when the callback or wrapper is built, so a mistake never costs a generation."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FastattrError(f"k must be a positive integer (how many credits per image), got {k!r}")
    items = attributor.manifest.items
    if k > items:
        raise FastattrError(f"k={k} exceeds the {items} training items of bundle '{attributor.manifest.name}'; "
                            f"use k <= {items}")
    return k


def expand_prompts(prompt: str | Sequence[str], batch_size: int) -> list[str]:
    """One prompt per image, in diffusers' order (each prompt's num_images_per_prompt images together)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or batch_size % len(prompts):
        raise FastattrError(f"{batch_size} images cannot come from {len(prompts)} prompts; "
                            "pass the same prompt(s) the pipeline was called with")
    per_prompt = batch_size // len(prompts)
    return [p for p in prompts for _ in range(per_prompt)]


FAMILIES = (("StableDiffusion3", "sd3"), ("StableDiffusionXL", "sdxl"), ("StableDiffusion", "sd"), ("Flux", "flux"))


def pipeline_family(pipeline) -> str:
    """Which decode recipe a pipeline class follows: checked before generation, so an unsupported
    pipeline never costs an image."""
    name = type(pipeline).__name__
    family = next((f for prefix, f in FAMILIES if name.startswith(prefix)), None)
    if family is None or getattr(pipeline, "vae", None) is None or getattr(pipeline, "image_processor", None) is None:
        raise FastattrError(
            f"AttributionCallback cannot decode latents of {name}; supported: Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, "
            "Flux and the sandbox pipeline. For other pipelines, attribute the returned images with "
            "Attributor.attribute(images, prompts) or use with_attribution(pipe, ...)")
    return family


def flux_size(pipeline, latents: torch.Tensor, height: int | None, width: int | None) -> tuple[int, int]:
    """The pixel size Flux's packed latents [B, (H/2f)(W/2f), 4C] unpack to: the size given to the
    pipeline, or for square images the one the sequence length implies."""
    patches, cell = latents.shape[1], 2 * pipeline.vae_scale_factor
    if height is None and width is None:
        side = round(patches ** 0.5)
        if side * side != patches:
            raise FastattrError(f"the Flux latents hold {patches} patches, not a square image: pass the pipeline's "
                                f"height= and width= to AttributionCallback")
        return side * cell, side * cell
    if height is None or width is None or (height // cell) * (width // cell) != patches:
        raise FastattrError(f"height={height}, width={width} do not match the Flux latents ({patches} patches of "
                            f"{cell}x{cell} pixels): pass the height and width the pipeline was called with")
    return height, width


@torch.no_grad()
def decode_latents(pipeline, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> list:
    """Final latents -> PIL images, following the pipeline family's own recipe (``height`` and
    ``width`` matter only for Flux's packed latents)."""
    family = pipeline_family(pipeline)
    vae = pipeline.vae
    config = vae.config
    needs_upcast = family == "sdxl" and vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
    latents = latents.to(torch.float32 if needs_upcast else vae.dtype)
    if needs_upcast:
        vae = vae.to(torch.float32)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if family == "flux":
        latents = pipeline._unpack_latents(latents, *flux_size(pipeline, latents, height, width), pipeline.vae_scale_factor)
    if family == "sdxl" and mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    elif family in ("sd3", "flux"):  # these VAEs shift as well as scale
        latents = latents / config.scaling_factor + config.shift_factor
    else:
        latents = latents / config.scaling_factor
    images = vae.decode(latents, return_dict=False)[0]
    if needs_upcast:
        vae.to(torch.float16)
    return pipeline.image_processor.postprocess(images, output_type="pil", do_denormalize=[True] * len(images))


class AttributionCallback(PipelineCallback):
    """Attributes the final images at the last step; results in ``self.attributions`` (batch order).

    ``prompt`` must be what the pipeline was called with (diffusers does not pass it to
    callbacks); negative prompts play no part in attribution. ``height`` and ``width`` are needed
    only for non-square Flux images (Flux's packed latents do not record them).
    """

    tensor_inputs = ["latents"]

    def __init__(self, attributor: Attributor | str | Path, prompt: str | Sequence[str] | None = None, k: int = 10,
                 device: str | None = None, height: int | None = None, width: int | None = None):
        super().__init__()
        self.attributor = _attributor(attributor, device)
        self.prompt, self.k = prompt, check_k(k, self.attributor)
        self.height, self.width = height, width
        self.attributions: list[Attribution] = []
        self.images: list = []

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if step_index == 0:  # checked at the first step: a mistake never waits for the last one
            if self.prompt is None:
                raise FastattrError("AttributionCallback needs the prompt: AttributionCallback(bundle, prompt=...)")
            expand_prompts(self.prompt, len(callback_kwargs["latents"]))
            if pipeline_family(pipeline) == "flux":
                flux_size(pipeline, callback_kwargs["latents"], self.height, self.width)
        if step_index == pipeline.num_timesteps - 1:
            latents = callback_kwargs["latents"]
            self.images = decode_latents(pipeline, latents, self.height, self.width)
            self.attributions = self.attributor.attribute(self.images, expand_prompts(self.prompt, len(latents)),
                                                          k=self.k)
        return callback_kwargs


class AttributedPipeline:
    """A pipeline whose outputs carry attributions; every other attribute passes through, and a
    method that returns the pipeline (``.to()``, ``enable_model_cpu_offload()`` ...) returns this
    wrapper, so chaining never drops the attributions."""

    def __init__(self, pipeline, attributor: Attributor, k: int = 10):
        self.pipeline, self.attributor, self.k = pipeline, attributor, check_k(k, attributor)

    def __getattr__(self, name: str):
        value = getattr(self.pipeline, name)
        if not callable(value) or isinstance(value, torch.nn.Module):
            return value

        @functools.wraps(value)
        def keep_wrapped(*args, **kwargs):
            result = value(*args, **kwargs)
            return self if result is self.pipeline else result

        return keep_wrapped

    def __call__(self, prompt: str | Sequence[str] | None = None, *args, **kwargs):
        if prompt is None:
            raise FastattrError("with_attribution pipelines need `prompt` as text (prompt_embeds alone "
                                "cannot be attributed)")
        output_type = kwargs.get("output_type", "pil")
        return_dict = kwargs.get("return_dict", True)
        if output_type == "latent":
            pipeline_family(self.pipeline)  # before generating
        output = self.pipeline(prompt, *args, **kwargs)
        images = output.images if return_dict else output[0]
        if output_type == "latent":
            images = decode_latents(self.pipeline, images, kwargs.get("height"), kwargs.get("width"))
        elif output_type == "pt":
            images = list(images.permute(0, 2, 3, 1).float().cpu())
        attributions = self.attributor.attribute(list(images), expand_prompts(prompt, len(images)), k=self.k)
        for image, attribution in zip(images, attributions):
            if hasattr(image, "info"):
                image.info["fastattr"] = attribution.to_json()
        if not return_dict:
            return (*output, attributions)
        output.attributions = attributions
        return output


def with_attribution(pipeline, bundle: Attributor | str | Path, k: int = 10, device: str | None = None) -> AttributedPipeline:
    """Wrap a diffusers pipeline so that each call also returns who made its images."""
    return AttributedPipeline(pipeline, _attributor(bundle, device), k)


def save_image(image, path: str | Path, **options) -> Path:
    """Save a returned image with every credit carrier (PNG/JPEG/WebP metadata + sidecar)."""
    from fastattr_hook.metadata import save_with_attribution

    if "fastattr" not in getattr(image, "info", {}):
        raise FastattrError("this image carries no attribution; produce it with with_attribution(pipe, ...)")
    return save_with_attribution(image, path, Attribution.from_json(image.info["fastattr"]), **options)
