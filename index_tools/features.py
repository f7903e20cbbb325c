"""A content-addressed store of backbone features: computed once, reused by every job.

Distillation training, its evaluation and index builds all run the same frozen backbones over
the same (image, text) pairs; only the head changes. ``FeatureStore`` keeps each pair's raw
backbone features under ``<root>/features-<backbone fingerprint>/``, keyed by the image content
(its sha256, or an id whose image never changes) and the text, so any job, in any order or
subset, finds what another computed. Storage is append-only chunks (``chunk-*.npy``, memory-
mapped, each followed by its ``.keys.json`` written atomically as the commit mark), so a killed
job loses at most the chunk in progress and concurrent readers never see half a chunk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fastattr_hook._io import atomic_open, atomic_write_text
from fastattr_hook.encoder import Encoder

CHUNK = 256  # pairs per stored chunk: the most a killed job recomputes


def pair_key(image_key: str, text: str) -> str:
    return hashlib.sha256(f"{image_key}\0{text}".encode()).hexdigest()[:32]


class FeatureStore:
    """Raw backbone features of one encoder's backbones (``Encoder.features``), by pair key."""

    def __init__(self, root: str | Path, encoder: Encoder):
        self.encoder = encoder
        self.folder = Path(root) / f"features-{encoder.backbone_fingerprint.removeprefix('sha256:')[:16]}"
        self._rows: dict[str, tuple[np.ndarray, int]] = {}
        self._seen: set[Path] = set()
        self.refresh()

    def refresh(self) -> None:
        """Map the chunks other jobs committed since."""
        for keys_file in sorted(self.folder.glob("chunk-*.keys.json")):
            if keys_file not in self._seen:
                array = np.load(keys_file.with_name(keys_file.name.replace(".keys.json", ".npy")), mmap_mode="r")
                self._rows.update((k, (array, i)) for i, k in enumerate(json.loads(keys_file.read_text())))
                self._seen.add(keys_file)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def get(self, keys: Sequence[str]) -> np.ndarray:
        return np.stack([self._rows[k][0][self._rows[k][1]] for k in keys]) if len(keys) else \
            np.zeros((0, self.encoder.feature_dim), np.float32)

    def put(self, keys: Sequence[str], features: np.ndarray) -> None:
        """Store one chunk (atomic; the keys file last)."""
        new = {k: i for i, k in enumerate(keys) if k not in self._rows}
        if not new:
            return
        features = np.ascontiguousarray(features[list(new.values())], dtype=np.float32)
        name = f"chunk-{hashlib.sha256(''.join(new).encode()).hexdigest()[:16]}"
        with atomic_open(self.folder / f"{name}.npy", "wb") as f:
            np.save(f, features)
        atomic_write_text(self.folder / f"{name}.keys.json", json.dumps(list(new)))
        self._seen.add(self.folder / f"{name}.keys.json")
        array = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        self._rows.update((k, (array, i)) for i, k in enumerate(new))

    def features(self, images: Sequence[Callable[[], Image.Image]], texts: Sequence[str],
                 image_keys: Sequence[str], desc: str = "features") -> np.ndarray:
        """[n, feature_dim] features of (image, text) pairs, computing only those not stored yet;
        ``images`` are loaders, called for those rows alone."""
        keys = [pair_key(i, t) for i, t in zip(image_keys, texts, strict=True)]
        missing = list({k: n for n, k in enumerate(keys) if k not in self._rows}.values())
        bar = tqdm(total=len(keys), initial=len(keys) - len(missing), desc=desc, unit="pair", disable=not missing)
        for start in range(0, len(missing), CHUNK):
            rows = missing[start:start + CHUNK]
            self.put([keys[n] for n in rows], compute_features(self.encoder, [images[n] for n in rows],
                                                               [texts[n] for n in rows]))
            bar.update(len(rows))
        bar.close()
        return self.get(keys)


def compute_features(encoder: Encoder, images: Sequence[Callable[[], Image.Image]], texts: Sequence[str]
                     ) -> np.ndarray:
    """Features of (loader, text) pairs in the encoder's batches, loading images batch by batch."""
    out = [np.zeros((0, encoder.feature_dim), np.float32)]
    step = encoder.spec.batch_size
    for start in range(0, len(texts), step):
        out.append(encoder.features([load() for load in images[start:start + step]], list(texts[start:start + step])))
    return np.concatenate(out)


def cached_features(encoder: Encoder, images: Sequence[Callable[[], Image.Image]], texts: Sequence[str],
                    image_keys: Sequence[str], cache_dir: str | Path | None, desc: str = "features") -> np.ndarray:
    """``FeatureStore(cache_dir, encoder).features(...)``; without a cache folder, just computed."""
    if cache_dir is None:
        return compute_features(encoder, images, texts)
    return FeatureStore(cache_dir, encoder).features(images, texts, image_keys, desc)
