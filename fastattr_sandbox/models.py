"""Model factories for the sandbox world, built from named configs like timm/open_clip factories.

The text-to-image model is a genuine diffusers ``StableDiffusionPipeline`` (tiny AutoencoderKL,
UNet2DConditionModel with ``attn2.to_k``/``attn2.to_v`` cross-attention, CLIPTextModel and an
offline CLIPTokenizer), so every code path that serves Stable Diffusion serves the sandbox too.
The tiny CLIP is an open_clip ``CLIP`` built from a custom model config.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastattr_hook.files import atomic_write_text

from . import world

# name -> configs; "micro" exercises every code path in seconds, "default" draws well.
SCALES: dict[str, dict] = {
    "micro": {
        "world": {"num_images": 160, "num_creators": 20, "motif_images": 4, "num_query_prompts": 24},
        "vae_steps": 60, "unet_steps": 80, "clip_steps": 60, "batch_size": 32,
        "unet_channels": (32, 64), "clip_width": 64, "clip_layers": 2,
    },
    "default": {
        "world": {"num_images": 1500, "num_creators": 30, "motif_images": 6, "num_query_prompts": 120},
        "vae_steps": 600, "unet_steps": 2000, "clip_steps": 1200, "batch_size": 64,
        "unet_channels": (32, 64), "clip_width": 128, "clip_layers": 4,
    },
}

CONTEXT_LENGTH = 32
EMBED_DIM = 64
TINY_CLIP_NAME = "fastattr-tiny-clip"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def grammar_words() -> list[str]:
    text = " ".join(
        list(world.SHAPE_COLOURS) + list(world.BACKGROUNDS) + list(world.SHAPES) + list(world.SIZES)
        + list(world.POSITIONS) + list(world.TEXTURES) + list(world.MOTIFS) + list(world._TEMPLATES)
        + ["an"]
    )
    words = {w for w in text.replace(",", " ").replace("{", " ").replace("}", " ").split() if w.isalpha()}
    return sorted(words)


def write_tokenizer_files(out_dir: str | Path) -> Path:
    """Write a small CLIP BPE vocabulary (byte-level base + merges for the sandbox grammar).

    Any text still tokenizes (it falls back to bytes); grammar words become one token each.
    ``<|endoftext|>`` gets the largest id, as in CLIP, so argmax pooling finds it.
    """
    out_dir = Path(out_dir)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in grammar_words():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            if merged not in vocab:
                merges.append(f"{current} {symbol}")
                vocab[merged] = len(vocab)
            current = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import CLIPTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)


def build_text_encoder(vocab_size: int, eos_token_id: int, bos_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=EMBED_DIM, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH, projection_dim=EMBED_DIM,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    return CLIPTextModel(config)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        mid_block_add_attention=False, sample_size=world.RESOLUTION,
    )


def build_unet(channels: tuple[int, int]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=EMBED_DIM, attention_head_dim=8, norm_num_groups=8,
    )


def noise_schedulers():
    """DDPM for training, DDIM (same betas) for sampling, both SD-style."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return (
        DDPMScheduler(**common, clip_sample=False),
        DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    )


def tiny_clip_config(width: int, layers: int, vocab_size: int) -> dict:
    """An open_clip model config: ViT image tower on 32x32 images, small text transformer."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"image_size": world.RESOLUTION, "layers": layers, "width": width,
                       "patch_size": 4, "head_width": 32, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": 64,
                     "heads": 4, "layers": 2, "mlp_ratio": 2.0},
    }


def register_open_clip_config(name: str, config: dict) -> None:
    """Make a custom config known to ``open_clip.create_model`` (in-process registry)."""
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS[name] = config
