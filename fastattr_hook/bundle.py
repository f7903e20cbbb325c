"""Index bundles: a directory holding everything needed to answer attribution queries.

    bundle.yaml     schema version, encoder fingerprint, backend + params, metric, dim, counts,
                    share-rule calibration, tool version, sha256 of every other file
    encoder.yaml    the encoder spec (paths relative to the bundle where possible)
    index/          the vector index file(s) of the backend
    shards/NAME/    more indexes, one per `fastattr index add` (bundle.yaml ``shards``), searched with index/
    vectors.npy     float32 copy of every vector, in key order
    keys.npy        the keys of vectors.npy's rows, once `fastattr index compact` dropped some (else row = key)
    items.sqlite    key -> the item's fields (``items.Item``), thumbnail, removed flag
    rejects.jsonl   manifest rows the build skipped, with the reason
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import yaml

from .config import from_dict, read_yaml, to_dict
from .errors import FastattrError
from .files import atomic_dir, atomic_write_text, changed_files, link_tree, map_npy, sha256_file, writer_lock

if TYPE_CHECKING:
    import numpy as np

    from .encoder import Encoder
    from .items import ItemStore
    from .search import VectorIndex

SCHEMA = "fastattr/bundle@1"


@dataclass
class EncoderInfo:
    name: str
    fingerprint: str
    dim: int
    tuned: bool = False


@dataclass
class ManifestInfo:
    path: str  # relative to the bundle folder
    fingerprint: str
    accepted: int
    rejected: int


@dataclass
class ShareRule:
    name: str = "softmax"
    temperature: float = 0.05
    calibration: str = ""


@dataclass
class ShardInfo:
    """An index added beside ``index/`` by `fastattr index add`; its own backend, its keys a range
    no other index holds. dim, metric and encoder are what it was built with: a shard that does not
    match the bundle is refused, not searched."""

    name: str  # the folder shards/<name>/
    backend: str
    backend_params: dict
    dtype: str
    items: int
    first_key: int
    last_key: int
    dim: int
    metric: str
    encoder: str  # the encoder fingerprint


@dataclass
class BundleManifest:
    schema: str
    name: str
    created: str
    tool_version: str
    encoder: EncoderInfo
    backend: str  # backend, backend_params and dtype describe index/
    backend_params: dict
    metric: str
    dim: int
    dtype: str
    items: int  # in every index together
    manifest: ManifestInfo
    share_rule: ShareRule = field(default_factory=ShareRule)
    shards: list[ShardInfo] = field(default_factory=list)  # empty: index/ is the only index, holding every item
    dropped: int = 0  # items deleted by `fastattr index compact`: accepted = items + dropped; keys are never reused
    recall_at_10: float | None = None  # of index/ against exact search, measured (and tuned for) when it was built
    files: dict[str, str] = field(default_factory=dict)
    seal: str = ""  # sha256 of everything above: bundle.yaml itself is covered (e.g. an edited share temperature)

    @property
    def fingerprint(self) -> str:
        """Identifies the bundle's content: the checksum of its vector index and items."""
        import hashlib

        digest = hashlib.sha256()
        for rel in sorted(self.files):
            digest.update(f"{rel}={self.files[rel]}".encode())
        return "sha256:" + digest.hexdigest()


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    path = Path(bundle_dir) / Bundle.MANIFEST
    if not path.is_file():
        raise FastattrError(f"{path}: not found; {bundle_dir} is not an index bundle "
                            "(build one with `fastattr index build`)")
    data = read_yaml(path, "it is corrupted: restore it, or rebuild the bundle")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise FastattrError(f"{path}: schema {data.get('schema') if isinstance(data, dict) else None!r} "
                            f"is not {SCHEMA}; rebuild the bundle with this version of fastattr")
    manifest = from_dict(BundleManifest, data, source=str(path))
    if manifest.seal != _seal(manifest):
        seal = "does not match its content" if manifest.seal else "is missing"
        raise FastattrError(f"{path}: edited after the bundle was written (its seal {seal}); restore it, or "
                            f"rebuild the bundle; `fastattr index verify {bundle_dir}` checks the rest")
    return manifest


def write_manifest(bundle_dir: str | Path, manifest: BundleManifest) -> None:
    manifest.seal = _seal(manifest)
    atomic_write_text(Path(bundle_dir) / Bundle.MANIFEST,
                      yaml.safe_dump(_content(manifest), sort_keys=False, allow_unicode=True))


# Fields newer than the first bundles, written (and sealed) only when set: older bundles keep their
# seal, and a bundle without shards or compaction stays readable by older fastattr versions.
_OPTIONAL = {"shards": [], "dropped": 0, "recall_at_10": None}


