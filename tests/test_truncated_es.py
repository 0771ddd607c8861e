"""Truncation-aware strategies (PersistentES, NoiseReuseES) through the run loop: each candidate's inner
state is carried across generations, advanced one window per generation, restarted when the unroll ends,
checkpointed, and resumed exactly."""

from __future__ import annotations

import signal

import jax
import numpy as np
import pytest
from helpers import SMOKE, blur, evolve_ok, metric_rows, same_genome, set_args

import genome as G
from evolution.cli import main
from workers import engine as E
from workers.evaluator import synapse_keys
from workers.tasks import TaskConfig, make_family

PES = ["strategy.name=persistent_es", "strategy.options={truncation_length: 2}", "episode.num_steps=6",
       "run.generations=9", "run.validation_every=3", "report.learning_rates=[0.1]", "report.baselines=[sgd]",
       "report.backprop_genome=false"]


def test_windows_of_the_shared_core_compose_into_one_unroll():
    spec = G.NetworkSpec((64, 8, 3))
    family = make_family(TaskConfig(family="digits", n_way=3, batch_size=8, num_query=24), "train")
    key = jax.random.key(3)
    tasks = family.sample(key, 3, 6)
    vectors = jax.vmap(lambda k: G.ravel(spec, G.random_genome(spec, k)))(jax.random.split(key, 4))
    scoring = E.Scoring()
    fresh = E.init_window_synapses(spec, synapse_keys(key, 3), 4)
    _, after_two = E.evaluate_window(spec, vectors, tasks, fresh, 0, 2, scoring)
    _, after_four = E.evaluate_window(spec, vectors, tasks, after_two, 2, 2, scoring)
    result_six, after_six = E.evaluate_window(spec, vectors, tasks, after_four, 4, 2, scoring)
    direct_result, direct = E.evaluate_window(spec, vectors, tasks, fresh, 0, 6, scoring)
    for a, b in zip(jax.tree.leaves(after_six), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(a, b)
    full = E.evaluate(spec, vectors, tasks, synapse_keys(key, 3), scoring, E.Horizon(6))  # a whole unroll's fitness
    np.testing.assert_allclose(result_six.fitness, full.fitness, rtol=1e-6)
    np.testing.assert_array_equal(result_six.fitness, direct_result.fitness)


@pytest.fixture(scope="module")
def pes_reference(tmp_path_factory):
    return evolve_ok(tmp_path_factory.mktemp("pes") / "full", PES)


def test_unroll_start_cycles_through_the_unroll(pes_reference, tmp_path, capsys):
    rows = metric_rows(pes_reference)
    assert [row["unroll_start"] for row in rows] == [0, 2, 4] * 3
    assert rows[-1]["inner_steps"] == 9 * 6 * 3 * 2  # generations x population x tasks x window
    overrides = [o.replace("persistent_es", "noise_reuse_es") for o in PES] + ["run.generations=4"]
    code = main(["evolve", str(SMOKE), "--out", str(tmp_path / "nres"), "--quiet", *set_args(overrides)])
    assert code == 0, capsys.readouterr().err
    assert [row["unroll_start"] for row in metric_rows(tmp_path / "nres")] == [0, 2, 4, 0]


def test_kill_9_mid_unroll_resumes_identically(pes_reference, tmp_path):
    out = tmp_path / "killed"
    proc = blur("evolve", SMOKE, "--out", out, "--quiet", *set_args(PES),
                env={"BLUR_FAILPOINTS": "generation:5:SIGKILL"})  # after generation 4: unroll_start 2 next
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    resumed = blur("resume", out, "--quiet")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert metric_rows(out) == metric_rows(pes_reference)
    same_genome(pes_reference, out)


@pytest.mark.parametrize("override, key", [
    (["evaluator.kind=ray"], "evaluator.kind"),
    (["run.curriculum.every=2"], "run.curriculum.every"),
    (["strategy.options={unroll_length: 8}"], "strategy.options.unroll_length"),
    (["strategy.options={truncation_length: 4}"], "strategy.options"),  # 6 is not a multiple of 4
])
def test_truncation_aware_settings_that_cannot_hold_are_refused(override, key, tmp_path, capsys):
    base = [o for o in PES if not o.startswith("strategy.options")] if override[0].startswith(
        "strategy.options") else PES
    code = main(["evolve", str(SMOKE), "--out", str(tmp_path / "o"), *set_args(base + override)])
    err = capsys.readouterr().err
    assert code == 2 and key in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
