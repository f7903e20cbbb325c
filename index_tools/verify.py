"""``fastattr index verify``: is this bundle intact, consistent and searchable?

Cheap checks (structure, checksums, counts, dimensions, encoder fingerprint) always run;
``deep`` re-embeds a random sample of items from their source images and checks that each
finds itself first, and measures the ANN backend's recall@10 against exact search.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fastattr_hook.files import changed_files
from fastattr_hook.bundle import Bundle
from fastattr_hook.encoder import Encoder
from fastattr_hook.errors import FastattrError
from fastattr_hook.items import ItemStore
from fastattr_hook.search import recall_at_k


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    bundle: str
    checks: list[Check] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "ok": self.ok, "checks": [asdict(c) for c in self.checks],
                "figures": self.figures}

    def format(self) -> str:
        lines = [f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        lines.append(f"{self.bundle}: {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


def verify_bundle(path: str | Path, deep: bool = False, sample: int = 32, min_recall: float = 0.95,
                  seed: int = 0) -> Report:
    path = Path(path)
    report = Report(str(path))
    try:
        bundle = Bundle.open(path)
        manifest = bundle.manifest
    except FastattrError as exc:
        report.add("structure", False, str(exc))
        return report
    shards = f" in index/ and {len(manifest.shards)} shards" if manifest.shards else ""
    report.add("structure", True, f"schema {manifest.schema}, backend {_backends(manifest)}, {manifest.items} items"
               + shards)

    bad = [f"{rel} missing" if problem == "missing" else f"{rel} changed (checksum mismatch)"
           for rel, problem in changed_files(path, manifest.files)]
    listed = set(manifest.files)
    extra = [p.relative_to(path).as_posix() for p in path.rglob("*")
             if p.is_file() and p.name != Bundle.MANIFEST and not p.name.startswith(".")
             and p.relative_to(path).as_posix() not in listed]
    bad += [f"{rel} not listed in bundle.yaml" for rel in extra]
    if not report.add("checksums", not bad, "; ".join(bad) or f"{len(listed)} files match bundle.yaml"):
        return report  # nothing below can be trusted

    try:
        encoder = bundle.encoder(device="cpu")
        fingerprint_ok = encoder.fingerprint == manifest.encoder.fingerprint
        report.add("encoder", fingerprint_ok,
                   f"fingerprint {encoder.fingerprint[:19]}... "
                   + ("matches" if fingerprint_ok else f"!= bundle's {manifest.encoder.fingerprint[:19]}... "
                      "(encoder weights or spec changed since the build)"))
    except FastattrError as exc:
        report.add("encoder", False, str(exc))
        return report

    try:
        index = bundle.index()
    except FastattrError as exc:  # e.g. a shard built with another encoder
        report.add("index", False, str(exc))
        return report
    vectors = bundle.vectors()
    accepted = "accepted manifest rows" + (f" less {manifest.dropped} compacted away" if manifest.dropped else "")
    with bundle.items() as store:
        counts = {"bundle.yaml": manifest.items, "index": len(index), "items store": store.count(),
                  "vectors.npy": len(vectors), accepted: manifest.manifest.accepted - manifest.dropped}
        report.add("counts", len(set(counts.values())) == 1, ", ".join(f"{k} {v}" for k, v in counts.items()))
        dims = {"bundle.yaml": manifest.dim, "encoder": encoder.dim, "vectors.npy": vectors.shape[1]}
        report.add("dimensions", len(set(dims.values())) == 1, ", ".join(f"{k} {v}" for k, v in dims.items()))
        if deep and report.ok:
            _deep_checks(report, path, bundle, encoder, index, store, sample, min_recall, seed)
    return report


def _backends(manifest) -> str:
    """The backend of index/, and of the shards where another."""
    others = sorted({shard.backend for shard in manifest.shards} - {manifest.backend})
    return manifest.backend + "".join(f" + {backend}" for backend in others)


def _deep_checks(report: Report, path: Path, bundle: Bundle, encoder: Encoder, index, store: ItemStore,
                 sample: int, min_recall: float, seed: int) -> None:
    from .manifest import ImageRef, ManifestRow, RowRejected

    keys = store.sample_keys(sample, seed=seed)
    items = store.get(keys)
    images, texts, failures = [], [], []
    for key in keys:
        item = items[key]
        values = asdict(item) | {"image": ImageRef.parse(item.image, base=path.resolve())}
        row = ManifestRow(**values, row=key + 1, source=f"items.sqlite:key {key}")
        try:
            images.append(row.load_image())
            texts.append(item.caption)
        except RowRejected as exc:
            failures.append(f"{item.id}: {exc}")
    if not report.add("source images", not failures, "; ".join(failures[:5]) or f"{len(keys)} sampled images readable"):
        return
    fresh = encoder.embed(images, texts, role="item")
    found, _ = index.search(fresh, 1)
    misses = [items[k].id for k, top in zip(keys, found[:, 0]) if top != k]
    report.figures["self_found_first"] = 1 - len(misses) / len(keys)
    report.add("self-retrieval", not misses,
               f"{len(keys) - len(misses)}/{len(keys)} re-embedded items find themselves first"
               + (f"; misses: {', '.join(misses[:5])}" if misses else ""))

    all_vectors, row_keys = np.asarray(bundle.vectors(), dtype=np.float32), bundle.vector_keys()
    queries = all_vectors[np.searchsorted(row_keys, keys)]
    exact = row_keys[np.argsort(-(queries @ all_vectors.T), axis=1)[:, :10]]
    approx, _ = index.search(queries, 10)
    recall = recall_at_k(approx, exact, 10)
    report.figures["recall_at_10"] = recall
    report.add("recall@10", recall >= min_recall,
               f"{_backends(bundle.manifest)} vs exact search over every vector: {recall:.3f} (minimum {min_recall})")
