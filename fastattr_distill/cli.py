"""``fastattr distill ...``: train the head, measure it against the teacher, retrain without credits."""

from __future__ import annotations

import sys
from pathlib import Path


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
    if args.reference:
        data = data.with_reference(args.reference)
    tuned, baseline = Encoder.from_yaml(args.encoder, args.device), Encoder.from_yaml(args.baseline, args.device)
    cache = args.cache or Path(args.encoder).parent / "cache"
    report = evaluate(data, method_scores(data, tuned, baseline, cache), reference=args.reference or "main run")
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
            planned = len(cf.load_plan(job, args.config)["runs"])
            cf.report(job, cf.measure(job, args.config, partial=args.partial), out, _command_line(), planned)
            print(Path(out).with_suffix(".md").read_text(encoding="utf-8"))
    return 0


def register(commands) -> None:
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
    p.add_argument("--reference", help="judge against this teacher variant of the test queries (a seed no label "
                   "was made with) instead of the main run; the main run becomes a method")
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
    p.add_argument("--partial", action="store_true", help="report: read out the runs done so far (the reference "
                   "among them) while the others still train; the report says how many")
    p.set_defaults(func=_distill_counterfactual)
