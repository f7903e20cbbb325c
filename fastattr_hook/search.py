"""Nearest-neighbour search over L2-normalised embeddings: one small interface, three backends.

Score convention: every backend returns cosine similarity (higher = closer, 1.0 = same direction),
best first. Vectors are normalised on the way in, so cosine equals the inner product. Where fewer
than ``k`` items can be returned, rows are padded with key ``-1`` and score ``-inf``.

Backends:

* ``exact``: brute force (chunked matrix product + partial sort) over ``.npy`` files. Perfect
  recall; the reference the others are checked against, and the default below
  ``EXACT_MAX_ITEMS`` items, where a full scan costs a few milliseconds per query batch.
* ``usearch``: an HNSW graph in one file, memory-mapped for serving; a core dependency. In i8,
  the default above ``EXACT_MAX_ITEMS`` when faiss is not installed. Its recall depends on
  ``connectivity`` and ``expansion_*``: the build tunes ``expansion_search`` (``tune_search``), and
  ``fastattr index verify --deep`` measures it on re-embedded items.
* ``faiss``: any ``index_factory`` string (``HNSW32``, ``IVF4096,PQ64``, ...), compressed indexes
  under a memory budget included (LAION scale); optional, ``pip install 'fastattr[faiss]'``.
  HNSW32,SQ8 is the default above ``EXACT_MAX_ITEMS`` when faiss is installed (``default_index``).

A lossy index (one byte per dimension or less) re-scores its candidates on float32 vectors
(``rerank_with``; a bundle serves it so, from its ``vectors.npy``).

``ShardedIndex`` searches several opened indexes (any backends, disjoint keys) as one: a bundle's
index plus the shards ``fastattr index add`` wrote beside it.

Indexes loaded with ``view=True`` are read-only (the file is mapped, not copied): ``add`` raises.
Opt-outs never change an index: ``search(..., exclude=keys)`` skips them. Backend libraries are imported lazily so ``import fastattr_hook`` stays light.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .files import atomic_open, atomic_path
from .errors import FastattrError

__all__ = ["BACKENDS", "EXACT_MAX_ITEMS", "RECALL_TARGET", "ShardedIndex", "VectorIndex", "create_index",
           "default_index", "load_index", "recall_at_k", "tune_search"]

EXACT_MAX_ITEMS = 50_000  # below this, brute force is fast enough and has perfect recall
RERANK = 4  # a lossy index returns this many candidates per result, scored again on float32 vectors
_INT64_MAX = np.iinfo(np.int64).max


class VectorIndex(abc.ABC):
    """Keys (non-negative int64) -> unit vectors; ``search`` returns the top-k keys by cosine similarity.

    Subclasses implement the ``_add``/``_search`` primitives on already validated, normalised
    input; this class does the checks, the read-only guard, exclusions and the padding once.
    """

    backend: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]  # every parameter the backend accepts, with its default

    def __init__(self, dim: int, params: dict[str, Any], view: bool) -> None:
        self.dim, self.params, self.view = dim, params, view
        self._exact: tuple[np.ndarray, np.ndarray | None] | None = None  # see rerank_with

    @property
    def storage(self) -> str:
        """How the index stores vectors (bundle.yaml ``dtype``): ``f32`` unless the backend compresses them."""
        return "f32"

    @property
    def lossy(self) -> bool:
        """Whether the stored codes lose the order of near ties (8 bits a dimension or fewer), so that
        searches are best re-ranked on float32 vectors (``rerank_with``)."""
        return self.storage not in ("f32", "f16", "SQfp16", "SQbf16")

    def rerank_with(self, vectors: np.ndarray, keys: np.ndarray | None = None) -> "VectorIndex":
        """Score each search's best ``RERANK`` x k candidates again on ``vectors`` (float32 unit
        vectors; row i holds key ``keys[i]``, ascending, or key i without ``keys``) and keep the best k.

        One byte per dimension loses near ties: on 100k synthetic 768-d vectors faiss HNSW32,SQ8
        reached recall@10 0.967 at efSearch 256, and 0.991 re-ranked this way, as float32 HNSW32
        did (0.992), from a third of its index bytes (benchmarks/results/search_scale/). A bundle keeps
        these vectors anyway (``vectors.npy``, memory-mapped: a search reads only its candidates' rows)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or (keys is not None and len(keys) != len(vectors)):
            raise FastattrError(f"rerank_with(): expected [n, {self.dim}] vectors and n keys, got vectors of shape "
                                f"{vectors.shape} and {'no keys' if keys is None else f'{len(keys)} keys'}")
        self._exact = (vectors, keys)
        return self

    @property
    def search_setting(self) -> str | None:
        """The parameter read at search time that trades speed for recall (``tune_search`` sets it);
        None for an exact index."""
        return None

    def set_search_setting(self, value: int) -> None:
        """Change ``search_setting`` on the open index (and in ``params``, which bundle.yaml records)."""
        raise FastattrError(f"backend '{self.backend}' has no search-time setting to change")

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors[i]`` under ``keys[i]``; keys must be new and unique."""
        self._check_writable("add items")
        keys, vectors = _as_keys(keys), self._as_unit_vectors(vectors, "vectors")
        if len(keys) != len(vectors):
            raise FastattrError(f"add(): {len(keys)} keys but {len(vectors)} vectors; pass one key per vector")
        if len(keys):
            self._add(keys, vectors)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys int64 [q, k], scores float32 [q, k]), best first, padded with -1 / -inf. Keys in
        ``exclude`` (e.g. opted-out items) are never returned: the search widens until k others are
        found or the index is exhausted."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise FastattrError(f"search(): k must be a positive integer, got {k!r}")
        queries = self._as_unit_vectors(queries, "queries")
        exclude = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
        out_keys = np.full((len(queries), k), -1, dtype=np.int64)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        total = len(self)
        if not len(queries) or not total:
            return out_keys, out_scores
        fetch = min(total, int(k) * (RERANK if self._exact is not None else 1) + len(exclude))
        while True:
            keys, scores = self._search(queries, fetch)
            keep = (keys >= 0) & ~np.isin(keys, exclude)
            if fetch >= total or keep.sum(axis=1).min() >= k:
                break
            fetch = min(total, fetch * 2)  # ANN backends may return excluded items first: widen
        if self._exact is not None:
            keys, scores = self._rescored(queries, np.where(keep, keys, -1))
            keep = keys >= 0
        for row in range(len(queries)):
            kept_keys, kept_scores = keys[row][keep[row]][:k], scores[row][keep[row]][:k]
            out_keys[row, :len(kept_keys)] = kept_keys
            out_scores[row, :len(kept_scores)] = kept_scores
        return out_keys, out_scores

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of items in the index."""

    @abc.abstractmethod
    def save(self, directory: Path) -> list[str]:
        """Write the index file(s) atomically into ``directory``; returns their names relative to it."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: Path, dim: int, params: dict, *, view: bool = True) -> "VectorIndex":
        """Open an index written by ``save``; ``view=True`` memory-maps it read-only where possible."""

    @classmethod
    @abc.abstractmethod
    def create(cls, dim: int, params: dict | None = None) -> "VectorIndex":
        """A new empty index."""

    @abc.abstractmethod
    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores) of width <= k; missing results have key -1."""

    def _rescored(self, queries: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``keys`` (-1: none) ordered by exact cosine with their query, on ``rerank_with``'s vectors."""
        vectors, vector_keys = self._exact
        found = keys >= 0
        rows = np.clip(keys if vector_keys is None else np.searchsorted(vector_keys, keys), 0, len(vectors) - 1)
        strays = keys[found & (keys != (rows if vector_keys is None else vector_keys[rows]))]
        if len(strays):
            raise FastattrError(f"the index returned key {strays[0]}, which its float32 vectors do not hold; "
                                "rebuild the bundle (`fastattr index verify` names what is wrong)")
        candidates = np.asarray(vectors[rows.ravel()], dtype=np.float32).reshape(*rows.shape, self.dim)
        scores = np.where(found, np.einsum("qcd,qd->qc", candidates, queries), -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(keys, order, 1), np.take_along_axis(scores, order, 1)

    def _check_writable(self, action: str) -> None:
        if self.view:
            raise FastattrError(f"this {self.backend} index was loaded with view=True (memory-mapped, read-only); "
                                f"load it with view=False to {action}")

    def _as_unit_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            got = f"{array.shape[1]}-d" if array.ndim == 2 else f"shape {array.shape}"
            raise FastattrError(f"{what} are {got} but this {self.backend} index holds {self.dim}-d vectors; "
                                f"pass an array of shape [n, {self.dim}] from the bundle's encoder")
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
        if len(bad):
            raise FastattrError(f"{what} row {bad[0]} is zero or not finite ({len(bad)} such rows); "
                                "cannot normalise it for cosine search")
        return np.ascontiguousarray(array / norms)


def _as_keys(keys: np.ndarray) -> np.ndarray:
    """Validated 1-D int64 keys: integers in [0, 2**63), unique."""
    array = np.asarray(keys)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise FastattrError(f"keys must be a 1-D array of integers, got dtype {array.dtype} and shape {array.shape}")
    if array.min() < 0 or array.max() > _INT64_MAX:
        raise FastattrError(f"keys must be in [0, 2**63), got values from {array.min()} to {array.max()}")
    array = array.astype(np.int64)
    unique, counts = np.unique(array, return_counts=True)
    if len(unique) != len(array):
        raise FastattrError(f"keys must be unique; repeated: {unique[counts > 1][:5].tolist()}")
    return array


def _resolve_params(backend: str, params: dict | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """The backend's defaults updated with ``params``; unknown keys are an error (typos would be silent)."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise FastattrError(f"backend '{backend}': unknown parameter(s) {', '.join(map(repr, unknown))}; "
                            f"valid parameters: {', '.join(defaults) or 'none'}")
    return {**defaults, **params}


def _check_positive_ints(backend: str, params: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        value = params.get(name)
        if name in params and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise FastattrError(f"backend '{backend}': parameter '{name}' must be a positive integer, got {value!r}")


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise FastattrError(f"{path}: index file not found; the bundle is incomplete or was built with another "
                            "backend (check backend in bundle.yaml, or rebuild with `fastattr index build`)")
    return path


def _check_loaded_dim(path: Path, found: int, dim: int) -> None:
    if found != dim:
        raise FastattrError(f"{path}: holds {found}-d vectors but {dim}-d were expected (bundle.yaml dim); "
                            "the index and the bundle manifest disagree: rebuild the bundle")


# ---------------------------------------------------------------------------------------------- exact


class ExactIndex(VectorIndex):
    """Brute force over ``keys.npy`` + ``vectors.npy``: the reference for recall checks.

    ``add`` rewrites the in-memory arrays, so add in large batches (the bundle build
    adds everything in one call).
    """

    backend = "exact"
    defaults: ClassVar[dict[str, Any]] = {}
    query_block = 256        # queries x database_block float32 scores bound the scratch memory (64 MiB)
    database_block = 65_536

    def __init__(self, dim: int, params: dict[str, Any], keys: np.ndarray, vectors: np.ndarray, view: bool) -> None:
        super().__init__(dim, params, view)
        self._keys, self._vectors = keys, vectors

    @classmethod
    def create(cls, dim: int, params: dict | None = None) -> "ExactIndex":
        return cls(dim, _resolve_params(cls.backend, params, cls.defaults), np.empty(0, dtype=np.int64),
                   np.empty((0, dim), dtype=np.float32), view=False)

    @classmethod
    def load(cls, directory: Path, dim: int, params: dict, *, view: bool = True) -> "ExactIndex":
        params = _resolve_params(cls.backend, params, cls.defaults)
        directory = Path(directory)
        mmap_mode = "r" if view else None
        keys = np.load(_existing_file(directory / "keys.npy"), mmap_mode=mmap_mode)
        vectors = np.load(_existing_file(directory / "vectors.npy"), mmap_mode=mmap_mode)
        if vectors.ndim != 2 or keys.ndim != 1 or len(keys) != len(vectors):
            raise FastattrError(f"{directory}: keys.npy {keys.shape} and vectors.npy {vectors.shape} do not match; "
                                "rebuild the bundle")
        _check_loaded_dim(directory / "vectors.npy", vectors.shape[1], dim)
        return cls(dim, params, keys, vectors, view)

    def __len__(self) -> int:
        return len(self._keys)

    def save(self, directory: Path) -> list[str]:
        directory = Path(directory)
        for name, array in (("keys.npy", self._keys), ("vectors.npy", self._vectors)):
            with atomic_open(directory / name, "wb") as f:
                np.save(f, np.ascontiguousarray(array))
        return ["keys.npy", "vectors.npy"]

    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        present = keys[np.isin(keys, self._keys)]
        if len(present):
            raise FastattrError(f"keys already in the index: {present[:5].tolist()}; remove them first or use new keys")
        self._keys = np.concatenate([self._keys, keys])
        self._vectors = np.concatenate([self._vectors, vectors])

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self._keys))
        rows = np.empty((len(queries), k), dtype=np.int64)
        scores = np.empty((len(queries), k), dtype=np.float32)
        for start in range(0, len(queries), self.query_block):
            block = slice(start, start + self.query_block)
            rows[block], scores[block] = self._top_rows(queries[block], k)
        return self._keys[rows], scores

    def _top_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers and scores of the k best database rows, scanning the database in blocks."""
        import torch  # the product runs in torch's thread pool: numpy's OpenBLAS threads, left spinning after
        # it, slowed the encoder's next forward pass 2.5x on a 2-core machine (attribute(): 34 -> 14 ms)

        best_rows = np.empty((len(queries), 0), dtype=np.int64)
        best_scores = np.empty((len(queries), 0), dtype=np.float32)
        query_tensor = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        for start in range(0, len(self._vectors), self.database_block):
            block = np.ascontiguousarray(self._vectors[start:start + self.database_block], dtype=np.float32)
            with warnings.catch_warnings():  # a viewed (read-only) index is only read here
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                products = (query_tensor @ torch.from_numpy(block).T).numpy()
            scores = np.concatenate([best_scores, products], axis=1)
            rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, start + len(block)),
                                                              (len(queries), len(block)))], axis=1)
            if scores.shape[1] > k:
                keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                scores, rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
            best_scores, best_rows = scores, rows
        order = np.argsort(-best_scores, axis=1, kind="stable")
        return np.take_along_axis(best_rows, order, 1), np.take_along_axis(best_scores, order, 1)



