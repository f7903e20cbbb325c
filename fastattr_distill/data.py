"""A distillation dataset (``fastattr teacher merge``) as the student sees it.

``distill.npz`` holds the teacher's rankings; ``distill.yaml`` beside it says which model,
manifest and bundle they belong to. Loading checks that the training manifest is still the one
the teacher scored, so a student is never trained on rankings of other data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from fastattr_hook.files import sha256_file
from fastattr_hook.errors import FastattrError

log = logging.getLogger(__name__)
SCHEMA = "fastattr/distill@1"


@dataclass
class DistillDataset:
    path: Path
    meta: dict  # distill.yaml
    query_id: np.ndarray
    split: np.ndarray
    prompt: np.ndarray
    seed: np.ndarray  # generation seed of each query image
    image: np.ndarray  # absolute paths of the query images
    offsets: np.ndarray
    key: np.ndarray  # [C] bundle keys of the candidates
    tau: np.ndarray  # [C]
    rank: np.ndarray  # [C]
    train_keys: np.ndarray  # [N] the training table (bundle keys), the order item features follow
    train_ids: np.ndarray
    variants: list[str]
    variant_tau: np.ndarray  # [V, C], NaN outside the test queries

    @property
    def manifest(self) -> Path:
        value = Path(self.meta["job"]["manifest"])
        return value if value.is_absolute() else (self.path.parent / value).resolve()

    @property
    def fingerprint(self) -> str:
        return "sha256:" + sha256_file(self.path)

    def queries(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def candidates(self, q: int) -> slice:
        return slice(int(self.offsets[q]), int(self.offsets[q + 1]))

    def item_rows(self, keys: np.ndarray) -> np.ndarray:
        """Rows of the training table for bundle keys."""
        rows = np.searchsorted(self.train_keys, keys)
        found = rows < len(self.train_keys)
        found[found] = self.train_keys[rows[found]] == keys[found]
        if not found.all():
            raise FastattrError(f"{self.path}: a candidate key is not in the training table; re-run `fastattr "
                                f"teacher merge`")
        return rows


def load_dataset(path: str | Path) -> DistillDataset:
    """Read and check ``distill.npz`` (and the ``distill.yaml`` beside it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "distill.npz"
    meta_path = path.with_suffix(".yaml")
    for p in (path, meta_path):
        if not p.is_file():
            raise FastattrError(f"{p}: not found; make the dataset with `fastattr teacher merge` (see README)")
    meta = yaml.safe_load(meta_path.read_text(encoding="utf-8")) or {}
    if meta.get("schema") != SCHEMA:
        raise FastattrError(f"{meta_path}: not a distillation dataset (schema {meta.get('schema')!r}, expected {SCHEMA})")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError) as exc:
        raise FastattrError(f"{path}: unreadable ({exc}); re-run `fastattr teacher merge`") from None
    if len(arrays.get("query_id", [])) == 0:
        raise FastattrError(f"{path}: holds no query; score some with `fastattr teacher score` and merge again")
    if meta.get("counts", {}).get("missing"):
        log.warning("%s: partial dataset (%d queries were not scored when it was merged)", path,
                    meta["counts"]["missing"])
    if "train_keys" in arrays:
        train_keys, train_ids = arrays["train_keys"], arrays["train_ids"]
    else:  # datasets merged before the table was stored: every candidate seen
        train_keys, first = np.unique(arrays["key"], return_index=True)
        train_ids = arrays["id"][first]
    images = np.array([str((path.parent / p).resolve()) for p in arrays["image"]])
    variants = [str(v) for v in arrays.get("variants", [])]
    variant_tau = arrays.get("variant_tau", np.zeros((0, len(arrays["key"]))))
    return DistillDataset(path.resolve(), meta, arrays["query_id"], arrays["split"], arrays["prompt"], arrays["seed"], images,
                          arrays["offsets"], arrays["key"], arrays["tau"], arrays["rank"], train_keys, train_ids,
                          variants, variant_tau)
