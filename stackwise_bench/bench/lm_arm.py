"""One arm of the nanoGPT figure (:mod:`.lm`), in a process of its own:
``python -m stackwise_bench.bench.lm_arm SPEC.json``.

The arm runs either nanoGPT's own ``train.py`` (vendored in ``nanogpt/``, unchanged) or ``python -m
stackwise_bench.train`` exactly as a user would (``runpy``, the real ``sys.argv``), and watches both from the
outside with the same three hooks, so neither side is timed or scored by its own code:

- **step clock**: torch's global optimizer-step hook marks the end of every update
  (:class:`~stackwise_bench.bench.harness.StepClock`); the interval between two marks is one whole step, its data
  fetch included;
- **evaluations**: every ``eval()`` of the root model (nanoGPT's ``GPT``, transformers' ``GPT2LMHeadModel``) is
  noted with the number of updates done, so the intervals holding an evaluation (and the checkpoint written with
  it) are left out of the timing;
- **the judge**: at the first root ``eval()`` after ``judge.at_steps`` updates, the model in hand is scored by one
  function for both sides: total nats over every target of the validation split's exact contiguous windows
  (:func:`~stackwise_bench.data.text.windows.contiguous_batches`), read from the very ``val.bin`` both sides read.

nanoGPT seeds once, ``torch.manual_seed(1337 + seed_offset)``, and has no seed knob: the arm adds the run's seed to
that call (``spec["seed"]``), the only thing it changes.
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOTS = ("GPT", "GPT2LMHeadModel")  # the root model of each side: its eval() marks an evaluation


def judge(model, val_path: str, seq_len: int, batch: int, device, max_tokens: int | None = None) -> dict:
    """Mean nats per target over the exact contiguous windows of ``val_path`` (uint16 ids; its first
    ``max_tokens``), for either side, and the model's parameter count (a tied tensor once)."""
    from stackwise_bench.data.text.windows import contiguous_batches

    tokens = np.memmap(val_path, dtype=np.uint16, mode="r")[:max_tokens]
    nats, n = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for x, y in contiguous_batches(tokens, seq_len, batch, device, "val"):
            if type(model).__name__ == "GPT":
                logits, _ = model(x, y.contiguous())  # nanoGPT: logits at every position given targets
            else:
                logits = model(input_ids=x, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            nats += loss.double().cpu()
            n += y.numel()
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"loss": float(nats) / n, "targets": n, "params": params}


def watch(spec: dict, clock) -> tuple[list, dict]:
    """Patch ``Module.train`` so a root model's ``eval()`` is noted (and judged when due); returns both records."""
    evals, judged = [], {}
    train = torch.nn.Module.train
    j = spec["judge"]

    def noted_train(self, mode: bool = True):
        out = train(self, mode)
        if not mode and type(self).__name__ in ROOTS:
            done = len(clock.marks)
            evals.append(done)
            if done in j["at_steps"] and done not in judged:
                judged[done] = judge(self, j["val_path"], j["seq_len"], j["batch"], clock.device, j.get("max_tokens"))
        return out

    torch.nn.Module.train = noted_train
    return evals, judged


def seed_nanogpt(seed: int) -> None:
    """nanoGPT's one ``torch.manual_seed(1337 + seed_offset)`` becomes ``1337 + seed_offset + seed``."""
    manual_seed = torch.manual_seed

    def seeded(value):
        torch.manual_seed = manual_seed  # once: later calls (if any) are left alone
        return manual_seed(value + seed)

    torch.manual_seed = seeded


def main(spec_path: str) -> None:
    from stackwise_bench.bench.harness import StepClock

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    with StepClock(device) as clock:
        evals, judged = watch(spec, clock)
        if spec["side"] == "nanogpt":
            seed_nanogpt(int(spec["seed"]))
            sys.argv = ["train.py", *spec["argv"]]
            sys.path.insert(0, spec["script_dir"])  # train.py imports model.py from beside it
            runpy.run_path(str(Path(spec["script_dir"]) / "train.py"), run_name="__main__")
        else:
            sys.argv = ["stackwise_bench.train", *spec["argv"]]
            try:
                runpy.run_module("stackwise_bench.train", run_name="__main__", alter_sys=True)
            except SystemExit as exc:  # Hydra's main may exit; only a failure matters
                if exc.code not in (None, 0):
                    raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        seconds = [a.elapsed_time(b) / 1e3 for a, b in zip(clock.marks, clock.marks[1:])]
    else:
        seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    result = {
        "side": spec["side"],
        "seed": spec["seed"],
        "updates": len(clock.marks),
        "intervals_s": seconds,  # intervals_s[i]: from the end of update i + 1 to the end of update i + 2
        "evals_after": evals,  # updates done at each root eval(): that update's following interval holds it
        "judged": {str(k): v for k, v in judged.items()},
        "threads": torch.get_num_threads(),
        "finished": time.time(),
    }
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
