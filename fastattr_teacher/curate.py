"""Two-stage curation of distillation data (method.md section 3) as resumable, shardable jobs.

One job YAML drives four steps, each a ``fastattr teacher`` command:

``curate``  plan the queries ((held-out prompt, seed) pairs), generate their images with the model's
            own pipeline, stage 1: each train query's K nearest items in the baseline bundle,
            stage 2: a seeded random M of them; test queries get the whole training set -> plan.npz
``fisher``  the Fisher (once, saved) and the pre-training losses of every item the plan scores
``score``   one teacher job per query, each result in its own ``queries/<qid>.npz``
``merge``   one distillation dataset (``merge.py``)

Every file is written atomically and existing outputs are skipped, so any step can be killed and
rerun. Under ``accelerate launch`` process r of w owns queries r, r+w, r+2w, ... of the plan: the
shares are disjoint whatever has been done already, and every result depends only on its query,
so a run over any number of processes, interrupted or not, gives the same bits.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fastattr_hook import __version__
from fastattr_hook.files import atomic_open, atomic_path, claimed
from fastattr_hook.config import from_dict, load_yaml, to_dict
from fastattr_hook.errors import FastattrError
from index_tools.build import distributed
from index_tools.manifest import manifest_fingerprint

from fastattr_hook.pipeline import load_pipeline

from .adapter import TrainingItem, UNetAdapter, read_training_items
from .config import TeacherConfig
from .fisher import FISHER_FIELDS
from .preconditioner import compute_preconditioner, load_preconditioner
from .score import item_flips, item_gradients, pretrain_losses, score_query

log = logging.getLogger(__name__)

SANDBOX_LAYOUT = {"pipeline": "pipeline", "manifest": "data/manifest.jsonl", "prompts": "data/query_prompts.jsonl",
                  "bundle": "bundle"}
PATH_KEYS = ("out", "sandbox", *SANDBOX_LAYOUT)
LOSS_CHUNK = 1024  # pre-training losses are checkpointed to the cache every this many items


@dataclass(frozen=True)
class CurationJob:
    """One curation run. Relative paths are relative to the YAML file; ``sandbox`` supplies
    whichever of pipeline/manifest/prompts/bundle are not given (its own files)."""

    out: str  # folder for the plan, query images, Fisher, per-query results and the dataset
    sandbox: str | None = None
    pipeline: str | None = None  # local diffusers StableDiffusionPipeline folder (the model attributed)
    manifest: str | None = None  # the training manifest the model was trained on and the bundle indexes
    prompts: str | None = None  # held-out prompts: JSONL objects with "prompt", or one prompt per line
    bundle: str | None = None  # baseline index bundle (untuned encoder) for stage 1
    train_queries: int = 100
    test_queries: int = 10
    candidates: int = 1000  # K: stage-1 neighbours of each train query
    scored: int = 100  # M: the random subset of the K the teacher scores (about 0.1 K keeps accuracy)
    seed: int = 0  # prompt order, generation seeds (seed + query number) and the stage-2 draws
    steps: int = 25  # sampler steps of the query images
    guidance_scale: float = 4.0
    device: str | None = None  # default: accelerate's device for the process, else cuda when available
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Extra teacher runs of the test queries, name -> the teacher keys that differ: another seed
    # measures the teacher's agreement with itself (the ceiling of any student), another
    # preconditioner compares AbU+ with AbU.
    variants: dict[str, dict] = field(default_factory=dict)
    # Variants also run on the train queries: a second teacher run of a query, averaged into its
    # training label (`distill train` key 'label_variants'), so that it carries less of one seed's error.
    # Adding one later keeps every finished result.
    train_variants: list[str] = field(default_factory=list)

    @property
    def plan_path(self) -> Path:
        return Path(self.out) / "plan.npz"

    @property
    def fisher_path(self) -> Path:
        return Path(self.out) / "fisher.safetensors"

    @property
    def cache_dir(self) -> Path:
        return Path(self.out) / "cache"

    def image_path(self, qid: str) -> Path:
        return Path(self.out) / "images" / f"{qid}.png"

    def result_path(self, qid: str, variant: str | None = None) -> Path:
        return Path(self.out) / "queries" / (f"{qid}@{variant}.npz" if variant else f"{qid}.npz")

    def teacher_config(self, variant: str | None = None) -> TeacherConfig:
        if variant is None:
            return self.teacher
        return from_dict(TeacherConfig, {**to_dict(self.teacher), **self.variants[variant]}, source="job",
                         prefix=f"variants.{variant}.")

    def fisher_path_for(self, variant: str | None = None) -> Path:
        """A variant shares the main Fisher unless it changes what the Fisher depends on."""
        config = self.teacher_config(variant)
        if all(getattr(config, f) == getattr(self.teacher, f) for f in FISHER_FIELDS):
            return self.fisher_path
        return Path(self.out) / f"fisher@{variant}.safetensors"


def load_job(path: str | Path) -> CurationJob:
    """Read and check a job YAML: unknown keys, wrong types, missing inputs and impossible counts
    are errors naming the file and the key."""
    path = Path(path)
    job = load_yaml(CurationJob, path)
    base = path.parent.resolve()
    paths = {key: str((base / getattr(job, key)).resolve()) for key in PATH_KEYS if getattr(job, key) is not None}
    if job.sandbox:
        for key, rel in SANDBOX_LAYOUT.items():
            paths.setdefault(key, str(Path(paths["sandbox"]) / rel))
    job = dataclasses.replace(job, **paths)
    # The manifest may be a glob of tar shards: index_tools checks it when it is read.
    checks = {"pipeline": "model_index.json", "bundle": "bundle.yaml", "prompts": "", "manifest": None}
    for key, inner in checks.items():
        value = getattr(job, key)
        if value is None:
            raise FastattrError(f"{path}: key '{key}' is required (or give 'sandbox')")
        if inner is not None and not (Path(value) / inner).exists():
            raise FastattrError(f"{path}: key '{key}': {Path(value) / inner} not found")
    for key in ("train_queries", "test_queries"):
        if getattr(job, key) < 0:
            raise FastattrError(f"{path}: key '{key}' must be >= 0")
    if job.train_queries + job.test_queries < 1:
        raise FastattrError(f"{path}: keys 'train_queries' + 'test_queries' must ask for at least one query")
    if not 1 <= job.scored <= job.candidates:
        raise FastattrError(f"{path}: keys 'scored' (M={job.scored}) and 'candidates' (K={job.candidates}) "
                            f"need 1 <= M <= K")
    if job.steps < 1:
        raise FastattrError(f"{path}: key 'steps' must be >= 1")
    for name in job.variants:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise FastattrError(f"{path}: key 'variants.{name}': names may use letters, digits, '_' and '-' only")
        try:
            job.teacher_config(name)
        except FastattrError as exc:
            raise FastattrError(f"{path}: {exc}") from None
    for name in job.train_variants:
        if name not in job.variants:
            raise FastattrError(f"{path}: key 'train_variants': '{name}' is not a name under 'variants' "
                                f"({sorted(job.variants)}); define it there first")
    return job


def settings(job: CurationJob) -> dict:
    """What the results depend on besides the input files (checked by fingerprint) and paths
    (``train_variants`` only asks for more results)."""
    return {k: v for k, v in to_dict(job).items() if k not in (*PATH_KEYS, "device", "train_variants")}


# -- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    qid: str
    split: str  # "train" (stage-2 candidates) or "test" (the whole training set)
    prompt: str
    seed: int  # generation seed of the query image
    candidates: np.ndarray  # positions in the plan's training table


@dataclass(frozen=True)
class Plan:
    """The queries and what each is scored against; ``meta`` says how it was made."""

    meta: dict
    train_keys: np.ndarray  # bundle key of each training item the teacher may score, key order
    train_ids: np.ndarray
    queries: list[Query]

    def save(self, path: Path) -> None:
        offsets = np.cumsum([0] + [len(q.candidates) for q in self.queries])
        with atomic_open(path, "wb") as f:  # compressed: whole-set plans hold N positions per query
            np.savez_compressed(
                f, meta=np.array(json.dumps(self.meta)), train_keys=self.train_keys, train_ids=self.train_ids,
                query_id=np.array([q.qid for q in self.queries]), split=np.array([q.split for q in self.queries]),
                prompt=np.array([q.prompt for q in self.queries]),
                seed=np.array([q.seed for q in self.queries], dtype=np.int64), cand_offsets=offsets.astype(np.int64),
                cand_pos=np.concatenate([q.candidates for q in self.queries]).astype(np.int32))  # < 2^31 items

    @classmethod
    def load(cls, path: Path) -> "Plan":
        with np.load(path, allow_pickle=False) as z:
            off, pos = z["cand_offsets"], z["cand_pos"]
            pos = pos.astype(np.int64)
            queries = [Query(str(qid), str(split), str(prompt), int(seed), pos[off[i]:off[i + 1]])
                       for i, (qid, split, prompt, seed) in enumerate(zip(z["query_id"], z["split"], z["prompt"],
                                                                            z["seed"]))]
            return cls(json.loads(str(z["meta"])), z["train_keys"], z["train_ids"], queries)


def load_plan(job: CurationJob, config_path: str | Path = "JOB.yaml") -> Plan:
    """The job's plan, refusing one made with other settings (its results would not mix)."""
    if not job.plan_path.is_file():
        raise FastattrError(f"{job.plan_path}: no plan yet; run `fastattr teacher curate --config {config_path}` first")
    plan = Plan.load(job.plan_path)
    recorded, current = dict(plan.meta["settings"]), settings(job)
    # Settings added since the plan was made hold their defaults there.
    recorded["teacher"] = {**to_dict(TeacherConfig()), **recorded.get("teacher", {})}
    recorded["variants"] = dict(recorded.get("variants", {}))
    added = {name: value for name, value in current["variants"].items() if name not in recorded["variants"]}
    recorded["variants"].update(added)  # a new variant only adds results; a changed one would mix them
    changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    if changed:
        raise FastattrError(f"{config_path}: key '{changed[0]}' differs from the plan in {job.out} "
                            f"({recorded.get(changed[0])!r} there); use a new 'out' folder for new settings")
    if added:  # recorded, so that changing it later is refused like any other setting
        plan.meta["settings"] = {**plan.meta["settings"], "variants": recorded["variants"]}
        plan.save(job.plan_path)
    return plan


