"""``fastattr demo``: generate with the shipped sandbox, attribute, write an HTML report."""

from __future__ import annotations


def _demo(args) -> int:
    from integrations.demo import run_demo

    report = run_demo(args.out, prompts=args.prompt, k=args.k, seed=args.seed, steps=args.steps)
    print(f"images with embedded credits and the report: {report}")
    return 0


def register(commands) -> None:
    p = commands.add_parser("demo", help="generate with the shipped sandbox, attribute, write an HTML report")
    p.add_argument("--out", default="fastattr-demo", help="folder for the images and report.html (default: %(default)s)")
    p.add_argument("--prompt", action="append", help="repeat for several prompts (default: 4 held-out prompts)")
    p.add_argument("--k", type=int, default=5, help="credits per image (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default: %(default)s)")
    p.set_defaults(func=_demo)
