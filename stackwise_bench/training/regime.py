"""Training regimes: whether the network's depth is fixed (``Classical``) or grows over training (``DepthTime``).

The trainer drives a regime through a handful of hooks (the same on both classes):

- at build time: ``setup(model)`` before the optimizer is built, then ``plan(total_steps)``;
- each training step: ``before_step(global_step, model, optimizer, scheduler)`` first thing, before the forward,
  ``optimizer.zero_grad`` and ``optimizer.step`` (``global_step`` = the steps done so far; ``scheduler.step()``
  stays after ``optimizer.step()``, so ``scheduler.last_epoch == global_step`` here);
- in every checkpoint: ``state_dict()``; on resume, BEFORE the model/optimizer/scheduler states are loaded:
  ``load_state_dict(saved)`` then ``replay(saved["stage"], model, optimizer, scheduler)``. Use the saved
  ``stage``, not ``stage_at(global_step)``: a checkpoint taken right before a growth step is one stage behind.
- what is tested (:attr:`tested`): the best validation among the epochs at the final depth; ``at_final_depth(step)``
  says which epochs those are (every epoch of a classical run; a depth-time run's from its last growth on), so an
  arm is compared as what it delivers at the end of its budget, never as the shallower network of an earlier stage.

Optimizer layout after a growth (the groups are rebuilt from the model, in model order, at every growth):
``rackwise``: ``[decayed, not decayed]``, exactly :func:`~stackwise_bench.training.optim.param_groups` of the grown
model; ``stackwise``: the non-block pair first, then one pair per stack, oldest first (empty groups are left out;
each group carries ``"stack"``: None for non-block parameters, else the stage its blocks were born in). Group 0
is thus always at the full rate: the one the trainer logs. Every group takes group 0's other hyperparameters
(betas, eps, momentum, fused, ...); decayed groups the largest ``weight_decay`` among the groups (``build_optimizer``
gives decayed weights ``weight_decay``, the rest 0), the others 0, by :func:`decays`. Optimizer state is keyed by
the Parameter objects, which growth keeps in place under their new names, so old parameters keep their state with
no remapping. Groups added to a ``LambdaLR`` need ``scheduler.base_lrs`` and ``scheduler.lr_lambdas`` extended
(``scheduler.step()`` zips them with the groups, strictly): the regime rebuilds both, with the one shared lambda of
``build_scheduler``.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch

from stackwise_bench.errors import ConfigError
from stackwise_bench.nn.growth import INITS, MODES, Growth, block_lists, depth_of, grow, truncate
from stackwise_bench.nn.resnet import CifarResNet
from stackwise_bench.training.optim import decays
from stackwise_bench.values import is_int, is_number

SCOPES = ("rackwise", "stackwise")
OPTIMIZER_STATES = ("copy", "reset")
# The checkpoint a run is tested with (summary.json's test.checkpoint_policy): the trainer picks best.pt among the
# epochs at the final depth only, counts early-stopping patience there only, and always evaluates the last epoch.
TESTED = "best validation epoch at the final depth"


class Classical:
    """Fixed depth, today's behaviour: every hook is a no-op.

    ``match=True`` makes it the *matched* classical arm of a depth-as-time study: its FLOP budget is what a
    :class:`DepthTime` run with ``stacks`` and ``boundaries`` (None: derived as DepthTime derives them) spends over
    the same ``trainer.max_epochs``, and its schedule spans that budget (Kaddour et al., 2023: the fair baseline
    decays its learning rate within the smaller budget; it is not a full-length run cut short). With ``match=False``
    the stacks are only recorded: a study sets one schedule on every arm, and the full-budget classical arm keeps its
    full budget.
    """

    name = "classical"
    stage = 0
    tested = TESTED  # every epoch is at the final depth: the best validation epoch

    def __init__(self, stacks: list[int] | None = None, boundaries: list[float] | None = None, match: bool = False):
        if not isinstance(match, bool):
            raise ConfigError(f"regime.match={match} must be true or false; use e.g. regime.match=true.")
        # match=true without stacks/boundaries: depth_time's own defaults, derived from the model in setup()
        schedule = DepthTime(stacks, boundaries, init="identity") if match or stacks is not None else None
        if schedule is not None:
            schedule.called = "regime.match=true spends the FLOPs of a depth_time run, which"  # in its refusals
        self.matched = schedule if match else None

    def setup(self, model, model_name: str | None = None) -> None:
        if self.matched is not None:  # checks (or derives) the stacks at the model's depth on a truncated copy
            self.matched.setup(copy.deepcopy(model), model_name)

    def plan(self, total_steps: int) -> list[int]:
        return []

    def stage_at(self, global_step: int) -> int:
        return 0

    def depth_at(self, stage: int) -> int | None:
        """None: the model's own depth."""
        return None

    def acts_at(self, global_step: int) -> bool:
        """Whether :meth:`before_step` has anything to do before the step after ``global_step``: never here."""
        return False

    def at_final_depth(self, global_step: int) -> bool:
        """Whether the model after ``global_step`` steps is the one the run ends with: always here."""
        return True

    def grows_at(self, global_step: int) -> bool:
        return False

    def before_step(self, global_step: int, model, optimizer, scheduler) -> dict | None:
        return None

    def replay(self, stage: int, model, optimizer, scheduler) -> None:
        if stage != 0:
            raise ValueError(f"a classical run has only stage 0, not {stage}")

    def lr_multiplier(self, global_step: int) -> float:
        return 1.0

    def state_dict(self) -> dict:
        return {"stage": 0}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        """The schedule actually used (``matched_*``: the derived one, where the config left it null)."""
        if self.matched is None:
            return {"regime": self.name}
        return {
            "regime": self.name,
            "matched_stacks": self.matched.stacks,
            "matched_boundaries": self.matched.boundaries,
        }


