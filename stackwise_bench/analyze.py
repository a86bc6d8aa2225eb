"""Command line: ``python -m stackwise_bench.analyze runs=multirun/peft_baseline [key=value ...]``.

Keys: ``runs`` (a folder or ``[f1,f2]``; quote a folder whose name has commas
inside a list: ``runs=["multirun/x/lora.rank=8,seed=1",multirun/y]``), ``metric`` (default test.top1),
``baseline`` (``baseline=precision=fp32``), ``group_by`` (``[k1,k2]``), ``out``
(default ``<first runs folder>/analysis``, numbered when it exists),
``expect`` (expectations YAML), ``plots`` (true/false), ``plan_seeds`` (true/false: treat the runs as a
pilot and print, per comparison, the observed effect and the seeds a full study needs for 80% power,
then exit 0 without writing the report or checking expectations), ``scaling`` (a numeric axis such as
``lora.rank`` or ``params.trainable``: fit error = E + A·x^(−α) with bootstrap intervals, scaling.csv and a
log-log plot), ``aggregate`` (mean, the default, or iqm: adds the interquartile mean with stratified-bootstrap
intervals), ``bootstrap`` (resamples for the bootstrap intervals, default 1000), ``target`` (a depth-as-time study's
validation value to reach, e.g. ``target=3.0`` for a loss; default: 99% of the classical arm's final top-1, 101%
of its loss).

Not a Hydra app on purpose: Hydra's override grammar rejects
``baseline=precision=fp32``; ``OmegaConf.from_dotlist`` splits at the first ``=``.
Exit status: 0 done, 1 an expectation failed, 2 bad input (one sentence on stderr).
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from stackwise_bench.cli import parse_key_values
from stackwise_bench.errors import ConfigError
from stackwise_bench.values import is_number

USAGE = (
    "usage: python -m stackwise_bench.analyze runs=<folder>|[<folder>,...] [metric=test.top1] "
    "[baseline=<key>=<value>] [group_by=[<key>,...]] [out=<folder>] [expect=<file.yaml>] [plots=true] "
    "[plan_seeds=false] [scaling=<axis>] [aggregate=mean|iqm] [bootstrap=1000] [target=<val metric>]"
)
DEFAULTS = {
    "runs": None,
    "metric": None,
    "baseline": None,
    "group_by": None,
    "out": None,
    "expect": None,
    "plots": True,
    "plan_seeds": False,
    "scaling": None,
    "aggregate": "mean",
    "bootstrap": 1000,
    "target": None,
}


def parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments into a dict of :data:`DEFAULTS` keys.

    Raises:
        ConfigError: for an argument without ``=``, an unknown key, or no ``runs``.
    """
    args = {**DEFAULTS, **parse_key_values(argv, DEFAULTS, USAGE)}
    if not args["runs"]:
        raise ConfigError(f"runs= is missing: name the run or sweep folder(s) to analyse; {USAGE}")
    args["runs"] = _as_list(args["runs"], split_commas=False)  # Hydra job folders have commas in their names
    if args["group_by"] is not None:
        args["group_by"] = [] if args["group_by"] in ("", "[]") else _as_list(args["group_by"])
    if args["out"] is not None:
        args["out"] = os.path.expanduser(str(args["out"]))
    if not isinstance(args["plots"], bool):
        raise ConfigError(f"plots={args['plots']} must be true or false.")
    if not isinstance(args["plan_seeds"], bool):
        raise ConfigError(f"plan_seeds={args['plan_seeds']} must be true or false.")
    if args["aggregate"] not in ("mean", "iqm"):
        raise ConfigError(f"aggregate={args['aggregate']} is not mean or iqm; use aggregate=iqm (or leave it out).")
    from stackwise_bench.analysis.read.numeric import is_int  # pandas: imported once the arguments parse

    boot = args["bootstrap"]
    if not is_int(boot) or boot < 100:
        raise ConfigError(f"bootstrap={boot} must be a whole number of resamples of at least 100 (default 1000).")
    target = args["target"]
    if target is not None and not is_number(target, finite=True):
        raise ConfigError(
            f"target={target} must be a number: the validation value a depth-as-time study's arms must reach "
            "(e.g. target=3.0 for a loss); leave it out for 101% (99%) of the classical arm's final value."
        )
    if args["scaling"] is not None:
        args["scaling"] = str(args["scaling"])
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        args = parse_args(argv)
        from stackwise_bench.analysis.pipeline import analyze_runs
        from stackwise_bench.analysis.report.write import write_report

        start = time.perf_counter()
        a = analyze_runs(
            args["runs"],
            metric=args["metric"],
            baseline=args["baseline"],
            group_by=args["group_by"],
            expect=args["expect"],
            aggregate=args["aggregate"],
            scaling=args["scaling"],
            n_boot=args["bootstrap"],
            target=args["target"],
        )
        if args["target"] is not None and a.regimes is None:
            raise ConfigError(
                f"target={args['target']} is the validation value a depth-as-time study's arms must reach, and "
                f"{', '.join(args['runs'])} holds no regime= study; drop target= (or analyse a regime study)."
            )
        if args["plan_seeds"]:
            print_seed_plan(a)
            return 0
        command = "python -m stackwise_bench.analyze " + " ".join(shlex.quote(x) for x in argv)
        out_dir = write_report(a, args["out"], plots=args["plots"], command=command)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        print_summary(a, out_dir, time.perf_counter() - start)
    except BrokenPipeError:  # `... | head`: the report is written, the reader left early
        sys.stdout = open(os.devnull, "w")
    return 1 if a.validation and a.validation["failed"] else 0


