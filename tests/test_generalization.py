"""The generalization report: paired statistics against an independent computation, tuning on validation
tasks only, the collapse flag, reshaped genomes, and `blur evaluate --horizons --set` end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import genome as G
from evolution.cli import main
from evolution.settings import Setting
from workers.report import generalization_report, majority_share, paired_statistics, report_tasks, reshape_spec
from workers.tasks import TaskConfig, make_family

TASK = TaskConfig(family="digits", batch_size=8, num_query=24)
SMALL = dict(num_test_tasks=8, num_tuning_tasks=4, learning_rates=(0.1, 1.0), baseline_names=("sgd", "adam"))


@pytest.fixture(scope="module")
def report():
    spec, genome = G.backprop_genome((64, 8, 3), 0.5, loss="cross_entropy")
    settings = [Setting("narrow", 1.0, TASK, (8,), 4), Setting("deep", 1.0, TASK, (8, 8), 4)]
    return generalization_report(spec, genome, settings, [2, 4], jax.random.key(0), **SMALL)


def test_paired_statistics_match_an_independent_computation(report):
    checked = 0
    for setting in report["settings"].values():
        for cell in setting["horizons"].values():
            rule = np.asarray(cell["methods"]["evolved rule"]["per_task_accuracy"])
            assert len(rule) == 8
            for name, row in cell["methods"].items():
                other = np.asarray(row["per_task_accuracy"])
                np.testing.assert_allclose(row["accuracy"], other.mean(), rtol=0, atol=1e-12)
                np.testing.assert_allclose(row["standard_error"], other.std(ddof=1) / np.sqrt(len(other)), atol=1e-12)
                if name == "evolved rule":
                    assert "paired_difference" not in row
                    continue
                d = rule - other
                np.testing.assert_allclose(row["paired_difference"], d.mean(), atol=1e-12)
                np.testing.assert_allclose(row["paired_standard_error"], d.std(ddof=1) / np.sqrt(len(d)), atol=1e-12)
                if d.std() > 0:
                    np.testing.assert_allclose(row["p_value"], stats.ttest_rel(rule, other).pvalue, rtol=1e-9)
                checked += 1
            best = max(("SGD", "Adam"), key=lambda n: cell["methods"][n]["accuracy"])
            assert cell["best_baseline"] == best
    assert checked == 2 * 2 * 3  # settings x horizons x (backprop genome, SGD, Adam)
    assert paired_statistics([0.5, 0.5], [0.5, 0.5]) == {"paired_difference": 0.0, "paired_standard_error": 0.0,
                                                         "p_value": 1.0}


def test_cells_report_their_network_horizon_and_grid_edges(report):
    deep = report["settings"]["deep"]
    assert deep["layer_sizes"] == [64, 8, 8, 3] and set(deep["horizons"]) == {"2", "4"}
    cell = deep["horizons"]["4"]
    assert cell["num_steps"] == 4 and cell["curve_steps"][0] == 0 and cell["curve_steps"][-1] == 4
    for row in cell["methods"].values():
        assert len(row["curve"]) == len(row["curve_stderr"]) == len(cell["curve_steps"])
        if row["learning_rate"] is not None:  # a two-value grid: every choice is at its edge
            assert row["lr_at_grid_edge"] is True
    assert report["methods"] is report["settings"]["narrow"]["horizons"]["2"]["methods"]


def test_tuning_sees_only_validation_tasks(tmp_path):
    tasks, tuning, test_key, tuning_key = report_tasks(TASK, 4, jax.random.key(1), 6, 4)
    assert not np.array_equal(jax.random.key_data(test_key), jax.random.key_data(tuning_key))
    validation, test = make_family(TASK, "validation"), make_family(TASK, "test")

    def rows(family):
        found = set()
        for pool, count in ((family.data.support_x, family.data.support_count),
                            (family.data.query_x, family.data.query_count)):
            for c in range(pool.shape[0]):
                found |= {r.tobytes() for r in np.asarray(pool[c, : int(count[c])])}
        return found

    validation_rows, test_rows = rows(validation), rows(test)
    assert not validation_rows & test_rows  # disjoint examples (digits: two halves of the same classes)
    for x in (tuning.support_x, tuning.query_x):
        assert {r.tobytes() for r in np.asarray(x).reshape(-1, 64)} <= validation_rows
    for x in (tasks.support_x, tasks.query_x):
        assert not {r.tobytes() for r in np.asarray(x).reshape(-1, 64)} & validation_rows
    # the learning rates chosen do not depend on the test tasks: another test split, same tuning tasks
    spec, genome = G.backprop_genome((64, 8, 3), 0.5, loss="cross_entropy")
    setting = [Setting("s", 1.0, TASK, (8,), 4)]
    small = {**SMALL, "baseline_names": ("sgd",)}
    a = generalization_report(spec, genome, setting, [4], jax.random.key(2), **small)
    b = generalization_report(spec, genome, setting, [4], jax.random.key(2), split="train", **small)
    for name in ("backprop genome", "SGD"):
        row_a, row_b = a["methods"][name], b["methods"][name]
        assert row_a["learning_rate"] == row_b["learning_rate"]
        assert row_a.get("sweep") == row_b.get("sweep")
    assert a["methods"]["SGD"]["per_task_accuracy"] != b["methods"]["SGD"]["per_task_accuracy"]


def test_a_constant_predictor_is_flagged_as_collapsed(report):
    spec, genome = G.backprop_genome((64, 8, 3), 0.5, loss="cross_entropy")
    silent = genome._replace(forward_transform=jnp.zeros_like(genome.forward_transform))  # logits all zero
    out = generalization_report(spec, silent, [Setting("s", 1.0, TASK, (8,), 4)], [4], jax.random.key(0),
                                **{**SMALL, "baseline_names": ("sgd",)}, include_backprop_genome=False)
    rule = out["methods"]["evolved rule"]
    assert rule["majority_share"] == 1.0 and rule["collapsed"] is True
    learned = majority_share(spec, genome, TASK, 32, jax.random.key(0), 8)  # backprop, long enough to learn
    assert 1 / 3 <= learned < 0.5


def test_reshape_keeps_the_rule_and_refuses_another_depth_for_per_layer_genomes():
    spec = G.NetworkSpec((64, 16, 3))
    wider = reshape_spec(spec, (40, 32, 32, 10))
    assert wider.layer_sizes == (40, 32, 32, 10) and G.num_dims(wider) == G.num_dims(spec)
    per_layer = G.NetworkSpec((64, 16, 3), per_layer_genome=True)
    assert reshape_spec(per_layer, (40, 8, 10)).layer_sizes == (40, 8, 10)
    with pytest.raises(ValueError, match="per layer for 1 hidden layer"):
        reshape_spec(per_layer, (40, 8, 8, 10))


def test_evaluate_reports_held_out_settings_and_horizons_as_json(tmp_path, capsys):
    spec, genome = G.backprop_genome((64, 8, 3), 0.5, loss="cross_entropy")
    path = G.save(tmp_path / "bp.genome", spec, genome)
    code = main(["evaluate", str(path), "--task", "digits", "--horizons", "3", "--tasks", "6", "--tuning-tasks", "4",
                 "--set", "network.hidden_sizes=[8,8]", "--set", "task.num_query=12", "--json",
                 "--plot", str(tmp_path / "curves.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    (name, setting), = report["settings"].items()
    assert name == "digits-3way-8x8" and setting["layer_sizes"] == [64, 8, 8, 3]
    for horizon in ("3",):  # several horizons: the library tests above
        methods = setting["horizons"][horizon]["methods"]
        assert set(methods) == {"genome bp.genome", "backprop genome", "SGD", "SGD+momentum", "Adam"}
        for method, row in methods.items():
            assert {"accuracy", "standard_error", "diverged"} <= set(row)
            if method != "genome bp.genome":
                assert {"paired_difference", "paired_standard_error", "p_value"} <= set(row)
    assert "evaluate:" in captured.err  # progress with an ETA
    assert (tmp_path / "curves.png").stat().st_size > 1000
    per_layer = G.save(tmp_path / "pl.genome", G.NetworkSpec((64, 8, 3), per_layer_genome=True),
                       G.neutral_genome(G.NetworkSpec((64, 8, 3), per_layer_genome=True)))
    for argv, needle in [(["--set", "network.hidden_sizes=[8,8]"], "per layer for 1 hidden layer"),
                         (["--horizons", "0,4"], "--horizons: must be an integer in [1,"),
                         (["--set", "network.num_states=3"], "--set network.num_states: blur evaluate takes"),
                         (["--set", "task.n_wya=3"], "task.n_wya: unknown key")]:
        code = main(["evaluate", str(per_layer), "--task", "digits", "--tasks", "4", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err
