"""`blur compare` end to end on the smoke config: every outer loop runs on equal budgets and the report,
CSV and plots are written."""

from __future__ import annotations

import csv
from pathlib import Path

from evolution.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_compare_smoke_writes_report_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", str(ROOT / "configs" / "compare_smoke.yaml"), "--out", str(out),
                 "--set", "compare.seeds=[0]"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = (out / "report.md").read_text()
    for method in ("CMA-ES", "full backprop", "truncated", "PES", "EvoGrad"):
        assert method in report and method in printed.out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {row["method"] for row in rows} >= {"CMA-ES", "full backprop", "truncated", "PES", "EvoGrad"}
    budgets = {row["method"]: float(row["inner_steps"]) for row in rows if "inner_steps" in row and row["inner_steps"]}
    assert budgets and max(budgets.values()) <= 240 * 1.25  # equal inner-step budgets
    assert sorted(p.name for p in out.glob("*.png"))
    memory = {row["method"]: (int(row["temp_bytes_T4"]), int(row["temp_bytes_T16"])) for row in rows
              if row["temp_bytes_T4"]}
    assert memory["full backprop"][1] > 2 * memory["full backprop"][0]  # backprop through the unroll grows
    for flat in ("CMA-ES", "truncated", "PES", "EvoGrad"):
        assert memory[flat][1] == memory[flat][0]  # the others do not grow with T


def test_compare_rejects_a_bad_section(tmp_path, capsys):
    code = main(["compare", str(ROOT / "configs" / "compare_smoke.yaml"), "--out", str(tmp_path / "x"),
                 "--set", "compare.budget=3"])
    err = capsys.readouterr().err
    assert code == 2 and "compare.budget: unknown key" in err and len(err.strip().splitlines()) == 1
