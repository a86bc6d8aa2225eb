"""Every command in README.md runs, in a tiny form, or is marked with what it needs and checked to parse.

The fast tier checks the README's shape (every command has a form, every link an anchor, no command only in
prose); the slow test runs the commands in subprocesses, in README order, in two scratch folders side by side:
"runs" (single runs and parse checks) and "studies" (sweeps, scripts, then the analyses and evaluations that read
their folders). A command that needs a full study's folder reads its QUICK form's (`multirun/X` -> `X_quick`).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from readme_commands import README, ROOT, Form, anchors, blocks, forms, inline_commands

TIMEOUT_S = 600  # one command; the whole test takes ~3 min on 2 cores


def test_every_command_has_a_form():
    # a command no rule covers (a new program, an unmarked benchmark) fails here, in the fast tier
    assert [f for f in forms() if f.argv is not None or f.which], "no README command found"


def test_links_point_at_headings():
    text = README.read_text()
    known = anchors(text)
    missing = sorted({a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in known})
    assert not missing, f"README links to headings that do not exist: {missing}"


def test_commands_in_prose_are_in_blocks():
    text = README.read_text()
    in_blocks = {" ".join(line.split("#")[0].split()) for _, _, body in blocks(text) for line in body}
    loose = [c for c in inline_commands(text) if " ".join(c.split()) not in in_blocks]
    assert not loose, f"commands only in prose (the README test cannot run them; put them in a block): {loose}"


def test_marked_commands_are_only_parsed():
    marked = [f for f in forms() if f.command.needs]
    assert marked and all(f.why == "parse" for f in marked)


# ---- the slow test: run them ----------------------------------------------------------------------------------


def _make_images(root: Path) -> None:
    """A tiny image folder (two classes of flat-coloured PNGs) for `dataset=imagefolder dataset.root=~/data/flowers`."""
    from PIL import Image

    for k, (name, colour) in enumerate({"daisy": (230, 230, 40), "rose": (200, 30, 60)}.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(40):  # enough for one batch of 32 after the val and test splits
            shade = tuple(max(0, c - 3 * i) for c in colour)
            Image.new("RGB", (12 + k, 12), shade).save(root / name / f"{i:02d}.png")


def _alias_quick_studies(cwd: Path) -> None:
    """`multirun/X` for a full study the test cannot train reads its QUICK folder `multirun/X_quick`."""
    for quick in (cwd / "multirun").glob("*_quick"):
        full = quick.with_name(quick.name.removesuffix("_quick"))
        if not full.exists():
            full.symlink_to(quick.name)


def _resolve(argv: list[str], cwd: Path, runs_cwd: Path) -> list[str]:
    """Placeholders become a run the test made; a job folder named by its seed becomes the tiny job's folder."""
    out = []
    single = sorted((runs_cwd / "multirun" / "single-runs").glob("*/*"))
    for a in argv:
        if "<" in a:
            assert single, f"{a}: no single run to stand in for the placeholder"
            a = re.sub(r"multirun/single-runs/<[^>]*>/<[^>]*>|<[^>]*>", str(single[0]), a)
        m = re.search(r"multirun/([\w.\-]+)/([\w.=,\-]+)$", a)
        if m and not (cwd / m.group(0)).exists() and (cwd / "multirun" / m.group(1)).is_dir():
            # the tiny job's folder also names the tiny overrides: the one with every part of the README's name
            want = set(m.group(2).split(","))
            jobs = [p for p in sorted((cwd / "multirun" / m.group(1)).iterdir()) if want <= set(p.name.split(","))]
            if jobs:
                a = a[: m.start()] + f"multirun/{m.group(1)}/{jobs[0].name}"
        out.append(a)
    return out


def _expect_file(cwd: Path, argv: list[str]) -> None:
    """`expect=expect.yaml`: the README's own YAML example."""
    for a in argv:
        if a.startswith("expect="):
            yaml_blocks = [body for lang, _, body in blocks() if lang == "yaml"]
            (cwd / a.split("=", 1)[1]).write_text("\n".join(yaml_blocks[0]) + "\n")


def _run(argv: list[str], cwd: Path, env: dict) -> tuple[float, float, int | None, str]:
    """Run one command: wall seconds, CPU seconds (its own and its children's), exit code (None: timed out), output."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(TIMEOUT_S, proc.kill)
    timer.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # reaped here, with the CPU it and its children used
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    timed_out = not timer.is_alive()
    timer.cancel()
    proc.stdout.close()
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, None if timed_out else code, output


def _run_lane(lane: list[Form], cwd: Path, runs_cwd: Path, env: dict) -> list[str]:
    failures = []
    for f in lane:
        where = f"README.md:{f.command.line}: {f.command.text}"
        if f.which:
            if shutil.which(f.which) is None:
                failures.append(f"{where}\n  {f.which} is not on PATH")
            continue
        _alias_quick_studies(cwd)
        argv = _resolve(f.argv, cwd, runs_cwd)
        _expect_file(cwd, argv)
        if argv[0] == "python":
            argv = [sys.executable] + argv[1:]
        took, cpu, code, output = _run(argv, cwd, env | f.command.env)
        print(f"[{took:5.1f} s, {cpu:5.1f} s CPU] {f.why:5} {' '.join(argv)[:150]}", flush=True)
        if code is None:
            failures.append(f"{where}\n  timed out after {TIMEOUT_S} s: {' '.join(argv)}")
        elif code not in f.ok_codes:
            tail = "\n".join(output.strip().splitlines()[-15:])
            failures.append(f"{where}\n  ran: {' '.join(argv)}\n  exit {code}:\n{tail}")
            print(f"FAILED {failures[-1]}", flush=True)
    return failures


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    runs_cwd, studies_cwd, home = tmp_path / "runs", tmp_path / "studies", tmp_path / "home"
    for cwd in (runs_cwd, studies_cwd):
        cwd.mkdir()
        (cwd / "scripts").symlink_to(ROOT / "scripts")  # the scripts are called as scripts/<name> from the clone
    _make_images(home / "data" / "flowers")
    env = os.environ | {
        "MPLBACKEND": "Agg",
        "HYDRA_FULL_ERROR": "1",
        "OMP_NUM_THREADS": "1",  # two lanes side by side on a small machine: one thread each
        "TRACKIO_DIR": str(tmp_path / "trackio"),
    }
    lanes = {"runs": [], "studies": []}
    for f in forms():
        if f.argv is None and not f.which:
            print(f"skipped: {f.command.text} ({f.why})")
            continue
        if f.argv is not None:  # `~/data/flowers`: the generated folder, not the user's home
            f.argv = [a.replace("~/", f"{home}/") for a in f.argv]
        lanes[f.lane].append(f)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        runs = pool.submit(_run_lane, lanes["runs"], runs_cwd, runs_cwd, env)
        studies = pool.submit(_run_lane, lanes["studies"], studies_cwd, runs_cwd, env)
        failures = runs.result() + studies.result()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"README commands: {time.perf_counter() - start:.0f} s wall, {cpu:.0f} s CPU in the commands")
    assert not failures, "README commands that failed:\n\n" + "\n\n".join(failures)
