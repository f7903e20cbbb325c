"""The ``fastattr`` command line. Subcommands import their machinery lazily, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import FastattrError


def _sandbox_build(args) -> int:
    from fastattr_sandbox import build

    state = build.build(args.out, scale=args.scale, seed=args.seed, force=args.force)
    print(json.dumps({"sandbox": str(Path(args.out).resolve()), "figures": state["figures"]}, indent=1))
    return 0


def _sandbox_generate(args) -> int:
    from fastattr_sandbox import build

    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    images = build.generate(prompts, root=args.sandbox, seed=args.seed, steps=args.steps,
                            guidance_scale=args.guidance_scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out / f"{i:03d}.png"
        image.save(path)
        print(path)
    return 0


def _sandbox_prompts(args) -> int:
    from fastattr_sandbox import build
    from fastattr_sandbox.world import grammar_prompts
    from fastattr_hook._io import atomic_write_text

    root = Path(args.sandbox) if args.sandbox else build.sandbox_dir()
    data = root / "data"
    held_out = [json.loads(line) for line in (data / "query_prompts.jsonl").read_text().splitlines() if line]
    held_out = list({p["prompt"]: {**p, "source": "held-out"} for p in held_out}.values())[:args.count]
    captions = {json.loads(line)["caption"] for line in (data / "manifest.jsonl").read_text().splitlines() if line}
    extra = grammar_prompts(args.seed, args.count - len(held_out), captions | {p["prompt"] for p in held_out})
    rows = held_out + [{**p, "source": "grammar"} for p in extra]
    atomic_write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"{args.out}: {len(held_out)} held-out query prompts of {root} + {len(extra)} new grammar prompts "
          f"(none is a training caption)")
    return 0


def _sandbox_set_encoder(args) -> int:
    from fastattr_sandbox import build

    state = build.set_encoder(args.sandbox or build.sandbox_dir(), args.encoder)
    index = state["figures"]["index"]
    print(f"bundle rebuilt with encoder '{index['encoder']}' ({'tuned' if index['tuned'] else 'untuned'}); "
          f"checksums recorded in sandbox.yaml")
    return 0


def _sandbox_verify(args) -> int:
    from fastattr_sandbox import build

    files = build.verify(args.sandbox)
    print(f"{build.sandbox_dir(args.sandbox)}: {len(files)} files match sandbox.yaml")
    return 0


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

    return BuildOptions(backend=getattr(args, "backend", None), backend_params=_backend_params(getattr(args, "backend_param", [])),
                        chunk_size=args.chunk_size, num_workers=args.workers, device=args.device,
                        feature_cache=args.feature_cache)


def _index_build(args) -> int:
    from index_tools.build import build_bundle

    manifest = build_bundle(args.manifest, args.encoder, args.out, _build_options(args), resume=args.resume,
                            name=args.name)
    if manifest is not None:
        print(f"{args.out}: {manifest.items} items ({manifest.manifest.rejected} rows rejected, see "
              f"{Path(args.out) / 'rejects.jsonl'}), backend {manifest.backend}, dim {manifest.dim}")
    return 0


def _index_add(args) -> int:
    from index_tools.build import add_to_bundle

    manifest = add_to_bundle(args.bundle, args.manifest, _build_options(args), resume=args.resume)
    print(f"{args.bundle}: now {manifest.items} items ({manifest.manifest.rejected} rows rejected in total)")
    return 0


def _index_verify(args) -> int:
    from index_tools.verify import verify_bundle

    report = verify_bundle(args.bundle, deep=args.deep, sample=args.sample, min_recall=args.min_recall)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format())
    return 0 if report.ok else 1


def _index_info(args) -> int:
    from .bundle import Bundle
    from .config import to_dict

    bundle = Bundle.open(args.bundle)
    manifest = bundle.manifest
    with bundle.items() as store:
        removed = len(store.removed_keys())
    info = {**to_dict(manifest), "fingerprint": manifest.fingerprint, "removed": removed}
    info.pop("files")
    print(json.dumps(info, indent=1) if args.json else "\n".join(
        f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in info.items()))
    return 0


def _index_remove(args) -> int:
    from index_tools.optout import remove_items

    count = remove_items(args.bundle, ids=args.ids or (), creator=args.creator, license=args.license,
                         reason=args.reason)
    print(f"{args.bundle}: {count} items removed (they no longer appear in results)")
    return 0


def _attribute(args) -> int:
    from PIL import Image

    from .attributor import Attributor

    bundle = args.bundle
    if bundle is None:
        from fastattr_sandbox.build import DEFAULT_SANDBOX

        bundle = DEFAULT_SANDBOX / "bundle"
        print(f"no --bundle given: using the shipped sandbox bundle {bundle}", file=sys.stderr)
    print("loading the bundle and its encoder ...", file=sys.stderr)
    attributor = Attributor.from_bundle(bundle, device=args.device)
    images = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise FastattrError(f"{path}: cannot read image ({exc})") from None
    results = attributor.attribute(images, args.prompt, k=args.k)
    if args.write_metadata:
        import shutil

        from .metadata import C2paConfig, write_attribution_in_place

        if bool(args.c2pa_cert) != bool(args.c2pa_key):
            raise FastattrError("C2PA signing needs both --c2pa-cert and --c2pa-key")
        c2pa = C2paConfig(args.c2pa_cert, args.c2pa_key) if args.c2pa_cert else None
        for path, result in zip(args.images, results):
            target = Path(path)
            if args.out:  # copy first: writing metadata never re-encodes pixels
                Path(args.out).mkdir(parents=True, exist_ok=True)
                target = Path(shutil.copy2(path, Path(args.out) / target.name))
            write_attribution_in_place(target, result, c2pa=c2pa)
            print(f"wrote credits into {target}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1, ensure_ascii=False))
    else:  # captions and creators come from scraped data: control characters are shown escaped
        from .metadata import printable

        for path, result in zip(args.images, results):
            print(f"{path}  (prompt: {result.prompt!r}, {result.timing_ms['total']:.1f} ms)")
            for c in result.credits:
                print(f"  {c.rank:>3}. {printable(c.id):<24} score {c.score:+.4f}  share {c.share:6.1%}  "
                      f"{printable(c.creator or '-')} [{printable(c.license or '-')}]  {printable(c.caption[:60])}")
    return 0


def _inspect(args) -> int:
    from .metadata import printable, format_inspection, inspect_image

    reports = []
    for path in args.images:  # one bad file is reported; the others still are inspected
        try:
            reports.append(inspect_image(path))
        except FastattrError as exc:
            reports.append({"path": str(path), "error": str(exc), "agree": False})
    print(json.dumps(reports, indent=1, ensure_ascii=False) if args.json
          else "\n\n".join(f"{printable(r['path'])}: {printable(r['error'])}" if "error" in r
                             else format_inspection(r) for r in reports))
    return 0 if all(r.get("agree", True) for r in reports) else 1


def _demo(args) -> int:
    from integrations.demo import run_demo

    report = run_demo(args.out, prompts=args.prompt, k=args.k, seed=args.seed, steps=args.steps)
    print(f"images with embedded credits and the report: {report}")
    return 0


def _teacher(args) -> int:
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    from fastattr_teacher.curate import curate, load_job, run_fisher, score_queue
    from fastattr_teacher.merge import merge

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("fastattr_teacher").setLevel(logging.INFO)  # per-query seconds, Newton step sizes
    job = load_job(args.config)
    with logging_redirect_tqdm():  # per-query log lines print above the progress bars
        if args.teacher_command == "curate":
            plan = curate(job, args.config)
            if plan is not None:
                print(f"{job.plan_path}: {len(plan.queries)} queries over {len(plan.train_ids)} training items")
        elif args.teacher_command == "fisher":
            run_fisher(job, args.config)
            print(f"{job.fisher_path}: ready, pre-training losses cached in {job.cache_dir}")
        elif args.teacher_command == "score":
            done = score_queue(job, args.config)
            print(f"{job.out}: scored {len(done)} queries in this process")
        else:
            out = merge(job, args.out, allow_partial=args.allow_partial, config_path=args.config)
            print(f"{out}: distillation dataset (how it was made: {out.with_suffix('.yaml')})")
    return 0


def _distill_logging():
    """Per-epoch and per-run log lines above the progress bars."""
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("fastattr_distill").setLevel(logging.INFO)
    return logging_redirect_tqdm()


def _command_line() -> str:
    import shlex

    return "fastattr " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _distill_train(args) -> int:
    from fastattr_distill.train import load_config, train

    with _distill_logging():
        spec = train(load_config(args.config), args.config)
    print(f"{spec}: tuned encoder spec (head, training history: {spec.parent})")
    return 0


def _distill_eval(args) -> int:
    from fastattr_distill.data import load_dataset
    from fastattr_distill.evaluate import evaluate, method_scores, motif_check, write_report
    from fastattr_hook.encoder import Encoder

    print("loading the dataset and the encoders ...", file=sys.stderr)
    data = load_dataset(args.dataset)
    tuned, baseline = Encoder.from_yaml(args.encoder, args.device), Encoder.from_yaml(args.baseline, args.device)
    cache = args.cache or Path(args.encoder).parent / "cache"
    report = evaluate(data, method_scores(data, tuned, baseline, cache))
    if not args.no_motifs:
        report["motifs"] = motif_check({f"tuned ({tuned.spec.name})": tuned, "untuned concatenation": baseline},
                                       args.sandbox, data, cache)
    for path in write_report(report, args.out, _command_line()):
        print(path)
    print(Path(args.out).with_suffix(".md").read_text(encoding="utf-8"))
    return 0


def _distill_counterfactual(args) -> int:
    from fastattr_distill import counterfactual as cf

    job = cf.load_job(args.config)
    with _distill_logging():
        if args.step == "plan":
            meta = cf.plan(job, args.config)
            print(f"{job.out}/plan.json: {len(meta['runs'])} retraining runs (reference included)")
        elif args.step == "train":
            print(f"{job.out}: trained {len(cf.train_runs(job, args.config))} runs in this process")
        else:
            out = args.out or str(Path(job.out) / "counterfactual")
            cf.report(job, cf.measure(job, args.config), out, _command_line())
            print(Path(out).with_suffix(".md").read_text(encoding="utf-8"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastattr", description="fastattr: which training images made this "
                                     "image, in milliseconds. Each command has its own --help.")
    parser.add_argument("--version", action="version", version=f"fastattr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sandbox = commands.add_parser("sandbox", help="build and use the offline sandbox world").add_subparsers(
        dest="sandbox_command", metavar="ACTION", required=True)
    p = sandbox.add_parser("build", help="generate the dataset and train the sandbox models (resumable)")
    p.add_argument("--scale", choices=["micro", "default"], default="default")
    p.add_argument("--out", required=True, help="sandbox directory to create or resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild every stage")
    p.set_defaults(func=_sandbox_build)
    p = sandbox.add_parser("generate", help="sample images with the sandbox text-to-image model")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--out", required=True)
    p.add_argument("--sandbox", help="sandbox directory (default: the shipped one)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.set_defaults(func=_sandbox_generate)
    p = sandbox.add_parser("prompts", help="write held-out query prompts plus new prompts from the sandbox "
                           "grammar (JSONL), e.g. for `fastattr teacher` jobs")
    p.add_argument("--count", type=int, required=True, help="how many distinct prompts to write")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--sandbox", help="sandbox directory (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new grammar prompts")
    p.set_defaults(func=_sandbox_prompts)
    p = sandbox.add_parser("set-encoder", help="rebuild the sandbox's bundle with another encoder (e.g. the "
                           "distilled one in SANDBOX/tuned/) and record it")
    p.add_argument("--encoder", required=True, help="encoder spec inside the sandbox folder")
    p.add_argument("--sandbox", help="sandbox directory (default: the shipped one)")
    p.set_defaults(func=_sandbox_set_encoder)
    p = sandbox.add_parser("verify", help="check a sandbox's files against its checksums")
    p.add_argument("sandbox", nargs="?")
    p.set_defaults(func=_sandbox_verify)

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
    p.add_argument("--backend", choices=["exact", "usearch", "faiss"], help="default: exact for small sets, else usearch")
    p.add_argument("--backend-param", action="append", metavar="KEY=VALUE",
                   help="e.g. dtype=f16, connectivity=32, factory=IVF256,PQ16, nprobe=16")
    p.add_argument("--name", help="the bundle's name, recorded in every credit (default: the --out folder name)")
    embed_options(p)
    p.set_defaults(func=_index_build)
    p = index.add_parser("add", help="append a manifest's rows to a bundle")
    p.add_argument("bundle", help="bundle directory (the folder holding bundle.yaml)")
    p.add_argument("--manifest", required=True, help="manifest of the new rows (ids already in the bundle are rejected)")
    embed_options(p)
    p.set_defaults(func=_index_add)
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

    p = commands.add_parser("attribute", help="which training images made these images?")
    p.add_argument("images", nargs="+", help="generated images (PNG, JPEG, WebP)")
    p.add_argument("--prompt", required=True, help="the prompt they were generated from")
    p.add_argument("--bundle", help="index bundle (default: the shipped sandbox bundle)")
    p.add_argument("--k", type=int, default=10, help="credits per image (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one fastattr/attribution@1 object per "
                   "image (a list also for one image)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--write-metadata", action="store_true", help="embed the credits in each image (atomic)")
    p.add_argument("--out", help="with --write-metadata: write copies here instead of in place")
    p.add_argument("--c2pa-cert", help="with --write-metadata: PEM certificate chain to sign a C2PA manifest")
    p.add_argument("--c2pa-key", help="with --write-metadata: PEM private key of that certificate")
    p.set_defaults(func=_attribute)

    p = commands.add_parser("demo", help="generate with the shipped sandbox, attribute, write an HTML report")
    p.add_argument("--out", default="fastattr-demo")
    p.add_argument("--prompt", action="append", help="repeat for several prompts (default: 4 held-out prompts)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.set_defaults(func=_demo)

    teacher = commands.add_parser("teacher", help="the AbU teacher: curate distillation data (resumable, "
                                  "accelerate-aware)").add_subparsers(dest="teacher_command", metavar="ACTION",
                                                                      required=True)
    for action, text in (("curate", "plan queries, generate their images, pick stage-1/2 candidates"),
                         ("fisher", "compute the Fisher and the pre-training losses once (main process)"),
                         ("score", "score every query without a result yet (run under accelerate launch "
                                   "for many processes; rerun to resume)"),
                         ("merge", "merge the per-query results into one distillation dataset")):
        p = teacher.add_parser(action, help=text)
        p.add_argument("--config", required=True, help="curation job YAML")
        p.set_defaults(func=_teacher)
        if action == "merge":
            p.add_argument("--out", help="dataset file (default: OUT/distill.npz, its manifest beside it as .yaml)")
            p.add_argument("--allow-partial", action="store_true", help="merge even while some queries are unscored")

    distill = commands.add_parser("distill", help="train the attribution head from the teacher and measure it "
                                  "against the teacher").add_subparsers(dest="distill_command", metavar="ACTION",
                                                                        required=True)
    p = distill.add_parser("train", help="train the head (resumable per epoch; runs under accelerate launch)")
    p.add_argument("--config", required=True, help="distillation YAML (see README: The distilled encoder)")
    p.set_defaults(func=_distill_train)
    p = distill.add_parser("eval", help="mAP / Spearman / recall against the teacher on the test queries, for "
                           "random, untuned and tuned encoders and the teacher's variants")
    p.add_argument("--dataset", required=True, help="distill.npz (or its folder) made by `fastattr teacher merge`")
    p.add_argument("--encoder", required=True, help="the tuned encoder spec (made by `fastattr distill train`)")
    p.add_argument("--baseline", required=True, help="the untuned encoder spec with the same backbones")
    p.add_argument("--out", required=True, help="report path without suffix: writes OUT.json, OUT.md, OUT.png")
    p.add_argument("--cache", help="feature cache folder (default: the tuned encoder's folder/cache)")
    p.add_argument("--sandbox", help="sandbox for the rare-motif check (default: the shipped one)")
    p.add_argument("--no-motifs", action="store_true", help="skip the rare-motif check (needs a sandbox model)")
    p.add_argument("--device", help="torch device for the encoders (default: cuda when available)")
    p.set_defaults(func=_distill_eval)
    p = distill.add_parser("counterfactual", help="leave-K-out retraining: remove each method's top-K training "
                           "items, retrain, measure how much the query's loss and image change")
    p.add_argument("step", choices=["plan", "train", "report"], help="plan the runs; train them (resumable, "
                   "accelerate launch for many processes); measure and write the report")
    p.add_argument("--config", required=True, help="counterfactual job YAML")
    p.add_argument("--out", help="report: path without suffix (default: OUT/counterfactual) for .json/.md/.png")
    p.set_defaults(func=_distill_counterfactual)

    p = commands.add_parser("inspect", help="show the credit metadata carried by images")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastattrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command (with --resume where offered) to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
