"""The teacher's view of a text-to-image model: training items in, per-sample DDPM losses out.

``UNetAdapter`` wraps a diffusers ``StableDiffusionPipeline`` (the sandbox model, or Stable
Diffusion 1.x/2.x loaded from a local folder): it encodes a training item into exactly what the
UNet trains on (VAE posterior mean x scaling factor, text-encoder hidden states) and evaluates the
noise-prediction loss for given noise and timesteps under the pipeline's training noise schedule.
Encodings are cached in memory per item, because every query re-scores the same training items;
for large training sets ``attach_encoding_cache`` keeps them in memory-mapped files instead, encoded
once per model and shared by every process and run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.func import functional_call
from tqdm.auto import tqdm

from fastattr_hook.files import atomic_write_text
from fastattr_hook.errors import FastattrError
from fastattr_hook.pipeline import load_pipeline

log = logging.getLogger(__name__)
ENCODE_CHUNK = 256  # training items encoded between checkpoints of the encoding cache


class TrainingItem(Protocol):
    """What the teacher needs of a training item, structurally: the record of an item's fields is
    ``fastattr_hook.items.Item``, and its manifest form ``index_tools.manifest.ManifestRow`` is one."""

    id: str
    captions: tuple[str, ...]  # one or more (MSCOCO has 5); losses average over them

    def load_image(self) -> Image.Image: ...


def read_training_items(manifest: str | Path) -> list[TrainingItem]:
    """The usable rows of a training manifest, in order (structurally bad rows are skipped, logged)."""
    from index_tools.manifest import Rejection, iter_manifest

    items, rejected = [], []
    for row in iter_manifest(manifest):
        (rejected if isinstance(row, Rejection) else items).append(row)
    if rejected:
        log.warning("%s: skipped %d bad rows, first: %s", manifest, len(rejected), rejected[0].message)
    if not items:
        raise FastattrError(f"{manifest}: no usable training rows; validate it with index_tools")
    return items


@dataclass
class _EncodingFiles:
    """Memory-mapped encodings of a fixed list of training items (see ``attach_encoding_cache``)."""

    rows: dict[str, int]  # item id -> row
    flips: list[bool]
    latents: np.ndarray  # [n, len(flips), C, h, w] float32
    text: np.ndarray  # [total captions, L, D] float32
    text_start: np.ndarray  # [n + 1]: row i's captions are text[text_start[i]:text_start[i + 1]]


class UNetAdapter:
    """Encodings and losses for a diffusers UNet2DConditionModel pipeline; the weights are frozen
    (``requires_grad`` off), gradients are taken through ``torch.func`` on selected parameters."""

    def __init__(self, pipe, device: str | torch.device = "cpu") -> None:
        from diffusers import DDPMScheduler

        self.device = torch.device(device)
        self.unet = pipe.unet.to(self.device).eval().requires_grad_(False)
        self.vae = pipe.vae.to(self.device).eval().requires_grad_(False)
        self.text_encoder = pipe.text_encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = pipe.tokenizer
        # Sampling pipelines ship a DDIM/PNDM scheduler; the loss needs the training (DDPM) one,
        # which shares its betas and prediction type through the config.
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise FastattrError(f"unsupported prediction_type '{self.prediction_type}' in the scheduler config "
                                f"(the teacher supports epsilon and v_prediction models)")
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.resolution = int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_shape = (int(self.vae.config.latent_channels), int(self.unet.config.sample_size),
                             int(self.unet.config.sample_size))
        self.weights_modified = False  # set while unlearned weights are in place
        self.base_losses: dict[str, dict[str, np.ndarray]] = {}  # config hash -> item id -> losses
        self.base_gradients: dict[str, dict[str, np.ndarray]] = {}  # config hash -> item id -> [flips, P]
        self._latents: dict[tuple[str, bool], torch.Tensor] = {}
        self._text: dict[str, torch.Tensor] = {}
        self._files: _EncodingFiles | None = None
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "UNetAdapter":
        """Load a local diffusers StableDiffusionPipeline folder (no network, no safety checker)."""
        return cls(load_pipeline(folder), device)

    # -- encoding ------------------------------------------------------------------------------

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """[3, R, R] in [-1, 1]: shorter side resized to the model resolution, centre-cropped."""
        image = image.convert("RGB")
        r = self.resolution
        if image.size != (r, r):
            scale = r / min(image.size)
            w, h = max(r, round(image.width * scale)), max(r, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - r) // 2, (h - r) // 2
            image = image.crop((left, top, left + r, top + r))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).to(self.device)

    @torch.no_grad()
    def encode_image(self, image: Image.Image, flips: Sequence[bool] = (False,)) -> torch.Tensor:
        """[len(flips), C, h, w] latents. One image per VAE call, so a latent never depends on
        which other items happen to share a batch (shards must reproduce the full run's bits)."""
        x = self.pixels(image)
        out = [self.vae.encode((x.flip(-1) if flip else x)[None]).latent_dist.mean[0] for flip in flips]
        return torch.stack(out) * self.vae.config.scaling_factor

    def text_embedding(self, caption: str) -> torch.Tensor:
        """[L, D] text-encoder hidden states, the UNet's cross-attention context (cached per caption)."""
        if caption not in self._text:
            self._text[caption] = self._embed_text(caption)
        return self._text[caption]

    @torch.no_grad()
    def _embed_text(self, caption: str) -> torch.Tensor:
        ids = self.tokenizer([caption], padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0][0]

    def encode_item(self, item: TrainingItem, flips: Sequence[bool] = (False,)) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [len(flips), C, h, w], text [len(item.captions), L, D]) of a training item,
        cached per (id, flip) and per caption."""
        files = self._files
        if files is not None and item.id in files.rows and set(flips) <= set(files.flips):
            row = files.rows[item.id]
            latents = np.stack([files.latents[row, files.flips.index(f)] for f in flips])
            text = np.array(files.text[files.text_start[row]:files.text_start[row + 1]])
            return torch.from_numpy(latents).to(self.device), torch.from_numpy(text).to(self.device)
        missing = [f for f in flips if (item.id, f) not in self._latents]
        if missing:
            for flip, latent in zip(missing, self.encode_image(item.load_image(), missing)):
                self._latents[(item.id, flip)] = latent
        return (torch.stack([self._latents[(item.id, f)] for f in flips]),
                torch.stack([self.text_embedding(caption) for caption in item.captions]))

    def attach_encoding_cache(self, items: Sequence[TrainingItem], cache_dir: str | Path,
                              flips: Sequence[bool] = (False, True), build: bool = True) -> bool:
        """Serve ``encode_item`` for ``items`` from memory-mapped files under ``cache_dir`` (one folder
        per model fingerprint), so large training sets are encoded once and never held in RAM.

        With ``build``, missing rows are encoded first, checkpointed every ``ENCODE_CHUNK`` items (a killed
        run resumes); run it in one process. Without, the files are used only when complete.
        Returns whether the cache is attached. The stored values are the in-memory path's bits."""
        root = Path(cache_dir) / f"encodings-{self.fingerprint()[:16]}"
        header = {"ids": [item.id for item in items], "flips": [bool(f) for f in flips],
                  "captions": [len(item.captions) for item in items]}
        text_start = np.concatenate([[0], np.cumsum(header["captions"])])
        done_path = root / "done.json"
        if (root / "items.json").is_file():
            if json.loads((root / "items.json").read_text()) != header:
                raise FastattrError(f"{root}: made for another list of training items, captions or flips "
                                    f"(or by an older fastattr); delete the folder to re-encode")
        elif not build:
            return False
        else:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / "items.json", json.dumps(header))
        done = set(json.loads(done_path.read_text())) if done_path.is_file() else set()
        if len(done) < len(items) and not build:
            return False
        shapes = {}
        if not ((root / "latents.npy").is_file() and (root / "text.npy").is_file()):
            shapes = {"latents.npy": (len(items), *self.encode_image(items[0].load_image(), flips).shape),
                      "text.npy": (int(text_start[-1]), *self._embed_text(items[0].captions[0]).shape)}
            done = set()

        def open_array(name: str) -> np.ndarray:
            if name in shapes:
                return np.lib.format.open_memmap(root / name, "w+", np.float32, shapes[name])
            return np.load(root / name, mmap_mode="r" if len(done) == len(items) else "r+")

        latents, text = open_array("latents.npy"), open_array("text.npy")
        todo = [i for i in range(len(items)) if i not in done]
        chunk = ENCODE_CHUNK
        for start in tqdm(range(0, len(todo), chunk), desc="encode training items", unit="chunk", disable=not todo):
            for i in todo[start:start + chunk]:
                latents[i] = self.encode_image(items[i].load_image(), flips).cpu().numpy()
                for row, caption in enumerate(items[i].captions, start=int(text_start[i])):
                    text[row] = self._embed_text(caption).cpu().numpy()
            latents.flush()
            text.flush()
            done.update(todo[start:start + chunk])
            atomic_write_text(done_path, json.dumps(sorted(done)))
        self._files = _EncodingFiles({item.id: i for i, item in enumerate(items)}, header["flips"], latents, text,
                                     text_start)
        self._latents.clear()
        return True

    def encode_query(self, image: Image.Image, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [1, C, h, w], text [L, D]) of a query: a generated image and its prompt."""
        return self.encode_image(image), self.text_embedding(prompt)

    # -- loss ----------------------------------------------------------------------------------

    def prepare(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, regression target) under the training schedule."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        return noisy, target

    def prediction_loss(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                        target: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-sample MSE [B]; ``params`` replaces those parameters (functional call) so gradients
        flow to them only."""
        args, kwargs = (noisy, timesteps), {"encoder_hidden_states": text}
        out = functional_call(self.unet, params, args, kwargs) if params else self.unet(*args, **kwargs)
        return (out.sample.float() - target.float()).pow(2).flatten(1).mean(1)

    def loss(self, latents: torch.Tensor, text: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-sample DDPM loss [B] for latents [B, C, h, w], text [B, L, D], noise, timesteps [B]."""
        noisy, target = self.prepare(latents, noise, timesteps)
        return self.prediction_loss(noisy, timesteps, text, target, params)

    def fingerprint(self) -> str:
        """sha256 of every model weight and the schedule: keys caches of pre-training losses."""
        if self.weights_modified:
            raise RuntimeError("fingerprint taken while unlearned weights are in place")
        if self._fingerprint is None:
            digest = hashlib.sha256(repr(sorted(self.scheduler.config.items())).encode())
            for model in (self.unet, self.vae, self.text_encoder):
                for name, tensor in sorted(model.state_dict().items()):
                    digest.update(name.encode())
                    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint
