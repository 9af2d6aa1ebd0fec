"""Rich progress bars for training: one bar per epoch with loss, accuracy and current sparsity.

An `EpochBars` is the `progress` factory `run_pruning` takes: `bars(description, batches)`
returns a bar that the loop updates after every batch and closes with the epoch's record.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class EpochBars:
    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}  "
                       "sparsity {task.fields[sparsity]:.3f}{task.fields[test]}"),
            TimeElapsedColumn(), console=console,
        )
        self.progress.start()

    def __call__(self, description: str, total: int) -> "EpochBar":
        task = self.progress.add_task(description, total=total, loss=0.0, acc=0.0, sparsity=0.0, test="")
        return EpochBar(self.progress, task)

    def stop(self) -> None:
        self.progress.stop()


class EpochBar:
    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task

    def update(self, **fields: float) -> None:
        self.progress.update(self.task, advance=1, **fields)

    def close(self, record: dict[str, Any]) -> None:
        split = "val" if "val_acc" in record else "test"
        self.progress.update(self.task, loss=record["loss"], acc=record["train_acc"],
                             sparsity=record["sparsity"], test=f"  {split} {record[f'{split}_acc']:.3f}")
