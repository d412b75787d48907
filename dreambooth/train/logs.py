"""Training logs: always JSONL and CSV rows under the model's logging/ folder, TensorBoard events when available.

Rows are appended and flushed one at a time, so a crash loses at most the row being written and a resumed
run continues the same files.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import atomic
from .events import LossRecord

JSONL_NAME = "train_log.jsonl"
CSV_NAME = "train_log.csv"


def record_row(record: LossRecord, it_per_s: float) -> dict[str, Any]:
    """A flat row: step, loss, lr/<group>, concept/<index>, validation_loss, it_per_s."""
    row: dict[str, Any] = {"step": record.step, "loss": record.loss}
    row.update({f"lr/{name}": lr for name, lr in record.lr.items()})
    row.update({f"concept/{index}": loss for index, loss in sorted(record.per_concept.items())})
    row["validation_loss"] = record.validation_loss
    row["it_per_s"] = it_per_s
    row["time"] = time.time()
    return row


class TrainLog:
    def __init__(self, folder: Path, groups: list[str], concept_count: int, enabled: bool = True):
        self.folder = folder
        self.enabled = enabled
        self.columns = (["step", "loss"] + [f"lr/{g}" for g in groups]
                        + [f"concept/{i}" for i in range(concept_count)] + ["validation_loss", "it_per_s", "time"])
        self._tensorboard = self._open_tensorboard() if enabled else None

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional; JSONL/CSV are always written
            return None
        return SummaryWriter(log_dir=str(self.folder / "tensorboard"))

    def write(self, record: LossRecord, it_per_s: float) -> None:
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        row = record_row(record, it_per_s)
        with open(self.folder / JSONL_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        self._write_csv(row)
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "time") and value is not None:
                    self._tensorboard.add_scalar(key, value, record.step)
            self._tensorboard.flush()

    def _write_csv(self, row: dict[str, Any]) -> None:
        path = self.folder / CSV_NAME
        new_file = not path.exists()
        with open(path, "a", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def drop_rows_after(self, step: int) -> None:
        """Before a resumed run redoes the steps after its snapshot (`step`), drop the rows the interrupted run
        logged for them, so every step appears once. Only the trailing rows go: earlier runs' rows stay."""
        if not self.enabled:
            return
        jsonl = self.folder / JSONL_NAME
        if jsonl.is_file():
            lines = [line for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = _without_tail(lines, step, lambda line: json.loads(line).get("step"))
            if len(kept) < len(lines):
                atomic.write_text(jsonl, "".join(line + "\n" for line in kept))
        table = self.folder / CSV_NAME
        if table.is_file():
            lines = table.read_text(encoding="utf-8").splitlines()
            kept = lines[:1] + _without_tail(lines[1:], step, lambda line: next(csv.reader([line]))[0])
            if len(kept) < len(lines):
                atomic.write_text(table, "".join(line + "\r\n" for line in kept))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _without_tail(lines: list[str], step: int, step_of: Callable[[str], Any]) -> list[str]:
    """`lines` without the trailing ones whose step is above `step` (an unreadable line ends the tail)."""
    end = len(lines)
    while end > 0:
        try:
            if float(step_of(lines[end - 1])) <= step:
                break
        except (ValueError, TypeError, IndexError, StopIteration):
            break
        end -= 1
    return lines[:end]


def read_jsonl(folder: Path) -> list[dict[str, Any]]:
    path = folder / JSONL_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
