"""Attribution latency with the published architectures (random weights), CPU now, GPU when lent.

    python benchmarks/real_architectures.py                       # CPU: batch 1 and 16, 100k-vector index
    python benchmarks/real_architectures.py --device cuda --dtype bf16 --sizes 1000000 --batches 1 16 64 \\
        --gpu-flat-sizes 1000000 10000000 --out $OUT/real_architectures   # the prepared GPU run

The encoder is the method's: DINO ViT-B/16 (timm ``vit_base_patch16_224``, resize 256 / crop 224)
and the CLIP ViT-B/32 text tower (open_clip) concatenated, 1280-d, then the attribution head
(3 x 768, out 768). Weights are random (nothing is downloaded): latency does not depend on their
values. It goes through ``Attributor.attribute()``, the code a pipeline callback runs, on a bundle
whose index holds ``--sizes`` synthetic vectors (``search_scale.make_corpus``) with the default
backend for that size, and reports per image: encoding, search, the rest, and the end-to-end
time against the paper's 18.7 ms per query on an A100. The head's own cost is timed side by side
on the same backbone features (the tuned ``embed_features`` against the untuned one, which only
normalises): issue 10's "attribution speed unchanged within 10%" on these backbones. ``--dtype``
runs the encoder under autocast.
``--gpu-flat-sizes`` times brute-force search on the GPU (fp16 product + topk, what faiss-GPU Flat
does), the published method's own approach, at sizes where building an HNSW bundle would not fit
a short GPU loan. The lent GPU machine has torch, timm and no registry: carry wheels of usearch,
open_clip_torch and ftfy (``pip download --no-deps -d wheels ...``) and install them there first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from search_scale import make_corpus  # noqa: E402

from fastattr_hook.attributor import Attributor  # noqa: E402
from fastattr_hook.files import atomic_write_text  # noqa: E402
from fastattr_hook.head import AttributionHead, save_head  # noqa: E402
from fastattr_hook.search import create_index, default_index  # noqa: E402

PAPER_A100_MS = 18.7


def make_bundle(folder: Path, n: int, device: str) -> Path:
    """A bundle folder that ``Attributor.from_bundle`` opens: random-weight encoder, n synthetic items."""
    from index_tools.build import calibrate_temperature
    from fastattr_hook.bundle import SCHEMA, Bundle, BundleManifest, EncoderInfo, ManifestInfo, ShareRule
    from fastattr_hook.encoder import Encoder
    from fastattr_hook.items import Item, ItemStore

    torch.manual_seed(0)
    save_head(AttributionHead(1280), folder / "head.safetensors")
    spec = {"name": "dino-vitb16+clip-vitb32-text (random weights)", "head": "head.safetensors", "batch_size": 64,
            "backbones": [{"kind": "timm_image", "model": "vit_base_patch16_224"},
                          {"kind": "open_clip_text", "model": "ViT-B-32"}]}
    (folder / Bundle.ENCODER).write_text(yaml.safe_dump(spec))
    encoder = Encoder.from_yaml(folder / Bundle.ENCODER, device=device)
    vectors, _ = make_corpus(n, 1, dim=encoder.dim)
    backend, params = default_index(n)
    index = create_index(backend, encoder.dim, params)
    index.add(np.arange(n), vectors)
    (folder / Bundle.INDEX).mkdir()
    index.save(folder / Bundle.INDEX)
    np.save(folder / Bundle.VECTORS, vectors)
    with ItemStore(folder / Bundle.ITEMS, readonly=False) as store:
        store.insert((Item(id=f"item-{k}", caption=f"caption {k}", creator=f"creator {k % 97}", license="cc-by-4.0",
                           key=k), None) for k in range(n))
    (folder / Bundle.REJECTS).write_text("")
    manifest = BundleManifest(schema=SCHEMA, name=f"synthetic-{n}", created="", tool_version="benchmark",
                              encoder=EncoderInfo(**encoder.describe()), backend=backend,
                              backend_params=dict(index.params), metric="cos", dim=encoder.dim, dtype=index.storage,
                              items=n, manifest=ManifestInfo(path="-", fingerprint="-", accepted=n, rejected=0),
                              share_rule=ShareRule("softmax", *calibrate_temperature(index, vectors[:4096])))
    Bundle(folder, manifest).finish()
    return folder


def time_attribute(attributor: Attributor, images, prompts, batch: int, repeats: int) -> dict:
    attributor.attribute(images[:batch], prompts[:batch])  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        timings = [attributor.attribute(images[i:i + batch], prompts[i:i + batch])[0].timing_ms
                   for i in range(0, len(images), batch)]
        if attributor.encoder.device.type == "cuda":
            torch.cuda.synchronize()
        runs.append({"end_to_end": 1e3 * (time.perf_counter() - start) / len(images),
                     **{key: statistics.mean(t[key] for t in timings) for key in ("encode", "search", "total")}})
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def head_ms(encoder, features: np.ndarray, repeats: int) -> tuple[float, float]:
    """ms per image of ``embed_features`` with the head and without it (untuned), interleaved."""
    head, tuned, untuned = encoder.head, [], []
    try:
        for _ in range(repeats + 1):  # the first pass warms up
            for timings, use_head in ((tuned, head), (untuned, None)):
                encoder.head = use_head
                start = time.perf_counter()
                encoder.embed_features(features)
                timings.append(1e3 * (time.perf_counter() - start) / len(features))
    finally:
        encoder.head = head
    return statistics.median(tuned[1:]), statistics.median(untuned[1:])


def gpu_exact_ms(vectors: np.ndarray, queries: np.ndarray, repeats: int) -> dict:
    """Brute-force top-10 on the GPU (fp16 matrix product + topk): the published method's search."""
    database = torch.from_numpy(vectors).to("cuda", torch.float16)
    out = {}
    for batch in (1, 64):
        chunks = [torch.from_numpy(queries[i:i + batch]).to("cuda", torch.float16)
                  for i in range(0, len(queries), batch)]
        torch.topk(chunks[0] @ database.T, 10)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for chunk in chunks:
                torch.topk(chunk @ database.T, 10)
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - start) / len(queries))
        out[f"batch {batch}"] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--gpu-flat-sizes", type=int, nargs="*", default=[],
                        help="also time GPU brute force over this many vectors (no bundle built)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/real_architectures")
    args = parser.parse_args()
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(args.images)]
    prompts = [f"a photograph of object {i} in a garden, detailed" for i in range(args.images)]
    header = (f"{time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, device {args.device}"
              f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
              f"dtype {args.dtype}, torch threads {torch.get_num_threads()}, {args.images} 512x512 images")
    print(header, flush=True)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            attributor = Attributor.from_bundle(make_bundle(Path(tmp), n, args.device), device=args.device)
            for batch in args.batches:
                with torch.autocast(attributor.encoder.device.type, enabled=args.dtype != "f32",
                                    dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float16):
                    row = {"n": n, "backend": attributor.manifest.backend, "batch": batch,
                           **time_attribute(attributor, images, prompts, batch, args.repeats)}
                    features = attributor.encoder.features(images[:batch], prompts[:batch])
                    row["head"], row["untuned_normalise"] = head_ms(attributor.encoder, features, 20 * args.repeats)
                row["rest"] = row["end_to_end"] - row["encode"] - row["search"]
                row["vs_paper_a100"] = PAPER_A100_MS / row["end_to_end"]
                untuned_encode = row["encode"] - row["head"] + row["untuned_normalise"]
                row["tuned_vs_untuned_encode"] = row["encode"] / untuned_encode
                rows.append(row)
                print(f"N {n:>10,} ({row['backend']}) batch {batch:>3}: {row['end_to_end']:8.2f} ms/image end to end = "
                      f"encode {row['encode']:.2f} + search {row['search']:.3f} + rest {row['rest']:.3f}; "
                      f"paper's A100 18.7 ms / this = {row['vs_paper_a100']:.2f}; head {row['head']:.3f} ms "
                      f"(untuned: {row['untuned_normalise']:.3f}), tuned / untuned encoding "
                      f"{row['tuned_vs_untuned_encode']:.4f}", flush=True)
    for n in args.gpu_flat_sizes:
        vectors, queries = make_corpus(n, 256)
        for name, ms in gpu_exact_ms(vectors, queries, args.repeats).items():
            rows.append({"n": n, "gpu_exact_fp16": name, "ms_per_query": ms})
            print(f"N {n:>10,} GPU brute force fp16 {name}: {ms:.4f} ms/query", flush=True)
        del vectors
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "real_architectures.json", json.dumps({"header": header, "argv": sys.argv, "rows": rows},
                                                                   indent=1))


if __name__ == "__main__":
    main()
