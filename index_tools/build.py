"""``fastattr index build`` / ``add`` / ``compact``: training manifest -> verified index bundle.

The build streams the manifest, embeds accepted rows in chunks and checkpoints each chunk
(``<out>.partial/chunks/``) so a killed build resumes without redoing or duplicating work.
Under ``accelerate launch`` every process embeds a disjoint set of chunks; the main process
merges them. With ``--ray`` this process hands the chunks to Ray actors instead (``ray_build.py``;
on a multi-node cluster ``<out>.partial`` must be on storage every node shares). The finished
bundle appears atomically (temp directory + rename). ``add`` writes the new rows' vectors into a new
index shard beside the others; ``compact`` merges the shards into one index and deletes opted-out
items for good.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from fastattr_hook import __version__
from fastattr_hook.bundle import (SCHEMA, Bundle, BundleManifest, EncoderInfo, ManifestInfo, ShardInfo, ShareRule,
                                  read_manifest)
from fastattr_hook.config import read_yaml
from fastattr_hook.encoder import Encoder, relocated_spec
from fastattr_hook.errors import FastattrError
from fastattr_hook.files import atomic_dir, atomic_open, atomic_write_text, writer_lock
from fastattr_hook.items import Item, ItemStore
from fastattr_hook.search import VectorIndex, create_index, default_index, tune_search

from .manifest import ImageRef, ManifestRow, ManifestValidator, RowRejected, iter_manifest, manifest_fingerprint

log = logging.getLogger(__name__)

CALIBRATION_RATIO = 10.0  # a typical query's 1st credit gets this many times the share of its 10th


@dataclass
class BuildOptions:
    backend: str | None = None  # None: chosen by size (exact for small sets)
    backend_params: dict | None = None
    chunk_size: int = 1024
    num_workers: int = 0
    thumbnail_size: int = 64  # 0 = store no thumbnails
    device: str | None = None
    progress: bool = True
    feature_cache: str | None = None  # a FeatureStore folder: backbone features computed once (see features.py)
    ray: bool = False  # embed on Ray actors (ray_build.py); `build` only
    ray_address: str | None = None  # with ray: HOST:PORT of a cluster; None: $RAY_ADDRESS, else a local Ray
    ray_workers: int | None = None  # with ray: actors; None: one per GPU of the cluster, else one per CPU


class _ChunkDataset(torch.utils.data.Dataset):
    """Loads and preprocesses one chunk's rows; a bad image becomes a rejection, not a crash."""

    def __init__(self, rows: list[tuple[int, ManifestRow]], encoder: Encoder, thumbnail_size: int):
        self.rows, self.encoder, self.thumbnail_size = rows, encoder, thumbnail_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        seq, row = self.rows[i]
        try:
            image = row.load_image()
        except RowRejected as exc:
            return seq, None, {"reason": exc.reason, "message": str(exc)}
        thumb = b""
        if self.thumbnail_size:
            small = image.copy()
            small.thumbnail((self.thumbnail_size, self.thumbnail_size))
            buffer = io.BytesIO()
            small.save(buffer, format="PNG")
            thumb = buffer.getvalue()
        return seq, self.encoder.preprocess(image, row.caption), thumb


def _collate(batch):
    return batch