# -------------------------------------------------------------------------------------------- usearch


def _import_usearch():
    if sys.platform.startswith("linux") and "usearch.compiled" not in sys.modules:
        # The usearch wheel links its own copy of the C++ runtime and exports its locale symbols
        # process-wide; loaded first, they crash faiss's std::regex (index_factory segfaults).
        # Loading the system runtime first, as importing torch does, keeps both working.
        with contextlib.suppress(OSError):
            ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    try:
        import usearch.index
    except ImportError:
        raise FastattrError("backend 'usearch' needs the usearch package, a core dependency of fastattr: "
                            "pip install 'usearch>=2.12' (or reinstall fastattr)") from None
    return usearch.index


class USearchIndex(VectorIndex):
    """HNSW graph (usearch) in ``index.usearch``; scores are 1 - cosine distance.

    Defaults: connectivity 32, expansion_add 128, expansion_search 256 (the build tunes it), f16: on
    100k synthetic 768-d vectors f16 reached the recall of f32 (0.9955 vs 0.9967 at expansion_search
    256) at half the memory and no more time; ``i8`` (a quarter of f32) stopped at recall@10 0.82
    whatever the expansion (usearch quantises unit vectors coarsely), and re-ranked (``rerank_with``)
    reached 0.992 at 256. benchmarks/results/search_scale/.
    """

    backend = "usearch"
    defaults: ClassVar[dict[str, Any]] = {"dtype": "f16", "connectivity": 32, "expansion_add": 128,
                                          "expansion_search": 256}
    dtypes = ("f32", "f16", "i8")
    file_name = "index.usearch"

    def __init__(self, dim: int, params: dict[str, Any], index, view: bool) -> None:
        super().__init__(dim, params, view)
        self._index = index

    @property
    def storage(self) -> str:
        return self.params["dtype"]

    @property
    def search_setting(self) -> str:
        return "expansion_search"

    def set_search_setting(self, value: int) -> None:
        self._index.expansion_search = value
        self.params = {**self.params, "expansion_search": value}

    @classmethod
    def _params(cls, params: dict | None) -> dict[str, Any]:
        params = _resolve_params(cls.backend, params, cls.defaults)
        if params["dtype"] not in cls.dtypes:
            raise FastattrError(f"backend 'usearch': parameter 'dtype' must be one of {', '.join(cls.dtypes)}, "
                                f"got {params['dtype']!r}")
        _check_positive_ints(cls.backend, params, ("connectivity", "expansion_add", "expansion_search"))
        return params

    @classmethod
    def create(cls, dim: int, params: dict | None = None) -> "USearchIndex":
        usearch = _import_usearch()
        params = cls._params(params)
        index = usearch.Index(ndim=dim, metric="cos", dtype=params["dtype"], connectivity=params["connectivity"],
                              expansion_add=params["expansion_add"], expansion_search=params["expansion_search"])
        return cls(dim, params, index, view=False)

    @classmethod
    def load(cls, directory: Path, dim: int, params: dict, *, view: bool = True) -> "USearchIndex":
        usearch = _import_usearch()
        params = cls._params(params)
        path = _existing_file(Path(directory) / cls.file_name)
        try:
            meta = usearch.Index.metadata(path)
        except ValueError as exc:
            raise FastattrError(f"{path}: not a usearch index ({exc}); rebuild the bundle") from None
        _check_loaded_dim(path, meta["dimensions"], dim)
        index = usearch.Index.restore(path, view=view, expansion_add=params["expansion_add"],
                                      expansion_search=params["expansion_search"])
        return cls(dim, params, index, view)

    def __len__(self) -> int:
        return len(self._index)

    def save(self, directory: Path) -> list[str]:
        with atomic_path(Path(directory) / self.file_name) as tmp:
            self._index.save(tmp)
        return [self.file_name]

    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        present = keys[self._index.contains(keys.astype(np.uint64))]
        if len(present):
            raise FastattrError(f"keys already in the index: {present[:5].tolist()}; remove them first or use new keys")
        self._index.add(keys.astype(np.uint64), vectors)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        matches = self._index.search(queries, k)
        keys = np.atleast_2d(matches.keys).astype(np.int64)
        distances = np.atleast_2d(matches.distances).astype(np.float32)
        if isinstance(matches, _import_usearch().BatchMatches):  # padded to k; the first counts[i] are results
            missing = np.arange(keys.shape[1]) >= matches.counts[:, None]
            keys[missing], distances[missing] = -1, np.inf
        return keys, 1.0 - distances  # a single query comes back as Matches: its results only, no padding



