"""Numbers in the report's tables: one format per column, no decimals on counts and large values."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from stackwise_bench.analysis import analyze_runs, write_report
from stackwise_bench.analysis.read.formatting import markdown_table
from stackwise_bench.analysis.report.headline import headline_table

from analysis_helpers import finished_run

WHOLE = re.compile(r"^\d{1,3}(,\d{3})*$")  # 174,868: thousands separated, no decimals
TWO_DECIMALS = re.compile(r"^\d{1,3}(,\d{3})*\.\d\d$")  # 91.50


def _study(tmp_path, trainable: dict[int, int], img_s: dict[int, float]):
    """Two cells (lora.rank 0 and 8) of two seeds each with the given parameter counts and images/s."""
    for rank in (0, 8):
        for seed in (1, 2):
            finished_run(
                tmp_path,
                f"r{rank}s{seed}",
                seed=seed,
                top1=90.0 + rank / 8 + seed / 4,
                overrides=[f"lora.rank={rank}"],
                trainable=trainable[rank],
                img_s=img_s[rank] + seed,
            )
    return tmp_path


def _section_table(md: str, heading: str) -> pd.DataFrame:
    """The first Markdown table under ``heading`` as strings."""
    section = md.split(heading, 1)[1]
    lines = [x for x in section.splitlines() if x.startswith("|")]
    lines = lines[: next((i for i, x in enumerate(lines[2:], 2) if not x.startswith("|")), len(lines))]
    rows = [[c.strip() for c in x.strip("|").split(" | ")] for x in lines]
    return pd.DataFrame(rows[2:], columns=rows[0])


def _parts(cell: str) -> list[str]:
    return cell.split(" ± ")


@pytest.mark.parametrize(
    "trainable",
    [{0: 174_868, 8: 77_652}, {0: 900, 8: 650}],  # across 10^5 (one had commas, the other .00); small counts
)
def test_other_metrics_one_format_per_column(tmp_path, trainable):
    study = _study(tmp_path / "runs", trainable, img_s={0: 95_000.25, 8: 120_500.75})
    out = write_report(analyze_runs(study), tmp_path / "out", plots=False)
    table = _section_table((out / "report.md").read_text(), "## Other metrics")
    assert len(table) == 2 and {"params.trainable", "train.img_s", "train.time_s", "test.f1_macro"} <= set(table)
    for column in ("params.trainable", "train.img_s"):  # counts and large values: whole numbers, commas
        for cell in table[column]:
            mean, std = _parts(cell)
            assert WHOLE.match(mean) and WHOLE.match(std), (column, cell)
    counts = {int(_parts(c)[0].replace(",", "")) for c in table["params.trainable"]}
    assert counts == set(trainable.values())
    for column in ("test.f1_macro", "train.time_s", "train.best_val_top1", "test.top5"):  # accuracies, seconds
        for cell in table[column]:
            assert all(TWO_DECIMALS.match(p) for p in _parts(cell)), (column, cell)


def test_headline_columns_share_one_format(tmp_path):
    a = analyze_runs(_study(tmp_path, {0: 174_868, 8: 77_652}, {0: 1000.0, 8: 1000.0}), metric="params.trainable")
    head = headline_table(a.summary, a.comparisons, a.metric, a.group_by, a.baseline)
    means = [_parts(c)[0] for c in head["mean ± std"]]
    assert means == ["174,868", "77,652"]
    assert all(WHOLE.match(p) for c in head["mean ± std"] for p in _parts(c))


def test_markdown_table_formats_a_float_column_alike():
    df = pd.DataFrame({"img_s": [99_999.4, 100_000.6], "top1": [90.123, 91.0], "n": [3, 3]})
    rows = [x.split(" | ") for x in markdown_table(df).splitlines()[2:]]
    assert [r[0].strip("| ") for r in rows] == ["99,999", "100,001"]
    assert [r[1] for r in rows] == ["90.12", "91.00"]
    assert [r[2].strip("| ") for r in rows] == ["3", "3"]


def test_sampled_floats_label_cells_in_six_significant_digits():
    """A search's sampled value names its cell readably; two samples alike in 6 digits stay two cells."""
    import pandas as pd

    from stackwise_bench.analysis.read.grouping import format_value, iter_groups, with_group_labels

    assert format_value(0.0018662266976517971) == "0.00186623"
    assert format_value(3e-4) == "0.0003" and format_value(2.0) == "2" and format_value(None) == "null"
    df = pd.DataFrame({"optimizer.lr": [0.0018662266976517971, 0.0018662266976517971, 0.001866226], "x": [1, 2, 3]})
    assert list(with_group_labels(df, ["optimizer.lr"])["group"])[0] == "optimizer.lr=0.00186623"
    assert len(list(iter_groups(df, ["optimizer.lr"]))) == 2


def test_the_seed_spread_sets_the_decimals_of_a_headline():
    """A loss whose seeds differ in the third decimal shows it (2.414 ± 0.001), an accuracy keeps two decimals, a
    count none."""
    from stackwise_bench.analysis.read.formatting import spread_digits

    assert spread_digits([0.001, 0.002, 0.003]) == 3
    assert spread_digits([0.4, 0.9]) == 2 and spread_digits([]) == 2 and spread_digits([0.0, float("nan")]) == 2
    assert spread_digits([1e-9]) == 6  # capped
