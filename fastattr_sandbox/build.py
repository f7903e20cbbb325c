"""Build, load and use a sandbox directory, stage by stage and resumable.

Layout of a sandbox directory::

    sandbox.yaml        what was built: scale, seed, configs, figures, sha256 of every model file
    data/               manifest.jsonl, images/*.png, query_prompts.jsonl, creators.json
    pipeline/           a diffusers StableDiffusionPipeline folder (save_pretrained, safetensors)
    clip/               the tiny CLIP in open_clip's local-dir layout (open_clip_config.json + safetensors)
    eval/               generation-quality figures (eval.json) and contact_sheet.png
    encoder.yaml        the untuned baseline encoder: tiny CLIP image + text towers
    bundle/             an index bundle of the training set built with that encoder (index_tools)
    tuned/              optional: a distilled encoder (``fastattr distill train`` with ``out`` here);
                        ``set_encoder`` rebuilds ``bundle/`` with it and records it in sandbox.yaml
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from fastattr_hook import __version__
from fastattr_hook.config import read_yaml
from fastattr_hook.files import atomic_dir, atomic_write_text, changed_files, sha256_file
from fastattr_hook.errors import FastattrError

from . import models, train, world

SCHEMA = "fastattr/sandbox@1"
STAGES = ("data", "vae", "unet", "clip", "eval", "index")
DEFAULT_SANDBOX = Path(__file__).parent / "artifacts" / "default"
_CHECKSUMMED = ("data/manifest.jsonl", "pipeline", "clip", "encoder.yaml")
ENCODER_SPEC = {
    "name": "sandbox-tiny-clip-untuned",
    "backbones": [
        {"kind": "open_clip_image", "model": "local-dir:clip"},
        {"kind": "open_clip_text", "model": "local-dir:clip", "tokenizer": "pipeline/tokenizer"},
    ],
}


def rebuild_hint(root: Path) -> str:
    return f"rebuild it with: fastattr sandbox build --scale default --out {root}"


def read_state(root: Path) -> dict:
    path = root / "sandbox.yaml"
    if not path.is_file():
        return {}
    state = read_yaml(path, rebuild_hint(root)) or {}
    if not isinstance(state, dict):
        raise FastattrError(f"{path}: corrupted (not a mapping); {rebuild_hint(root)}")
    return state


def _write_state(root: Path, state: dict) -> None:
    atomic_write_text(root / "sandbox.yaml", yaml.safe_dump(state, sort_keys=False))


def _checksums(root: Path, extra: tuple[str, ...] = ()) -> dict[str, str]:
    files = {}
    for entry in (*_CHECKSUMMED, *extra):
        path = root / entry
        paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in paths:
            files[p.relative_to(root).as_posix()] = sha256_file(p)
    return files


def build(out: str | Path, scale: str = "default", seed: int = 0, force: bool = False) -> dict:
    """Run every stage not yet done (``force`` redoes all); returns the final sandbox state."""
    if scale not in models.SCALES:
        raise FastattrError(f"unknown scale '{scale}' (choose from: {', '.join(models.SCALES)})")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    cfg = models.SCALES[scale]
    state = {} if force else read_state(root)
    if state and (state.get("scale"), state.get("seed")) != (scale, seed):
        raise FastattrError(
            f"{root / 'sandbox.yaml'}: this directory holds a '{state.get('scale')}' sandbox with seed "
            f"{state.get('seed')}; use another --out, or --force to rebuild it as '{scale}' seed {seed}"
        )
    state = state or {"schema": SCHEMA, "scale": scale, "seed": seed, "config": _plain(cfg), "stages": {},
                      "figures": {}}
    work = root / "work"
    work.mkdir(exist_ok=True)
    data_dir = root / "data"

    started = time.perf_counter()

    def done(stage: str, figures: dict) -> None:
        nonlocal started
        state["stages"][stage] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        state["figures"][stage] = {**figures, "seconds": round(time.perf_counter() - started, 1)}
        started = time.perf_counter()
        _write_state(root, state)

    if "data" not in state["stages"]:
        summary = world.generate(world.WorldConfig(seed=seed, **cfg["world"]), data_dir)
        models.write_tokenizer_files(work / "tokenizer")
        done("data", summary)
    rows = train.read_manifest(data_dir)
    captions = [r["caption"] for r in rows]
    images = train.load_images(data_dir, rows)
    tokenizer = models.load_tokenizer(work / "tokenizer") if (work / "tokenizer").is_dir() else None

    if "vae" not in state["stages"]:
        vae, figures = train.train_vae(images, cfg["vae_steps"], cfg["batch_size"], seed, work)
        with atomic_dir(work / "vae") as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        done("vae", figures)

    if "unet" not in state["stages"]:
        from diffusers import AutoencoderKL, StableDiffusionPipeline

        vae = AutoencoderKL.from_pretrained(work / "vae")
        mean, std = train.encode_latent_stats(vae, images)
        unet, text_encoder, figures = train.train_unet(
            mean, std, captions, tokenizer, cfg["unet_steps"], cfg["batch_size"], cfg["unet_channels"], seed, work)
        _, sample_scheduler = models.noise_schedulers()
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sample_scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        with atomic_dir(root / "pipeline") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        done("unet", figures)

    if "clip" not in state["stages"]:
        figures = train.train_clip(images, captions, tokenizer, cfg["clip_steps"], 2 * cfg["batch_size"],
                                   cfg["clip_width"], cfg["clip_layers"], seed, root / "clip", work,
                                   holdout=min(100, len(rows) // 5))
        done("clip", figures)

    if "eval" not in state["stages"]:
        done("eval", evaluate(root, seed=seed))

    if "index" not in state["stages"]:
        from index_tools.build import BuildOptions, build_bundle

        atomic_write_text(root / "encoder.yaml", yaml.safe_dump(ENCODER_SPEC, sort_keys=False))
        shutil.rmtree(root / "bundle", ignore_errors=True)  # a bundle not yet recorded here is stale
        bundle = build_bundle(data_dir / "manifest.jsonl", root / "encoder.yaml", root / "bundle",
                              BuildOptions(backend="exact", thumbnail_size=32), resume=True,
                              name=f"sandbox-{scale}")
        done("index", {"items": bundle.items, "rejected": bundle.manifest.rejected,
                       "share_temperature": bundle.share_rule.temperature})

    state["files"] = _checksums(root, _encoder_files(root, state))
    state["tool_version"] = __version__
    _write_state(root, state)
    shutil.rmtree(work, ignore_errors=True)
    return state


def _encoder_files(root: Path, state: dict) -> tuple[str, ...]:
    """The files of the encoder the bundle was built with, when it is not the untuned one."""
    spec = state.get("encoder")
    if not spec:
        return ()
    head = (read_yaml(root / spec, rebuild_hint(root)) or {}).get("head")
    folder = Path(spec).parent
    return tuple(p for p in (spec, (folder / head).as_posix() if head else None, (folder / "train.json").as_posix())
                 if p and (root / p).is_file())


def set_encoder(root: str | Path, spec: str | Path) -> dict:
    """Serve the sandbox with another encoder (the distilled one): rebuild ``bundle/`` with it
    (atomically: the old bundle stays until the new one is complete) and record it, with the
    checksums of its files, in sandbox.yaml. ``encoder.yaml`` stays, the untuned baseline."""
    from index_tools.build import BuildOptions, build_bundle

    root = sandbox_dir(root)
    spec = Path(spec).resolve()
    try:
        rel = spec.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise FastattrError(f"{spec}: not inside the sandbox {root}; train with `out:` a folder of the sandbox "
                            f"(e.g. {root / 'tuned'}) so the sandbox stays self-contained") from None
    state = read_state(root)
    fresh = root / "bundle.new"
    shutil.rmtree(fresh, ignore_errors=True)
    bundle = build_bundle(root / "data" / "manifest.jsonl", spec, fresh,
                          BuildOptions(backend="exact", thumbnail_size=32), resume=True,
                          name=f"sandbox-{state['scale']}")
    old = root / "bundle.old"
    shutil.rmtree(old, ignore_errors=True)
    (root / "bundle").rename(old)
    fresh.rename(root / "bundle")
    shutil.rmtree(old)
    state["encoder"] = None if rel == "encoder.yaml" else rel
    state["figures"]["index"] = {**state["figures"]["index"], "encoder": bundle.encoder.name,
                                 "tuned": bundle.encoder.tuned, "share_temperature": bundle.share_rule.temperature}
    state["files"] = _checksums(root, _encoder_files(root, state))
    _write_state(root, state)
    return state


def _plain(value):
    return json.loads(json.dumps(value))


def sandbox_dir(path: str | Path | None = None) -> Path:
    """Resolve and check a built sandbox; the shipped default when ``path`` is None."""
    root = Path(path) if path else DEFAULT_SANDBOX
    state = read_state(root)
    if not state:
        raise FastattrError(f"{root / 'sandbox.yaml'}: missing, so {root} is no sandbox; {rebuild_hint(root)}")
    missing = [s for s in STAGES if s not in state.get("stages", {})]
    if missing or "files" not in state:
        raise FastattrError(f"{root}: sandbox build incomplete (stages left: {', '.join(missing) or 'checksums'}); "
                            f"resume it with: fastattr sandbox build --scale {state.get('scale')} --out {root}")
    return root


def verify(root: str | Path | None = None) -> dict[str, str]:
    """Check every recorded checksum; raises naming the first bad file."""
    root = sandbox_dir(root)
    state = read_state(root)
    for rel, problem in changed_files(root, state["files"])[:1]:
        detail = "missing from the sandbox" if problem == "missing" else "checksum mismatch (file changed or corrupted)"
        raise FastattrError(f"{root / rel}: {detail}; {rebuild_hint(root)}")
    return state["files"]


def load_pipeline(root: str | Path | None = None, check: bool = True):
    """The sandbox's StableDiffusionPipeline (checked against its checksums first, unless ``check``
    is False), loaded by the one pipeline loader."""
    from fastattr_hook.pipeline import load_pipeline as load

    root = sandbox_dir(root)
    if check:
        verify(root)
    return load(root / "pipeline")


def generate(prompts: list[str], root: str | Path | None = None, seed: int = 0, steps: int = 25,
             guidance_scale: float = 4.0, pipe=None, **kwargs) -> list[Image.Image]:
    """Sample one image per prompt with the sandbox pipeline (deterministic for a seed)."""
    pipe = pipe or load_pipeline(root)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                **kwargs).images


def classify_colours(image: Image.Image) -> tuple[str, str]:
    """(shape colour, background) of a sandbox-style image by nearest palette colour.

    Background = median of the border pixels; shape = median of pixels far from the background.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
    # Take the pixels furthest from the background: the shape (textures stay close to it).
    far = pixels[distance >= max(np.quantile(distance, 0.9), 60.0)]
    shape_rgb = np.median(far, axis=0) if len(far) else bg_rgb

    def nearest(rgb, palette):
        return min(palette, key=lambda name: float(np.linalg.norm(np.array(palette[name]) - rgb)))

    return nearest(shape_rgb, world.SHAPE_COLOURS), nearest(bg_rgb, world.BACKGROUNDS)


