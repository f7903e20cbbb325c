"""``fastattr distill counterfactual``: leave-K-out retraining, the field's gold standard (method.md 6).

For each test query and method (teacher, tuned encoder, untuned encoder, random), the method's top-K
training items are removed and the sandbox UNet is retrained from scratch without them; one
reference UNet is retrained on the full set. Every run uses the same seed, initialisation, schedule
and batches as the reference, each batch less the removed items it holds, so every other item meets
the same steps, noise and timesteps (skipping them in the order would shift every later batch: on the
sandbox, a change of the query loss as large as the removals' own). The
original model's VAE and text encoder are kept (frozen: only the UNet is retrained, so its text
states are computed once). Then, per run:

- dL: the query's diffusion loss under the retrained UNet minus under the reference, on identical
  seeded (noise, timestep) pairs (higher = the removed items mattered more);
- the MSE between the images the two models regenerate from the query's prompt and seed, and the
  cosine similarity of their image features (the untuned encoder's image tower; lower = more change).

Steps (one YAML): ``plan`` (the removal sets, fingerprints), ``train`` (one resumable job per run,
disjoint per process under ``accelerate launch``; a UNet file per run), ``report`` (metrics per run,
cached, then tables with paired 95% confidence intervals, JSON + markdown + PNG).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastattr_hook.files import atomic_open, atomic_path, atomic_write_text
from fastattr_hook.config import load_yaml, to_dict
from fastattr_hook.errors import FastattrError

from .data import DistillDataset, load_dataset

log = logging.getLogger(__name__)
METHODS = ("teacher", "tuned", "untuned", "random")
PATH_KEYS = ("dataset", "out", "tuned", "untuned")
# Two-sided 95% Student t quantiles for 1..30 degrees of freedom (then the normal 1.96).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class CounterfactualJob:
    """Relative paths are relative to the YAML file."""

    dataset: str  # distill.npz: its test queries (whole-set teacher rankings) and, through its job, the model
    out: str
    tuned: str  # the distilled encoder spec
    untuned: str  # the untuned baseline spec (its image tower also scores image similarity)
    queries: int = 4  # Q: the dataset's first Q test queries
    k: list[int] = field(default_factory=lambda: [40])  # K values: how many top items each run removes
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 1000  # UNet training steps of every run (from scratch)
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    eval_pairs: int = 256  # (noise, timestep) pairs of the query loss
    sample_steps: int = 25  # regeneration: DDIM steps and guidance (the curation job's)
    guidance_scale: float = 4.0
    device: str | None = None


def load_job(path: str | Path) -> CounterfactualJob:
    path = Path(path)
    job = load_yaml(CounterfactualJob, path)
    base = path.parent.resolve()
    job = dataclasses.replace(job, **{k: str((base / getattr(job, k)).resolve()) for k in PATH_KEYS})
    unknown = sorted(set(job.methods) - set(METHODS))
    if unknown:
        raise FastattrError(f"{path}: key 'methods': unknown method '{unknown[0]}' (choose from: {', '.join(METHODS)})")
    if not job.k or min(job.k) < 1 or job.queries < 1 or job.steps < 1:
        raise FastattrError(f"{path}: keys 'k' (each >= 1), 'queries' and 'steps' must be positive")
    return job


def _settings(job: CounterfactualJob) -> dict:
    return {k: v for k, v in to_dict(job).items() if k not in PATH_KEYS and k != "device"}


# -- the plan ------------------------------------------------------------------------------------


def pipeline_dir(data: DistillDataset) -> Path:
    value = Path(data.meta["job"]["pipeline"])
    return value if value.is_absolute() else (data.path.parent / value).resolve()


def method_rankings(job: CounterfactualJob, data: DistillDataset, queries: np.ndarray) -> dict[str, np.ndarray]:
    """{method: [Q, N] training-table rows, most influential first}."""
    from fastattr_hook.encoder import Encoder

    from .evaluate import full_scores
    from .metrics import ranking
    from .train import item_features, query_features

    out = {}
    cache = Path(job.out) / "features"
    for method in job.methods:
        if method == "teacher":
            scores = np.stack([full_scores(data, q, data.tau) for q in queries])
        elif method == "random":
            scores = np.stack([np.random.default_rng([job.seed, int(q)]).random(len(data.train_keys))
                               for q in queries])
        else:
            encoder = Encoder.from_yaml(job.tuned if method == "tuned" else job.untuned, device="cpu")
            items = encoder.embed_features(np.asarray(item_features(encoder, data, cache)))
            scores = encoder.embed_features(np.asarray(query_features(encoder, data, cache))[queries], "query") @ items.T
        out[method] = np.stack([ranking(s) for s in scores])
    return out


def plan(job: CounterfactualJob, config_path: str | Path = "CF.yaml") -> dict:
    """The runs: a reference and one per (query, method, K), each with the table rows it removes."""
    from fastattr_teacher.adapter import UNetAdapter

    data = load_dataset(job.dataset)
    queries = data.queries("test")[:job.queries]
    if len(queries) < job.queries:
        raise FastattrError(f"{data.path}: {len(queries)} test queries, fewer than 'queries: {job.queries}' in "
                            f"{config_path}")
    rankings = method_rankings(job, data, queries)
    runs = {"reference": []}
    # Query by query, so that a partial run already holds complete paired comparisons; within a
    # query the tuned runs last, as a new head changes only those.
    for i, q in enumerate(queries):
        for method in sorted(rankings, key=lambda m: m == "tuned"):
            for k in job.k:
                runs[f"{data.query_id[q]}-{method}-k{k}"] = sorted(int(r) for r in rankings[method][i, :k])
    meta = {"settings": _settings(job), "model": UNetAdapter.from_pretrained(pipeline_dir(data)).fingerprint(),
            "dataset": data.split_fingerprint("test"), "queries": [int(q) for q in queries], "runs": runs}
    atomic_write_text(Path(job.out) / "plan.json", json.dumps(meta))
    return meta


def load_plan(job: CounterfactualJob, config_path: str | Path = "CF.yaml") -> dict:
    path = Path(job.out) / "plan.json"
    if not path.is_file():
        raise FastattrError(f"{path}: no plan yet; run `fastattr distill counterfactual plan --config {config_path}`")
    meta = json.loads(path.read_text())
    if meta["settings"] != _settings(job):
        changed = sorted(k for k in meta["settings"] if meta["settings"][k] != _settings(job).get(k))
        raise FastattrError(f"{config_path}: key '{changed[0]}' differs from the plan in {job.out}; use a new 'out'")
    data = load_dataset(job.dataset)
    if data.split_fingerprint("test") != meta["dataset"]:
        raise FastattrError(f"{job.dataset}: its test queries changed since the plan was made; plan again into a "
                            f"new 'out'")
    from fastattr_teacher.adapter import UNetAdapter

    if UNetAdapter.from_pretrained(pipeline_dir(data)).fingerprint() != meta["model"]:
        raise FastattrError(f"{pipeline_dir(data)}: the model changed since the plan in {job.out} was made "
                            f"(fingerprint); plan again into a new 'out'")
    return meta


# -- retraining ----------------------------------------------------------------------------------


def batch_order(num_items: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """[steps, batch_size] item rows: seeded epoch permutations of the whole set, the same for every
    run (a run drops its removed items from each batch, see ``retrain``)."""
    epochs = -(-steps * batch_size // num_items)
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(num_items) for e in range(epochs)])
    return order[:steps * batch_size].reshape(steps, batch_size)


class _Frozen:
    """What every run shares: latent posteriors and text states of the training set, the model's
    VAE, text encoder and tokenizer."""

    def __init__(self, pipe, items, device: torch.device):
        from fastattr_sandbox import train as sandbox_train

        self.pipe, self.device = pipe, device
        images = torch.stack([torch.from_numpy(np.asarray(item.load_image(), dtype=np.float32) / 127.5 - 1)
                              .permute(2, 0, 1) for item in items])
        self.mean, self.std = sandbox_train.encode_latent_stats(pipe.vae, images)
        self.text = self.embed([item.caption for item in items])
        self.empty = self.embed([""])[0]

    @torch.no_grad()
    def embed(self, captions: list[str]) -> torch.Tensor:
        from fastattr_sandbox.train import tokenize

        ids = tokenize(self.pipe.tokenizer, captions).to(self.device)
        return torch.cat([self.pipe.text_encoder(ids[s:s + 256])[0] for s in range(0, len(ids), 256)]).cpu()


def retrain(job: CounterfactualJob, frozen: _Frozen, removed: list[int], work: Path, desc: str):
    """A UNet trained from scratch on the training set minus ``removed`` (the sandbox recipe, UNet
    only); resumable from ``work/unet.ckpt``."""
    from fastattr_sandbox import models
    from fastattr_sandbox.train import _Checkpoint, _step_generator

    torch.manual_seed(job.seed)
    unet = models.build_unet(tuple(frozen.pipe.unet.config.block_out_channels)).to(frozen.device)
    train_scheduler, _ = models.noise_schedulers()
    opt = torch.optim.AdamW(unet.parameters(), lr=job.lr, weight_decay=1e-2)
    keep = np.ones(len(frozen.mean), dtype=bool)
    keep[removed] = False
    if not keep.any():
        raise FastattrError("every training item was removed; lower K")
    order = batch_order(len(keep), job.steps, job.batch_size, job.seed)
    ckpt = _Checkpoint(work / "unet.ckpt")
    start = 0
    if state := ckpt.load():
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    unet.train()
    for step in tqdm(range(start, job.steps), desc=desc, initial=start, total=job.steps, unit="step"):
        g = _step_generator(job.seed, step)
        idx = torch.from_numpy(order[step])
        latents = frozen.mean[idx] + frozen.std[idx] * torch.randn(frozen.mean[idx].shape, generator=g)
        text = frozen.text[idx].clone()
        text[torch.rand(job.batch_size, generator=g) < 0.1] = frozen.empty  # caption dropout, as in training
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, train_scheduler.config.num_train_timesteps, (job.batch_size,), generator=g)
        noisy = train_scheduler.add_noise(latents, noise, t)
        kept = torch.from_numpy(keep[order[step]])  # the reference's batch less the removed items
        if kept.any():
            dev = frozen.device
            prediction = unet(noisy[kept].to(dev), t[kept].to(dev), text[kept].to(dev)).sample
            loss = F.mse_loss(prediction, noise[kept].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            for group in opt.param_groups:  # warm-up then cosine decay, a pure function of the step
                group["lr"] = float(job.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / job.steps)))
            opt.step()
        ckpt.maybe_save(step + 1, job.steps, {"unet": unet.state_dict(), "optimizer": opt.state_dict()})
    ckpt.clear()
    return unet.eval()


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:12]


def run_stem(meta: dict, run: str) -> str:
    """A run's file name: its name and a digest of the items it removes, so that planning again
    (e.g. after a new head changed the tuned rankings) retrains only the runs whose removals changed."""
    return f"{run}-{_digest(meta['runs'][run])}"


def model_path(job: CounterfactualJob, meta: dict, run: str) -> Path:
    return Path(job.out) / "models" / f"{run_stem(meta, run)}.safetensors"


def result_path(job: CounterfactualJob, meta: dict, run: str) -> Path:
    """The reference is measured on every query, so its file also names the queries: a plan with
    more queries measures the reference again (from its model where it is still here)."""
    stem = run_stem(meta, run) + (f"-{_digest(meta['queries'])}" if run == "reference" else "")
    return Path(job.out) / "results" / f"{stem}.npz"


def done(job: CounterfactualJob, meta: dict, run: str) -> bool:
    """Measured (results are small and committed) or at least trained (models are not)."""
    return result_path(job, meta, run).is_file() or model_path(job, meta, run).is_file()


def train_runs(job: CounterfactualJob, config_path: str | Path = "CF.yaml") -> list[str]:
    """Train the runs without a result yet (reference first) and measure each at once: its small
    result file (committed as the work goes) is what ``report`` needs. Each run is claimed by the
    process that trains it (a lock beside its work folder), so the processes of ``accelerate launch``,
    or plain ones started at any time, share whatever is pending; returns the runs this one trained."""
    from safetensors.torch import save

    from fastattr_hook.files import atomic_write_bytes, claimed
    from fastattr_hook.pipeline import load_pipeline
    from fastattr_teacher.adapter import UNetAdapter, read_training_items
    from index_tools.build import distributed

    _, _, _, launched = distributed()
    meta = load_plan(job, config_path)
    pending = [run for run in meta["runs"] if not done(job, meta, run)]
    if not pending:
        return []
    data = load_dataset(job.dataset)
    device = torch.device(launched or job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(pipeline_dir(data)).to(device)
    by_id = {item.id: item for item in read_training_items(data.manifest)}
    frozen = _Frozen(pipe, [by_id[str(i)] for i in data.train_ids], device)
    adapter = UNetAdapter(pipe, device)
    work = Path(job.out) / "work"
    trained = []
    for run in claimed(pending, lambda run: work / f"{run_stem(meta, run)}.claim", lambda run: done(job, meta, run)):
        unet = retrain(job, frozen, meta["runs"][run], work / run_stem(meta, run), f"retrain {run}")
        state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
        atomic_write_bytes(model_path(job, meta, run), save(state))
        _measure_run(job, data, pipe, adapter, meta, run, state)
        log.info("%s: retrained without %d items and measured", run, len(meta["runs"][run]))
        trained.append(run)
    return trained


# -- measuring -----------------------------------------------------------------------------------


@torch.no_grad()
def _measure_run(job: CounterfactualJob, data: DistillDataset, pipe, adapter, meta: dict, run: str,
                 state: dict) -> dict:
    """The run's query loss on seeded (noise, timestep) pairs and its regenerated image(s), written
    to ``out/results/``; the reference is measured on every query."""
    from PIL import Image

    pipe.unet.load_state_dict(state)
    queries = meta["queries"] if run == "reference" else [_query_of(data, run)]
    losses, images = [], []
    for q in queries:
        with Image.open(data.image[q]) as image:
            latents, text = adapter.encode_query(image.convert("RGB"), str(data.prompt[q]))
        gen = torch.Generator().manual_seed(job.seed * 7919 + int(q))
        noise = torch.randn((job.eval_pairs, *latents.shape[1:]), generator=gen).to(adapter.device)
        t = torch.randint(0, adapter.num_train_timesteps, (job.eval_pairs,), generator=gen).to(adapter.device)
        loss = torch.cat([adapter.loss(latents.expand(len(n), -1, -1, -1), text.expand(len(n), -1, -1), n, s)
                          for n, s in zip(noise.split(64), t.split(64))])
        losses.append(float(loss.double().mean()))
        sample = pipe(str(data.prompt[q]), num_inference_steps=job.sample_steps, guidance_scale=job.guidance_scale,
                      generator=torch.Generator().manual_seed(int(data.seed[q])), output_type="np").images[0]
        images.append(sample.astype(np.float32))
    result = {"query": np.array(queries), "loss": np.array(losses), "image": np.stack(images)}
    with atomic_open(result_path(job, meta, run), "wb") as f:
        np.savez(f, **result)
    return result


def measure(job: CounterfactualJob, config_path: str | Path = "CF.yaml", partial: bool = False) -> dict[str, dict]:
    """{run: {"query", "loss", "image" (regenerated, [H, W, 3] in 0..1)}} of every run, from the
    result files (a run trained before results were written is measured from its model now); dL,
    MSE and similarity need the reference and are computed in ``report``. ``partial``: the runs done
    so far (the reference among them), for a readout while the rest still trains."""
    from safetensors.torch import load_file

    from fastattr_hook.pipeline import load_pipeline
    from fastattr_teacher.adapter import UNetAdapter

    meta = load_plan(job, config_path)
    missing = [run for run in meta["runs"] if not done(job, meta, run)]
    if missing and (not partial or "reference" in missing):
        raise FastattrError(f"{job.out}: {len(missing)} runs are not trained yet (e.g. {missing[0]}); run "
                            f"`fastattr distill counterfactual train --config {config_path}`")
    results, pipe = {}, None
    for run in tqdm([run for run in meta["runs"] if run not in missing], desc="read results", unit="run"):
        path = result_path(job, meta, run)
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                results[run] = {name: z[name] for name in z.files}
            continue
        if pipe is None:
            data = load_dataset(job.dataset)
            device = torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            pipe = load_pipeline(pipeline_dir(data)).to(device)
            adapter = UNetAdapter(pipe, device)
        results[run] = _measure_run(job, data, pipe, adapter, meta, run, load_file(model_path(job, meta, run)))
    return results


def _query_of(data: DistillDataset, run: str) -> int:
    qid = run.rsplit("-", 2)[0]
    return int(np.flatnonzero(data.query_id == qid)[0])


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the two-sided 95% Student t interval)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    t = T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96
    return float(values.mean()), float(t * values.std(ddof=1) / np.sqrt(len(values)))


def _paired(a: dict[str, list], b: dict[str, list]) -> tuple[np.ndarray, np.ndarray]:
    """The dL of two methods on the queries both have runs for (a partial run may lack some)."""
    common = sorted(set(a["query"]) & set(b["query"]))
    return (np.array([a["dL"][a["query"].index(q)] for q in common]),
            np.array([b["dL"][b["query"].index(q)] for q in common]))


def report(job: CounterfactualJob, results: dict[str, dict], out: str | Path, command: str,
           planned: int | None = None) -> dict:
    """Per K and method: dL, regeneration MSE and image similarity (mean and 95% interval over the
    queries), paired differences of the tuned encoder against untuned and random, and each query's
    dL; JSON, md, PNG. ``planned``: the plan's run count, when ``results`` holds only some of them."""
    from PIL import Image

    from fastattr_hook.encoder import Encoder

    encoder = Encoder.from_yaml(job.untuned, device="cpu")
    tower = next((i for i, b in enumerate(encoder.backbones) if b.spec.kind.endswith("_image")), None)
    if tower is None:
        raise FastattrError(f"{job.untuned}: no image backbone to compare regenerated images with")
    start = sum(b.dim for b in encoder.backbones[:tower])

    def image_features(images: np.ndarray) -> np.ndarray:
        pil = [Image.fromarray((np.clip(i, 0, 1) * 255).round().astype(np.uint8)) for i in images]
        f = encoder.features(pil, [""] * len(pil))[:, start:start + encoder.backbones[tower].dim]
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    ref = results["reference"]
    ref_at = {int(q): i for i, q in enumerate(ref["query"])}
    ref_features = image_features(ref["image"])
    rows: dict[int, dict[str, dict[str, list]]] = {}
    for run, r in results.items():
        if run == "reference":
            continue
        _, method, k = run.rsplit("-", 2)
        i = ref_at[int(r["query"][0])]
        cell = rows.setdefault(int(k[1:]), {}).setdefault(method, {"dL": [], "mse": [], "similarity": [], "query": []})
        cell["dL"].append(float(r["loss"][0] - ref["loss"][i]))
        cell["mse"].append(float(np.mean((r["image"][0] - ref["image"][i]) ** 2)))
        cell["similarity"].append(float(image_features(r["image"])[0] @ ref_features[i]))
        cell["query"].append(int(r["query"][0]))
    table = {"queries": len(ref["query"]), "steps": job.steps, "reference_loss": [float(x) for x in ref["loss"]],
             "runs": len(results), "planned_runs": planned or len(results), "k": {}, "per_query_dL": {}}
    for k, methods in sorted(rows.items()):
        entry = {m: {name: interval(v[name]) for name in ("dL", "mse", "similarity")} for m, v in methods.items()}
        for other in ("untuned", "random"):
            if "tuned" in methods and other in methods:
                a, b = _paired(methods["tuned"], methods[other])
                entry[f"tuned - {other}"] = {"dL": interval(a - b)}
        if "tuned" in methods and "teacher" in methods:
            a, b = _paired(methods["tuned"], methods["teacher"])
            entry["tuned / teacher dL"] = float(a.mean() / b.mean())
        table["k"][str(k)] = entry
        table["per_query_dL"][str(k)] = {m: dict(zip(v["query"], v["dL"])) for m, v in methods.items()}
    _write(table, Path(out), command)
    return table


