"""Content-addressed stores of arrays: backbone features computed once and reused by every job.

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

from fastattr_hook.files import atomic_open, atomic_write_text
from fastattr_hook.encoder import Encoder

CHUNK = 256  # pairs per stored chunk: the most a killed job recomputes


def pair_key(image_key: str, text: str) -> str:
    return hashlib.sha256(f"{image_key}\0{text}".encode()).hexdigest()[:32]


class ChunkStore:
    """Array rows by string key, in append-only chunks under a folder: ``chunk-<hash>.npy``
    (memory-mapped) and its ``.keys.json``, written last and atomically as the commit mark. A killed
    writer loses at most the chunk it was writing, readers never see half a chunk, and every job
    reuses what another stored. Used for backbone features and the teacher's item gradients."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._rows: dict[str, tuple[np.ndarray, int]] = {}
        self._seen: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Map the chunks other jobs committed since."""
        for keys_file in sorted(self.folder.glob("chunk-*.keys.json")):
            if keys_file.name not in self._seen:
                self._map(keys_file, json.loads(keys_file.read_text()))

    def _map(self, keys_file: Path, keys: list[str]) -> None:
        array = np.load(keys_file.with_name(keys_file.name.replace(".keys.json", ".npy")), mmap_mode="r")
        self._rows.update((k, (array, i)) for i, k in enumerate(keys))
        self._seen.add(keys_file.name)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """The rows of ``keys``, stacked (every key must be stored)."""
        return np.stack([self._rows[k][0][self._rows[k][1]] for k in keys])

    def put(self, keys: Sequence[str], rows: np.ndarray) -> None:
        """Store one chunk of rows (keys already stored are skipped)."""
        new = {k: i for i, k in enumerate(keys) if k not in self._rows}
        if not new:
            return
        name = f"chunk-{hashlib.sha256(''.join(new).encode()).hexdigest()[:16]}"
        with atomic_open(self.folder / f"{name}.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(rows[list(new.values())]))
        atomic_write_text(self.folder / f"{name}.keys.json", json.dumps(list(new)))
        self._map(self.folder / f"{name}.keys.json", list(new))


class FeatureStore(ChunkStore):
    """Raw backbone features of one encoder's backbones (``Encoder.features``), by pair key."""

    def __init__(self, root: str | Path, encoder: Encoder):
        self.encoder = encoder
        super().__init__(Path(root) / f"features-{encoder.backbone_fingerprint.removeprefix('sha256:')[:16]}")

    def get(self, keys: Sequence[str]) -> np.ndarray:
        return super().get(keys) if len(keys) else np.zeros((0, self.encoder.feature_dim), np.float32)

    def features(self, images: Sequence[Callable[[], Image.Image]], texts: Sequence[str],
                 image_keys: Sequence[str], desc: str = "features") -> np.ndarray:
        """[n, feature_dim] features of (image, text) pairs, computing only those not stored yet;
        ``images`` are loaders, called for those rows alone."""
        keys = [pair_key(i, t) for i, t in zip(image_keys, texts, strict=True)]
        missing = list({k: n for n, k in enumerate(keys) if k not in self._rows}.values())
        bar = tqdm(total=len(keys), initial=len(keys) - len(missing), desc=desc, unit="pair", disable=not missing)
        for start in range(0, len(missing), CHUNK):
            rows = missing[start:start + CHUNK]
            features = compute_features(self.encoder, [images[n] for n in rows], [texts[n] for n in rows])
            self.put([keys[n] for n in rows], features.astype(np.float32))
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
