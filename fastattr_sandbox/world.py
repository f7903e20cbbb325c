"""The sandbox dataset: procedurally drawn, captioned images with creators and licenses.

Everything is a pure function of a seed, so a sandbox can be rebuilt bit for bit. Each creator
has a recognisable signature (a favourite palette, background and texture), a few rare motifs
appear in only a handful of images, and some (colour, shape, background) combinations are held
out of training entirely: prompts built from them are the query prompts.

The output is a standard training manifest (JSONL) next to the PNG files it points to, the same
format users feed ``fastattr index build``.
"""

from __future__ import annotations

import hashlib
import io
import re
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from fastattr_hook.files import atomic_write_bytes, atomic_write_text

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (30, 30, 30),
    "gray": (128, 128, 128),
    "navy": (25, 35, 100),
    "beige": (225, 205, 160),
    "teal": (20, 130, 130),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SIZES = ("small", "large")
POSITIONS = ("in the center", "on the left", "on the right", "at the top", "at the bottom")
TEXTURES = ("plain", "striped", "dotted", "checkered")
MOTIFS = ("golden star", "crescent moon", "lightning bolt", "tiny heart")
LICENSES = ("CC-BY-4.0", "CC0-1.0", "CC-BY-NC-4.0", "CC-BY-SA-4.0", "proprietary")
_FIRST = ("Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ines", "Jonas",
          "Kaito", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tala",
          "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zora")
_LAST = ("Moreau", "Okafor", "Lindqvist", "Tanaka", "Novak", "Haddad", "Silva", "Kowalski",
         "Brennan", "Ivanova", "Mendes", "Larsen", "Costa", "Rahman", "Weber", "Dubois")
_TEMPLATES = (
    "a {size} {colour} {shape} {position} on a {texture} {bg} background",
    "{size} {colour} {shape} {position}, {texture} {bg} background",
    "a {colour} {shape}, {size}, {position} over a {texture} {bg} backdrop",
)

RESOLUTION = 32
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Creator:
    name: str
    license: str
    palette: tuple[str, ...]
    background: str
    texture: str

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" ", "-")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    bg: str
    size: str
    position: str
    texture: str
    motif: str | None = None

    def caption(self, template: int = 0) -> str:
        text = _TEMPLATES[template % len(_TEMPLATES)].format(
            size=self.size, colour=self.colour, shape=self.shape, position=self.position,
            texture=self.texture, bg=self.bg,
        )
        text = f"{text} with a {self.motif}" if self.motif else text
        return re.sub(r"\ba (?=[aeiou])", "an ", text)


def make_creators(rng: np.random.Generator, count: int) -> list[Creator]:
    names = [f"{a} {b}" for a, b in itertools.product(_FIRST, _LAST)]
    picked = rng.choice(len(names), size=count, replace=False)
    creators = []
    for index in picked:
        creators.append(Creator(
            name=names[index],
            license=str(rng.choice(LICENSES)),
            palette=tuple(str(c) for c in rng.choice(list(SHAPE_COLOURS), size=3, replace=False)),
            background=str(rng.choice(list(BACKGROUNDS))),
            texture=str(rng.choice(TEXTURES)),
        ))
    return creators


def held_out_triples(seed: int, fraction: float = 0.12) -> set[tuple[str, str, str]]:
    """(colour, shape, background) combinations never drawn in training."""
    rng = np.random.default_rng([seed, 1])
    triples = [t for t in itertools.product(SHAPE_COLOURS, SHAPES, BACKGROUNDS) if t[0] != t[2]]
    order = rng.permutation(len(triples))
    return {triples[i] for i in order[: int(len(triples) * fraction)]}


