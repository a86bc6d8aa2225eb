"""The run record as each rank of a run on several devices sees it: rank 0 writes, every rank reads what it wrote.

Only rank 0 holds the folder's lease and writes into it (:class:`LeaderSink` is its record, unchanged); the other
ranks (:class:`FollowerSink`) write nothing. A checkpoint that every rank needs (``last.pt`` on a resume, ``best.pt``
for the test) is read once, by rank 0, with the record's checks (this run's, not damaged), and sent to the others,
so no rank ever opens a file another process is writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LeaderSink:
    """Rank 0's sink: the run record, with the checkpoints it loads sent to the other ranks."""

    def __init__(self, record, group):
        self.record, self.group = record, group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.record, name)

    def has_checkpoint(self, name: str) -> bool:
        return self.group.broadcast(self.record.has_checkpoint(name))

    def load_checkpoint(self, name: str, map_location: Any = "cpu") -> dict:
        try:
            state = self.record.load_checkpoint(name, map_location="cpu")  # sent from the CPU: no GPU copies
        except BaseException:
            self.group.broadcast(None)  # the others stop waiting; this rank raises the record's sentence
            raise
        return self.group.broadcast(state)


class FollowerSink:
    """A rank > 0's sink: rows, samples and checkpoints go nowhere (rank 0 writes the same ones), checkpoints come
    from rank 0."""

    wants_steps = False

    def __init__(self, group, run_dir: str | Path, device):
        self.group, self.dir, self.device = group, Path(run_dir), device

    def checkpoint_path(self, name: str) -> Path:
        return self.dir / "checkpoints" / f"{name}.pt"

    def has_checkpoint(self, name: str) -> bool:
        return self.group.broadcast(None)

    def load_checkpoint(self, name: str, map_location: Any = "cpu") -> dict:
        state = self.group.broadcast(None)
        if state is None:
            raise RuntimeError(f"rank 0 could not read {self.checkpoint_path(name)}; its record says why")
        return _to(state, map_location)

    def save_checkpoint(self, name: str, state: dict) -> None:
        pass

    def log_epoch(self, row: dict) -> None:
        pass

    def log_step(self, row: dict) -> None:
        pass

    def log_diagnostics(self, row: dict) -> None:
        pass

    def log_hardware(self, row: dict) -> None:
        pass

    def restart_logs(self) -> None:
        pass

    def trim_to_checkpoint(self, state: dict) -> None:
        pass


def _to(state: Any, device) -> Any:
    """``state``'s tensors on ``device`` (a broadcast object arrives on the CPU)."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to(v, device) for k, v in state.items()}
    if isinstance(state, list):
        return [_to(v, device) for v in state]
    return state