# ---------------------------------------------------------------------------------------------- faiss


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise FastattrError("backend 'faiss' needs the faiss package: pip install 'fastattr[faiss]' "
                            "(or 'fastattr[faiss-gpu]' on a CUDA machine), or use backend 'usearch'") from None
    return faiss


def _faiss_reason(exc: Exception) -> str:
    """The message part of a faiss C++ error, without the function signature and source location."""
    match = re.search(r" at \S+:\d+: (.*)", str(exc), re.DOTALL)
    return (match.group(1) if match else str(exc)).strip()


class FaissIndex(VectorIndex):
    """Any faiss ``index_factory`` string over inner product, in ``index.faiss``.

    IVF indexes store our keys natively; the others are wrapped in ``IndexIDMap2``. Factories that
    need training (IVF, PQ) train on the vectors of the first ``add``. ``efConstruction`` (HNSW, used
    by ``add``; faiss' default 40), ``efSearch`` (HNSW) and ``nprobe`` (IVF) are set on the index where
    they apply. With ``gpu`` true, a ``view=True`` index is copied to GPU 0 when faiss sees one and
    implements the type there (not HNSW).
    """

    backend = "faiss"
    defaults: ClassVar[dict[str, Any]] = {"factory": "HNSW32", "efConstruction": 40, "efSearch": 128, "nprobe": 16,
                                          "gpu": True}
    file_name = "index.faiss"

    def __init__(self, dim: int, params: dict[str, Any], index, view: bool) -> None:
        super().__init__(dim, params, view)
        self._index = index  # the CPU index: what add and save change
        self._searcher = self._gpu_copy(index) if view and params["gpu"] else index
        # faiss GPU indexes are not thread-safe; CPU searches are
        self._lock = threading.Lock() if self._searcher is not index else contextlib.nullcontext()

    @property
    def storage(self) -> str:
        """The factory's vector encoding (``PQ64``, ``SQ8``, ...), else ``f32``."""
        encoding = re.search(r"(?:PQ|SQ|RQ|LSQ)\w*", self.params["factory"])
        return encoding.group(0) if encoding else "f32"

    @property
    def search_setting(self) -> str | None:
        """``efSearch`` (HNSW) or ``nprobe`` (IVF): whichever applies to the factory; None for Flat."""
        return next((name for name in ("efSearch", "nprobe") if name in self.params), None)

    def set_search_setting(self, value: int) -> None:
        name = self.search_setting
        if name is None:
            return super().set_search_setting(value)
        space = _import_faiss().ParameterSpace()
        for index in {id(self._index): self._index, id(self._searcher): self._searcher}.values():
            space.set_index_parameter(index, name, value)
        self.params = {**self.params, name: value}

    @classmethod
    def _params(cls, faiss, index, params: dict) -> dict[str, Any]:
        """Resolved params: factory, gpu, and the build and search parameters that apply to ``index`` (now
        set on it)."""
        params = dict(params or {})
        resolved = _resolve_params(cls.backend, params, cls.defaults)
        _check_positive_ints(cls.backend, params, ("efConstruction", "efSearch", "nprobe"))
        if not isinstance(resolved["gpu"], bool):
            raise FastattrError(f"backend 'faiss': parameter 'gpu' must be true or false, got {resolved['gpu']!r}")
        space = faiss.ParameterSpace()
        for name in ("efConstruction", "efSearch", "nprobe"):
            try:
                space.set_index_parameter(index, name, resolved[name])
            except RuntimeError:
                if name in params:
                    raise FastattrError(f"backend 'faiss': parameter '{name}' does not apply to factory "
                                        f"{resolved['factory']!r}; remove it") from None
                del resolved[name]  # our default, for an index type without this parameter
        return resolved

    @classmethod
    def create(cls, dim: int, params: dict | None = None) -> "FaissIndex":
        faiss = _import_faiss()
        factory = _resolve_params(cls.backend, params, cls.defaults)["factory"]
        if not isinstance(factory, str):
            raise FastattrError(f"backend 'faiss': parameter 'factory' must be a string such as 'HNSW32', "
                                f"got {factory!r}")
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise FastattrError(f"backend 'faiss': parameter 'factory' {factory!r} is not a valid faiss index factory "
                                f"string ({_faiss_reason(exc)}); e.g. 'Flat', 'HNSW32', 'IVF4096,PQ64'") from None
        native_ids = faiss.try_extract_index_ivf(index) is not None or isinstance(
            faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2))
        if not native_ids:
            index = faiss.IndexIDMap2(index)
        return cls(dim, cls._params(faiss, index, params), index, view=False)

    @classmethod
    def load(cls, directory: Path, dim: int, params: dict, *, view: bool = True) -> "FaissIndex":
        faiss = _import_faiss()
        path = _existing_file(Path(directory) / cls.file_name)
        try:
            if view:
                try:
                    index = faiss.read_index(str(path), cls._mmap_flags(faiss))
                except RuntimeError:  # a type faiss cannot map: read it into memory
                    index = faiss.read_index(str(path))
            else:
                index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise FastattrError(f"{path}: not a readable faiss index ({_faiss_reason(exc)}); "
                                "rebuild the bundle") from None
        _check_loaded_dim(path, index.d, dim)
        return cls(dim, cls._params(faiss, index, params), index, view)

    @staticmethod
    def _mmap_flags(faiss) -> int:
        """Zero-copy read flags: IO_FLAG_MMAP_IFC (faiss >= 1.10) maps flat codes, HNSW storage and IVF lists
        (measured: a 200 MB Flat index loads in +12 MB RSS, not +206 MB); IO_FLAG_MMAP maps only IVF lists."""
        return getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY

    def _gpu_copy(self, index):
        """``index`` copied to GPU 0; itself without a GPU, or for a type faiss has no GPU version of (HNSW)."""
        faiss = _import_faiss()
        if faiss.get_num_gpus() == 0:
            return index
        self._gpu_resources = faiss.StandardGpuResources()  # must outlive the GPU index
        try:
            return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        except RuntimeError:
            return index

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def save(self, directory: Path) -> list[str]:
        faiss = _import_faiss()
        with atomic_path(Path(directory) / self.file_name) as tmp:
            faiss.write_index(self._index, str(tmp))
        return [self.file_name]

    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if not self._index.is_trained:
            try:
                self._index.train(vectors)
            except RuntimeError as exc:
                raise FastattrError(
                    f"backend 'faiss': factory {self.params['factory']!r} trains on the first add(), and "
                    f"{len(vectors)} vectors were not enough ({_faiss_reason(exc)}); add more vectors in the first "
                    "call, or choose a smaller factory (fewer IVF lists or PQ centroids)") from None
        self._index.add_with_ids(vectors, keys)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            scores, keys = self._searcher.search(queries, k)
        return keys, scores