def _sample_scene(rng: np.random.Generator, creator: Creator, excluded: set) -> Scene:
    while True:
        colour = str(rng.choice(creator.palette)) if rng.random() < 0.7 else str(rng.choice(list(SHAPE_COLOURS)))
        bg = creator.background if rng.random() < 0.6 else str(rng.choice(list(BACKGROUNDS)))
        shape = str(rng.choice(SHAPES))
        if colour != bg and (colour, shape, bg) not in excluded:
            break
    texture = creator.texture if rng.random() < 0.7 else str(rng.choice(TEXTURES))
    return Scene(shape, colour, bg, str(rng.choice(SIZES)), str(rng.choice(POSITIONS)), texture)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 12) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _shade(rgb: tuple[int, ...], factor: float) -> tuple[int, ...]:
    """A visible variant of a colour for textures: darker for light colours, lighter for dark."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    target = 0 if lum > 100 else 255
    return tuple(int(c + (target - c) * factor) for c in rgb)


def _polygon(cx: float, cy: float, r: float, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(cx + r * x, cy + r * y) for x, y in points]


def render(scene: Scene, rng: np.random.Generator, resolution: int = RESOLUTION) -> Image.Image:
    """Draw a scene supersampled, then downsample (anti-aliased, deterministic)."""
    s = resolution * _SUPERSAMPLE
    bg = _jitter(BACKGROUNDS[scene.bg], rng)
    image = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(image)
    texture_colour = _shade(bg, 0.25)
    step = s // 8
    if scene.texture == "striped":
        for x in range(-s, s, step):
            draw.line([(x, 0), (x + s, s)], fill=texture_colour, width=step // 3)
    elif scene.texture == "dotted":
        for y in range(step // 2, s, step):
            for x in range(step // 2, s, step):
                draw.ellipse([x - step / 6, y - step / 6, x + step / 6, y + step / 6], fill=texture_colour)
    elif scene.texture == "checkered":
        for y in range(0, s, step):
            for x in range(0, s, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=texture_colour)

    radius = s * (0.17 if scene.size == "small" else 0.32) * (1 + 0.08 * rng.standard_normal())
    offset = s * 0.24
    cx, cy = {
        "in the center": (s / 2, s / 2),
        "on the left": (s / 2 - offset, s / 2),
        "on the right": (s / 2 + offset, s / 2),
        "at the top": (s / 2, s / 2 - offset),
        "at the bottom": (s / 2, s / 2 + offset),
    }[scene.position]
    if scene.size == "large":  # keep large shapes mostly inside the frame
        cx = min(max(cx, radius * 0.8), s - radius * 0.8)
        cy = min(max(cy, radius * 0.8), s - radius * 0.8)
    cx += rng.normal(0, s * 0.02)
    cy += rng.normal(0, s * 0.02)
    fill = _jitter(SHAPE_COLOURS[scene.colour], rng)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - radius * 0.85, cy - radius * 0.85, cx + radius * 0.85, cy + radius * 0.85], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius, [(0, -1), (0.95, 0.75), (-0.95, 0.75)]), fill=fill)
    elif scene.shape == "diamond":
        draw.polygon(_polygon(cx, cy, radius, [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]), fill=fill)
    elif scene.shape == "cross":
        w = radius * 0.38
        draw.rectangle([cx - w, cy - radius, cx + w, cy + radius], fill=fill)
        draw.rectangle([cx - radius, cy - w, cx + radius, cy + w], fill=fill)
    elif scene.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(radius * 0.4)))

    if scene.motif:
        _draw_motif(draw, scene.motif, s)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def _draw_motif(draw: ImageDraw.ImageDraw, motif: str, s: int) -> None:
    """Rare motifs sit in the top-left corner, large enough to survive downsampling."""
    cx, cy, r = s * 0.16, s * 0.16, s * 0.13
    if motif == "golden star":
        pts = [(math.cos(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45),
                -math.sin(math.pi / 2 + k * math.pi / 5) * (1 if k % 2 == 0 else 0.45)) for k in range(10)]
        draw.polygon(_polygon(cx, cy, r, pts), fill=(255, 200, 0))
    elif motif == "crescent moon":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 250, 210))
        draw.ellipse([cx - r * 0.4, cy - r * 1.1, cx + r * 1.4, cy + r * 0.7], fill=(40, 40, 60))
    elif motif == "lightning bolt":
        pts = [(0.2, -1), (-0.5, 0.1), (0.0, 0.1), (-0.3, 1), (0.6, -0.2), (0.1, -0.2), (0.5, -1)]
        draw.polygon(_polygon(cx, cy, r, pts), fill=(255, 240, 60))
    elif motif == "tiny heart":
        draw.ellipse([cx - r, cy - r * 0.8, cx, cy + r * 0.2], fill=(240, 50, 120))
        draw.ellipse([cx, cy - r * 0.8, cx + r, cy + r * 0.2], fill=(240, 50, 120))
        draw.polygon([(cx - r, cy - r * 0.2), (cx + r, cy - r * 0.2), (cx, cy + r)], fill=(240, 50, 120))


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    num_images: int = 1500
    num_creators: int = 30
    motif_images: int = 6  # how many training images carry each rare motif
    num_query_prompts: int = 120


def generate(config: WorldConfig, out_dir: str | Path) -> dict:
    """Write ``images/*.png``, ``manifest.jsonl`` and ``query_prompts.jsonl``; return a summary.

    Resumable: images already on disk with the expected bytes are not rewritten.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(config.seed)
    creators = make_creators(rng, config.num_creators)
    excluded = held_out_triples(config.seed)
    motif_owner = {m: creators[int(rng.integers(len(creators)))] for m in MOTIFS}

    # Rare motifs: a handful of images each, mostly from one creator (their favourite motif).
    motif_slots: dict[int, str] = {}
    slots = rng.permutation(config.num_images)
    for m_index, motif in enumerate(MOTIFS):
        for j in range(config.motif_images):
            motif_slots[int(slots[m_index * config.motif_images + j])] = motif

    rows = []
    owner_slots = {motif: 0 for motif in MOTIFS}
    for i in tqdm(range(config.num_images), desc="sandbox images", unit="img"):
        motif = motif_slots.get(i)
        if motif and owner_slots[motif] < config.motif_images - 2:
            creator = motif_owner[motif]
            owner_slots[motif] += 1
        else:
            creator = creators[int(rng.integers(len(creators)))]
        scene = _sample_scene(rng, creator, excluded)
        if motif:
            scene = Scene(**{**scene.__dict__, "motif": motif})
        image = render(scene, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        data = buffer.getvalue()
        relpath = f"images/{i:05d}.png"
        target = out_dir / relpath
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, data)
        rows.append({
            "id": f"sbx-{i:05d}",
            "image": relpath,
            "caption": scene.caption(int(rng.integers(len(_TEMPLATES)))),
            "creator": creator.name,
            "license": creator.license,
            "source_url": f"https://sandbox.fastattr.invalid/{creator.slug}/{i:05d}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "attributes": {k: v for k, v in scene.__dict__.items()},
        })

    atomic_write_text(out_dir / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    queries = query_prompts(config.seed, config.num_query_prompts)
    atomic_write_text(out_dir / "query_prompts.jsonl", "".join(json.dumps(q) + "\n" for q in queries))
    atomic_write_text(out_dir / "creators.json", json.dumps([c.__dict__ for c in creators], indent=1))
    return {"images": len(rows), "creators": len(creators), "query_prompts": len(queries),
            "motifs": {m: sum(1 for r in rows if r["attributes"]["motif"] == m) for m in MOTIFS}}


def query_prompts(seed: int, count: int) -> list[dict]:
    """Held-out prompts: every (colour, shape, background) here is absent from training."""
    rng = np.random.default_rng([seed, 2])
    triples = sorted(held_out_triples(seed))
    prompts = []
    for i in range(count):
        colour, shape, bg = triples[i % len(triples)]
        scene = Scene(shape, colour, bg, str(rng.choice(SIZES)), str(rng.choice(POSITIONS)),
                      str(rng.choice(TEXTURES)))
        prompts.append({"prompt": scene.caption(0), "attributes": scene.__dict__})
    return prompts


def grammar_prompts(seed: int, count: int, exclude: set[str] = frozenset(), motif_rate: float = 1 / 12) -> list[dict]:
    """``count`` distinct prompts drawn uniformly from the whole caption grammar (any colour, shape,
    background, size, position, texture and template; a motif with probability ``motif_rate``),
    none of them in ``exclude`` (e.g. the training captions and the held-out query prompts)."""
    rng = np.random.default_rng([seed, 3])
    prompts: dict[str, dict] = {}
    while len(prompts) < count:
        colour, bg = str(rng.choice(list(SHAPE_COLOURS))), str(rng.choice(list(BACKGROUNDS)))
        if colour == bg:
            continue
        scene = Scene(str(rng.choice(SHAPES)), colour, bg, str(rng.choice(SIZES)), str(rng.choice(POSITIONS)),
                      str(rng.choice(TEXTURES)), str(rng.choice(MOTIFS)) if rng.random() < motif_rate else None)
        prompt = scene.caption(int(rng.integers(len(_TEMPLATES))))
        if prompt not in exclude:
            prompts.setdefault(prompt, {"prompt": prompt, "attributes": scene.__dict__})
    return list(prompts.values())
