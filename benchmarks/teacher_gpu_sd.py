"""Teacher cost per query on a Stable-Diffusion-sized model (random weights), for a GPU machine.

    python benchmarks/teacher_gpu_sd.py [--items 64] [--fisher-samples 64] [--device cuda]
    python benchmarks/teacher_gpu_sd.py --tiny --device cpu     # a seconds-long check of the script itself

Builds an SD 1.x-shaped pipeline offline (UNet2DConditionModel 320/640/1280/1280 with 768-d
cross-attention on 64x64 latents, the SD VAE and a 12-layer CLIP text encoder, random weights,
the sandbox tokenizer), then times the three parts of an AbU query with the default TeacherConfig:
the diagonal Fisher (per sample, paid once), the query gradient + Newton step (once per query),
and scoring (per training item: T timesteps x 2 flips, before and after). Prints the per-query time
extrapolated to a training set of --extrapolate items (MSCOCO: 118,287).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from fastattr_sandbox import build
from fastattr_teacher import TeacherConfig, UNetAdapter, compute_preconditioner, item_losses, query_gradient
from fastattr_teacher.unlearn import newton_update


@dataclasses.dataclass
class RandomItem:
    """A synthetic training item: fixed-seed noise image, one caption."""

    id: str
    captions: tuple[str]
    size: int

    def load_image(self) -> Image.Image:
        rng = np.random.default_rng(int(self.id))
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))


def sd_pipeline(tiny: bool) -> StableDiffusionPipeline:
    tokenizer = build.load_pipeline(build.sandbox_dir()).tokenizer
    channels = (32, 64, 64, 64) if tiny else (320, 640, 1280, 1280)
    unet = UNet2DConditionModel(
        sample_size=8 if tiny else 64, block_out_channels=channels, layers_per_block=1 if tiny else 2,
        cross_attention_dim=64 if tiny else 768, attention_head_dim=8, norm_num_groups=8 if tiny else 32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32) if tiny else (128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1 if tiny else 2, norm_num_groups=8 if tiny else 32,
                        sample_size=64 if tiny else 512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64 if tiny else 768, intermediate_size=128 if tiny else 3072,
        num_hidden_layers=2 if tiny else 12, num_attention_heads=4 if tiny else 12,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=64, help="training items scored (timing sample)")
    parser.add_argument("--fisher-samples", type=int, default=64)
    parser.add_argument("--extrapolate", type=int, default=118_287)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    args = parser.parse_args()

    device = torch.device(args.device)
    adapter = UNetAdapter(sd_pipeline(args.tiny), device=device)
    unet_params = sum(p.numel() for p in adapter.unet.parameters())
    items = [RandomItem(str(i), (f"a photo of object number {i}",), adapter.resolution) for i in range(args.items)]
    config = dataclasses.replace(TeacherConfig(), fisher_samples=args.fisher_samples, batch_size=8)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"UNet {unet_params / 1e6:.0f}M parameters, {adapter.resolution}px -> "
          f"{adapter.unet.config.sample_size}x{adapter.unet.config.sample_size} latents; {config}")

    for item in items:  # VAE + text encodings: cached once per item in a real run, not part of a query
        adapter.encode_item(item, (False, True))
    fisher, fisher_s = timed(lambda: compute_preconditioner(adapter, items, config), device)
    latents, text = adapter.encode_query(items[0].load_image(), items[0].captions[0])
    grads, grad_s = timed(lambda: query_gradient(adapter, latents, text, config), device)
    _, newton_s = timed(lambda: newton_update(fisher, grads, config.alpha, config.damping), device)
    _, score_s = timed(lambda: item_losses(adapter, items, config, "score"), device)
    print(f"Fisher: {fisher_s / config.fisher_samples * 1e3:.1f} ms per sample ({config.fisher_samples} samples)")
    print(f"query gradient ({config.query_pairs} pairs) + Newton step: {grad_s + newton_s:.2f} s")
    print(f"scoring: {score_s / len(items) * 1e3:.1f} ms per item per pass ({config.timesteps} timesteps x "
          f"{2 if config.flips else 1} flips)")
    per_query = grad_s + newton_s + score_s / len(items) * args.extrapolate
    print(f"per query against {args.extrapolate:,} training items (pre-training losses cached): "
          f"{per_query / 60:.1f} min; with stage-2 curation of M=1,000 candidates: "
          f"{grad_s + newton_s + score_s / len(items) * 1000:.1f} s; the one-off pre-training pass costs "
          f"{score_s / len(items) * args.extrapolate / 3600:.2f} h")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
