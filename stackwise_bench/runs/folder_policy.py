"""The never-overwrite policy of a run folder: which run a folder holds, and whether a run may start there.

:meth:`~stackwise_bench.runs.record.RunRecord.prepare` applies it under the folder's lease; the train app's
callback asks it once more before Hydra writes ``.hydra/`` into an existing folder (``runs/output_dir.py``).
"""

from __future__ import annotations

from pathlib import Path

from stackwise_bench.errors import ConfigError
from stackwise_bench.runs import identity
from stackwise_bench.runs.contract import FINISHED
from stackwise_bench.runs.provenance import config_diff


def same_run(summary: dict, config: dict, fingerprint: str) -> bool:
    """Whether a recorded run trains what ``config`` trains.

    Equal fingerprints say so at once. They also differ when only the code moved (``_target_`` paths)
    or the record predates the current fingerprint, so then the configs' values decide.
    """
    if summary.get("run", {}).get("fingerprint") == fingerprint:
        return True
    return isinstance(summary.get("config"), dict) and not config_diff(summary["config"], config)


def refuse_other_run(run_dir: Path, summary: dict, config: dict, fingerprint: str, may_resume: bool) -> None:
    """The folder policy, without writing: refuse a folder holding another config's run, an unfinished run that
    ``may_resume`` does not continue, or run files without a summary (:meth:`RunRecord.prepare`; the train app's
    callback also asks before Hydra writes its ``.hydra/`` there).

    Raises:
        ConfigError: one sentence naming the folder and what to do.
    """
    if not summary:
        identity.refuse_unrecorded(run_dir, may_resume)  # a folder whose summary.json is gone
        return
    if not same_run(summary, config, fingerprint):
        diff = config_diff(summary.get("config", {}), config)
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds a run with a different config ({diff}); "
            "choose another hydra.run.dir (or study) instead of overwriting it."
        )
    if summary.get("status") not in FINISHED and not may_resume:
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds a {summary.get('status')} run; set trainer.resume=true to "
            "continue it from checkpoints/last.pt, or choose another hydra.run.dir."
        )
