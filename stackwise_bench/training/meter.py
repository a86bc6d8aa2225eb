"""The running sums of one training epoch, which an interrupted epoch's checkpoint carries (``progress.partial``).

Sums stay on the device (a float64 loss x samples, the task's tallies) and are read once per epoch, or when the
progress bar or a stop needs them; ``compile_s``/``compile_samples`` time the first compiled step of a process,
which includes compilation and is kept out of the training speed.
"""

from __future__ import annotations

import time

import torch

from stackwise_bench.training.precision import synchronize


class EpochMeter:
    """Loss, tallies, samples and time of the epoch being trained, continued from ``partial`` when resumed."""

    def __init__(self, device: torch.device, tallies: tuple[str, ...], partial: dict | None = None):
        partial = dict(partial or {})
        if "compile_imgs" in partial:  # checkpoints written before the task seam
            partial["compile_samples"] = partial.pop("compile_imgs")
        self.device = device
        self.loss = torch.tensor(float(partial.get("loss", 0.0)), device=device, dtype=torch.float64)
        self.names = tallies
        # each tally keeps the dtype the task counts in (an int64 count, a float sum): made by its first step
        self._tallies = {
            name: torch.tensor(
                partial[name], device=device, dtype=torch.float64 if isinstance(partial[name], float) else None
            )
            for name in tallies
            if name in partial
        }  # a float tally (masked LM's nats) is float64: a float32 one would round it on resume
        self.seen = int(partial.get("seen", 0))
        self.before_s = float(partial.get("time_s", 0.0))  # seconds of this epoch before the resume
        self.compile_s = float(partial.get("compile_s", 0.0))
        self.compile_samples = int(partial.get("compile_samples", 0))
        synchronize(device)
        self._t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int, tallies: dict[str, torch.Tensor]) -> None:
        self.loss += loss.detach().double() * samples
        for name, value in tallies.items():
            if name in self._tallies:
                self._tallies[name] += value
            else:
                self._tallies[name] = value.detach().clone()
        self.seen += samples

    @property
    def tallies(self) -> dict:
        """The task's tallies so far (0 for one no step has counted yet)."""
        return {name: self._tallies.get(name, 0) for name in self.names}

    def elapsed(self) -> float:
        """Seconds of this epoch so far (the resumed part included); reading it does not sync the device."""
        return self.before_s + time.perf_counter() - self._t0

    def finish(self) -> float:
        """The epoch's seconds, once the device has finished its work."""
        synchronize(self.device)
        return self.elapsed()

    def compiled(self, samples: int) -> bool:
        """The first compiled step just ran: the time so far was compilation. False: no step is pending now."""
        synchronize(self.device)
        self.compile_s += time.perf_counter() - self._t0
        self.compile_samples += samples
        return False

    def combine(self, total) -> None:
        """Replace this rank's sums by ``total`` of them (every rank's, on several devices) at the epoch's end."""
        names = list(self._tallies)
        summed = total([float(self.loss), float(self.seen), *(float(self._tallies[n]) for n in names)])
        self.loss = torch.tensor(summed[0], device=self.device, dtype=torch.float64)
        self.seen = int(round(summed[1]))
        for name, value in zip(names, summed[2:], strict=True):
            self._tallies[name] = torch.tensor(value, device=self.device).to(self._tallies[name].dtype)

    def mean_loss(self) -> float:
        return float(self.loss) / max(1, self.seen)

    def partial(self) -> dict:
        """The sums as plain numbers, for a mid-epoch checkpoint (synchronizes the device)."""
        synchronize(self.device)
        return {
            "loss": float(self.loss),
            **{name: value.item() for name, value in self._tallies.items()},
            "seen": self.seen,
            "time_s": self.elapsed(),
            "compile_s": self.compile_s,
            "compile_samples": self.compile_samples,
        }