def read_prompts(path: str | Path) -> list[str]:
    """Distinct prompts in file order: JSONL objects with "prompt" (the sandbox's query_prompts.jsonl)
    or plain text, one prompt per line."""
    path = Path(path)
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FastattrError(f"{path}:{n}: expected a JSON object with a \"prompt\"") from None
        else:
            prompts.append(line.strip())
    return list(dict.fromkeys(prompts))


def plan_queries(job: CurationJob, prompts: Sequence[str]) -> list[Query]:
    """Every query, candidates still empty. Test prompts are never train prompts (the test split
    measures generalisation); train queries cycle through the rest, a new seed each time."""
    order = np.random.default_rng(job.seed).permutation(len(prompts))
    test, train = order[:job.test_queries], order[job.test_queries:]
    if len(test) < job.test_queries or (job.train_queries and not len(train)):
        raise FastattrError(f"{job.prompts}: {len(prompts)} distinct prompts cannot give {job.test_queries} test "
                            f"prompts and at least one train prompt; add prompts or lower 'test_queries'")
    none = np.zeros(0, dtype=np.int64)
    queries = [Query(f"train-{i:05d}", "train", prompts[train[i % len(train)]], job.seed + i, none)
               for i in range(job.train_queries)]
    return queries + [Query(f"test-{j:05d}", "test", prompts[p], job.seed + job.train_queries + j, none)
                      for j, p in enumerate(test)]


