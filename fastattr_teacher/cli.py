"""``fastattr teacher ...``: curate distillation data with the AbU teacher."""

from __future__ import annotations


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
            paths = dict.fromkeys(job.fisher_path_for(v) for v in [None, *job.variants])
            fishers = [str(p) for p in paths if p.is_file()]
            print(f"{', '.join(fishers) or 'no Fisher needed (every result is in)'}: ready, pre-training losses "
                  f"cached in {job.cache_dir}")
        elif args.teacher_command == "score":
            done = score_queue(job, args.config)
            print(f"{job.out}: scored {len(done)} queries in this process")
        else:
            out = merge(job, args.out, allow_partial=args.allow_partial, config_path=args.config)
            print(f"{out}: distillation dataset (how it was made: {out.with_suffix('.yaml')})")
    return 0


def register(commands) -> None:
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
