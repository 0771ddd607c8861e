"""`blur compare` end to end on the smoke config: every outer loop runs on equal budgets and the report,
CSV and plots are written."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from evolution.cli import main
from evolution.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_compare_smoke_writes_report_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", str(ROOT / "configs" / "compare_smoke.yaml"), "--out", str(out),
                 "--set", "compare.seeds=[0]"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = (out / "report.md").read_text()
    methods = ("CMA-ES", "full backprop", "truncated", "PES", "EvoGrad", "BMG", "optimistic BMG", "iMAML", "CML",
               "WarpGrad")
    for method in methods:
        assert method in report and method in printed.out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {row["method"] for row in rows} >= set(methods) | {"SGD", "SGD+momentum", "Adam", "backprop genome"}
    budgets = {row["method"]: float(row["inner_steps"]) for row in rows if "inner_steps" in row and row["inner_steps"]}
    assert budgets and max(budgets.values()) <= 240 * 1.25  # equal inner-step budgets
    assert sorted(p.name for p in out.glob("*.png"))
    memory = {row["method"]: (int(row["temp_bytes_T4"]), int(row["temp_bytes_T16"])) for row in rows
              if row["temp_bytes_T4"]}
    assert memory["full backprop"][1] > 2 * memory["full backprop"][0]  # backprop through the unroll grows
    for flat in ("CMA-ES", "truncated", "PES", "EvoGrad", "BMG"):
        assert memory[flat][1] == memory[flat][0]  # the others do not grow with T
    # every row is scored at T and at 4T (baselines re-tuned there): a number per row, and the 4T column differs
    longer = {row["method"]: float(row["accuracy_T16_mean"]) for row in rows}
    assert set(longer) == {row["method"] for row in rows} and all(0.0 <= v <= 1.0 for v in longer.values())
    assert longer != {row["method"]: float(row["final_accuracy_mean"]) for row in rows}
    assert "held-out at T = 16" in report


def test_compare_rejects_a_bad_section(tmp_path, capsys):
    code = main(["compare", str(ROOT / "configs" / "compare_smoke.yaml"), "--out", str(tmp_path / "x"),
                 "--set", "compare.budget=3"])
    err = capsys.readouterr().err
    assert code == 2 and "compare.budget: unknown key" in err and len(err.strip().splitlines()) == 1


def test_every_method_has_the_same_horizon_at_the_same_budget_point(tmp_path):
    """A curriculum in inner steps (run.curriculum.every_inner_steps) is one function of the budget for ES and
    for every gradient loop: the horizon of each step is horizon(base, inner steps consumed before it)."""
    import csv

    from evolution.compare import main_compare
    from workers.horizon import horizon

    config = Path(__file__).resolve().parents[1] / "configs" / "compare_smoke.yaml"
    # one method per loop that schedules the horizon: the ES loop, the gradient loop with a full and a windowed
    # estimator (the other estimators run in the same loop), and the learned-initialization loop with two of its
    # cost formulas (iMAML T + 2·n_CG per task, WarpGrad T + 3T; CML's goes through the same callback)
    methods = ("[{name: CMA-ES, kind: es},"
               " {name: full backprop, kind: gradient, estimator: full, learning_rate: 0.01},"
               " {name: PES, kind: gradient, estimator: pes, learning_rate: 0.01,"
               "  options: {truncation: 2, pes_pairs: 2, pes_sigma: 0.05}},"
               " {name: iMAML, kind: learned_init, estimator: imaml, learning_rate: 0.001,"
               "  options: {lam: 2.0, cg_steps: 3}},"
               " {name: WarpGrad, kind: learned_init, estimator: warpgrad, learning_rate: 0.001,"
               "  options: {inner_lr: 0.1}}]")
    overrides = ["compare.seeds=[0]", "run.curriculum.every_inner_steps=60", "run.curriculum.increment=2",
                 "run.curriculum.max_steps=8", "compare.num_points=6", f"compare.methods={methods}",
                 "compare.baselines=false", "compare.horizon_multiples=[1]"]  # only the curves matter here
    assert main_compare(str(config), str(tmp_path / "out"), overrides) == 0
    with open(tmp_path / "out" / "curves.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["num_steps"]]
    assert {row["method"] for row in rows} == {"CMA-ES", "full backprop", "PES", "iMAML", "WarpGrad"}
    for row in rows:
        assert int(row["num_steps"]) == horizon(4, int(row["step_start_inner_steps"]), 60, 2, 8), row
    assert {int(row["num_steps"]) for row in rows} >= {6, 8}  # the curriculum did advance for the methods


@pytest.mark.parametrize("override, key", [("run.curriculum.every=2", "run.curriculum.every"),
                                           ("compare.methods=[{name: f, kind: gradient, curriculum_every: 2}]",
                                            "compare.methods[0].curriculum_every")])
def test_compare_refuses_curricula_that_count_generations_or_meta_steps(override, key):
    from evolution.compare import load_compare_config

    config = Path(__file__).resolve().parents[1] / "configs" / "compare_smoke.yaml"
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_compare_config(config, [override])


@pytest.mark.parametrize("edit, needle", [
    ("compare.methods=[{name: x, kind: learned_init, estimator: maml}]", "compare.methods[0].estimator: a learned_init"),
    ("compare.methods=[{name: x, kind: learned_init, estimator: imaml, options: {lam: 0}}]",
     "compare.methods[0].options.lam: must be a positive finite number"),
    ("compare.methods=[{name: x, kind: learned_init, estimator: cml, options: {beta: -1}}]",
     "compare.methods[0].options.beta: must be a positive finite number"),
    ("compare.methods=[{name: x, kind: learned_init, estimator: imaml, options: {cg_steps: 0}}]",
     "compare.methods[0].options.cg_steps: must be an integer >= 1"),
    ("compare.methods=[{name: x, kind: learned_init, estimator: imaml, options: {n_cg: 3}}]",
     "compare.methods[0].options.n_cg: unknown option"),
    ("compare.methods=[{name: x, kind: learned_init, estimator: warpgrad, options: {replay_batch: 0}}]",
     "compare.methods[0].options.replay_batch: must be an integer >= 1"),
    ("compare.methods=[{name: x, kind: learned_init, estimator: warpgrad, options: {inner_lr: -0.1}}]",
     "compare.methods[0].options.inner_lr: must be a positive finite number"),
    ("compare.methods=[{name: x, kind: learned_init, estimator: warpgrad, options: {lam: 2}}]",
     "compare.methods[0].options.lam: unknown option"),
    ("compare.horizon_multiples=[0]", "compare.horizon_multiples: expected distinct integers"),
    ("compare.methods=[{name: x, kind: gradient, estimator: bmg, options: {bmg_bootstrap: 0}}]",
     "estimator.bmg_bootstrap must be >= 1 unless"),
    ("compare.methods=[{name: x, kind: gradient, estimator: bmg, options: {bmg_bootstrap: -2}}]",
     "estimator.bmg_bootstrap must be >= 0"),
    ("compare.methods=[{name: x, kind: learned_init, estimator: cml, options: {lam: -2.0}}]",
     "compare.methods[0].options.lam: must be a positive finite number"),
    ("compare.methods=[{name: x, kind: evolution}]", "compare.methods[0].kind: must be one of"),
    ("compare.methods=[{name: x, kind: learned_init, estimator: warpgrad, options: {replay_batch: 9}}]",
     "compare.methods[0].options.replay_batch: at most the 8 points"),
])
def test_learned_init_methods_refuse_bad_values(tmp_path, capsys, edit, needle):
    code = main(["compare", str(ROOT / "configs" / "compare_smoke.yaml"), "--out", str(tmp_path / "x"), "--set", edit])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_a_diverging_meta_learner_is_reported_in_its_row_and_the_comparison_goes_on(tmp_path, capsys):
    """An inner learning rate that overflows makes the meta-gradient non-finite at the first meta-step: the run
    stops as diverged, its row says so, and the other methods and the report are still produced."""
    methods = ("[{name: CML, kind: learned_init, estimator: cml, learning_rate: 0.001, options: {lam: 2.0}}, "
               "{name: boom iMAML, kind: learned_init, estimator: imaml, options: {inner_lr: 1.0e+30}}, "
               "{name: boom WarpGrad, kind: learned_init, estimator: warpgrad, options: {inner_lr: 3.0e+38}}]")
    out = tmp_path / "cmp"
    code = main(["compare", str(ROOT / "configs" / "compare_smoke.yaml"), "--out", str(out), "--set",
                 "compare.seeds=[0]", "--set", f"compare.methods={methods}", "--set", "compare.baselines=false",
                 "--set", "compare.horizon_multiples=[1]"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = __import__("json").loads((out / "compare.json").read_text())["summary"]["methods"]
    assert summary["boom iMAML"]["diverged_seeds"] == [0] and summary["boom WarpGrad"]["diverged_seeds"] == [0]
    assert summary["CML"]["diverged_seeds"] == [] and summary["CML"]["inner_steps"] >= 240
    assert summary["boom iMAML"]["inner_steps"] < 240  # stopped at the first non-finite meta-step
    report = (out / "report.md").read_text()
    assert report.count("meta-gradient diverged, seeds [0]") == 2