def training_table(job: CurationJob) -> tuple[np.ndarray, np.ndarray]:
    """(keys, ids) of the training items the teacher may score: those of the manifest that the
    baseline bundle indexes and nobody opted out of, in key order."""
    from fastattr_hook.bundle import Bundle

    manifest_ids = {item.id for item in read_training_items(job.manifest)}
    with Bundle.open(job.bundle).items() as store:
        removed, last = store.removed_keys(), store.max_key()
        rows = {}
        for start in range(0, last + 1, 10_000):  # bounded SQL parameter lists
            rows.update(store.get(range(start, min(start + 10_000, last + 1))))
    keys = sorted(k for k, row in rows.items() if k not in removed and row.id in manifest_ids)
    outside = sum(row.id not in manifest_ids for row in rows.values())
    if outside:
        log.warning("%s: %d bundle items are not in %s; they are never candidates", job.bundle, outside, job.manifest)
    if not keys:
        raise FastattrError(f"{job.bundle}: no item of the bundle is in {job.manifest}; curate with the bundle built "
                            f"from the model's training manifest")
    return np.array(keys, dtype=np.int64), np.array([rows[k].id for k in keys])


def _device(job: CurationJob, launched: torch.device | None) -> torch.device:
    """accelerate's device for this process, else the job's, else cuda when available."""
    return torch.device(launched or job.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def curate(job: CurationJob, config_path: str | Path = "JOB.yaml") -> Plan | None:
    """Generate the missing query images (this process's share), then on the main process pick the
    candidates and write the plan. Returns the plan on the main process, None elsewhere. Rerun on
    a finished plan, it only restores deleted images."""
    rank, world, barrier, launched = distributed()
    device = _device(job, launched)
    plan = load_plan(job, config_path) if job.plan_path.is_file() else None
    queries = plan.queries if plan else plan_queries(job, read_prompts(job.prompts))
    mine = [q for q in queries[rank::world] if not job.image_path(q.qid).is_file()]
    pipe = load_pipeline(job.pipeline).to(device) if mine or (plan is None and rank == 0) else None
    if plan and mine and UNetAdapter(pipe, device).fingerprint() != plan.meta["model"]:
        raise FastattrError(f"{job.pipeline}: the model's weights differ from those the plan in {job.out} was "
                            f"made with; curate again into a new 'out' folder")
    for query in tqdm(mine, desc=f"query images (process {rank + 1}/{world})", unit="image"):
        # One image per call with its own generator: an image never depends on its batch or process.
        image = pipe(query.prompt, num_inference_steps=job.steps, guidance_scale=job.guidance_scale,
                     generator=torch.Generator().manual_seed(query.seed)).images[0]
        with atomic_path(job.image_path(query.qid)) as tmp:
            image.save(tmp, format="PNG")
    barrier()
    if rank != 0 or plan is not None:
        return plan
    keys, ids = training_table(job)
    candidates = _stage_candidates(job, queries, keys, device)
    meta = {"settings": settings(job), "model": UNetAdapter(pipe, device).fingerprint(),
            "manifest": manifest_fingerprint(job.manifest), "bundle": _bundle_info(job.bundle),
            "training_items": len(keys), "tool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    plan = Plan(meta, keys, ids, [dataclasses.replace(q, candidates=candidates[q.qid]) for q in queries])
    plan.save(job.plan_path)
    return plan


def _bundle_info(bundle: str) -> dict:
    from fastattr_hook.bundle import read_manifest

    manifest = read_manifest(bundle)
    return {"fingerprint": manifest.fingerprint, "encoder": manifest.encoder.name,
            "encoder_fingerprint": manifest.encoder.fingerprint, "items": manifest.items}


def _stage_candidates(job: CurationJob, queries: list[Query], keys: np.ndarray, device: torch.device
                      ) -> dict[str, np.ndarray]:
    """Positions in the training table each query is scored against. Train: stage 1 takes the K
    nearest items in the baseline bundle, stage 2 a random M of them drawn from (seed, query
    number), kept in stage-1 order. Test: the whole table."""
    from fastattr_hook.attributor import Attributor

    out = {q.qid: np.arange(len(keys)) for q in queries if q.split == "test"}
    train = [(number, q) for number, q in enumerate(queries) if q.split == "train"]
    if not train:
        return out
    attributor = Attributor.from_bundle(job.bundle, device=str(device))
    vectors = attributor.encoder.embed([_query_image(job, q) for _, q in train], [q.prompt for _, q in train],
                                       role="query")
    found, _ = attributor.search(vectors, min(job.candidates, len(attributor.index)))
    position = {int(k): i for i, k in enumerate(keys)}
    for (number, query), row in zip(train, found):
        nearest = np.array([position[int(k)] for k in row if int(k) in position], dtype=np.int64)
        rng = np.random.default_rng([job.seed, number])
        chosen = np.sort(rng.choice(len(nearest), size=min(job.scored, len(nearest)), replace=False))
        out[query.qid] = nearest[chosen]
    return out


def _query_image(job: CurationJob, query: Query) -> Image.Image:
    path = job.image_path(query.qid)
    if not path.is_file():
        raise FastattrError(f"{path}: missing; rerun `fastattr teacher curate` with this job to restore it")
    with Image.open(path) as image:
        return image.convert("RGB")


# -- teacher steps -------------------------------------------------------------------------------


def _teacher_inputs(job: CurationJob, plan: Plan, device: torch.device) -> tuple[UNetAdapter, list[TrainingItem]]:
    """The model and the plan's training items, refusing inputs that changed since ``curate``."""
    if manifest_fingerprint(job.manifest) != plan.meta["manifest"]:
        raise FastattrError(f"{job.manifest}: the training manifest changed since the plan was made; "
                            f"curate again into a new 'out' folder")
    adapter = UNetAdapter.from_pretrained(job.pipeline, device)
    if adapter.fingerprint() != plan.meta["model"]:
        raise FastattrError(f"{job.pipeline}: the model's weights differ from those the plan was made with; "
                            f"curate again into a new 'out' folder")
    by_id = {item.id: item for item in read_training_items(job.manifest)}
    missing = [i for i in plan.train_ids if i not in by_id]
    if missing:
        raise FastattrError(f"{job.manifest}: {len(missing)} planned training items are gone (e.g. '{missing[0]}')")
    return adapter, [by_id[i] for i in plan.train_ids]


def run_fisher(job: CurationJob, config_path: str | Path = "JOB.yaml") -> None:
    """The Fisher over the training table (computed once, checkpointed, saved atomically) and the
    pre-training losses (``scoring: linear``: loss gradients) of every item the plan scores (cached
    in chunks), so score workers only load them; the same for each variant. Main process only: the
    work is one pass, and concurrent writers would race on the cache."""
    rank, _, _, launched = distributed()
    if rank != 0:
        return
    plan = load_plan(job, config_path)
    pending = {v for q, v in teacher_tasks(job, plan) if not job.result_path(q.qid, v).is_file()}
    adapter, items = _teacher_inputs(job, plan, _device(job, launched))
    adapter.attach_encoding_cache(items, job.cache_dir, item_flips(job.teacher))
    test = np.unique(np.concatenate([q.candidates for q in plan.queries if q.split == "test"] or [[]])).astype(int)
    scored = np.unique(np.concatenate([q.candidates for q in plan.queries]))
    for variant in [None, *job.variants]:
        if variant not in pending:
            continue  # every result of this run is in: its Fisher is not needed
        config, path = job.teacher_config(variant), job.fisher_path_for(variant)
        if path.is_file():
            log.info("%s exists; delete it to recompute", path)
        else:
            checkpoints = job.cache_dir / "fisher-passes"  # resumable passes, dropped once the Fisher is saved
            compute_preconditioner(adapter, items, config, checkpoints).save(path)
            shutil.rmtree(checkpoints, ignore_errors=True)
        prepare = item_gradients if config.scoring == "linear" else pretrain_losses
        todo = scored if variant is None or variant in job.train_variants else test
        for start in range(0, len(todo), LOSS_CHUNK):
            prepare(adapter, [items[i] for i in todo[start:start + LOSS_CHUNK]], config, job.cache_dir)


def teacher_tasks(job: CurationJob, plan: Plan) -> list[tuple[Query, str | None]]:
    """Every (query, variant) result of the job, in scoring order: test queries and their variants
    first (the evaluation needs them whole; training can start from a partial train split), then
    the train queries, then their second runs (``train_variants``)."""
    test = [q for q in plan.queries if q.split == "test"]
    train = [q for q in plan.queries if q.split != "test"]
    return ([(q, None) for q in test] + [(q, v) for v in job.variants for q in test] + [(q, None) for q in train]
            + [(q, v) for v in job.train_variants for q in train])


def score_queue(job: CurationJob, config_path: str | Path = "JOB.yaml") -> list[str]:
    """Score the (query, variant) jobs that have no result yet; returns the result names this process
    scored, in the order of ``teacher_tasks``. Each job is claimed by the process that scores it (a
    lock in ``cache/claims/``), so the processes of ``accelerate launch``, or plain ones started at
    any time, share whatever is pending; each result is written atomically as soon as it is done,
    so a kill loses one query at most."""
    rank, world, _, launched = distributed()
    plan = load_plan(job, config_path)
    pending = [(q, v) for q, v in teacher_tasks(job, plan) if not job.result_path(q.qid, v).is_file()]
    for variant in dict.fromkeys(v for _, v in pending):
        if not job.fisher_path_for(variant).is_file():
            raise FastattrError(f"{job.fisher_path_for(variant)}: missing; run `fastattr teacher fisher --config "
                                f"{config_path}` first")
    if not pending:
        return []
    adapter, items = _teacher_inputs(job, plan, _device(job, launched))
    adapter.attach_encoding_cache(items, job.cache_dir, item_flips(job.teacher), build=False)  # made by `fisher`
    fishers, scored = {}, []
    def result(task: tuple[Query, str | None]) -> Path:
        return job.result_path(task[0].qid, task[1])

    bar = tqdm(pending, desc=f"teacher queries (process {rank + 1}/{world})", unit="query")
    for query, variant in claimed(bar, lambda task: job.cache_dir / "claims" / f"{result(task).stem}.claim",
                                  lambda task: result(task).is_file()):
        config, fisher_path = job.teacher_config(variant), job.fisher_path_for(variant)
        if fisher_path not in fishers:
            fishers[fisher_path] = load_preconditioner(fisher_path)
        image = _query_image(job, query)
        start = time.perf_counter()
        scores = score_query(adapter, fishers[fisher_path], [items[i] for i in query.candidates], image,
                             query.prompt, config, job.cache_dir)
        seconds = time.perf_counter() - start
        rank_of = np.empty(len(scores.tau), dtype=np.int64)
        rank_of[scores.ranking] = np.arange(len(scores.tau))
        with atomic_open(result((query, variant)), "wb") as f:  # compressed: results are committed
            np.savez_compressed(f, query_id=np.array(query.qid), keys=plan.train_keys[query.candidates],
                                ids=plan.train_ids[query.candidates], tau=scores.tau, rank=rank_of,
                                seconds=np.array(seconds))
        name = f"{query.qid}@{variant}" if variant else query.qid
        log.info("%s (%s, %d candidates, process %d/%d): %.2f s", name, query.split, len(query.candidates),
                 rank + 1, world, seconds)
        bar.set_postfix(last=f"{seconds:.1f}s")
        scored.append(name)
    return scored
