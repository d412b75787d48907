"""Fixtures of the reliability tests: the tiny SD1 weights (built once), workspaces, and fork-server zygotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import dreambooth

HERE = Path(__file__).resolve().parent
REPO = Path(dreambooth.__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import faultkit  # noqa: E402


@pytest.fixture(scope="session")
def base_working(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved working/ folder of the tiny SD1 model (random weights, seed 0)."""
    from dreambooth.models.components import save_components
    from dreambooth.models.tiny import tiny_components

    folder = tmp_path_factory.mktemp("tiny-sd1") / "working"
    save_components(tiny_components("sd1", seed=0), folder)
    return folder


@pytest.fixture
def workspace(tmp_path: Path, base_working: Path) -> Callable[..., Path]:
    """`workspace(variant, **settings)`: a fresh models folder with model 'tiny' configured for `variant`."""
    counter = iter(range(1000))

    def make(variant: str = "dreambooth", **overrides: Any) -> Path:
        return faultkit.make_workspace(tmp_path / f"ws{next(counter)}", base_working, variant, **overrides)

    return make


class Zygote:
    """A `faultkit.py` process that has imported the heavy libraries and forks one child per phase."""

    def __init__(self, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen([sys.executable, str(HERE / "faultkit.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                        cwd=str(REPO))
        ready = self._line()
        if ready != "ready":
            raise RuntimeError(f"fault-kit zygote did not start: {ready!r}")

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def run(self, scenario: list[dict[str, Any]]) -> list[int]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(scenario) + "\n")
        self.process.stdin.flush()
        line = self._line()
        if not line:
            raise RuntimeError("fault-kit zygote exited")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def zygotes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Zygote]]:
    """Two zygotes (CI has two cores; each child trains on one thread); their stderr goes to zygote-N.log."""
    if not hasattr(os, "fork"):
        pytest.skip("the crash tests fork training processes; this platform has no fork()")
    logs = tmp_path_factory.mktemp("zygotes")
    started = [Zygote(logs / f"zygote-{n}.log") for n in range(2)]
    yield started
    for zygote in started:
        zygote.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`small_tmpfs(bytes, at=None)`: a tmpfs of that size (a really full disk) mounted on `at` (an empty
    folder) or a new folder; skips the test where mounting is not permitted (no root, no CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size: int, at: Path | None = None) -> Path:
        point = at or tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}); "
                        "the failing-writer variants still run")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
