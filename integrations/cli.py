"""``fastattr demo``: generate with the shipped sandbox, attribute, write an HTML report."""

from __future__ import annotations


def _demo(args) -> int:
    from integrations.demo import run_demo

    report = run_demo(args.out, prompts=args.prompt, k=args.k, seed=args.seed, steps=args.steps)
    print(f"images with embedded credits and the report: {report}")
    return 0


def register(commands) -> None:
    p = commands.add_parser("demo", help="generate with the shipped sandbox, attribute, write an HTML report")
    p.add_argument("--out", default="fastattr-demo")
    p.add_argument("--prompt", action="append", help="repeat for several prompts (default: 4 held-out prompts)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.set_defaults(func=_demo)
