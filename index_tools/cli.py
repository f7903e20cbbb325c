"""``fastattr index ...``: build, verify and edit index bundles."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastattr_hook.errors import FastattrError


def _backend_params(pairs: list[str]) -> dict | None:
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise FastattrError(f"--backend-param '{pair}' must look like key=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params or None


def _build_options(args):
    from index_tools.build import BuildOptions

    ray = getattr(args, "ray", False)
    for flag in ("ray_address", "ray_workers"):
        if getattr(args, flag, None) is not None and not ray:
            raise FastattrError(f"--{flag.replace('_', '-')} only applies with --ray; add --ray")
    return BuildOptions(backend=getattr(args, "backend", None), backend_params=_backend_params(getattr(args, "backend_param", [])),
                        chunk_size=args.chunk_size, num_workers=args.workers, device=args.device,
                        feature_cache=args.feature_cache, ray=ray, ray_address=getattr(args, "ray_address", None),
                        ray_workers=getattr(args, "ray_workers", None))


def _index_build(args) -> int:
    from index_tools.build import build_bundle

    # build_bundle returns for an existing --out only when resuming a finished build of the same manifest
    # and encoder (it refuses any other); its own note of that goes to a log the command line does not show
    finished = args.resume and Path(args.out).exists()
    manifest = build_bundle(args.manifest, args.encoder, args.out, _build_options(args), resume=args.resume,
                            name=args.name)
    if manifest is None:
        return 0
    if finished:
        print(f"{args.out}: already complete ({manifest.items} items); nothing to do")
    else:
        print(f"{args.out}: {manifest.items} items ({manifest.manifest.rejected} rows rejected, see "
              f"{Path(args.out) / 'rejects.jsonl'}), backend {manifest.backend}, dim {manifest.dim}")
    return 0


def _index_add(args) -> int:
    from index_tools.build import add_to_bundle

    manifest = add_to_bundle(args.bundle, args.manifest, _build_options(args), resume=args.resume)
    print(f"{args.bundle}: now {manifest.items} items in {1 + len(manifest.shards)} index shards "
          f"({manifest.manifest.rejected} rows rejected in total)")
    return 0


def _index_compact(args) -> int:
    from index_tools.build import compact_bundle

    done = compact_bundle(args.bundle, args.backend, _backend_params(args.backend_param))
    if not done.changed:
        print(f"{args.bundle}: nothing to compact ({done.items_before} items in one {done.backend} index, none "
              "removed); the bundle is unchanged")
    else:
        print(f"{args.bundle}: {done.items_before} items in {done.indexes_before} index shards -> {done.items_after} "
              f"items in one {done.backend} index; {done.deleted} removed items deleted for good (vectors, "
              "captions, thumbnails); keys unchanged")
    return 0


def _index_verify(args) -> int:
    from index_tools.verify import verify_bundle

    print(f"checking {args.bundle}" + (" (loading the encoder to re-embed a sample) ..." if args.deep else " ..."),
          file=sys.stderr)
    report = verify_bundle(args.bundle, deep=args.deep, sample=args.sample, min_recall=args.min_recall)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format())
    return 0 if report.ok else 1


def _index_info(args) -> int:
    from fastattr_hook.bundle import Bundle
    from fastattr_hook.config import to_dict

    bundle = Bundle.open(args.bundle)
    manifest = bundle.manifest
    with bundle.items() as store:
        removed = len(store.removed_keys())
    info = {**to_dict(manifest), "fingerprint": manifest.fingerprint, "removed": removed}
    info.pop("files")
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    shards = info.pop("shards")
    print("\n".join(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in info.items()))
    print(f"shards: {len(shards)} beside index/" if shards else "shards: none (index/ holds every item)")
    for shard in shards:
        print(f"  {shard['name']}: {shard['items']} items, keys {shard['first_key']}-{shard['last_key']}, backend "
              f"{shard['backend']} {json.dumps(shard['backend_params'])}, dtype {shard['dtype']}")
    return 0


def _index_remove(args) -> int:
    from index_tools.optout import remove_items

    count = remove_items(args.bundle, ids=args.ids or (), creator=args.creator, license=args.license,
                         reason=args.reason)
    print(f"{args.bundle}: {count} items removed (they no longer appear in results)")
    return 0


def register(commands) -> None:
    index = commands.add_parser("index", help="build, verify and edit index bundles").add_subparsers(
        dest="index_command", metavar="ACTION", required=True)

    def embed_options(p):
        p.add_argument("--resume", action="store_true", help="continue a killed build")
        p.add_argument("--chunk-size", type=int, default=1024, help="rows per checkpointed chunk")
        p.add_argument("--workers", type=int, default=0, help="DataLoader workers for image decoding")
        p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        p.add_argument("--feature-cache", help="folder of stored backbone features (shared with `fastattr distill`): "
                       "rows whose features are there skip the backbones")

    p = index.add_parser("build", help="embed a training manifest into a new bundle")
    p.add_argument("--manifest", required=True, help="JSONL/CSV/Parquet manifest, or webdataset .tar shard(s)")
    p.add_argument("--encoder", required=True, help="encoder spec YAML")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--backend", choices=["exact", "usearch", "faiss"], help="default: exact below 50,000 items, else faiss HNSW32,SQ8 where faiss is installed, else usearch i8 (both re-ranked)")
    p.add_argument("--backend-param", action="append", metavar="KEY=VALUE",
                   help="e.g. dtype=f16, connectivity=32, factory=IVF256,PQ16, nprobe=16")
    p.add_argument("--name", help="the bundle's name, recorded in every credit (default: the --out folder name)")
    p.add_argument("--ray", action="store_true", help="embed on Ray workers, one per GPU (pip install "
                   "'fastattr[ray]'); on several nodes, <out>.partial, the images and the encoder files must be on "
                   "shared storage. `index add` has no --ray")
    p.add_argument("--ray-address", metavar="ADDR", help="with --ray: the cluster's HOST:PORT (`ray start --head` "
                   "prints it) or ray://HOST:PORT; default $RAY_ADDRESS, else Ray starts on this machine")
    p.add_argument("--ray-workers", type=int, metavar="N", help="with --ray: how many workers (default: one per "
                   "GPU of the cluster, else one per CPU)")
    embed_options(p)
    p.set_defaults(func=_index_build)
    p = index.add_parser("add", help="append a manifest's rows to a bundle, as a new index shard")
    p.add_argument("bundle", help="bundle directory (the folder holding bundle.yaml)")
    p.add_argument("--manifest", required=True, help="manifest of the new rows (ids already in the bundle are rejected)")
    embed_options(p)
    p.set_defaults(func=_index_add)
    p = index.add_parser("compact", help="merge the index shards into one index and delete removed items for good")
    p.add_argument("bundle", help="bundle directory (the folder holding bundle.yaml)")
    p.add_argument("--backend", choices=["exact", "usearch", "faiss"],
                   help="default: the bundle's (chosen by size again when it is exact)")
    p.add_argument("--backend-param", action="append", metavar="KEY=VALUE",
                   help="override one of the bundle's backend parameters, e.g. dtype=f16")
    p.set_defaults(func=_index_compact)
    p = index.add_parser("verify", help="check structure, checksums, counts, encoder; --deep re-embeds a sample")
    p.add_argument("bundle", help="bundle directory (the folder holding bundle.yaml)")
    p.add_argument("--deep", action="store_true", help="also re-embed a sample of items from their source images and "
                   "measure the backend's recall@10 against exact search")
    p.add_argument("--sample", type=int, default=32, help="with --deep: how many items to re-embed (default 32)")
    p.add_argument("--min-recall", type=float, default=0.95, help="with --deep: fail below this recall@10 "
                   "(default 0.95)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_index_verify)
    p = index.add_parser("info", help="show a bundle's description")
    p.add_argument("bundle", help="bundle directory (the folder holding bundle.yaml)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=_index_info)
    p = index.add_parser("remove", help="opt items out (by id, creator or license); effective at once")
    p.add_argument("bundle", help="bundle directory (the folder holding bundle.yaml)")
    p.add_argument("--ids", nargs="+", help="training ids to remove")
    p.add_argument("--creator", help="remove every item of this creator")
    p.add_argument("--license", help="remove every item under this license")
    p.add_argument("--reason", default="opt-out", help="recorded with each removal (default: opt-out)")
    p.set_defaults(func=_index_remove)
