"""One run on several devices: torch.distributed's process group, and what the loop asks of it.

A :class:`Group` is what the trainer knows of the other ranks. :data:`SINGLE` (one process) makes every method a
no-op, so the loop reads the same with one device or eight. With ``trainer.devices=N`` (:mod:`.ranks` starts the
ranks) every rank builds the same model from the same seed and draws the same batches; each trains on its own
slice of every batch (:meth:`Group.shard`), and DDP (or FSDP2's ``fully_shard``) averages the gradients. With
equal slices and mean losses, N ranks at ``B/N`` take the step one process takes at ``B``.

* **Evaluation** runs through :class:`GatherForward`: each rank scores its slice of a batch and the logits are
  gathered, so the task's metrics (top-1, a confusion matrix, bits per byte) are computed on every rank from the
  same numbers one process computes.
* **Checkpoints** are one file in the single-process format whatever the strategy: DDP's ranks hold the same
  weights and rank 0 saves them; FSDP gathers a full state dict (``torch.distributed.checkpoint.state_dict``) and
  keys the optimizer's state by index as ``Optimizer.state_dict`` does. One format means ``evaluate``, the PTQ
  formats and a resume on another number of devices read it as they read any run's; the cost, a full copy in rank
  0's host memory while saving, is what a sharded DCP checkpoint saves, and the models trained here fit one host.
* **Control**: the stop flags, the sums of an epoch and the checkpoints rank 0 reads go over a gloo group on the
  CPU, so asking "stop?" after each step never waits for a GPU stream.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import types
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")
UNSUMMED = ("time_s", "compile_s", "compile_samples")  # an epoch's partial sums that are times, not sums
TIMEOUT_S = 300  # a collective no rank reaches for this long fails; a dead rank is noticed at once (its socket closes)


@dataclasses.dataclass
class Group:
    """This process's place in the run: its rank among ``size``, the strategy, and the gloo group for control."""

    rank: int = 0
    size: int = 1
    strategy: str = "single"
    backend: str | None = None
    control: Any = None  # the CPU (gloo) group: flags, sums, objects; the default group when that is gloo
    device: str | None = None  # this rank's device (its local GPU, or the CPU)

    @property
    def leads(self) -> bool:
        """Rank 0: the one that holds the lease and writes the run folder."""
        return self.rank == 0

    def describe(self) -> dict:
        """``env``'s record of the group: world size, backend, strategy."""
        return {"world_size": self.size, "backend": self.backend, "strategy": self.strategy if self.size > 1 else None}

    # ---- data ----------------------------------------------------------------------------------------------------
    def shard(self, batch: tuple) -> tuple:
        """This rank's consecutive slice of every tensor of ``batch`` (training batches divide evenly: refused
        otherwise before any rank starts)."""
        if self.size == 1:
            return batch
        if isinstance(batch, dict):  # a sequence-pair task's ids, segments, mask and labels
            return {k: self.shard((v,))[0] if torch.is_tensor(v) else v for k, v in batch.items()}
        return tuple(torch.tensor_split(t, self.size)[self.rank] for t in batch)

    def own_partial(self, partial: dict) -> dict:
        """A resumed epoch's running sums as this rank continues them: rank 0 carries every rank's sums so far
        (:meth:`total_partial` saved them), the others start from zero."""
        return partial if self.leads else {k: v for k, v in partial.items() if k in UNSUMMED}

    def total_partial(self, partial: dict) -> dict:
        """An interrupted epoch's running sums (``EpochMeter.partial``) summed over the ranks, for ``last.pt``."""
        keys = [k for k in partial if k not in UNSUMMED]
        totals = dict(zip(keys, self.sum([float(partial[k]) for k in keys]), strict=True))
        return {**partial, **{k: type(partial[k])(v) for k, v in totals.items()}}

    # ---- the model -----------------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, blocks) -> torch.nn.Module:
        """Before the optimizer is built: FSDP2 shards ``blocks`` (each one unit) and the rest of the model."""
        if self.strategy != "fsdp":
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (self.size,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training step calls: DDP around ``model`` (again after a growth), FSDP's own module."""
        if self.strategy != "ddp":
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module evaluation calls: each rank scores its slice and the logits are gathered."""
        return model if self.size == 1 else GatherForward(model, self)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the ranks, on the device (no host sync: NCCL queues it on the stream)."""
        if self.size == 1:
            return value
        total = value.clone()
        dist.all_reduce(total)
        return total / self.size

    # ---- collectives on the CPU ----------------------------------------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (float64)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.control)
        return t.tolist()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag true on any rank: every rank takes the same branch (stop, save) at the same step."""
        if self.size == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return [bool(v) for v in t.tolist()]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; tensors come back on the CPU)."""
        if self.size == 1:
            return obj
        box = [obj if self.leads else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        box = [None] * self.size if self.leads else None
        dist.gather_object(obj, box, dst=0, group=self.control)
        return box

    # ---- state dicts in the single-process format ----------------------------------------------------------------
    def model_state(self, model: torch.nn.Module) -> dict:
        if self.strategy != "fsdp":
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model(self, model: torch.nn.Module, state: dict) -> None:
        if self.strategy != "fsdp":
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict:
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        named = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return _by_index(named) if self.leads else {}

    def load_optimizer(self, model: torch.nn.Module, optimizer, state: dict) -> None:
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        named = _by_name(state, optimizer, model)
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


SINGLE = Group()


def full_tensor(t):
    """A DTensor (FSDP's sharded values, and what is computed from them) as a whole tensor; others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _by_index(named: dict) -> dict:
    """An optimizer state dict keyed by parameter names (DCP's) keyed by index, as ``Optimizer.state_dict`` does."""
    index, groups = {}, []
    for group in named["param_groups"]:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: s for name, s in named["state"].items()}, "param_groups": groups}


def _by_name(state: dict, optimizer, model: torch.nn.Module) -> dict:
    """The reverse of :func:`_by_index` for this optimizer: index ``i`` is its ``i``-th parameter, by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}


class GatherForward(torch.nn.Module):
    """Evaluation on several ranks: each scores its slice of the batch (padded to equal lengths), the logits are
    gathered in rank order and the padding dropped, so the caller sees the whole batch's logits."""

    def __init__(self, model: torch.nn.Module, group: Group):
        super().__init__()
        self.inner, self.group = model, group

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["input_ids"]
        n, size = len(x), self.group.size
        length = -(-n // size)
        slices = torch.tensor_split(torch.arange(n, device=x.device), size)
        mine = slices[self.group.rank]
        padded = torch.cat([mine, mine.new_full((length - len(mine),), max(n - 1, 0))]) if len(mine) < length else mine

        def part(value):  # every per-sample input (ids, segment ids, attention masks) cut the same way
            return (
                value.index_select(0, padded) if torch.is_tensor(value) and value.dim() and len(value) == n else value
            )

        out = self.inner(*map(part, args), **{k: part(v) for k, v in kwargs.items()})
        logits = out.logits if hasattr(out, "logits") else out
        pieces = [torch.empty_like(logits) for _ in range(size)]
        dist.all_gather(pieces, logits.contiguous())
        full = torch.cat([p[: len(s)] for p, s in zip(pieces, slices, strict=True)])
        return types.SimpleNamespace(logits=full) if hasattr(out, "logits") else full


def init_group(rank: int, size: int, strategy: str, address: str, device: torch.device) -> Group:
    """Join the process group at ``address`` (``tcp://host:port``) as ``rank`` of ``size``: NCCL on CUDA with a
    gloo group beside it for control, gloo on the CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return Group(rank=rank, size=size, strategy=strategy, backend=backend, control=control, device=str(device))


def leave_group() -> None:
    """Close this process's connections: a rank still waiting in a collective fails at once instead of hanging."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # a peer already gone: nothing left to close cleanly
            log.debug("leaving the process group: %s", exc)


class SyncedStop:
    """The run's :class:`~stackwise_bench.training.stop.StopSignal` as every rank sees it: a signal that reached
    one rank stops them all at the same step (each read is a collective, so every rank reads at the same points)."""

    def __init__(self, stop, group: Group):
        self.inner, self.group = stop, group
        self._stopping = False

    @property
    def requested(self) -> bool:
        return self.group.any(self.inner.requested)[0]

    def poll(self) -> bool:
        """After a step: whether any rank must save ``last.pt`` now (to stop, or at a scheduler's SIGTERM)."""
        self._stopping, save = self.group.any(self.inner.requested, self.inner.save_now)
        return self._stopping or save

    def saved(self) -> bool:
        """``last.pt`` holds the step :meth:`poll` asked for; True when training stops there."""
        self.inner.save_now = False
        return self._stopping