def _content(manifest: BundleManifest) -> dict:
    return {k: v for k, v in to_dict(manifest).items() if not (k in _OPTIONAL and v == _OPTIONAL[k])}


def _seal(manifest: BundleManifest) -> str:
    import hashlib

    content = {k: v for k, v in _content(manifest).items() if k != "seal"}
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def bundle_files(bundle_dir: str | Path, previous: "Bundle | None" = None) -> dict[str, str]:
    """sha256 of every file in the bundle except bundle.yaml itself. A file that is a hard link of the
    same file of ``previous`` (a staged change: ``Bundle.change``) keeps the checksum recorded there:
    a change hashes only what it wrote, and never vouches for a file tampered with before it."""
    root = Path(bundle_dir)
    files = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name == Bundle.MANIFEST or path.name.startswith("."):
            continue
        rel = path.relative_to(root).as_posix()
        recorded = previous.manifest.files.get(rel) if previous else None
        files[rel] = recorded if recorded and _same_file(path, previous.path / rel) else sha256_file(path)
    return files


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def shipped_bundle() -> Path | None:
    """The sandbox bundle that ships with fastattr, or None without the sandbox package. Located,
    never imported: the runtime does not depend on the sandbox."""
    import importlib.util

    spec = importlib.util.find_spec("fastattr_sandbox")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "artifacts" / "default" / "bundle"