def evaluate(root: Path, seed: int = 0, batch: int = 40) -> dict:
    """Prompt-following figures on held-out prompts, plus a contact sheet."""
    import open_clip

    queries = [json.loads(line) for line in (root / "data" / "query_prompts.jsonl").read_text().splitlines()]
    from fastattr_hook.pipeline import load_pipeline as load

    pipe = load(root / "pipeline")  # the build is not finished yet: no sandbox checks
    images: list[Image.Image] = []
    for i in range(0, len(queries), batch):
        images += generate([q["prompt"] for q in queries[i:i + batch]], pipe=pipe, seed=seed + i)

    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{root / 'clip'}")
    clip.eval()
    tokenizer = pipe.tokenizer
    shape_ok = colour_ok = bg_ok = 0
    for query, image in zip(queries, images):
        attrs = query["attributes"]
        colour, bg = classify_colours(image)
        colour_ok += colour == attrs["colour"]
        bg_ok += bg == attrs["bg"]
        candidates = [world.Scene(**{**attrs, "shape": s}).caption(0) for s in world.SHAPES]
        with torch.no_grad():
            img = torch.nn.functional.normalize(clip.encode_image(preprocess(image).unsqueeze(0)), dim=-1)
            txt = torch.nn.functional.normalize(clip.encode_text(train.tokenize(tokenizer, candidates)), dim=-1)
        shape_ok += world.SHAPES[int((img @ txt.T).argmax())] == attrs["shape"]
    real_rows = train.read_manifest(root / "data")[:200]
    real_ok = sum(classify_colours(Image.open(root / "data" / r["image"])) == (r["attributes"]["colour"], r["attributes"]["bg"])
                  for r in real_rows)
    n = len(queries)
    figures = {
        "held_out_prompts": n,
        "shape_colour_accuracy": colour_ok / n,
        "background_accuracy": bg_ok / n,
        "shape_accuracy_by_tiny_clip": shape_ok / n,
        "chance": {"shape_colour": 1 / len(world.SHAPE_COLOURS), "background": 1 / len(world.BACKGROUNDS),
                   "shape": 1 / len(world.SHAPES)},
        "colour_checker_accuracy_on_real_training_images": real_ok / len(real_rows),
        "sampler": {"scheduler": "DDIM", "steps": 25, "guidance_scale": 4.0, "seed": seed},
    }
    (root / "eval").mkdir(exist_ok=True)
    contact_sheet([q["prompt"] for q in queries[:24]], images[:24]).save(root / "eval" / "contact_sheet.png")
    atomic_write_text(root / "eval" / "eval.json", json.dumps(figures, indent=1))
    return figures


def contact_sheet(prompts: list[str], images: list[Image.Image], cell: int = 96, cols: int = 4) -> Image.Image:
    """Each sample enlarged (nearest neighbour) with its prompt written beside it."""
    width = 420
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * width, rows * (cell + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        x, y = (i % cols) * width, (i // cols) * (cell + 8)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x + 4, y + 4))
        words, line, lines = prompt.split(), "", []
        for word in words:
            if len(line) + len(word) > 42:
                lines.append(line)
                line = ""
            line += word + " "
        lines.append(line)
        for j, text in enumerate(lines[:7]):
            draw.text((x + cell + 10, y + 6 + 13 * j), text, fill="black")
    return sheet
