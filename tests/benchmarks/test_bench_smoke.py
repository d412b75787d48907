"""Smoke check of the training benchmark: the tiny preset runs end to end and prints its tables.

No timing assertions: CI machines are too noisy. The real-architecture presets are run by hand
(`python benchmarks/bench_train.py --preset cpu-real`) and their results kept in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"


def _bench_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_tiny_preset_prints_tables(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--steps", "2", "--only", "tiny-sd1-lora",
               "--results", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| tiny-sd1-lora |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 9
    assert all(float(cell) > 0 for cell in cells[1:])
    assert "| class images/s, batch 1" in done.stdout
    assert "| create model from single-file checkpoint (s) |" in done.stdout
    written = results.read_text()
    assert "Command: `python benchmarks/bench_train.py --preset tiny" in written
    assert "| tiny-sd1-lora |" in written and "torch " in written


def test_summary_ratios_and_warmup() -> None:
    bench = _bench_module()
    case = bench.Case("c", "sd1", False, "lora", 64, steps=6, images=2)
    assert case.warmup == 2
    runs = {"ours": [bench.RunResult([1.0, 3.0, 2.0], 10.0, 2.0)],
            "ref": [bench.RunResult([4.0, 4.0, 5.0], 20.0, 4.0)]}
    row = bench.summarise(case, runs)
    assert row["step_ratio"] == 0.5 and row["first_ratio"] == 0.5
    assert row["ours_rss_gib"] == 2.0 and row["ref_rss_gib"] == 4.0
    text = bench.table([row])
    assert text.splitlines()[2].startswith("| c | 2.000 | 4.000 | 0.50 |")