def print_seed_plan(a) -> None:
    """Per comparison of the pilot: group vs baseline, observed effect, seeds needed for 80% power."""
    from stackwise_bench.analysis.stats.stat_power import seed_plan_lines

    base = ", ".join(f"{k}={v}" for k, v in a.baseline.items()) or "none"
    print(f"Seed plan from {len(a.runs)} pilot runs | metric {a.metric} | baseline {base}")
    lines = seed_plan_lines(a.comparisons)
    print("".join(f"  - {line}\n" for line in lines) if lines else "  (no comparisons: no baseline to compare to)\n")
    print("No report written (plan_seeds=true).")


def print_summary(a, out_dir, seconds: float) -> None:
    from stackwise_bench.analysis.read.directions import WORDS
    from stackwise_bench.analysis.read.formatting import screen_table
    from stackwise_bench.analysis.report.headline import best_cell_sentence, headline_table

    finished = len(a.runs) - len(a.unfinished)
    base = ", ".join(f"{k}={v}" for k, v in a.baseline.items()) or "none"
    print(
        f"{len(a.runs)} runs ({finished} finished) | cells by {', '.join(a.group_by) or '(all runs)'} "
        f"| metric {a.metric} ({WORDS.get(a.direction, 'read as higher is better')}) | baseline {base}\n"
    )
    print(
        screen_table(headline_table(a.summary, a.comparisons, a.metric, a.group_by, a.baseline, runs=a.runs, iqm=a.iqm))
    )
    print(best_cell_sentence(a.summary, a.metric, a.direction), end="")
    if a.scaling is not None:
        print_scaling(a.scaling)
    if a.regimes is not None and (a.regimes.sentences or a.regimes.notes):
        from stackwise_bench.analysis.studies.regimes import label_of

        print(f"\nDepth as time vs classical ({label_of(a.regimes.metric)} at equal FLOPs; details in the report):")
        print("".join(f"  - {s}\n" for s in [*a.regimes.sentences, *a.regimes.notes]), end="")
    for view in a.views:
        if view.highlights:
            print(f"\n{view.title}:")
            print("".join(f"  - {h}\n" for h in view.highlights), end="")
    if len(a.quantization):
        from stackwise_bench.analysis.studies.quantization_report import quantization_display

        shown = ["format", "settings", "n", "top-1 before (%)", "top-1 after (%)", "degradation (points)", "p (Holm)"]
        table = quantization_display(a.quantization, a.group_by)
        print("\nPost-training quantization:")
        print(screen_table(table[[c for c in ["group", *shown] if c in table]]))
    if a.validation is not None:
        v = a.validation
        print(f"\nExpectations: {v['passed']} passed, {v['failed']} failed, {v['skipped']} skipped")
        for r in v["results"]:
            if r["passed"] is False:
                print(f"  FAIL {r['name']} [{r.get('group')}]: {r.get('detail', '')}")
    if a.warnings:
        print("\nWarnings:")
        print("".join(f"  - {w}\n" for w in a.warnings), end="")
    print(f"\nReport: {out_dir / 'report.md'}  ({seconds:.1f} s)")


def print_scaling(s) -> None:
    """α, E and A with their intervals per stratum, or the sentence saying why there is no fit."""
    from stackwise_bench.analysis.studies.scaling import estimate_text

    print(f"\nScaling of {s.error} along {s.axis}: E + A·x^(−α), 95% bootstrap intervals")
    for st in s.strata:
        if st.fit is None:
            print(f"  - {st.label}: {st.note}")
            continue
        parts = [f"{k} {estimate_text(st.fit, k)}" for k in ("alpha", "E", "A")]
        print(f"  - {st.label}: " + ", ".join(parts) + f" ({len(st.x)} runs)")


def _as_list(value, split_commas: bool = True) -> list:
    """A list as given (``[a,b]``), or one string: split at commas only where asked."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if not split_commas:
        return [text]
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [part.strip() for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