class Bundle:
    """An index bundle; the folder is the object (as in diffusers' ``from_pretrained``). Every
    file name inside a bundle is spelled here and nowhere else."""

    MANIFEST, ENCODER, INDEX, SHARDS, ITEMS, VECTORS, KEYS, REJECTS = (
        "bundle.yaml", "encoder.yaml", "index", "shards", "items.sqlite", "vectors.npy", "keys.npy", "rejects.jsonl")

    def __init__(self, path: str | Path, manifest: BundleManifest):
        self.path, self.manifest = Path(path), manifest

    # Files checksummed each time a bundle is opened for serving (``serve``): the small ones (the encoder
    # spec, keys, rejects, the items store and index of a small bundle), where an edit is cheap for an
    # attacker and silent (a reversed keys.npy credits every image to the wrong creator). Measured: 30-45 ms
    # for the default sandbox bundle's 10 MB on a busy core; larger files are `fastattr index verify`'s job.
    CHECKED_ON_OPEN = 16 << 20

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        return cls(path, read_manifest(path))

    @classmethod
    @contextlib.contextmanager
    def change(cls, path: str | Path, reads: tuple[str, ...] = (ITEMS,)) -> Iterator["Bundle"]:
        """Change the bundle at ``path`` (add, remove, compact): one writer at a time (``writer_lock``),
        from its latest state, in a staged copy (hard links; the items store, which changes in place,
        copied) that replaces the bundle in one step when the block succeeds, so that a crash changes
        nothing and readers never see half a change. Yields the staged bundle; edit its ``manifest``.
        ``reads``: the files the change reads to write new ones, refused if they no longer match their
        checksums (sealing the change would hide the tampering)."""
        with writer_lock(path):
            bundle = cls.open(path)
            recorded = {rel: digest for rel, digest in bundle.manifest.files.items() if rel in reads}
            damaged = changed_files(bundle.path, recorded)
            if damaged:
                rel, problem = damaged[0]
                raise FastattrError(f"{bundle.path / rel}: {problem} since the bundle was written, so the bundle "
                                    f"cannot be changed; run `fastattr index verify {bundle.path}`, then restore or "
                                    "rebuild it")
            with atomic_dir(bundle.path) as tmp:
                link_tree(bundle.path, tmp, copy=(cls.ITEMS,))
                staged = cls(tmp, copy.deepcopy(bundle.manifest))
                yield staged
                staged.finish(previous=bundle)

    def encoder(self, device: str | None = None) -> "Encoder":
        from .encoder import Encoder

        return Encoder.from_yaml(self.path / self.ENCODER, device=device)

    def items(self, writable: bool = False) -> "ItemStore":
        from .items import ItemStore

        return ItemStore(self.path / self.ITEMS, readonly=not writable)

    def index(self) -> "VectorIndex":
        """The vector index, memory-mapped, read-only: index/ alone, or with shards one ``ShardedIndex``
        over index/ and every shard (each checked against the bundle before anything is opened).
        A lossy index (one byte per dimension or less) re-ranks its candidates on ``vectors()``."""
        from .search import ShardedIndex, load_index

        m = self.manifest
        shard_dirs = [self._checked_shard(shard) for shard in m.shards]
        index = load_index(m.backend, self.path / self.INDEX, m.dim, m.backend_params)
        if m.shards:
            index = ShardedIndex([index, *(load_index(shard.backend, folder, m.dim, shard.backend_params)
                                           for shard, folder in zip(m.shards, shard_dirs))])
        if index.lossy:
            index.rerank_with(self.vectors(scattered=True), self._stored_keys())
        return index

    def shard_path(self, name: str) -> Path:
        return self.path / self.SHARDS / name

    def new_shard_name(self) -> str:
        """Numbered in the order they were added; compaction removes every shard, so names never clash."""
        return f"{len(self.manifest.shards) + 1:04d}"

    def _checked_shard(self, shard: ShardInfo) -> Path:
        """The shard's folder, once its recorded dim, metric and encoder match the bundle's."""
        m, source = self.manifest, self.path / self.MANIFEST
        differs = [f"{what} {str(mine)[:19]} (the bundle's: {str(bundle)[:19]})" for what, mine, bundle in (
            ("dim", shard.dim, m.dim), ("metric", shard.metric, m.metric),
            ("encoder fingerprint", shard.encoder, m.encoder.fingerprint)) if mine != bundle]
        if differs:
            raise FastattrError(f"{source}: shard '{shard.name}' was built with {'; '.join(differs)}, so its scores "
                                "cannot be merged with the rest; restore the bundle from a copy, or rebuild it with "
                                "`fastattr index build`")
        folder = self.shard_path(shard.name)
        if not folder.is_dir():
            raise FastattrError(f"{folder}: shard '{shard.name}' listed in {source} is missing; restore the folder "
                                f"from a copy of the bundle, or rebuild it (`fastattr index verify {self.path}` "
                                "lists every missing file)")
        return folder

    def vectors(self, scattered: bool = False) -> "np.ndarray":
        """[items, dim] float32 copy of every vector in key order (memory-mapped); ``vector_keys`` are
        their keys. ``scattered``: mapped for reads of a few rows here and there (re-ranking)."""
        return map_npy(self.path / self.VECTORS, scattered)

    def vector_keys(self) -> "np.ndarray":
        """The key of each row of ``vectors()``, ascending: keys.npy once compaction dropped rows, else
        the row numbers."""
        import numpy as np

        keys = self._stored_keys()
        return np.arange(len(self.vectors()), dtype=np.int64) if keys is None else keys

    def _stored_keys(self) -> "np.ndarray | None":
        """keys.npy, or None while row = key."""
        import numpy as np

        path = self.path / self.KEYS
        return np.load(path) if path.is_file() else None

    def rejects(self) -> list[dict]:
        path = self.path / self.REJECTS
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line] \
            if path.is_file() else []

    def serve(self) -> tuple["VectorIndex", "ItemStore"]:
        """The index (memory-mapped) and the items store, opened for serving after cheap checks (full
        checksums are `fastattr index verify`'s job): the checksums of the small files, files that
        open, and bundle.yaml, the index and the items store agreeing on the count. A bundle a writer
        swapped since ``manifest`` was read is opened as it is now (``manifest`` follows), not
        mistaken for a damaged one."""
        try:
            return self._serve()
        except FastattrError:
            latest = read_manifest(self.path)
            if latest.seal == self.manifest.seal:
                raise
            self.manifest = latest
            return self._serve()

    def _serve(self) -> tuple["VectorIndex", "ItemStore"]:
        hint = f"run `fastattr index verify {self.path}` for a full report, then restore or rebuild the bundle"
        small = {rel: digest for rel, digest in self.manifest.files.items()  # a missing one: named by its loader
                 if (self.path / rel).is_file() and (self.path / rel).stat().st_size <= self.CHECKED_ON_OPEN}
        damaged = changed_files(self.path, small)
        if damaged:
            rel, problem = damaged[0]
            raise FastattrError(f"{self.path / rel}: {problem} since the bundle was written; {hint}")
        try:
            index, items = self.index(), self.items()
            counts = {"bundle.yaml": self.manifest.items, "index": len(index), "items store": items.count()}
        except FastattrError:  # already says what is wrong (e.g. a backend that is not installed)
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file raises whatever its library raises
            raise FastattrError(f"{self.path}: damaged ({type(exc).__name__}: {exc}); {hint}") from None
        if len(set(counts.values())) != 1:
            raise FastattrError(f"{self.path}: damaged: items counted by " + ", ".join(f"{k} {v}" for k, v in counts.items())
                                + f" disagree; {hint}")
        return index, items

    def finish(self, previous: "Bundle | None" = None) -> None:
        """Record the checksum of every file in bundle.yaml and write it (last, as it vouches for the
        rest); files linked unchanged from ``previous`` keep their recorded checksums (``bundle_files``)."""
        self.manifest.files = bundle_files(self.path, previous)
        write_manifest(self.path, self.manifest)
