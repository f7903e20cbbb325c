"""Backbone features, computed once and memory-mapped: the distillation's only expensive input.

Training, evaluation and index builds all need the frozen backbones' features of the same
training items and queries; the head is the only part that changes. ``cached_features`` stores
them under ``<cache>/features-<key>/``, the key being the backbones' fingerprint and the exact
inputs (ids, texts and image content keys), so a cache is never used for other inputs. Work is
checkpointed every ``CHUNK`` rows (a killed run resumes) and each file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fastattr_hook._io import atomic_write_text
from fastattr_hook.encoder import Encoder

CHUNK = 256


def cached_features(encoder: Encoder, images: Sequence[Callable[[], Image.Image]], texts: Sequence[str],
                    image_keys: Sequence[str], cache_dir: str | Path | None, desc: str = "features") -> np.ndarray:
    """[n, encoder.feature_dim] float32 raw backbone features of (image, text) pairs.

    ``images`` are loaders (called only for rows not cached yet); ``image_keys`` identify the image
    contents (a sha256, or an id whose image never changes). Without ``cache_dir`` nothing is kept."""
    if not len(images) == len(texts) == len(image_keys):
        raise ValueError("images, texts and image_keys must have the same length")
    if cache_dir is None:
        return _compute(encoder, images, texts, range(len(texts)), desc)
    key = hashlib.sha256(json.dumps({"backbones": encoder.backbone_fingerprint, "texts": list(texts),
                                     "images": list(image_keys)}).encode()).hexdigest()
    root = Path(cache_dir) / f"features-{key[:16]}"
    root.mkdir(parents=True, exist_ok=True)
    done_path, data_path = root / "done.json", root / "features.npy"
    done = set(json.loads(done_path.read_text())) if done_path.is_file() and data_path.is_file() else set()
    if len(done) == len(texts):
        return np.load(data_path, mmap_mode="r")
    shape = (len(texts), encoder.feature_dim)
    array = (np.load(data_path, mmap_mode="r+") if done else
             np.lib.format.open_memmap(data_path, "w+", np.float32, shape))
    todo = [i for i in range(len(texts)) if i not in done]
    bar = tqdm(total=len(texts), initial=len(done), desc=desc, unit="pair")
    for start in range(0, len(todo), CHUNK):
        rows = todo[start:start + CHUNK]
        array[rows] = _compute(encoder, images, texts, rows)
        array.flush()
        done.update(rows)
        atomic_write_text(done_path, json.dumps(sorted(done)))
        bar.update(len(rows))
    bar.close()
    return np.load(data_path, mmap_mode="r")


def _compute(encoder: Encoder, images, texts, rows, desc: str | None = None) -> np.ndarray:
    rows = list(rows)
    out = [np.zeros((0, encoder.feature_dim), np.float32)]
    step = encoder.spec.batch_size
    for start in tqdm(range(0, len(rows), step), desc=desc, unit="batch", disable=desc is None):
        part = rows[start:start + step]
        out.append(encoder.features([images[i]() for i in part], [texts[i] for i in part]))
    return np.concatenate(out)
