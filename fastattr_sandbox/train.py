"""Training loops for the sandbox models (VAE, UNet + text encoder, tiny CLIP).

Randomness is drawn from a generator seeded by (seed, step), so a run that is killed and resumed
from a checkpoint follows exactly the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from fastattr_hook.files import atomic_open, atomic_write_text

from . import models


def load_images(data_dir: Path, rows: list[dict]) -> torch.Tensor:
    """All training images as a float tensor in [-1, 1], shape [N, 3, H, W]."""
    arrays = [np.asarray(Image.open(data_dir / r["image"]).convert("RGB")) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def read_manifest(data_dir: Path) -> list[dict]:
    with open(data_dir / "manifest.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


CHECKPOINT_EVERY = 200  # steps between training checkpoints


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class _Checkpoint:
    """Periodic training checkpoints (tensors only, loaded with ``weights_only=True``)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=True) if self.path.is_file() else None

    def maybe_save(self, step: int, total: int, state: dict) -> None:
        if step % CHECKPOINT_EVERY == 0 and step < total:
            with atomic_open(self.path) as f:
                torch.save({**state, "step": step}, f)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def train_vae(images: torch.Tensor, steps: int, batch_size: int, seed: int, work: Path):
    """A small KL autoencoder (32x32x3 -> 16x16x4); sets ``scaling_factor`` like SD's."""
    torch.manual_seed(seed)
    vae = models.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt = _Checkpoint(work / "vae.ckpt")
    start = 0
    if state := ckpt.load():
        vae.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"]); start = state["step"]
    vae.train()
    bar = tqdm(range(start, steps), desc="train vae", initial=start, total=steps)
    for step in bar:
        g = _step_generator(seed, step)
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        ckpt.maybe_save(step + 1, steps, {"model": vae.state_dict(), "optimizer": opt.state_dict()})
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        recon_mse = float(torch.cat([F.mse_loss(vae.decode(vae.encode(images[i:i + 256]).latent_dist.mean).sample,
                                                images[i:i + 256], reduction="none").mean((1, 2, 3))
                                     for i in range(0, len(images), 256)]).mean())
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    ckpt.clear()
    return vae, {"recon_mse": recon_mse, "scaling_factor": vae.config.scaling_factor}


def encode_latent_stats(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, computed once (scaled like SD latents)."""
    sf = vae.config.scaling_factor
    with torch.no_grad():
        dists = [vae.encode(images[i:i + 256]).latent_dist for i in range(0, len(images), 256)]
    return torch.cat([d.mean for d in dists]) * sf, torch.cat([d.std for d in dists]) * sf


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(latent_mean, latent_std, captions, tokenizer, steps, batch_size, channels, seed, work,
               lr: float = 1e-3, caption_dropout: float = 0.1, warmup: int = 100):
    """Denoiser and text encoder trained jointly with the DDPM noise loss (SD recipe, tiny)."""
    torch.manual_seed(seed)
    unet = models.build_unet(channels)
    text_encoder = models.build_text_encoder(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
    train_scheduler, _ = models.noise_schedulers()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    ckpt = _Checkpoint(work / "unet.ckpt")
    start = 0
    if state := ckpt.load():
        unet.load_state_dict(state["unet"]); text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"]); start = state["step"]
    unet.train(); text_encoder.train()
    losses = []
    bar = tqdm(range(start, steps), desc="train unet", initial=start, total=steps)
    for step in bar:
        g = _step_generator(seed, step)
        idx = torch.randint(len(latent_mean), (batch_size,), generator=g)
        latents = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)
        tokens = ids[idx].clone()
        tokens[torch.rand(batch_size, generator=g) < caption_dropout] = empty
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, train_scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        noisy = train_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(tokens)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:  # warm-up then cosine decay, a pure function of the step
            group["lr"] = float(lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / steps)))
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        ckpt.maybe_save(step + 1, steps, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                                          "optimizer": opt.state_dict()})
    unet.eval(); text_encoder.eval()
    ckpt.clear()
    return unet, text_encoder, {"final_loss": float(np.mean(losses[-100:])) if losses else None}


def train_clip(images, captions, tokenizer, steps, batch_size, width, layers, seed, out_dir: Path, work: Path,
               holdout: int = 100):
    """Tiny open_clip CLIP trained with ``ClipLoss``; the last ``holdout`` pairs are kept out for eval."""
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(seed)
    config = models.tiny_clip_config(width, layers, len(tokenizer))
    models.register_open_clip_config(models.TINY_CLIP_NAME, config)
    model = open_clip.create_model(models.TINY_CLIP_NAME, pretrained=None)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pixels = ((images + 1) / 2 - mean) / std
    ids = tokenize(tokenizer, captions)
    n_train = len(images) - holdout
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ckpt = _Checkpoint(work / "clip.ckpt")
    start = 0
    if state := ckpt.load():
        model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"]); start = state["step"]
    model.train()
    bar = tqdm(range(start, steps), desc="train clip", initial=start, total=steps)
    for step in bar:
        g = _step_generator(seed, step)
        idx = torch.randperm(n_train, generator=g)[:batch_size]
        image_features, text_features, logit_scale = model(pixels[idx], ids[idx])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        ckpt.maybe_save(step + 1, steps, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(pixels[n_train:]), dim=-1)
        txt = F.normalize(model.encode_text(ids[n_train:]), dim=-1)
        ranks = (txt @ img.T).argsort(dim=1, descending=True)
        target = torch.arange(holdout).unsqueeze(1)
        top1 = float((ranks[:, :1] == target).any(1).float().mean())
        top5 = float((ranks[:, :5] == target).any(1).float().mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / "open_clip_model.safetensors") as f:
        f.write(_safetensors_bytes(model.state_dict()))
    atomic_write_text(out_dir / "open_clip_config.json", json.dumps({
        "model_cfg": config,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }, indent=1))
    ckpt.clear()
    return {"text_to_image_top1": top1, "text_to_image_top5": top5, "holdout_pairs": holdout,
            "chance_top1": 1.0 / holdout}


def _safetensors_bytes(state_dict: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state_dict.items()})

