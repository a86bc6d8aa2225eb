"""The README's commands and the tiny form each is run in (tests/test_readme.py runs them).

A command is one line of a ``bash``/``sh``/``console``/untyped block (``\\`` continuations joined, ``&&`` split,
a leading ``$ `` dropped). Its trailing comment may say ``needs: data, gpu``: what a test machine lacks, so the
command is only checked to parse. Everything else runs, with overrides that make it take seconds.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
NEEDS = {"data", "gpu", "network", "server", "slurm", "time"}  # what a marked command needs (README, Tests)

# One epoch of 64 training images at a small size: a run in seconds, whatever the command asked for.
TINY = ["trainer.max_epochs=1", "trainer.batch_size=32", "trainer.progress=log"]
TINY_DIGITS = ["dataset.train_size=64"]
# A text dataset: a few random-window steps, a slice of validation and test tokens.
TINY_TEXT = ["dataset.steps_per_epoch=5", "dataset.val_tokens=4096", "dataset.test_tokens=4096"]
# A small image per model family; the 12-block timm ViTs keep 2 blocks (a model.* key timm takes: `+` adds it).
TINY_MODEL = {
    "deit": ["model.img_size=32", "+model.depth=2"],
    "vit_tiny": ["model.img_size=16", "+model.depth=2"],
    "vit": ["model.img_size=16"],
    "resnet": ["model.img_size=16"],
}
IN_PROCESS = "hydra/launcher=basic"  # a sweep's jobs in the launching process: no worker pays the imports again
TINY_SEARCH = ["hydra.sweeper.n_trials=2"]
MOST_JOBS = 4  # a bigger sweep keeps two values of each swept key: every code path, a fraction of the jobs
# A script's extra arguments go to every train call it makes; these make its study tiny. Grids are cut only where
# the study would otherwise run dozens of jobs (a script's own rank/method axes are left alone: its reference
# calls set them too).
SCRIPT_TINY = TINY + TINY_DIGITS + [IN_PROCESS]
SCRIPT_EXTRA = {
    "peft_methods.sh": ["seed=42"],
    "lora_rank_scaling.sh": ["lora.rank=1,2,4,8", "seed=42,123"],
    "depth_time.sh": ["trainer.batch_size=16", "seed=42"],  # 4 steps: room for its two growths
    "lm_depth_time.sh": ["seed=1"],
}
# A script on text data gets the text knobs instead of the digits ones.
SCRIPT_TEXT = {"lm_depth_time.sh"}
SKIP = {
    "pip": "the test environment has the package and its extras installed",
    "pytest": "the suite itself (this test is part of it)",
}
SERVERS = {"tensorboard", "mlflow", "trackio", "wandb"}


@dataclass
class Command:
    """One README command line, as written, with what it needs."""

    text: str
    line: int  # in README.md
    env: dict[str, str]
    argv: list[str]
    needs: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (tuple(sorted(self.env.items())), tuple(self.argv))


@dataclass
class Form:
    """How the test runs a command: argv (None = not run), the exit codes that pass, and in which lane."""

    command: Command
    argv: list[str] | None
    why: str  # "run" / "parse" / a reason it is skipped
    ok_codes: tuple[int, ...] = (0,)
    lane: str = "runs"  # "runs": single runs and parse checks; "studies": sweeps, scripts, analyses (in order)
    which: str | None = None  # a server: the program must be on PATH


def blocks(text: str | None = None) -> list[tuple[str, int, list[str]]]:
    """Fenced code blocks: (language, line of the first body line, body lines)."""
    text = README.read_text() if text is None else text
    out, lang, start, body = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^```(\S*)\s*$", line)
        if m and lang is None:
            lang, start, body = m.group(1), i + 1, []
        elif line.startswith("```") and lang is not None:
            out.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def split_comment(line: str) -> tuple[str, str]:
    """The command and its trailing comment (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def commands(text: str | None = None) -> list[Command]:
    """Every command line of the README's shell blocks, in order."""
    out = []
    for lang, start, body in blocks(text):
        if lang == "python":  # a snippet: run as it stands, after the commands above it
            out.append(Command("python snippet", start, {}, ["python", "-c", "\n".join(body)]))
            continue
        if lang not in SHELL_LANGS:
            continue
        joined, first = "", None
        for offset, raw in enumerate(body):
            line = raw.removeprefix("$ ")
            if first is None:
                first = start + offset
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            cmd, comment = split_comment(joined + line)
            joined, line_no, first = "", first, None
            if not cmd.strip():
                continue
            m = re.search(r"\bneeds: *([a-z]+(?:, *[a-z]+)*)", comment)
            needs = [n.strip() for n in m.group(1).split(",")] if m else []
            # a <placeholder> is one word, whatever it says (the test puts a real run in its place)
            cmd = re.sub(r"<([^<>]*)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", cmd)
            for part in cmd.split("&&"):
                words = shlex.split(part)
                env = {}
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                    k, v = words.pop(0).split("=", 1)
                    env[k] = v
                out.append(Command(part.strip(), line_no, env, words, needs))
    return out


def _value(argv: list[str], key: str) -> str | None:
    for a in argv:
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
    return None


def tiny_run_overrides(argv: list[str]) -> list[str]:
    """What makes a train command seconds: the tiny knobs its own arguments do not set already."""
    keys = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    extra = list(TINY)
    dataset = _value(argv, "dataset")
    if dataset in (None, "digits") and not _value(argv, "experiment"):
        extra += TINY_DIGITS
    if dataset in ("shakespeare", "text"):
        extra += TINY_TEXT
    model = _value(argv, "model") or "resnet8"
    extra += next((v for prefix, v in TINY_MODEL.items() if model.startswith(prefix)), [])
    if "--multirun" in argv and "hydra/launcher" not in keys:
        extra.append(IN_PROCESS)
    extra = [o for o in extra if o.split("=", 1)[0].lstrip("+") not in keys]
    if "hparams_search" in keys or "hydra/sweeper" in keys:
        extra += TINY_SEARCH  # after the command's own n_trials: the last one wins
    return extra


def cut_grid(args: list[str], most: int = MOST_JOBS) -> list[str]:
    """A sweep of more than ``most`` jobs keeps the first two values of each swept key (seed=42,123,456 -> 42,123)."""
    values = {a: a.split("=", 1)[1] for a in args if "=" in a}
    swept = [a for a, v in values.items() if "," in v and not v.startswith("[") and "(" not in v]  # not lists, tag()
    jobs = math.prod(len(a.split("=", 1)[1].split(",")) for a in swept)
    if jobs <= most:
        return list(args)
    return [",".join(a.split(",")[:2]) if a in swept else a for a in args]


def form(cmd: Command) -> Form:
    """How tests/test_readme.py runs ``cmd``; a command no rule covers raises (add a rule or a marker)."""
    argv, prog = cmd.argv, cmd.argv[0]
    unknown = set(cmd.needs) - NEEDS
    if unknown:
        raise ValueError(f"README.md:{cmd.line}: unknown needs: {sorted(unknown)} (known: {sorted(NEEDS)})")
    if prog in SKIP:
        return Form(cmd, None, SKIP[prog])
    placeholder = any("<" in a for a in argv)
    lane = "runs" if placeholder else "studies"
    if prog == "torchrun":  # starts ranks of its own: tests/test_distributed.py launches it
        if not cmd.needs:
            raise ValueError(f"README.md:{cmd.line}: torchrun starts several processes: mark it '# needs: gpu'")
        return Form(cmd, None, "parse", which=prog)
    if prog in SERVERS:
        if not cmd.needs:
            raise ValueError(f"README.md:{cmd.line}: {prog} serves or uploads: mark it '# needs: server' (or network)")
        return Form(cmd, None, "parse", which=prog)
    if prog == "bash" and len(argv) > 1 and argv[1].startswith("scripts/"):
        if cmd.needs:
            return Form(cmd, ["bash", "-n", argv[1]], "parse", lane="runs")
        script = Path(argv[1]).name
        base = TINY + TINY_TEXT + [IN_PROCESS] if script in SCRIPT_TEXT else SCRIPT_TINY
        extra = base + SCRIPT_EXTRA.get(script, [])
        return Form(cmd, argv + extra, "run", lane=lane)
    if prog != "python" or len(argv) < 2:
        raise ValueError(f"README.md:{cmd.line}: no rule runs {cmd.text!r}")
    if argv[1] == "-m" and argv[2].startswith("stackwise_bench."):
        app, args = argv[2].removeprefix("stackwise_bench."), argv[3:]
        multirun = "--multirun" in args
        if app == "train":
            if cmd.needs:  # composes every job (a sweep) or the config (a run), trains nothing
                return Form(cmd, argv + (["plan=true"] if multirun else ["--cfg", "job"]), "parse", lane="runs")
            if "plan=true" in args:
                return Form(cmd, argv, "run", lane="runs")
            tiny = argv[:3] + (cut_grid(args) if multirun else args) + tiny_run_overrides(args)
            return Form(cmd, tiny, "run", lane="studies" if multirun else "runs")
        if app in ("analyze", "evaluate"):
            if cmd.needs:
                return Form(cmd, argv[:3] + ["--help"], "parse", lane="runs")
            extra = [IN_PROCESS] if multirun else []
            ok = (0, 1) if any(a.startswith("expect=") for a in args) else (0,)  # 1: an expectation failed
            return Form(cmd, argv + extra, "run", ok_codes=ok, lane=lane)
        if app == "bench":
            if not cmd.needs:
                raise ValueError(f"README.md:{cmd.line}: the benchmark takes minutes: mark it '# needs: time'")
            return Form(cmd, argv[:3] + ["--help"], "parse", lane="runs")
    if argv[1] == "-c":
        return Form(cmd, argv, "run", lane="studies")
    if argv[1].startswith("scripts/") and argv[1].endswith(".py"):
        if cmd.needs:
            return Form(cmd, argv[:2] + ["--help"], "parse", lane="runs")
        return Form(cmd, argv, "run", lane="studies")
    raise ValueError(f"README.md:{cmd.line}: no rule runs {cmd.text!r}")


def forms(text: str | None = None) -> list[Form]:
    """Every README command's form, identical commands once."""
    seen, out = set(), []
    for cmd in commands(text):
        f = form(cmd)
        # identical commands, and checks that come out the same (`bench --help`), run once
        key = (tuple(sorted(cmd.env.items())), tuple(f.argv or [f.why, f.which or ""]))
        if cmd.key in seen or key in seen:
            continue
        seen.update({cmd.key, key})
        out.append(f)
    balance_lanes(out)
    return out


# Rough CPU seconds of each tiny form (measured on 2 cores), to split the studies between the two lanes.
SCRIPT_COST = {"peft_methods.sh": 48, "precision_study.sh": 35, "peft_baseline.sh": 21, "lora_rank_scaling.sh": 14}


def cost(f: Form) -> float:
    if not f.argv:
        return 0.0
    if f.why == "parse":
        return 2.0
    if f.argv[0] == "bash":
        return SCRIPT_COST.get(Path(f.argv[1]).name, 13.0)
    if _is_sweep(f.argv):
        return 10.0
    return 6.0 if f.argv[:3] == ["python", "-m", "stackwise_bench.train"] else 3.0


def _is_sweep(argv: list[str]) -> bool:
    return argv[:3] == ["python", "-m", "stackwise_bench.train"] and "--multirun" in argv


def _writes(f: Form) -> set[str]:
    """Study names a sweep or a script writes (a script: every word of its code; matched against what is read)."""
    if _is_sweep(f.argv):
        return {_value(f.argv, "study") or "default"}
    if f.argv[0] == "bash":
        code = [line.split("#")[0] for line in (ROOT / f.argv[1]).read_text().splitlines()]
        return set(re.findall(r"[A-Za-z_]\w*", "\n".join(code)))
    return set()


def _reads(f: Form) -> set[str]:
    """Study names an analyze, evaluate or snippet reads (an evaluation study: its preset's `runs:`)."""
    text = " ".join(f.argv)
    exp = _value(f.argv, "experiment")
    if exp and f.argv[:3] == ["python", "-m", "stackwise_bench.evaluate"]:
        text += (ROOT / "conf" / "experiment" / f"{exp}.yaml").read_text()
    return {name.removesuffix("_quick") for name in re.findall(r"multirun/([\w.\-]+)", text)}


def balance_lanes(out: list[Form]) -> None:
    """Studies with the analyses that read them stay together, each group in the lane with less work so far."""
    studies = [f for f in out if f.lane == "studies"]
    group = {id(f): {id(f)} for f in studies}
    for i, reader in enumerate(studies):
        for writer in studies[:i]:
            if _reads(reader) & _writes(writer):
                merged = group[id(reader)] | group[id(writer)]
                for member in merged:
                    group[member] = merged
    load = {"runs": sum(cost(f) for f in out if f.lane == "runs"), "studies": 0.0}
    done: set[int] = set()
    for f in studies:
        members = group[id(f)]
        if id(f) in done:
            continue
        done |= members
        lane = min(load, key=load.get)
        load[lane] += sum(cost(g) for g in studies if id(g) in members)
        for g in studies:
            if id(g) in members:
                g.lane = lane


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    in_block = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        m = re.match(r"^#{1,6} +(.*)$", line)
        if in_block or not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def inline_commands(text: str) -> list[str]:
    """Inline code spans outside blocks that are whole commands (they must be in a block, where the test runs them)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", prose)
    start = re.compile(r"^(python -m stackwise_bench\.|python scripts/|bash scripts/|QUICK=1 )")
    return [s for s in spans if start.match(s)]
