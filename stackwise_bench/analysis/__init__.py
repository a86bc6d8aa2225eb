"""Analysis of run folders: one table, seed statistics, comparisons, plots and a report.

Reads files only and never imports torch. Names are imported on first use, so
``from stackwise_bench.analysis import collect_runs`` costs only pandas::

    from stackwise_bench.analysis import collect_runs, analyze_runs, write_report
    df = collect_runs("multirun/peft_baseline")
    a = analyze_runs("multirun/peft_baseline", baseline="lora.rank=0")
    write_report(a)   # -> multirun/peft_baseline/analysis/report.md, ...

The modules are grouped by stage, each importing only the stages below it (pyproject's contract):
``read/`` (run folders -> tables, directions, formatting) < ``stats/`` < ``studies/`` (one view and report
section per study) < ``pipeline`` (:func:`analyze_runs`) < ``plots/`` < ``report/``.

Evaluation records next to the runs (``<run>/eval/<name>/``, from ``stackwise_bench.evaluate``)
are not runs; their quantized ones become ``a.quantization`` (per cell and format). Per-layer
diagnostics (``diagnostics.jsonl``) become ``a.diagnostics`` (:func:`collect_diagnostics`, long format).
"""

from importlib import import_module

_EXPORTS = {
    "read.collect": ("collect_runs", "collect_epochs", "collect_hardware", "override_keys", "finished", "FINISHED"),
    "read.diagnostics": ("collect_diagnostics",),
    "stackwise_bench.runs.folders": ("find_run_dirs", "find_eval_dirs", "is_eval_record"),
    "stackwise_bench.runs.contract": ("read_summary",),
    "read.grouping": ("default_group_by", "varying_keys", "parse_selector"),
    "stats.seeds": ("seed_stats", "t_interval", "cohens_d", "holm", "describe"),
    "stats.compare": ("compare_to_baseline", "compare_cells", "resolve_baseline"),
    "read.dynamics": ("run_dynamics",),
    "studies.precision": ("precision_study",),
    "studies.optimizer": ("optimizer_study",),
    "studies.view": ("StudyView",),
    "studies.peft": ("peft_study",),
    "studies.expectations": ("load_expectations", "check_expectations"),
    "studies.quantization": ("collect_evaluations", "quantized_evaluations", "quantization_table"),
    "studies.regimes": ("analyze_regimes", "RegimeAnalysis"),
    "pipeline": ("analyze_runs", "StudyAnalysis"),
    "report.write": ("write_report", "new_output_dir"),
    "plots.figures": ("make_plots",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'stackwise_bench.analysis' has no attribute {name!r}")
    module = _WHERE[name]
    where = module if module.startswith("stackwise_bench.") else f"stackwise_bench.analysis.{module}"
    value = getattr(import_module(where), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
