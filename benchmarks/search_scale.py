"""Vector search at scale: every backend and setting side by side on the same vectors (issue 13).

    python benchmarks/search_scale.py [--sizes 100000 300000] [--queries 1000] [--repeats 3]
        [--corpus synthetic|sandbox] [--only LABEL ...] [--out benchmarks/results/search_scale]

For each size N it makes N database vectors and ``--queries`` query vectors of d = 768 (synthetic:
``make_corpus``; sandbox: real embeddings, ``sandbox_corpus``), computes the exact top-100 once, then for each index configuration (built through
``fastattr_hook.search``, the code the product runs) measures:

* build time (one ``add`` of all N vectors, all cores) and bytes per vector on disk (the index file;
  a ``rerank`` configuration also reads the float32 ``vectors.npy`` every bundle keeps, memory-mapped);
* RAM: resident-memory growth when the saved index is loaded for serving (``view=True``, memory-mapped
  where the backend can) and then searched with every query; usearch/faiss HNSW touch most pages;
* single-query latency p50/p99 (one query per call, one thread, the way a generation pipeline asks),
  the median over ``--repeats`` interleaved passes, and its speedup over exact search measured in
  the same run;
* batched throughput (all queries in one call, all cores);
* recall@10 (of a search for 10) and recall@100 (of a search for 100) against exact search.

Settings read at search time (usearch ``expansion_search``, faiss ``efSearch``/``nprobe``) are
swept by reopening the saved index with other parameters, not by rebuilding. Writes JSON, a markdown
table and a PNG (recall@10 against single-query speedup) under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastattr_hook.files import atomic_write_text, map_npy
from fastattr_hook.search import create_index, load_index, recall_at_k

DIM = 768


def make_corpus(n: int, queries: int, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(database [n, dim], queries [queries, dim]) float32 with the structure of real image embeddings.

    * Low intrinsic dimension: points live near a 64-d subspace (a fixed random orthonormal basis
      of R^768), plus isotropic noise carrying ~15% of the energy.
    * Clusters of unequal size: n / 250 cluster centres; sizes follow a Zipf law (exponent 1.1), so
      a few dense clusters hold much of the set and many are small (styles, subjects, datasets).
    * Near-duplicates: 5% of the database are copies of other rows with 2% noise (re-uploads,
      crops), the near-ties that make ANN recall hard.
    Queries are fresh draws from the same clusters (no duplicates of database rows).
    """
    rng = np.random.default_rng(seed)
    intrinsic = 64
    basis = np.linalg.qr(rng.standard_normal((dim, intrinsic)))[0].T.astype(np.float32)  # [64, dim]
    clusters = max(1, n // 250)
    weights = 1.0 / np.arange(1, clusters + 1) ** 1.1
    centres = rng.standard_normal((clusters, intrinsic)).astype(np.float32)
    spread = rng.uniform(0.3, 0.8, clusters).astype(np.float32)  # some clusters tight, some loose

    def draw(count: int, generator: np.random.Generator) -> np.ndarray:
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 65_536):  # bounded scratch memory at 1M+
            m = min(65_536, count - start)
            which = generator.choice(clusters, size=m, p=weights / weights.sum())
            latent = centres[which] + spread[which, None] * generator.standard_normal((m, intrinsic), np.float32)
            signal = latent @ basis
            signal /= np.linalg.norm(signal, axis=1, keepdims=True)
            noise = generator.standard_normal((m, dim), np.float32)
            noise *= 0.42 / np.sqrt(dim)  # |noise|^2 ~ 0.18 against |signal|^2 = 1: ~15% of the energy
            out[start:start + m] = signal + noise
        return out

    database = draw(n, rng)
    dups = rng.choice(n, size=n // 20, replace=False)
    sources = rng.choice(n, size=len(dups))
    database[dups] = database[sources] + rng.standard_normal((len(dups), dim), np.float32) * (0.02 / np.sqrt(dim))
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    query = draw(queries, np.random.default_rng(seed + 1))
    return database, query / np.linalg.norm(query, axis=1, keepdims=True)


def sandbox_corpus(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real embeddings: n + queries images of the sandbox world (``fastattr_sandbox.world``, a larger
    draw than the shipped 1,500) embedded with the shipped bundle's distilled encoder, image and
    caption; the last ``queries`` are the queries. A small discrete world: many near-identical scenes."""
    from fastattr_hook.bundle import Bundle, shipped_bundle
    from fastattr_sandbox import world
    from index_tools.manifest import ManifestRow, iter_manifest

    encoder = Bundle.open(shipped_bundle()).encoder("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        world.generate(world.WorldConfig(seed=seed, num_images=n + queries), tmp)
        rows = [r for r in iter_manifest(Path(tmp) / "manifest.jsonl") if isinstance(r, ManifestRow)]
        vectors = [encoder.embed([r.load_image() for r in rows[i:i + 256]], [r.caption for r in rows[i:i + 256]])
                   for i in range(0, len(rows), 256)]
    vectors = np.concatenate(vectors).astype(np.float32)
    return vectors[:n], vectors[n:]


@dataclass
class Config:
    """One index to build, and the search-time settings to sweep on it."""
    label: str
    backend: str
    params: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=lambda: [{}])
    rerank: bool = False  # served as a bundle serves a lossy index: candidates re-scored on a mapped vectors.npy


def configs(only: list[str] | None = None) -> list[Config]:
    """Every configuration measured, or those whose label is in ``only`` (exact always: the reference)."""
    def usearch(dtype: str, connectivity: int) -> Config:
        return Config(f"usearch {dtype} M{connectivity}", "usearch",
                      {"dtype": dtype, "connectivity": connectivity, "expansion_add": 128},
                      [{"expansion_search": e} for e in (64, 128, 256, 512)])

    every = [
        Config("exact", "exact"),
        Config("faiss Flat", "faiss", {"factory": "Flat", "gpu": False}),
        usearch("f32", 32),
        usearch("f16", 16),
        usearch("f16", 32),
        usearch("i8", 32),
        Config("usearch i8 M32 rerank", "usearch", {"dtype": "i8", "connectivity": 32, "expansion_add": 128},
               [{"expansion_search": e} for e in (64, 128, 256, 512)], rerank=True),
        Config("faiss HNSW32", "faiss", {"factory": "HNSW32", "gpu": False},
               [{"efSearch": e} for e in (64, 128, 256, 512)]),
        Config("faiss HNSW32,SQ8", "faiss", {"factory": "HNSW32,SQ8", "gpu": False},
               [{"efSearch": e} for e in (64, 128, 256)]),
        Config("faiss HNSW32,SQ8 rerank", "faiss", {"factory": "HNSW32,SQ8", "gpu": False},
               [{"efSearch": e} for e in (64, 128, 256, 512, 1024)], rerank=True),
        Config("faiss HNSW32,SQ8 efC128 rerank", "faiss", {"factory": "HNSW32,SQ8", "efConstruction": 128, "gpu": False},
               [{"efSearch": e} for e in (256, 384, 448, 512, 1024)], rerank=True),
        Config("faiss HNSW48,SQ8 efC128 rerank", "faiss", {"factory": "HNSW48,SQ8", "efConstruction": 128, "gpu": False},
               [{"efSearch": e} for e in (192, 256, 384, 512)], rerank=True),
        Config("faiss IVF,SQ8", "faiss", {"factory": "IVF1024,SQ8", "gpu": False}, [{"nprobe": p} for p in (16, 64)]),
        Config("faiss IVF,SQ8 rerank", "faiss", {"factory": "IVF1024,SQ8", "gpu": False},
               [{"nprobe": p} for p in (16, 64, 128)], rerank=True),
        Config("faiss OPQ,IVF,PQ", "faiss", {"factory": "OPQ64,IVF1024,PQ64", "gpu": False},
               [{"nprobe": p} for p in (16, 64)]),
    ]
    unknown = set(only or ()) - {c.label for c in every}
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {sorted(unknown)}; known: {[c.label for c in every]}")
    return [c for c in every if not only or c.label == "exact" or c.label in only]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def set_threads(n: int) -> None:
    """One knob for every library's thread pool (exact search runs in torch's)."""
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def single_query_ms(index, queries: np.ndarray, k: int) -> np.ndarray:
    times = np.empty(len(queries))
    for i in range(len(queries)):
        start = time.perf_counter()
        index.search(queries[i:i + 1], k)
        times[i] = time.perf_counter() - start
    return times * 1e3


def run_size(n: int, args, cores: int) -> list[dict]:
    """Every configuration on one corpus of n vectors; exact first, as the others' reference."""
    corpus = sandbox_corpus if args.corpus == "sandbox" else make_corpus
    database, queries = corpus(n, args.queries, seed=args.seed)
    keys = np.arange(n, dtype=np.int64)
    print(f"\nN = {n:,} x {DIM} ({args.corpus}): {args.queries} queries", flush=True)
    rows, exact_keys = [], None
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        np.save(Path(tmp) / "vectors.npy", database)  # what a bundle keeps beside a lossy index, for re-ranking
        for config in configs(args.only):
            folder = Path(tmp) / config.label.replace(" ", "_").replace(",", "_")
            folder.mkdir()
            set_threads(cores)
            index = create_index(config.backend, DIM, config.params)
            start = time.perf_counter()
            index.add(keys, database)
            build_s = time.perf_counter() - start
            files = index.save(folder)
            params = dict(index.params)
            del index
            gc.collect()
            disk = sum((folder / f).stat().st_size for f in files)
            for setting in config.sweep:
                gc.collect()
                before = rss_bytes()
                index = load_index(config.backend, folder, DIM, {**params, **setting}, view=True)
                if config.rerank:
                    index.rerank_with(map_npy(Path(tmp) / "vectors.npy", scattered=True))
                set_threads(cores)
                start = time.perf_counter()
                found, _ = index.search(queries, 100)
                batch_s = time.perf_counter() - start
                ram = rss_bytes() - before
                if exact_keys is None:
                    assert config.backend == "exact", "the exact index is measured first: the others' reference"
                    exact_keys = found
                top10, _ = index.search(queries, 10)  # recall@10 as a query asks for 10: the search widths
                # (HNSW's ef is at least k; re-ranking fetches 4 x k candidates) are those of k = 10
                set_threads(1)
                p50, p99 = [], []
                for _ in range(args.repeats):
                    ms = single_query_ms(index, queries, 10)
                    p50.append(float(np.percentile(ms, 50)))
                    p99.append(float(np.percentile(ms, 99)))
                row = {"n": n, "corpus": args.corpus, "config": config.label, "backend": config.backend, "params": {**params, **setting},
                       "setting": ", ".join(f"{k} {v}" for k, v in setting.items()) or "-",
                       "build_s": build_s, "disk_bytes_per_vector": disk / n, "ram_bytes_per_vector": ram / n,
                       "p50_ms": statistics.median(p50), "p99_ms": statistics.median(p99),
                       "batch_qps": len(queries) / batch_s,
                       "recall@10": recall_at_k(top10, exact_keys[:, :10], 10),
                       "recall@100": recall_at_k(found, exact_keys, 100)}
                rows.append(row)
                exact_p50 = rows[0]["p50_ms"]
                print(f"  {config.label:<18} {row['setting']:<20} build {build_s:7.1f} s  disk {row['disk_bytes_per_vector']:6.0f} B/vec"
                      f"  RAM {row['ram_bytes_per_vector']:6.0f} B/vec  p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms"
                      f"  x{exact_p50 / row['p50_ms']:6.1f} vs exact  batch {row['batch_qps']:8.0f} q/s"
                      f"  R@10 {row['recall@10']:.4f}  R@100 {row['recall@100']:.4f}", flush=True)
                del index
            for child in folder.iterdir():
                child.unlink()
    for row in rows:
        row["speedup_vs_exact"] = rows[0]["p50_ms"] / row["p50_ms"]
    return rows


def write(rows: list[dict], out: Path, command: str, header: str) -> None:
    """``<out>/search_scale_<corpus>.{json,md,png}``, merged with the rows of earlier runs there (a
    row measured again replaces its old one); each run's command and header are kept."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"search_scale_{rows[0]['corpus']}"
    path = out / f"{stem}.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {"runs": [], "rows": []}
    runs = [run for run in earlier["runs"] if run["command"] != command] + [{"command": command, "header": header}]
    for row in rows:
        row["run"] = command

    def key(r: dict) -> tuple:  # exact is every run's own reference: one row per run
        return r["n"], r["config"], r["setting"], r["run"] if r["config"] == "exact" else ""

    mine = {key(r) for r in rows}
    rows = [r for r in earlier["rows"] if key(r) not in mine and r["run"] in {run["command"] for run in runs}] + rows
    order = [run["command"] for run in runs]
    rows.sort(key=lambda r: (r["n"], order.index(r["run"]), r["config"] != "exact"))  # each run's exact first
    atomic_write_text(path, json.dumps({"runs": runs, "rows": rows}, indent=1))
    lines = [f"# {stem}", "", "Commands (from the repository root, venv active); each run's rows are merged into one "
             "table, and each speedup is against the exact search of its own run:", ""]
    for number, run in enumerate(runs, start=1):
        lines += [f"Run {number}:", "```bash", run["command"], "```", run["header"], ""]
    for n in sorted({r["n"] for r in rows}):
        lines += [f"## N = {n:,} x {DIM} ({rows[0]['corpus']} corpus)", "",
                  "| run | index | search setting | build s | disk B/vec | RAM B/vec (served) | p50 ms | p99 ms | "
                  "speedup vs exact (p50) | batch q/s | recall@10 | recall@100 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["n"] == n):
            lines.append(f"| {order.index(r['run']) + 1} | {r['config']} | {r['setting']} | {r['build_s']:.1f} | {r['disk_bytes_per_vector']:.0f} | "
                         f"{r['ram_bytes_per_vector']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                         f"{r['speedup_vs_exact']:.1f} | {r['batch_qps']:.0f} | {r['recall@10']:.4f} | "
                         f"{r['recall@100']:.4f} |")
        lines.append("")
    atomic_write_text(out / f"{stem}.md", "\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for label in dict.fromkeys(r["config"] for r in rows if r["n"] == n):
            points = [r for r in rows if r["n"] == n and r["config"] == label]
            ax.plot([p["speedup_vs_exact"] for p in points], [p["recall@10"] for p in points], "o-", label=label)
        ax.axhline(0.99, color="grey", linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("single-query speedup over exact (p50)")
        ax.set_ylabel("recall@10")
        ax.set_title(f"N = {n:,} x {DIM}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", choices=["synthetic", "sandbox"], default="synthetic")
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="measure only these configurations (and exact), "
                        "e.g. --only 'usearch f16 M32' 'faiss HNSW32'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", help="folder for the indexes while measured (default: the system temp dir)")
    parser.add_argument("--out", default="benchmarks/results/search_scale")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))  # `taskset -c 1 python ...` measures on one core
    argv = list(sys.argv)
    if "--tmp" in argv:  # where the scratch indexes went is not part of the result (and names this machine)
        del argv[argv.index("--tmp"):argv.index("--tmp") + 2]
    command = "python " + shlex.join(argv)
    header = (f"Run {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())} on {platform.machine()}, {cores} of {os.cpu_count()} cores "
              f"(affinity); single-query latency on 1 thread, batch and build on {cores}.")
    print(header)
    rows = []
    for n in args.sizes:
        rows += run_size(n, args, cores)
        write(rows, Path(args.out), command, header)  # after each size: a long run keeps what it measured


if __name__ == "__main__":
    main()