# -------------------------------------------------------------------------------------------- sharded


class ShardedIndex(VectorIndex):
    """Several opened indexes searched as one, read-only. Every shard returns its own top-k and the
    merge keeps the best k of those: exactly the top-k of one index over all the vectors (as far as
    each shard's own search is exact). Keys must be unique across shards (a bundle's are)."""

    backend = "sharded"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, shards: list[VectorIndex]) -> None:
        dims = {shard.dim for shard in shards}
        if len(dims) != 1:
            raise FastattrError(f"ShardedIndex: needs one or more indexes of one dimension, got dimensions "
                                f"{sorted(dims)}")
        super().__init__(dims.pop(), {}, view=True)
        self.shards = shards

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    @property
    def lossy(self) -> bool:
        return any(shard.lossy for shard in self.shards)

    def save(self, directory: Path) -> list[str]:
        raise self._read_only("save it")

    @classmethod
    def load(cls, directory: Path, dim: int, params: dict, *, view: bool = True) -> "ShardedIndex":
        raise FastattrError("a ShardedIndex is not saved as such: open the bundle with Bundle.open(path).index()")

    @classmethod
    def create(cls, dim: int, params: dict | None = None) -> "ShardedIndex":
        raise FastattrError("a ShardedIndex only wraps opened indexes: ShardedIndex([index, ...])")

    def _check_writable(self, action: str) -> None:
        raise self._read_only(action)

    @staticmethod
    def _read_only(action: str) -> FastattrError:
        return FastattrError(f"a sharded index is read-only, cannot {action}: `fastattr index add` writes a new "
                             "shard, `fastattr index compact` merges the shards into one index")

    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        raise self._read_only("add items")

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found = [shard._search(queries, min(k, len(shard))) for shard in self.shards if len(shard)]
        keys = np.concatenate([keys for keys, _ in found], axis=1)
        scores = np.concatenate([scores for _, scores in found], axis=1).astype(np.float32)
        scores[keys < 0] = -np.inf  # a shard's padding never outranks a result
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(keys, best, 1), np.take_along_axis(scores, best, 1)


