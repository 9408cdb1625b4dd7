"""The training progress bar (rich): step, both loss components, learning rate, tokens/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Context manager; ``update(record)`` after each step, ``note(eval)`` prints a line."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                 console=self.console, disable=not enabled)
        self.task = self.progress.add_task("train", total=total, completed=done, stats="")
        self.enabled = enabled

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, r: dict) -> None:
        stats = (f"ar {r['ar_loss']:.3f}  diff {r['diff_loss']:.3f}  lr {r['lr']:.2e}  "
                 f"{r['tokens_per_s']:.0f} tok/s")
        self.progress.update(self.task, completed=r["step"], stats=stats)

    def note(self, r: dict) -> None:
        if self.enabled and set(r) - {"step", "final"}:  # nothing held out: no empty line
            text = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in r.items())
            self.progress.console.print(f"eval  {text}")
