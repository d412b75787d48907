"""Where a training step's time goes: torch.profiler over one steady-state step of ours or the reference loop.

    python benchmarks/profile_train.py --preset cpu-real --case sd15-512-lora-r4 --kind ours
    python benchmarks/profile_train.py --preset cpu-real --case sd15-512-dreambooth --kind ref --rows 40

Builds the same model, images and settings as bench_train.py (in a temporary folder), runs the chosen loop
in this process and prints the profiler's operator table for the first step after warm-up (sorted by self
CPU time, or CUDA time on a GPU), plus the time spent in the top-level phases it can see.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402  (the benchmark's setup and loops)


def profiled_run(kind: str, case: bench_train.Case, workdir: Path, rows: int, trace: Path | None) -> str:
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device == "cuda" else [])
    steps = case.warmup + 1
    run_case = replace(case, steps=steps + 1)
    plan = schedule(wait=steps - 1, warmup=0, active=1, repeat=1)
    with profile(activities=activities, schedule=plan, record_shapes=False) as profiler:
        def on_step(step: int) -> None:
            profiler.step()

        run = bench_train.reference_run if kind == "ref" else bench_train.ours_run
        run(run_case, workdir, on_step)
    if trace is not None:
        profiler.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if case.device == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=rows)


def find_case(preset: str, name: str) -> bench_train.Case:
    for case in bench_train.PRESETS[preset].cases:
        if case.name == name:
            return case
    names = ", ".join(c.name for c in bench_train.PRESETS[preset].cases)
    raise SystemExit(f"No case {name!r} in preset {preset}; choose one of {names}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(bench_train.PRESETS), default="tiny")
    parser.add_argument("--case", required=True)
    parser.add_argument("--kind", choices=("ours", "ref"), default="ours")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace (chrome://tracing) here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(bench_train.os.cpu_count() or 1)
    case = find_case(args.preset, args.case)
    with tempfile.TemporaryDirectory(prefix="db-profile-") as tmp:
        workdir = Path(tmp)
        model: Any = bench_train.prepare_model(case.family, case.real, workdir)
        bench_train.prepare_case(case, workdir, model)
        print(profiled_run(args.kind, case, workdir, args.rows, args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