def distributed():
    """(process index, process count, barrier, device) under accelerate launch, else (0, 1, no-op, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes, state.wait_for_everyone, state.device
    return 0, 1, lambda: None, None


def build_bundle(manifest_path: str | Path, encoder_spec: str | Path, out: str | Path,
                 options: BuildOptions | None = None, resume: bool = False, name: str | None = None) -> BundleManifest | None:
    """Build a bundle at ``out``; returns its manifest (None on non-main processes)."""
    options = options or BuildOptions()
    manifest_path, encoder_spec, out = Path(manifest_path), Path(encoder_spec), Path(out).resolve()
    rank, world, barrier, device = distributed()
    work = out.with_name(out.name + ".partial")
    pool = None
    if options.ray:
        if world > 1:
            raise FastattrError("--ray and accelerate launch / torchrun both split the chunks across workers; "
                                "run `fastattr index build --ray ...` as one plain process")
        if options.device:
            raise FastattrError(f"--device {options.device} does not apply with --ray: each Ray worker uses the "
                                "GPU Ray gives it, else CPU; leave out --device")
        from .ray_build import RayChunkPool

        # paths as every worker sees them (workers have another working directory)
        manifest_path, encoder_spec = manifest_path.resolve(), encoder_spec.resolve()
        if options.feature_cache:
            options = dataclasses.replace(options, feature_cache=str(Path(options.feature_cache).resolve()))
        pool = RayChunkPool(encoder_spec, work, options)  # checks Ray and the address before the encoder loads
    # with --ray this process only checks the fingerprint and dimension: on CPU, the GPUs are the workers'
    encoder = Encoder.from_yaml(encoder_spec, device="cpu" if options.ray else options.device or device)
    if out.exists():
        done = read_manifest(out) if resume and (out / Bundle.MANIFEST).is_file() else None
        if done and done.manifest.fingerprint == manifest_fingerprint(manifest_path) and \
                done.encoder.fingerprint == encoder.fingerprint:
            log.info("%s: already complete (same manifest and encoder); nothing to resume", out)
            if rank == 0:  # killed after the swap, before its work folder went
                _delete_work(work)
            return done if rank == 0 else None
        raise FastattrError(f"{out} already exists; choose another --out, or use `fastattr index add` to append")
    state = {"manifest": str(manifest_path.resolve()), "manifest_fingerprint": manifest_fingerprint(manifest_path),
             "encoder_fingerprint": encoder.fingerprint, "chunk_size": options.chunk_size}
    with pool or contextlib.nullcontext():
        _prepare_work_dir(work, state, resume, rank, barrier)
        accepted = _embed_manifest(manifest_path, encoder, work, options, rank, world, seen_ids=(), pool=pool)
    barrier()
    if rank != 0:
        return None
    if not accepted:
        raise FastattrError(f"{manifest_path}: no usable row, so no bundle was made; the reasons per row are in "
                            f"{work / 'rejects-manifest.jsonl'} (an empty or header-only manifest has none)")
    vectors, items, rejects = _merge_chunks(work, accepted)
    backend, params = (options.backend, options.backend_params) if options.backend else default_index(len(vectors))
    with writer_lock(out, keep=False), atomic_dir(out) as tmp:
        if out.exists():  # checked again, under the lock: two builds into one --out must not swap in turn
            raise FastattrError(f"{out}: another build wrote it while this one embedded; choose another --out")
        index = create_index(backend, encoder.dim, params, n_items_hint=len(vectors))
        save_yaml_dict(relocated_spec(encoder.spec, encoder_spec.parent.resolve(), out), tmp / Bundle.ENCODER)
        recall = _append(tmp, tmp / Bundle.INDEX, index, np.zeros(0, np.int64),
                         np.zeros((0, encoder.dim), np.float32), vectors, items, rejects, out,
                         tune=index.search_setting not in (options.backend_params or {}))
        manifest = BundleManifest(
            schema=SCHEMA, name=name or out.name,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), tool_version=__version__,
            encoder=EncoderInfo(**{k: v for k, v in encoder.describe().items()}),
            backend=backend, backend_params=dict(index.params), metric="cos", dim=encoder.dim,
            dtype=index.storage, items=len(vectors), recall_at_10=round(recall, 4),
            manifest=ManifestInfo(path=os.path.relpath(manifest_path.resolve(), out), fingerprint=state["manifest_fingerprint"],
                                  accepted=len(vectors), rejected=len(rejects)),
            share_rule=ShareRule("softmax", *calibrate_temperature(index, vectors)))
        Bundle(tmp, manifest).finish()
    _delete_work(work)
    return manifest


# What add and compact read back into the files they write anew (vectors.npy with the old rows, ...).
REWRITTEN = (Bundle.ITEMS, Bundle.VECTORS, Bundle.KEYS, Bundle.REJECTS)


def add_to_bundle(bundle_dir: str | Path, manifest_path: str | Path, options: BuildOptions | None = None,
                  resume: bool = False) -> BundleManifest:
    """Append a manifest's rows to an existing bundle (same encoder) as a new index shard; ids already
    present are rejected. The existing indexes are neither read nor rewritten."""
    options = options or BuildOptions()
    if options.ray:
        raise FastattrError("--ray is for `fastattr index build` only; `index add` embeds in this process")
    bundle_dir, manifest_path = Path(bundle_dir).resolve(), Path(manifest_path)
    bundle = Bundle.open(bundle_dir)
    current = bundle.manifest
    encoder = bundle.encoder(device=options.device)
    if encoder.fingerprint != current.encoder.fingerprint:
        raise FastattrError(f"{bundle_dir}: encoder files changed since the bundle was built; cannot append")
    work = bundle_dir.with_name(bundle_dir.name + ".add.partial")
    state = {"manifest": str(manifest_path.resolve()), "manifest_fingerprint": manifest_fingerprint(manifest_path),
             "encoder_fingerprint": encoder.fingerprint, "chunk_size": options.chunk_size,
             "bundle": current.fingerprint}
    shutil.rmtree(_deleting(work), ignore_errors=True)  # what a kill while _delete_work ran left
    if resume and _add_landed(work, state, bundle):
        log.info("%s: this add was committed before it was stopped; removing its work folder %s", bundle_dir, work)
        _delete_work(work)
        return current
    _prepare_work_dir(work, state, resume, 0, lambda: None)
    with bundle.items() as store:
        seen = list(store.ids())
        # every accepted row got the next key, compacted-away ones included: a key is never reused, so an
        # old credit's key never names another item
        first_key = max(store.max_key() + 1, current.manifest.accepted)
    accepted = _embed_manifest(manifest_path, encoder, work, options, 0, 1, seen_ids=seen)
    if not accepted:  # nothing new: the bundle stays exactly as it was
        rejects_file = work / "rejects-manifest.jsonl"
        rejected = rejects_file.read_text().splitlines() if rejects_file.is_file() else []
        _delete_work(work)
        log.warning("%s: no new row to add, the bundle is unchanged (%d rows rejected%s)", manifest_path,
                    len(rejected), f", first: {json.loads(rejected[0]).get('reason')}" if rejected else "")
        return current
    vectors, items, rejects = _merge_chunks(work, accepted)
    backend, params = (current.backend, current.backend_params) if current.backend != "exact" \
        else default_index(len(vectors))
    with Bundle.change(bundle_dir, reads=REWRITTEN) as staged:
        if staged.manifest.manifest.accepted != current.manifest.accepted:  # removals and compaction keep keys
            raise FastattrError(f"{bundle_dir}: another `fastattr index add` changed it while this one embedded, so "
                                f"this add's keys are taken; delete {work} and run it again")
        current = staged.manifest
        shard = create_index(backend, encoder.dim, params, n_items_hint=len(vectors))
        name = staged.new_shard_name()
        _append(staged.path, staged.shard_path(name), shard, staged.vector_keys(), staged.vectors(), vectors, items,
                staged.rejects() + rejects, bundle_dir, first_key=first_key)
        current.shards.append(ShardInfo(
            name=name, backend=backend, backend_params=dict(shard.params), dtype=shard.storage, items=len(vectors),
            first_key=first_key, last_key=first_key + len(vectors) - 1, dim=encoder.dim, metric=current.metric,
            encoder=encoder.fingerprint))
        current.items += len(vectors)
        current.manifest.accepted += len(vectors)
        current.manifest.rejected += len(rejects)
    _delete_work(work)
    return current


def _add_landed(work: Path, state: dict, bundle: Bundle) -> bool:
    """Whether a stopped add's ``work`` is already in ``bundle``: it was stopped after its change was
    committed and before its work folder was deleted. Then the bundle differs from the one the work
    started on, and every row the work embedded is in it."""
    if not (work / "state.yaml").is_file():
        return False
    if _changed_keys(read_work_state(work), state) != ["bundle"]:
        return False
    ids = [record["id"] for path in sorted((work / "chunks").glob("*.jsonl"))
           for record in map(json.loads, path.read_text().splitlines()) if "reject" not in record]
    with bundle.items() as store:
        present = set(store.ids())
    return bool(ids) and present.issuperset(ids)


@dataclass
class Compaction:
    """What `fastattr index compact` did."""

    changed: bool
    items_before: int
    indexes_before: int  # index/ and its shards
    deleted: int  # removed items deleted for good
    items_after: int
    backend: str  # of the one index left


def compact_bundle(bundle_dir: str | Path, backend: str | None = None, backend_params: dict | None = None
                   ) -> Compaction:
    """Replace index/ and every shard by one index over the items not removed, and delete the removed
    items for good (their vectors, and their rows with caption and thumbnail), so that an opt-out is
    eventually a real deletion. Keys are kept: credits already given still name the same items.

    The backend is ``backend``, else the bundle's (chosen by size again when it is exact); params
    override the bundle's when the backend stays. Nothing removed, no shard, no backend asked: no-op.
    """
    bundle = Bundle.open(bundle_dir)
    current = bundle.manifest
    with bundle.items() as store:
        removed = len(store.removed_keys())
    result = Compaction(changed=False, items_before=current.items, indexes_before=1 + len(current.shards),
                        deleted=0, items_after=current.items, backend=current.backend)
    if not removed and not current.shards and backend is None and backend_params is None:
        with writer_lock(bundle.path):  # nothing to change, but like every writer it clears what a killed one left
            return result
    with Bundle.change(bundle.path, reads=REWRITTEN) as staged:
        current, tmp = staged.manifest, staged.path
        with staged.items(writable=True) as store:  # the staged copy: items, vectors and index stay one snapshot
            removed_keys = np.array(sorted(store.removed_keys()), dtype=np.int64)
            keys = staged.vector_keys()
            keep = ~np.isin(keys, removed_keys)
            if not keep.any():
                raise FastattrError(f"{bundle.path}: every item is removed, so compacting would leave an empty "
                                    "bundle; delete the bundle instead")
            keys, vectors = keys[keep], np.asarray(staged.vectors()[keep], dtype=np.float32)
            if backend is None:
                backend, chosen = (current.backend, current.backend_params) if current.backend != "exact" \
                    else default_index(len(keys))
            else:
                chosen = current.backend_params if backend == current.backend else {}
            params = {**chosen, **(backend_params or {})}
            index = create_index(backend, current.dim, params, n_items_hint=len(keys))
            index.add(keys, vectors)
            if index.lossy:
                index.rerank_with(vectors, keys)
            recall = tune_search(index, keys, vectors, tune=index.search_setting not in (backend_params or {}))
            for folder in (Bundle.INDEX, Bundle.SHARDS):
                shutil.rmtree(tmp / folder, ignore_errors=True)
            (tmp / Bundle.INDEX).mkdir()
            index.save(tmp / Bundle.INDEX)
            _write_vectors(tmp, keys, vectors)
            deleted = store.delete_removed()
        current.backend, current.backend_params, current.dtype = backend, dict(index.params), index.storage
        current.recall_at_10 = round(recall, 4)
        current.items, current.dropped, current.shards = len(keys), current.dropped + deleted, []
    return dataclasses.replace(result, changed=True, deleted=deleted, items_after=len(keys), backend=backend)


def _append(folder: Path, index_dir: Path, index: VectorIndex, old_keys: np.ndarray, old_vectors: np.ndarray,
            vectors: np.ndarray, items: list[tuple[Item, bytes | None]], rejects: list[dict], final_dir: Path,
            first_key: int = 0, tune: bool = True) -> float:
    """The write sequence build and add share, into the temporary ``folder`` that replaces the bundle
    at ``final_dir``: the new vectors into the new ``index`` (its search setting tuned to
    ``RECALL_TARGET`` unless ``tune`` is false), saved in ``index_dir`` (index/ for a build, a shard's
    folder for an add), the vectors copy, the items store and the rejects file. Returns the index's
    recall@10 against exact search."""
    keys = np.arange(first_key, first_key + len(vectors), dtype=np.int64)
    index.add(keys, vectors)
    if index.lossy:  # tuned as it is served: re-ranked on the float32 copy (Bundle.index)
        index.rerank_with(vectors, keys)
    recall = tune_search(index, keys, vectors, tune=tune)
    index_dir.mkdir(parents=True)
    index.save(index_dir)
    # The vectors copy is rewritten whole, the old rows read back from the mapped file: linear in the
    # bundle's size, as are the checksums that finish() computes anyway.
    _write_vectors(folder, np.concatenate([old_keys, keys]), np.concatenate([old_vectors, vectors]))
    with ItemStore(folder / Bundle.ITEMS, readonly=False) as store:
        store.insert(_stored(keys, items, final_dir))
    _write_rejects(folder / Bundle.REJECTS, rejects)
    return recall


def _deleting(work: Path) -> Path:
    return work.with_name(f".{work.name}.deleting")


def _delete_work(work: Path) -> None:
    """Delete the work folder of a build or add that is done. It is renamed first (one atomic step), so a
    kill while it is deleted leaves no half folder that a --resume would read as unfinished work (a half
    deleted add's folder was refused: its bundle had changed and its rows were gone); the next
    `build --resume` or `add` of that bundle deletes the renamed rest."""
    shutil.rmtree(_deleting(work), ignore_errors=True)
    if work.exists():
        os.replace(work, _deleting(work))
    shutil.rmtree(_deleting(work), ignore_errors=True)


def save_yaml_dict(data: dict, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def read_work_state(work: Path) -> dict:
    """An unfinished build's ``state.yaml`` (what it was started with); a damaged one is an error naming it."""
    path, fix = work / "state.yaml", f"delete {work} to start the build over"
    state = read_yaml(path, fix)
    if not isinstance(state, dict) or not all(key in state for key in ("chunk_size", "encoder_fingerprint")):
        raise FastattrError(f"{path}: not a build state (no chunk_size / encoder_fingerprint); {fix}")
    return state


def _changed_keys(previous: dict, state: dict) -> list[str]:
    """The keys of an unfinished build's ``state`` whose value differs from what it was started with."""
    return [key for key, value in state.items() if previous.get(key) != value]


def _prepare_work_dir(work: Path, state: dict, resume: bool, rank: int, barrier) -> None:
    state_file = work / "state.yaml"
    if rank == 0:
        if work.exists() and not resume:
            raise FastattrError(f"{work}: an unfinished build is there; pass --resume to continue it, "
                                "or delete that directory to start over")
        if resume and state_file.is_file():
            previous = read_work_state(work)
            changed = _changed_keys(previous, state)
            if changed:
                key = changed[0]
                raise FastattrError(f"{work}: cannot resume: '{key}' changed since the build started "
                                    f"({previous.get(key)!r} -> {state[key]!r}); delete {work} to start over")
        (work / "chunks").mkdir(parents=True, exist_ok=True)
        save_yaml_dict(state, state_file)
    barrier()


def _embed_manifest(manifest_path: Path, encoder: Encoder, work: Path, options: BuildOptions, rank: int,
                    world: int, seen_ids, pool=None) -> int:
    """Embed every chunk this process owns that is not on disk yet (in this process, or by the Ray
    actors of ``pool``); returns rows accepted so far."""
    rejects_path = work / "rejects-manifest.jsonl" if rank == 0 else None
    if rejects_path:
        rejects_path.unlink(missing_ok=True)  # re-derived on every pass: structure checks are cheap

    def flush(chunk_index: int, rows: list[tuple[int, ManifestRow]]) -> None:
        if chunk_index % world != rank or (work / "chunks" / f"{chunk_index:06d}.npz").is_file():
            bar.update(len(rows))
        elif pool is not None:
            bar.update(pool.submit(chunk_index, rows))  # counts the chunks that finished while it waited
        else:
            _embed_chunk(chunk_index, rows, encoder, work, options)
            bar.update(len(rows))

    bar = tqdm(desc=f"embed{f' [{rank}/{world}]' if world > 1 else ''}", unit="img", disable=not options.progress)
    seq, chunk = 0, []
    with ManifestValidator(rejects_path, seen_ids=seen_ids) as validator:
        for item in iter_manifest(manifest_path):
            row = validator.check(item)
            if row is None:
                continue
            chunk.append((seq, row))
            seq += 1
            if len(chunk) == options.chunk_size:
                flush((seq - 1) // options.chunk_size, chunk)
                chunk = []
        if chunk:
            flush((seq - 1) // options.chunk_size, chunk)
    if pool is not None:
        bar.update(pool.drain())
    bar.close()
    return seq


def _embed_chunk(chunk_index: int, rows: list[tuple[int, ManifestRow]], encoder: Encoder, work: Path,
                 options: BuildOptions) -> None:
    loader = torch.utils.data.DataLoader(_ChunkDataset(rows, encoder, options.thumbnail_size),
                                         batch_size=encoder.spec.batch_size, num_workers=options.num_workers,
                                         collate_fn=_collate)
    by_seq = dict(rows)
    records, vectors = [], []
    store = None
    if options.feature_cache:
        from .features import FeatureStore, pair_key

        store = FeatureStore(options.feature_cache, encoder)
    for batch in loader:
        good = [(seq, inputs, thumb) for seq, inputs, thumb in batch if inputs is not None]
        for seq, inputs, info in batch:
            if inputs is None:
                row = by_seq[seq]
                records.append({"seq": seq, "reject": {"row": row.row, "source": row.source, "id": row.id, **info}})
        if good and store is None:
            vectors.append(encoder.embed_prepared([torch.stack(x) for x in zip(*(g[1] for g in good))]))
        elif good:  # backbone features from the store, computed and stored where missing
            keys = [pair_key(by_seq[seq].sha256 or by_seq[seq].id, by_seq[seq].caption) for seq, _, _ in good]
            missing = [n for n, key in enumerate(keys) if key not in store]
            if missing:
                inputs = [torch.stack(x) for x in zip(*(good[n][1] for n in missing))]
                store.put([keys[n] for n in missing], encoder.features_prepared(inputs).cpu().numpy())
            vectors.append(encoder.embed_features(store.get(keys)))
        if good:
            for seq, _, thumb in good:
                records.append({"seq": seq, **dataclasses.asdict(by_seq[seq].item()),
                                "thumbnail": base64.b64encode(thumb).decode()})
    stem = work / "chunks" / f"{chunk_index:06d}"
    atomic_write_text(stem.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    with atomic_open(stem.with_suffix(".npz")) as f:  # written last: its presence marks the chunk done
        np.savez(f, vectors=np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), np.float32))


def _merge_chunks(work: Path, accepted: int) -> tuple[np.ndarray, list[tuple[Item, bytes | None]], list[dict]]:
    """All chunk outputs in manifest order: (vectors, (item, thumbnail) pairs, rejects incl. manifest-level ones)."""
    vectors, items, rejects = [], [], []
    chunk_size = read_work_state(work)["chunk_size"]
    for chunk_index in range(math.ceil(accepted / chunk_size)):
        stem = work / "chunks" / f"{chunk_index:06d}"
        if not stem.with_suffix(".npz").is_file():
            raise FastattrError(f"{stem}.npz missing: a build process did not finish its chunks; rerun with --resume")
        vectors.append(np.load(stem.with_suffix(".npz"))["vectors"])
        for line in stem.with_suffix(".jsonl").read_text().splitlines():
            record = json.loads(line)
            if "reject" in record:
                rejects.append(record["reject"])
            else:
                del record["seq"]
                thumbnail = base64.b64decode(record.pop("thumbnail")) or None
                items.append((Item(**record), thumbnail))
    manifest_rejects = work / "rejects-manifest.jsonl"
    if manifest_rejects.is_file():
        rejects += [json.loads(line) for line in manifest_rejects.read_text().splitlines() if line]
    rejects.sort(key=lambda r: r["row"])
    dim = vectors[0].shape[1] if vectors else 0
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), items, rejects


def _stored(keys: np.ndarray, items: list[tuple[Item, bytes | None]], bundle_dir: Path
            ) -> Iterator[tuple[Item, bytes | None]]:
    """The items keyed as the store keeps them; image references become relative to the bundle so
    trees can move."""
    for key, (item, thumbnail) in zip(keys, items):
        image = str(ImageRef.parse(item.image).relative_to(bundle_dir))
        yield dataclasses.replace(item, key=int(key), image=image), thumbnail


def _write_vectors(bundle_dir: Path, keys: np.ndarray, vectors: np.ndarray) -> None:
    """A float32 copy of every vector in key order: the source for re-indexing and recall checks; and
    their keys (keys.npy) where rows are no longer at their key, after compaction dropped some."""
    with atomic_open(bundle_dir / Bundle.VECTORS) as f:
        np.save(f, vectors.astype(np.float32))
    if np.array_equal(keys, np.arange(len(keys))):
        (bundle_dir / Bundle.KEYS).unlink(missing_ok=True)
    else:
        with atomic_open(bundle_dir / Bundle.KEYS) as f:
            np.save(f, keys.astype(np.int64))


def _write_rejects(path: Path, rejects: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))


def calibrate_temperature(index, vectors: np.ndarray, samples: int = 256, seed: int = 0) -> tuple[float, str]:
    """Share temperature T so that a typical query's 1st credit gets 10x the share of its 10th.

    Queries are a sample of the bundle's own items (self-match dropped): T = median(s1 - s10) / ln 10.
    """
    k = min(10, len(vectors) - 1)
    if k < 2:
        return 0.05, "default (too few items to calibrate)"
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(vectors), size=min(samples, len(vectors)), replace=False)]
    _, scores = index.search(sample, k + 1)
    gaps = scores[:, 1] - scores[:, k]
    temperature = max(float(np.median(gaps)) / math.log(CALIBRATION_RATIO), 1e-4)
    return temperature, (f"median over {len(sample)} items of (s1 - s{k}) / ln {CALIBRATION_RATIO:g}: "
                         f"the 1st credit of a typical query gets {CALIBRATION_RATIO:g}x the share of the {k}th")