# ---------------------------------------------------------------------------------------------- API


BACKENDS: dict[str, type[VectorIndex]] = {"exact": ExactIndex, "usearch": USearchIndex, "faiss": FaissIndex}


def _backend_class(backend: str) -> type[VectorIndex]:
    if backend not in BACKENDS:
        raise FastattrError(f"unknown vector index backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    return BACKENDS[backend]


def create_index(backend: str, dim: int, params: dict | None = None, n_items_hint: int | None = None) -> VectorIndex:
    """A new empty index. ``n_items_hint`` is the expected size; no backend pre-allocates from it yet."""
    cls = _backend_class(backend)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise FastattrError(f"dim must be a positive integer, got {dim!r}")
    return cls.create(int(dim), params)


def load_index(backend: str, directory: Path, dim: int, params: dict, *, view: bool = True) -> VectorIndex:
    """Open an index saved by ``VectorIndex.save``; ``view=True`` (serving) maps it read-only where possible."""
    return _backend_class(backend).load(Path(directory), int(dim), params, view=view)


def default_index(n_items: int) -> tuple[str, dict[str, Any]]:
    """The backend and parameters ``index build`` gives ``n_items`` vectors when none is chosen:
    ``exact`` below ``EXACT_MAX_ITEMS`` (perfect recall, fast enough); above, one byte per dimension,
    served re-ranked (``rerank_with``): faiss HNSW32,SQ8 where faiss is installed, else usearch i8.
    On 100k vectors of d = 768 (benchmarks/results/search_scale/), re-ranked HNSW32,SQ8 answered a
    single query at recall@10 0.991 as fast as float32 HNSW32 (1.91 vs 1.95 ms at efSearch 256) from
    a third of the index bytes, and faster than usearch i8 (0.992 at 4.1 ms). The build tunes the
    search setting to recall 0.99."""
    if n_items < EXACT_MAX_ITEMS:
        return "exact", {}
    try:
        _import_faiss()
    except FastattrError:
        return "usearch", {"dtype": "i8"}
    return "faiss", {"factory": "HNSW32,SQ8"}


RECALL_TARGET = 0.99  # recall@10 against exact search that `index build` tunes an approximate index to
SEARCH_LADDER = (32, 64, 128, 256, 512, 1024, 2048)  # the search settings tune_search tries, cheapest first


def tune_search(index: VectorIndex, keys: np.ndarray, vectors: np.ndarray, target: float = RECALL_TARGET,
                tune: bool = True, queries: int = 256, k: int = 10, seed: int = 0) -> float:
    """Set ``index``'s search setting (usearch ``expansion_search``, faiss ``efSearch``/``nprobe``) to
    the cheapest value of ``SEARCH_LADDER`` whose recall@k against exact search reaches ``target``,
    or the last one; returns the recall@k at the value kept. ``index`` holds ``keys``/``vectors``.
    With ``tune`` false (a setting the user chose) or an exact index, only measures the recall.

    How many candidates a graph search must visit depends on the data (measured in
    benchmarks/results/search_scale_*.md: 64 to 512 for recall 0.99 on 100k vectors), so it is
    measured on the data: the queries are a sample of the index's own vectors, each one's own key
    left out of both result lists (a real query is not in the index).
    """
    keys, vectors = np.asarray(keys, dtype=np.int64), index._as_unit_vectors(vectors, "vectors")  # as add() stored them
    rows = np.random.default_rng(seed).choice(len(keys), size=min(queries, len(keys)), replace=False)
    sample, own = vectors[rows], keys[rows]
    exact = ExactIndex(index.dim, {}, keys, vectors, view=True)
    wanted = _without(own, exact.search(sample, k + 1)[0], k)

    def recall() -> float:
        return recall_at_k(_without(own, index.search(sample, k + 1)[0], k), wanted, k)

    if not tune or index.search_setting is None:
        return recall()
    for value in SEARCH_LADDER:
        index.set_search_setting(value)
        reached = recall()
        if reached >= target:
            break
    return reached


def _without(own: np.ndarray, found: np.ndarray, k: int) -> np.ndarray:
    """Each row of ``found`` without its query's own key, cut (or padded with -1) to width k."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for row, (key, keys) in enumerate(zip(own, found)):
        kept = keys[keys != key][:k]
        out[row, :len(kept)] = kept
    return out


def recall_at_k(approx_keys: np.ndarray, exact_keys: np.ndarray, k: int) -> float:
    """Mean over queries of the share of the exact top-k that the approximate top-k found.

    Padding (-1) in ``exact_keys`` is not counted, so a query with fewer than k items to find can
    still reach 1.0; a query with none counts as 1.0.
    """
    approx, exact = np.asarray(approx_keys)[:, :k], np.asarray(exact_keys)[:, :k]
    if len(approx) != len(exact):
        raise FastattrError(f"recall_at_k: {len(approx)} approximate rows but {len(exact)} exact rows")
    if len(exact) == 0:
        raise FastattrError("recall_at_k: no queries")
    wanted = exact >= 0
    found = (exact[:, :, None] == approx[:, None, :]).any(axis=2) & wanted
    totals = wanted.sum(axis=1)
    per_query = np.where(totals > 0, found.sum(axis=1) / np.maximum(totals, 1), 1.0)
    return float(per_query.mean())
