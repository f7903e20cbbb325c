"""A distillation dataset (``fastattr teacher merge``) as the student sees it.

``distill.npz`` holds the teacher's rankings; ``distill.yaml`` beside it says which model,
manifest and bundle they belong to. Loading checks that the training manifest is still the one
the teacher scored, so a student is never trained on rankings of other data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastattr_hook.config import read_yaml
from fastattr_hook.files import sha256_file
from fastattr_hook.errors import FastattrError

from .metrics import ranking

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
    variant_tau: np.ndarray  # [V, C], NaN where the variant did not run (train queries: job key 'train_variants')
    parts: tuple[Path, ...] = ()  # the files of a combined dataset (``load_datasets``), else just ``path``

    @property
    def manifest(self) -> Path:
        value = Path(self.meta["job"]["manifest"])
        return value if value.is_absolute() else (self.path.parent / value).resolve()

    @property
    def fingerprint(self) -> str:
        if len(self.parts) < 2:
            return "sha256:" + sha256_file(self.path)
        digest = hashlib.sha256("\n".join(sha256_file(p) for p in self.parts).encode()).hexdigest()
        return "sha256:" + digest

    def split_fingerprint(self, split: str) -> str:
        """sha256 of what the ``split`` queries hold (ids, prompts, seeds, query images, candidates and
        the main teacher run's scores) and of the training table: unchanged when runs are added to
        other queries or as variants, so a counterfactual plan of the test queries stays valid."""
        digest = hashlib.sha256()
        for q in self.queries(split):
            span = self.candidates(q)
            for value in (self.query_id[q], self.prompt[q], self.seed[q], sha256_file(self.image[q])):
                digest.update(f"{value}\n".encode())
            digest.update(np.ascontiguousarray(self.key[span], dtype=np.int64).tobytes())
            digest.update(np.ascontiguousarray(self.tau[span], dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(self.train_keys, dtype=np.int64).tobytes())
        digest.update("\n".join(str(i) for i in self.train_ids).encode())
        return "sha256:" + digest.hexdigest()

    def queries(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def candidates(self, q: int) -> slice:
        return slice(int(self.offsets[q]), int(self.offsets[q + 1]))

    def with_averaged_labels(self, variants: list[str], source: str) -> "DistillDataset":
        """Train queries' ``tau`` (and ``rank``) replaced by the mean of the main run and these
        teacher variants, over the runs each query has: less label noise. Test queries keep the main
        run, the one every evaluation compares against."""
        unknown = [v for v in variants if v not in self.variants]
        if unknown:
            raise FastattrError(f"{source}: key 'label_variants': '{unknown[0]}' is not a teacher variant of "
                                f"{self.path} ({self.variants}); name one of its job's 'train_variants'")
        if not variants:
            return self
        runs = np.vstack([self.tau[None], self.variant_tau[[self.variants.index(v) for v in variants]]])
        tau, rank = self.tau.copy(), self.rank.copy()
        for q in self.queries("train"):
            span = self.candidates(q)
            tau[span] = np.nanmean(runs[:, span], axis=0)
            rank[span] = np.argsort(ranking(tau[span]), kind="stable")  # 0 = most influential
        return dataclasses.replace(self, tau=tau, rank=rank)

    def with_reference(self, variant: str, source: str = "--reference") -> "DistillDataset":
        """Test queries judged against the teacher variant ``variant`` instead of the main run, which
        becomes the variant 'main run'. A student trained on the main run's labels shares that run's
        seeded per-item error with its test labels; another seed's run does not."""
        if variant not in self.variants:
            raise FastattrError(f"{source}: '{variant}' is not a teacher variant of {self.path} ({self.variants}); "
                                f"add it to the job's 'variants' and run `fastattr teacher fisher`, `score`, `merge`")
        v = self.variants.index(variant)
        tau, rank, variant_tau = self.tau.copy(), self.rank.copy(), self.variant_tau.copy()
        for q in self.queries("test"):
            span = self.candidates(q)
            if np.isnan(self.variant_tau[v, span]).any():
                raise FastattrError(f"{self.path}: test query {self.query_id[q]} has no '{variant}' run; run "
                                    f"`fastattr teacher score` and `merge` for its job")
            tau[span], variant_tau[v, span] = self.variant_tau[v, span], self.tau[span]
            rank[span] = np.argsort(ranking(tau[span]), kind="stable")
        variants = [*self.variants[:v], "main run", *self.variants[v + 1:]]
        return dataclasses.replace(self, tau=tau, rank=rank, variant_tau=variant_tau, variants=variants)

    def label_runs(self, variants: list[str]) -> np.ndarray:
        """[Q] teacher runs behind each query's label: 1 + the ``variants`` scored for it."""
        first = self.offsets[:-1]
        return 1 + (~np.isnan(self.variant_tau[[self.variants.index(v) for v in variants]][:, first])).sum(axis=0)

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
    meta = read_yaml(meta_path, "re-run `fastattr teacher merge`")
    schema = meta.get("schema") if isinstance(meta, dict) else None
    if schema != SCHEMA:
        raise FastattrError(f"{meta_path}: not a distillation dataset (schema {schema!r}, expected {SCHEMA})")
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


def load_datasets(paths: str | Path | list[str | Path]) -> DistillDataset:
    """One dataset, or several scored by the same teacher on the same model and training table (e.g.
    a job of more train queries next to the first one) as one: queries and candidates concatenated in
    the given order (teacher variants: the first dataset's, wherever a dataset has them). Refused,
    naming the file: another model, manifest, training table or teacher settings, or a train prompt
    that is a test prompt of any of them."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise FastattrError("no distillation dataset given; list at least one distill.npz")
    sets = [load_dataset(p) for p in paths]
    first = sets[0]
    if len(sets) == 1:
        return first

    def identity(d: DistillDataset) -> dict:
        fingerprints = d.meta.get("fingerprints", {})
        return {"model": fingerprints.get("model"), "manifest": fingerprints.get("manifest"),
                "teacher settings": d.meta["job"].get("teacher")}

    for other in sets[1:]:
        for what, value in identity(other).items():
            if value != identity(first)[what]:
                raise FastattrError(f"{other.path}: another {what} than {first.path}; datasets trained on together "
                                    f"must be scored by the same teacher on the same model and manifest")
        if not np.array_equal(other.train_keys, first.train_keys):
            raise FastattrError(f"{other.path}: another training table than {first.path}; merge both jobs against "
                                f"the same bundle")
    test_prompts = {str(p) for d in sets for p in d.prompt[d.split == "test"]}
    for d in sets:
        leaked = sorted({str(p) for p in d.prompt[d.split == "train"]} & test_prompts)
        if leaked:
            raise FastattrError(f"{d.path}: train prompt {leaked[0]!r} is a test prompt of the datasets trained on "
                                f"together; make the later job's prompts with `fastattr sandbox prompts --exclude`")
    sizes = np.cumsum([0] + [len(d.key) for d in sets])
    variant_tau = np.full((len(first.variants), sizes[-1]), np.nan)
    for d, start in zip(sets, sizes):
        for row, name in enumerate(first.variants):
            if name in d.variants:
                variant_tau[row, start:start + len(d.key)] = d.variant_tau[d.variants.index(name)]
    cat = {name: np.concatenate([getattr(d, name) for d in sets])
           for name in ("query_id", "split", "prompt", "seed", "image", "key", "tau", "rank")}
    offsets = np.concatenate([first.offsets[:1]] + [d.offsets[1:] + start for d, start in zip(sets, sizes)])
    return dataclasses.replace(first, **cat, offsets=offsets, variant_tau=variant_tau,
                               parts=tuple(d.path for d in sets))
