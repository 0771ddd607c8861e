"""Experiment tracking: real TensorBoard event files (read back with TensorBoard's event reader) and a real
MLflow file store (read back with the MLflow client), through `blur evolve` and a kill -9 + `blur resume`."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
from helpers import (KILL_OVERRIDES, LIGHT_REPORT, SMOKE, blur, evolve_here, evolve_signalled_at, metric_rows,
                     resume_here, set_args)

TRACKED = KILL_OVERRIDES + LIGHT_REPORT + ["tracking.tensorboard=true", "tracking.mlflow=true"]


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                                "tensors": 0})
    accumulator.Reload()
    return accumulator, [(e.step, e.value) for e in accumulator.Scalars(tag)]


def mlflow_run(run_dir):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    info = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=info["mlflow_uri"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return client, info["mlflow_run_id"], runs


def evolve(out, overrides, env=None):
    proc = blur("evolve", SMOKE, "--out", out, "--quiet", *set_args(overrides), env=env)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tracked run to completion (in this process), and beside it the same run in a subprocess SIGKILLed after
    generation 13."""
    base = tmp_path_factory.mktemp("tracking")
    killed = evolve_signalled_at(base / "killed", 13, TRACKED)
    evolve_here(base / "full", TRACKED)
    _, killed_err = killed.communicate(timeout=600)
    return base / "full", (base / "killed", killed.returncode, killed_err)


@pytest.fixture(scope="module")
def tracked(runs):
    return runs[0]


def test_a_tracked_run_has_every_generation_and_the_report_in_both_backends(tracked):
    rows = metric_rows(tracked)
    accumulator, best = tensorboard_scalars(tracked, "generation/best_fitness")
    assert [step for step, _ in best] == list(range(24))
    assert [value for _, value in best] == pytest.approx([row["best_fitness"] for row in rows], rel=1e-6)
    tags = accumulator.Tags()
    assert "plots/fitness" in tags["images"] and "report/held_out" in tags["tensors"]
    assert any(t.startswith("validation/") for t in tags["scalars"]) and "strategy/sigma" in tags["scalars"]
    client, run_id, runs = mlflow_run(tracked)
    assert [r.info.run_id for r in runs] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and json.loads(run.data.params["strategy.name"]) == "pycma"
    history = client.get_metric_history(run_id, "best_fitness")
    assert sorted(m.step for m in history) == list(range(24))
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"best.genome", "report.md", "report.json", "fitness.png"} <= artifacts
    assert "held_out.evolved_rule.accuracy" in run.data.metrics


def test_kill_9_and_resume_continue_the_same_tracking_runs_with_contiguous_steps(runs, tracked):
    out, code, err = runs[1]
    assert code == -signal.SIGKILL, err
    code, err = resume_here(out)  # (in this process: a second writer, as a second process would open)
    assert code == 0, err
    assert len(list((out / "tensorboard").iterdir())) == 2  # one event file per writer
    _, best = tensorboard_scalars(out, "generation/best_fitness")
    _, reference = tensorboard_scalars(tracked, "generation/best_fitness")
    assert [step for step, _ in best] == list(range(24)) and best == reference  # the orphans were purged
    client, run_id, runs = mlflow_run(out)
    assert len(runs) == 1 and runs[0].info.run_id == run_id and runs[0].info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "best_fitness"))
    assert [step for step, _ in history] == list(range(24))  # each step once
    assert [value for _, value in history] == pytest.approx([row["best_fitness"] for row in metric_rows(tracked)])


def test_a_tracking_backend_failing_mid_run_warns_once_and_the_run_goes_on(tmp_path, capsys):
    from evolution.config import config_from_dict, read_yaml_file
    from evolution.run import Run, local_evaluator

    data = read_yaml_file(SMOKE)
    data.update(tracking={"mlflow": True}, report={"test_tasks": 2, "tuning_tasks": 2})
    config = config_from_dict(data, ["run.generations=4"])
    run = Run.create(config, tmp_path / "run", local_evaluator)

    def sabotage(row):
        if row["generation"] == 1:  # the store vanishes under the run: every later MLflow call fails
            shutil.rmtree(tmp_path / "run" / "mlruns")
            (tmp_path / "run" / "mlruns").write_text("not a directory")

    try:
        assert run.run(sabotage) == "generations"
    finally:
        run.close()
    err = capsys.readouterr().err
    assert err.count("tracking backend mlflow failed") == 1 and "the run goes on" in err
    assert [row["generation"] for row in metric_rows(tmp_path / "run")] == [0, 1, 2, 3]


@pytest.mark.parametrize("overrides, message", [
    (["tracking.mlflow=true", "tracking.mlflow_uri=bogus://nowhere"], "tracking.mlflow_uri: cannot use bogus://"),
])
def test_an_unusable_mlflow_uri_is_a_one_line_error_before_anything_is_written(overrides, message, tmp_path):
    code, err = evolve(tmp_path / "run", overrides)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