class DepthTime:
    """Depth as time: train ``stacks[0]`` blocks, grow to ``stacks[i]`` at ``boundaries[i-1]`` of training.

    ``stacks=None`` (the YAML's null) derives them from the model in :meth:`setup` (:func:`default_stacks`);
    ``boundaries=None`` splits training into equal shares (:func:`equal_shares`); :meth:`describe` records the
    schedule actually used.

    Stages are numbered from 0: stage ``i`` trains ``stacks[i]`` blocks (per stage, for a CIFAR ResNet) and begins
    at global step ``plan[i-1]``; growth ``i`` (to stage ``i``) happens in ``before_step`` of that step, before
    its forward. ``building_mode``/``init`` are :func:`~stackwise_bench.nn.growth.grow`'s; its randomness
    (identity/random inits) comes from a CPU generator seeded from ``(seed, stage)``, never the global RNG.

    ``scope=stackwise``: at every growth the blocks that existed before it have their LR multiplied by
    ``old_lr_factor``, which compounds: the blocks born in stage ``t`` train at ``old_lr_factor ** (stage - t)``
    of the full rate. Non-block parameters (stem, embeddings, norms, head) always train at the full rate.
    ``old_lr_factor=0`` freezes the old blocks: ``requires_grad=False`` (no gradient, so no optimizer update and
    no weight decay) and LR 0; their BatchNorm running statistics still track in train mode.

    ``optimizer_state=copy``: a new parameter copied from a source block (``init=copy``) starts with a clone of
    the source's optimizer state (AdamW ``step``/``exp_avg``/``exp_avg_sq``, SGD ``momentum_buffer``); ``reset``:
    empty state. With ``init=identity|random`` there is no source, so both mean empty state (accepted, not refused,
    so the default works with every init). New parameters always train (``requires_grad=True``).

    ``lr_rewarm_steps=R > 0``: for ``k < R`` steps after a growth, every group's LR is ``base_lr * lambda(step) *
    (k+1)/R`` (:meth:`lr_multiplier`); ``before_step`` sets it after the scheduler's own value, which the next
    ``scheduler.step()`` recomputes from ``base_lrs`` (LambdaLR is closed-form), so the ramp never compounds.
    """

    name = "depth_time"
    tested = TESTED  # best.pt is chosen among the epochs after the last growth (:meth:`at_final_depth`)

    def __init__(
        self,
        stacks: list[int] | None = None,
        boundaries: list[float] | None = None,
        building_mode: str = "append",
        init: str = "copy",
        scope: str = "rackwise",
        old_lr_factor: float = 1.0,
        optimizer_state: str = "copy",
        lr_rewarm_steps: int = 0,
        seed: int = 0,
    ):
        # None until setup() derives them from the model (default_stacks, equal shares), where the config left null
        self.stacks: list[int] | None = None if stacks is None else _listed(stacks, "stacks", "[1,2,4]")
        if self.stacks is not None and (
            not self.stacks or not all(is_int(s) and s >= 1 for s in self.stacks) or _unsorted(self.stacks)
        ):
            raise ConfigError(
                f"regime.stacks={self.stacks} must be a non-empty list of positive integers in strictly increasing "
                "order; use e.g. regime.stacks=[1,2,4]."
            )
        self.boundaries = None if boundaries is None else _listed(boundaries, "boundaries", "[0.25,0.5]")
        if self.boundaries is not None:
            if self.stacks is not None:
                self._check_boundary_count()
            if not all(is_number(b) and 0 < b < 1 for b in self.boundaries) or _unsorted(self.boundaries):
                raise ConfigError(
                    f"regime.boundaries={self.boundaries} must be fractions of training strictly between 0 and 1, "
                    "in strictly increasing order; use e.g. regime.boundaries=[0.25,0.5]."
                )
            self.boundaries = [float(b) for b in self.boundaries]
        elif self.stacks is not None:
            self.boundaries = equal_shares(len(self.stacks))
        self.building_mode = _choice(building_mode, MODES, "building_mode")
        self.init = _choice(init, INITS, "init")
        self.scope = _choice(scope, SCOPES, "scope")
        self.optimizer_state = _choice(optimizer_state, OPTIMIZER_STATES, "optimizer_state")
        if not is_number(old_lr_factor) or not 0 <= old_lr_factor <= 1:
            raise ConfigError(
                f"regime.old_lr_factor={old_lr_factor} must be a number in [0, 1] (0 freezes the old blocks); "
                "use e.g. regime.old_lr_factor=0.1."
            )
        if self.scope == "rackwise" and old_lr_factor != 1:
            raise ConfigError(
                f"regime.old_lr_factor={old_lr_factor} needs regime.scope=stackwise (rackwise trains every block at "
                "the full rate); set regime.scope=stackwise or regime.old_lr_factor=1."
            )
        self.old_lr_factor = float(old_lr_factor)
        if not is_int(lr_rewarm_steps) or lr_rewarm_steps < 0:
            raise ConfigError(
                f"regime.lr_rewarm_steps={lr_rewarm_steps} must be a non-negative integer (0 = no rewarm); "
                "use e.g. regime.lr_rewarm_steps=100."
            )
        if not is_int(seed):
            raise ConfigError(f"regime.seed={seed} must be an integer; use e.g. regime.seed=0.")
        self.lr_rewarm_steps, self.seed = int(lr_rewarm_steps), int(seed)
        self.growth_steps: list[int] | None = None  # set by plan() or load_state_dict()
        self.called = "regime=depth_time"  # what the refusal of a model that cannot grow names
        self._reset()

    def _check_boundary_count(self, derived: str = "") -> None:
        if len(self.boundaries) != len(self.stacks) - 1:
            raise ConfigError(
                f"regime.boundaries={self.boundaries} has {len(self.boundaries)} entries but regime.stacks="
                f"{self.stacks}{derived} needs {len(self.stacks) - 1}, one per stage after the first."
            )

    def _reset(self) -> None:
        self.stage = 0  # the stage the model is built for now
        self.last_growth: Growth | None = None  # grow()'s report of the latest growth (new names, sources)
        self._born: dict[int, int] = {}  # id(block parameter) -> the stage its block was born in
        self._base_lr: float | None = None  # the full rate: scheduler.base_lrs[0] when first regrouped

    # ------------------------------------------------------------------ schedule
    def setup(self, model, model_name: str | None = None) -> None:
        """Check that ``stacks[-1]`` is the model's depth, then truncate it to ``stacks[0]`` (before the optimizer).

        Stacks left null are derived from the model's depth (:func:`default_stacks`), boundaries left null split
        training into equal shares; a model of one block (per stage) cannot grow and is refused, naming
        ``model_name`` (the config's ``model.name``) where given.
        """
        depth = depth_of(model)
        if self.stacks is None:
            self._derive(depth, model, model_name)
        if depth != self.stacks[-1]:
            raise ConfigError(
                f"regime.stacks={self.stacks} ends at depth {self.stacks[-1]} but the model has depth {depth}; make "
                f"the last entry {depth} or set the model's depth to {self.stacks[-1]}."
            )
        if self.init == "copy" and isinstance(model, CifarResNet) and self.stacks[0] < 2 and len(self.stacks) > 1:
            raise ConfigError(
                f"regime.init=copy: CifarResNet starting at regime.stacks[0]={self.stacks[0]} has only block 0 per "
                "stage, which is never copied; use regime.init=identity or random, or start from depth 2."
            )
        truncate(model, self.stacks[0])
        self._reset()

    def _derive(self, depth: int, model, model_name: str | None) -> None:
        stacks = default_stacks(depth)
        if len(stacks) < 2:
            model_key = f"model={model_name}" if model_name else f"the model ({type(model).__name__})"
            if isinstance(model, CifarResNet):
                raise ConfigError(
                    f"{self.called} grows a model block by block, and {model_key} has {depth} block per stage: "
                    "pick model=resnet14 or a ViT (vit_micro_p4, vit_tiny_p4, deit_tiny), or regime=classical."
                )
            raise ConfigError(
                f"{self.called} grows a model block by block, and {model_key} has {depth} block: raise "
                "model.depth (e.g. model.depth=2), or use regime=classical."
            )
        self.stacks = stacks
        if self.boundaries is None:
            self.boundaries = equal_shares(len(stacks))
        self._check_boundary_count(f" (derived from the model's depth {depth}; set regime.stacks to choose)")

    def plan(self, total_steps: int) -> list[int]:
        """The global steps at which stages 1.. begin: ``floor(b * total_steps + 0.5)`` (halves round up).

        Each must lie in ``[1, total_steps - 1]`` and be distinct, else ConfigError. Kept as ``growth_steps``.
        """
        if not is_int(total_steps) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be a positive integer")
        steps = [math.floor(b * total_steps + 0.5) for b in self.boundaries]
        if any(not 1 <= s < total_steps for s in steps) or len(set(steps)) < len(steps):
            raise ConfigError(
                f"regime.boundaries={self.boundaries} put the growths at steps {steps} of {total_steps} training "
                f"steps, which must be distinct and between 1 and {total_steps - 1}; use fewer stages, boundaries "
                "further apart or more training steps."
            )
        self.growth_steps = steps
        return list(steps)

    def _plan(self) -> list[int]:
        if self.growth_steps is None:
            raise RuntimeError("DepthTime.plan(total_steps) must be called before training")
        return self.growth_steps

    def stage_at(self, global_step: int) -> int:
        """The stage of the step that runs after ``global_step`` steps are done."""
        return sum(s <= global_step for s in self._plan())

    def depth_at(self, stage: int) -> int:
        return self.stacks[stage]

    def lr_multiplier(self, global_step: int) -> float:
        """``(k+1)/lr_rewarm_steps`` on the k-th step after the latest growth while ``k < lr_rewarm_steps``, else 1."""
        done = [s for s in self._plan() if s <= global_step]
        if not self.lr_rewarm_steps or not done or global_step - done[-1] >= self.lr_rewarm_steps:
            return 1.0
        return (global_step - done[-1] + 1) / self.lr_rewarm_steps

    # ------------------------------------------------------------------ hooks
    def grows_at(self, global_step: int) -> bool:
        """Whether a growth is due before the step that runs after ``global_step`` steps."""
        return self.stage_at(global_step) != self.stage

    def acts_at(self, global_step: int) -> bool:
        """Whether :meth:`before_step` has anything to do then: a growth, or the LR rewarm after one."""
        return bool(self.lr_rewarm_steps) or self.grows_at(global_step)

    def at_final_depth(self, global_step: int) -> bool:
        """Whether the model after ``global_step`` steps has its final depth: no growth is still to come (a growth
        planned at ``global_step`` itself happens before the next step, so that model is not final yet)."""
        plan = self._plan()
        return not plan or plan[-1] < global_step

    def before_step(self, global_step: int, model, optimizer, scheduler) -> dict | None:
        """Apply every growth due by ``global_step`` (in order) and the rewarm LR; describe the growth, if any.

        Returns ``{"stage", "depth", "step", "new_params"}`` (the stage reached, its depth, ``global_step`` and
        the count of new parameter tensors, over all growths applied now), or None when nothing grew.
        """
        target, new = self.stage_at(global_step), 0
        while self.stage < target:
            new += len(self._grow(model, optimizer, scheduler, self.optimizer_state == "copy"))
        multiplier = self.lr_multiplier(global_step)
        if multiplier != 1.0:
            lambdas, epoch = scheduler.lr_lambdas, scheduler.last_epoch
            for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True):
                group["lr"] = base * fn(epoch) * multiplier
        if not new:
            return None
        return {"stage": self.stage, "depth": self.stacks[self.stage], "step": global_step, "new_params": new}

    def replay(self, stage: int, model, optimizer, scheduler) -> None:
        """Re-apply growths 1..``stage`` to a freshly set-up model and its fresh optimizer/scheduler, for a resume.

        Structure only (no optimizer state is copied): the checkpoint's model/optimizer/scheduler states are loaded
        over it next, and the groups come out in the order of the uninterrupted run, so they fit.
        """
        if not is_int(stage) or not self.stage <= stage < len(self.stacks):
            raise ValueError(f"cannot replay to stage {stage} from stage {self.stage} of stacks {self.stacks}")
        while self.stage < stage:
            self._grow(model, optimizer, scheduler, copy_state=False)

    def _grow(self, model, optimizer, scheduler, copy_state: bool) -> list[str]:
        for container in block_lists(model):  # blocks present before this growth were born in the current stage
            for p in container.parameters():
                self._born.setdefault(id(p), self.stage)
        members = {id(p) for group in optimizer.param_groups for p in group["params"]}
        stage = self.stage + 1
        generator = torch.Generator().manual_seed(_stage_seed(self.seed, stage))
        growth = grow(model, self.stacks[stage], self.building_mode, self.init, generator)
        params = dict(model.named_parameters())
        for name in growth.new:
            params[name].requires_grad_(True)
            self._born[id(params[name])] = stage
            members.add(id(params[name]))
        if copy_state:
            for name, source in growth.copied.items():
                state = optimizer.state.get(params[source])
                if state:
                    optimizer.state[params[name]] = {
                        k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()
                    }
        self.stage, self.last_growth = stage, growth
        self._regroup(model, optimizer, scheduler, members)
        return growth.new

    def _regroup(self, model, optimizer, scheduler, members: set[int]) -> None:
        """Rebuild the param groups (module docstring), ``scheduler.base_lrs``, ``lr_lambdas`` and ``_last_lr``."""
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if not lambdas or any(fn is not lambdas[0] for fn in lambdas):
            raise TypeError("regime=depth_time needs a LambdaLR with one lambda for all groups (build_scheduler's)")
        if self._base_lr is None:
            self._base_lr = scheduler.base_lrs[0]
        wd = max(group["weight_decay"] for group in optimizer.param_groups)
        template = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "param_names", "stack")}
        stackwise = self.scope == "stackwise"
        split: dict[tuple[bool, int, bool], list] = {}
        for name, p in model.named_parameters():
            if id(p) in members:
                born = self._born.get(id(p)) if stackwise else None
                split.setdefault((born is not None, born or 0, not decays(name, p)), []).append(p)
        if sum(map(len, split.values())) != len(members):
            raise RuntimeError("the optimizer holds parameters that are not the model's")
        groups, base_lrs = [], []
        for (is_block, born, no_decay), params in sorted(split.items(), key=lambda item: item[0]):
            factor = self.old_lr_factor ** (self.stage - born) if is_block else 1.0
            base = self._base_lr * factor
            group = {**template, "params": params, "weight_decay": 0.0 if no_decay else wd, "initial_lr": base}
            group["lr"] = base * lambdas[0](scheduler.last_epoch)
            if stackwise:
                group["stack"] = born if is_block else None
                for p in params if is_block else ():
                    p.requires_grad_(factor > 0)
            groups.append(group)
            base_lrs.append(base)
        optimizer.param_groups[:] = groups  # in place: whoever holds the list sees the new groups
        scheduler.base_lrs, scheduler.lr_lambdas = base_lrs, [lambdas[0]] * len(groups)
        scheduler._last_lr = [group["lr"] for group in groups]

    # ------------------------------------------------------------------ records
    def state_dict(self) -> dict:
        """Plain python: the stage the model is built for (what ``replay`` needs) and the plan."""
        return {"stage": self.stage, "growth_steps": self.growth_steps, "stacks": list(self.stacks)}

    def load_state_dict(self, state: dict) -> None:
        """Adopt (after ``plan``: check) a checkpoint's plan; the structure comes from ``replay(state["stage"])``."""
        saved = state.get("growth_steps")
        if state.get("stacks") != self.stacks or (
            None not in (saved, self.growth_steps) and saved != self.growth_steps
        ):
            raise ConfigError(
                f"trainer.resume=true: the checkpoint grows through stacks {state.get('stacks')} at steps {saved}, "
                f"this run through {self.stacks} at steps {self.growth_steps}; resume with the same regime and "
                "trainer.max_epochs."
            )
        if self.growth_steps is None:
            self.growth_steps = saved

    def describe(self) -> dict:
        return {
            "regime": self.name,
            "stacks": list(self.stacks),
            "boundaries": list(self.boundaries),
            "growth_steps": self.growth_steps,
            "building_mode": self.building_mode,
            "init": self.init,
            "scope": self.scope,
            "old_lr_factor": self.old_lr_factor,
            "optimizer_state": self.optimizer_state,
            "lr_rewarm_steps": self.lr_rewarm_steps,
            "seed": self.seed,
        }