def _write(table: dict, out: Path, command: str) -> None:
    lines = ["# Counterfactual check: leave-K-out retraining", "", f"Command: `{command}`", "",
             f"{table['queries']} queries; every run retrains the sandbox UNet from scratch for {table['steps']} steps "
             "(same seed, initialisation and batches, each less the removed items it holds, so every other item meets the "
             "same steps, noise and timesteps; the original VAE and "
             "text encoder, frozen). dL = the query's loss under the run minus under the reference retrained on "
             "everything (identical noise and timesteps; higher = the removed items mattered more). MSE and image "
             "similarity compare the images both models regenerate from the query's prompt and seed (more change "
             "= better attribution). Mean [95% t interval] over the queries.", ""]
    if table["runs"] < table["planned_runs"]:
        lines += [f"**Partial readout: {table['runs']} of {table['planned_runs']} planned runs.** Each method's figures "
                  "cover the queries it has a run for; paired differences only the queries both methods have.", ""]
    for k, entry in table["k"].items():
        lines += [f"## K = {k}", "", "| method | dL | regeneration MSE | image similarity |", "|---|---|---|---|"]
        for method, v in entry.items():
            if isinstance(v, dict) and "mse" in v:
                lines.append(f"| {method} | " + " | ".join(f"{v[n][0]:.5f} [+- {v[n][1]:.5f}]"
                                                            for n in ("dL", "mse", "similarity")) + " |")
        for name in ("tuned - untuned", "tuned - random"):
            if name in entry:
                mean, half = entry[name]["dL"]
                lines.append(f"\nPaired dL difference {name}: {mean:.5f} [{mean - half:.5f}, {mean + half:.5f}]"
                             f"{' (excludes 0)' if abs(mean) > half else ''}")
        if "tuned / teacher dL" in entry:
            lines.append(f"\ntuned dL / teacher dL = {entry['tuned / teacher dL']:.3f}")
        per_query = table["per_query_dL"][k]
        methods = [m for m in METHODS if m in per_query]
        lines += ["", "dL per query (test query number):", "", "| query | " + " | ".join(methods) + " |",
                  "|---" * (len(methods) + 1) + "|"]
        for q in sorted({q for m in methods for q in per_query[m]}):
            lines.append(f"| {q} | " + " | ".join(f"{per_query[m][q]:+.5f}" if q in per_query[m] else ""
                                                  for m in methods) + " |")
        lines.append("")
    atomic_write_text(out.with_suffix(".json"), json.dumps({**table, "command": command}, indent=1))
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(table["k"])
    methods = [m for m in METHODS if any(m in table["k"][k] for k in ks)]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        values = [table["k"][k].get(m, {}).get("dL", (np.nan, np.nan)) for k in ks]
        ax.bar(np.arange(len(ks)) + i * width, [v[0] for v in values], width, yerr=[v[1] for v in values],
               capsize=3, label=m)
    ax.set_xticks(np.arange(len(ks)) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels([f"K = {k}" for k in ks])
    ax.set_ylabel("dL (retrained - reference)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
