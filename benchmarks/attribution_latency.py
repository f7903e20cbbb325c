"""Attribution latency and backend agreement on the shipped sandbox bundle, side by side.

    python benchmarks/attribution_latency.py [--queries 64] [--repeats 9]

Builds usearch and faiss bundles of the same manifest next to the shipped exact one (in a temp
dir), then for each: recall@10 vs exact on the held-out query prompts' generated images, and search
latency per query at batch 1 and 16 (interleaved repeats, medians); plus the end-to-end
``attribute()`` latency and its encoding share (the encoder dominates at this index size), for the
shipped bundle's encoder (the distilled one) and the untuned baseline side by side: the head's cost;
and, from ``attribute()``'s own timing, the share of its time spent outside encoding and search.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastattr_hook.attributor import Attributor
from fastattr_hook.search import recall_at_k
from fastattr_sandbox import build
from index_tools.build import BuildOptions, build_bundle
from integrations.demo import default_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    root = build.sandbox_dir()
    prompts = default_prompts(args.queries)
    images = build.generate(prompts, root=root, seed=0)
    bundles = {"exact": root / "bundle"}
    with tempfile.TemporaryDirectory() as tmp:
        for backend, params in (("usearch", None), ("faiss", {"factory": "HNSW32"})):
            bundles[backend] = Path(tmp) / backend
            build_bundle(root / "data" / "manifest.jsonl", root / "bundle" / "encoder.yaml", bundles[backend],
                         BuildOptions(backend=backend, backend_params=params, progress=False))
        build_bundle(root / "data" / "manifest.jsonl", root / "encoder.yaml", Path(tmp) / "untuned",
                     BuildOptions(backend="exact", progress=False))
        untuned = Attributor.from_bundle(Path(tmp) / "untuned")
        attributors = {name: Attributor.from_bundle(path) for name, path in bundles.items()}
        vectors = attributors["exact"].encoder.embed(images, prompts, role="query")
        exact_keys, _ = attributors["exact"].search(vectors, 10)
        print(f"sandbox bundle: {attributors['exact'].manifest.items} items, dim {vectors.shape[1]}, encoder "
              f"'{attributors['exact'].encoder.spec.name}' (tuned: {attributors['exact'].encoder.head is not None}), "
              f"{len(prompts)} generated query images (held-out prompts), torch threads {torch.get_num_threads()}")
        for name, attributor in attributors.items():
            keys, _ = attributor.search(vectors, 10)
            print(f"{name:>8}: recall@10 vs exact {recall_at_k(keys, exact_keys, 10):.3f}")

        exact = attributors["exact"]
        for batch in (1, 16):
            encode, end_to_end, baseline, overhead = [], [], [], []
            search = {name: [] for name in attributors}
            exact.attribute(images[:batch], prompts[:batch], k=10)  # warm-up
            untuned.attribute(images[:batch], prompts[:batch], k=10)
            for _ in range(args.repeats):
                start = time.perf_counter()
                for i in range(0, len(images), batch):
                    exact.encoder.embed(images[i:i + batch], prompts[i:i + batch], role="query")
                encode.append((time.perf_counter() - start) / len(images))
                start = time.perf_counter()
                timings = [exact.attribute(images[i:i + batch], prompts[i:i + batch], k=10)[0].timing_ms
                           for i in range(0, len(images), batch)]
                end_to_end.append((time.perf_counter() - start) / len(images))
                total = sum(t["total"] for t in timings)
                overhead.append(sum(t["total"] - t["encode"] - t["search"] for t in timings) / total)
                start = time.perf_counter()
                for i in range(0, len(images), batch):
                    untuned.attribute(images[i:i + batch], prompts[i:i + batch], k=10)
                baseline.append((time.perf_counter() - start) / len(images))
                for name, attributor in attributors.items():  # interleaved, same vectors for all
                    start = time.perf_counter()
                    for i in range(0, len(vectors), batch):
                        attributor.search(vectors[i:i + batch], 10)
                    search[name].append((time.perf_counter() - start) / len(vectors))
            print(f"batch {batch:>2}: attribute() {statistics.median(end_to_end) * 1e3:.2f} ms/image end to end "
                  f"(exact), of which encoding {statistics.median(encode) * 1e3:.2f} ms/image; untuned encoder "
                  f"{statistics.median(baseline) * 1e3:.2f} ms/image (ratio shipped / untuned "
                  f"{statistics.median(end_to_end) / statistics.median(baseline):.3f})")
            print(f"batch {batch:>2}: inside attribute() (its timing_ms), the share outside encoding and search "
                  f"(item lookup, shares, credits) is {statistics.median(overhead):.1%}")
            base = statistics.median(search["exact"])
            for name, values in search.items():
                median = statistics.median(values)
                print(f"batch {batch:>2} {name:>8}: search {median * 1e3:.3f} ms/query (ratio vs exact {median / base:.2f})")

if __name__ == "__main__":
    np.random.seed(0)
    main()