def default_stacks(depth: int) -> list[int]:
    """The stacks of a model of ``depth`` blocks (per stage) when ``regime.stacks`` is null.

    Halving back from the depth while it is even: 12 -> [3, 6, 12], 8 -> [1, 2, 4, 8], 4 -> [1, 2, 4], 2 -> [1, 2].
    An odd depth ``d > 1`` grows once, from its larger half ``(d + 1) // 2``: 3 -> [2, 3], 5 -> [3, 5], 7 -> [4, 7].
    That start is at least 2, so every building mode and init accepts it (init=copy refuses a CifarResNet that
    starts at 1, whose only block per stage is never copied). Depth 1 gives [1]: nothing to grow.
    """
    if depth % 2:
        return [depth] if depth == 1 else [(depth + 1) // 2, depth]
    stacks = [depth]
    while stacks[0] % 2 == 0:
        stacks.insert(0, stacks[0] // 2)
    return stacks


def equal_shares(stages: int) -> list[float]:
    """The boundaries of ``stages`` stages of equal length (``regime.boundaries`` null): ``[1/n, ..., (n-1)/n]``."""
    return [i / stages for i in range(1, stages)]


def _unsorted(values: list) -> bool:
    return any(not a < b for a, b in zip(values, values[1:]))


def _listed(value, key: str, example: str) -> list:
    """A list (Hydra passes a ListConfig) of the knob's entries."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"regime.{key}={value} must be a list; use e.g. regime.{key}={example}.")
    return list(value)


def _choice(value, choices: tuple[str, ...], key: str) -> str:
    if value not in choices:
        raise ConfigError(
            f"regime.{key}={value} is not one of {', '.join(choices)}; use e.g. regime.{key}={choices[0]}."
        )
    return value


def _stage_seed(seed: int, stage: int) -> int:
    """A 64-bit generator seed from ``(seed, stage)``: stable across processes and machines."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{stage}".encode(), digest_size=8).digest(), "little")
