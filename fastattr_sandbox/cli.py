"""``fastattr sandbox ...``: build and use the offline sandbox world."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _sandbox_build(args) -> int:
    from fastattr_sandbox import build

    state = build.build(args.out, scale=args.scale, seed=args.seed, force=args.force)
    print(json.dumps({"sandbox": str(Path(args.out).resolve()), "figures": state["figures"]}, indent=1))
    return 0


def _sandbox_generate(args) -> int:
    from fastattr_sandbox import build

    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    print(f"loading the sandbox pipeline, then sampling {len(prompts)} images ...", file=sys.stderr)
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
    from fastattr_hook.errors import FastattrError
    from fastattr_hook.files import atomic_write_text
    from fastattr_teacher.curate import read_prompts

    root = Path(args.sandbox) if args.sandbox else build.sandbox_dir()
    data = root / "data"
    held_out = [json.loads(line) for line in (data / "query_prompts.jsonl").read_text().splitlines() if line]
    excluded = {prompt for path in args.exclude for prompt in read_prompts(path)}
    held_out = [p for p in {p["prompt"]: {**p, "source": "held-out"} for p in held_out}.values()
                if p["prompt"] not in excluded][:args.count]
    captions = {json.loads(line)["caption"] for line in (data / "manifest.jsonl").read_text().splitlines() if line}
    if not 0 <= args.motif_rate <= 1:
        raise FastattrError(f"--motif-rate {args.motif_rate}: must be between 0 and 1")
    extra = grammar_prompts(args.seed, args.count - len(held_out),
                            captions | excluded | {p["prompt"] for p in held_out}, motif_rate=args.motif_rate)
    rows = held_out + [{**p, "source": "grammar"} for p in extra]
    atomic_write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"{args.out}: {len(held_out)} held-out query prompts of {root} + {len(extra)} new grammar prompts "
          f"(none is a training caption{' or a prompt of ' + ', '.join(args.exclude) if args.exclude else ''})")
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


def register(commands) -> None:
    sandbox = commands.add_parser("sandbox", help="build and use the offline sandbox world").add_subparsers(
        dest="sandbox_command", metavar="ACTION", required=True)
    p = sandbox.add_parser("build", help="generate the dataset and train the sandbox models (resumable)")
    p.add_argument("--scale", choices=["micro", "default"], default="default",
                   help="micro: the seconds-sized world the tests use; default: the shipped one (default: %(default)s)")
    p.add_argument("--out", required=True, help="sandbox directory to create or resume")
    p.add_argument("--seed", type=int, default=0, help="seed of the world: images, captions and training")
    p.add_argument("--force", action="store_true", help="rebuild every stage")
    p.set_defaults(func=_sandbox_build)
    p = sandbox.add_parser("generate", help="sample images with the sandbox text-to-image model")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--out", required=True, help="folder for the images (000.png, 001.png, ...)")
    p.add_argument("--sandbox", help="sandbox directory (default: the shipped one)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same images)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=4.0, help="classifier-free guidance (default: %(default)s)")
    p.set_defaults(func=_sandbox_generate)
    p = sandbox.add_parser("prompts", help="write held-out query prompts plus new prompts from the sandbox "
                           "grammar (JSONL), e.g. for `fastattr teacher` jobs")
    p.add_argument("--count", type=int, required=True, help="how many distinct prompts to write")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--sandbox", help="sandbox directory (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new grammar prompts")
    p.add_argument("--exclude", action="append", default=[], metavar="PROMPTS",
                   help="a prompts file (JSONL) whose prompts must not recur, e.g. an earlier job's, so that a new "
                   "job's train prompts are never that job's test prompts (repeatable)")
    p.add_argument("--motif-rate", type=float, default=1 / 12, metavar="SHARE",
                   help="share of the new prompts that ask for one of the 4 rare motifs (default: 1/12, as the "
                   "training captions; 1: a motif job for the rare-motif check)")
    p.set_defaults(func=_sandbox_prompts)
    p = sandbox.add_parser("set-encoder", help="rebuild the sandbox's bundle with another encoder (e.g. the "
                           "distilled one in SANDBOX/tuned/) and record it")
    p.add_argument("--encoder", required=True, help="encoder spec inside the sandbox folder")
    p.add_argument("--sandbox", help="sandbox directory (default: the shipped one)")
    p.set_defaults(func=_sandbox_set_encoder)
    p = sandbox.add_parser("verify", help="check a sandbox's files against its checksums")
    p.add_argument("sandbox", nargs="?", help="sandbox directory (default: the shipped one)")
    p.set_defaults(func=_sandbox_verify)
