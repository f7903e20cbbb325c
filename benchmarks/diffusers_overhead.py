"""Generation time with vs without attribution on the sandbox pipeline, measured side by side.

    python benchmarks/diffusers_overhead.py [--repeats 11] [--batch 4] [--steps 25]

Runs are interleaved (plain, wrapper, callback, plain, ...) so machine noise hits all alike;
prints medians and the overhead ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastattr_hook.attributor import Attributor
from fastattr_sandbox import build
from integrations.demo import default_prompts
from integrations.diffusers_callback import AttributionCallback, with_attribution


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    root = build.sandbox_dir()
    pipe = build.load_pipeline(root)
    attributor = Attributor.from_bundle(root / "bundle")
    wrapped = with_attribution(pipe, attributor, k=10)
    prompts = default_prompts(args.batch)

    def plain():
        pipe(prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))

    def wrapper():
        wrapped(prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))

    def callback():
        pipe(prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
             callback_on_step_end=AttributionCallback(attributor, prompt=prompts, k=10))

    runs = {"plain": plain, "with_attribution": wrapper, "AttributionCallback": callback}
    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    print(f"sandbox pipeline, batch {args.batch}, {args.steps} DDIM steps, {args.repeats} interleaved repeats, "
          f"torch threads {torch.get_num_threads()}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>20}: median {median * 1e3:8.1f} ms/batch  ratio vs plain {median / base:.3f}  "
              f"overhead {(median - base) * 1e3 / args.batch:+.1f} ms/image")


if __name__ == "__main__":
    main()
