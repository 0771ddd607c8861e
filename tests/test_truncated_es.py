"""Truncation-aware strategies (PersistentES, NoiseReuseES) through the run loop: each candidate's inner
state is carried across generations, advanced one window per generation, restarted when the unroll ends,
checkpointed, and resumed exactly."""

from __future__ import annotations

import signal

import jax
import numpy as np
import pytest
from helpers import SMOKE, evolve_here, evolve_signalled_at, metric_rows, resume_here, same_genome, set_args

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
    return evolve_here(tmp_path_factory.mktemp("pes") / "full", PES)


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
    proc = evolve_signalled_at(out, 5, PES)  # after generation 4: unroll_start 2 next
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    code, err = resume_here(out)
    assert code == 0, err
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


# The short-horizon bias on a real inner loop: from the backprop genome (learning rate 0.5), the query
# cross-entropy after 4 steps is lowest for a rule that barely moves, while after 16 steps the best learning
# rate is ≈ 1 (measured on digits: the backprop genome's CE at T=16 ≈ 0.80, at lr 1 ≈ 0.3). Plain ES on
# 4-step episodes follows the 4-step optimum into rules that diverge by step 16; PersistentES, scoring 4-step
# windows of 16-step unrolls, descends the whole unroll like ES on full 16-step episodes.
BIAS = ["network.forward_activation=sigmoid_backprop", "network.output_activation=linear_backprop",
        "network.backward_activation=identity", "network.backward_update=multiplicative_second_state",
        "network.feedback=error_cross_entropy", "network.symmetric_in_out=true", "network.symmetric_states=true",
        "network.batch_reduction=mean", "strategy.init=backprop", "strategy.sigma=0.05",
        "strategy.population_size=16", "run.generations=40", "run.tasks_per_generation=4",
        "run.validation_every=5", "run.validation_tasks=16", "report.learning_rates=[0.1]",
        "report.baselines=[sgd]", "report.backprop_genome=false"]
BIAS_RUNS = {
    "truncated": ["strategy.name=open_es", "episode.num_steps=4", "strategy.options={learning_rate: 0.02}"],
    "persistent": ["strategy.name=persistent_es", "episode.num_steps=16",
                   "strategy.options={truncation_length: 4, learning_rate: 0.02}"],
    "full": ["strategy.name=open_es", "episode.num_steps=16", "strategy.options={learning_rate: 0.02}"],
}


def test_persistent_es_reaches_the_full_horizon_optimum_that_truncated_es_misses(tmp_path):
    family = make_family(TaskConfig(family="digits", n_way=3, batch_size=8, num_query=24), "test")
    key = jax.random.key(11)
    tasks, keys = family.sample(key, 32, 16), synapse_keys(key, 32)

    def full_horizon_loss(spec, genome):  # held-out test tasks, 16 inner steps
        result = E.evaluate(spec, G.ravel(spec, genome)[None], tasks, keys, E.Scoring(), E.Horizon(16))
        return float(np.mean(result.fitness))

    initial = full_horizon_loss(*G.backprop_genome((64, 8, 3), 0.5, loss="cross_entropy"))
    loss = {}
    for name, overrides in BIAS_RUNS.items():
        evolve_here(tmp_path / name, BIAS + overrides)
        spec, genome, _ = G.load(tmp_path / name / "best.genome")
        loss[name] = full_horizon_loss(spec, genome)
    print(f"full-horizon CE: initial {initial:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in loss.items()))
    assert loss["truncated"] > max(initial, np.log(3)), loss  # worse than where it started: it overshoots
    assert loss["full"] < initial - 0.2, (initial, loss)
    assert loss["persistent"] < initial - 0.2, (initial, loss)
    assert loss["persistent"] < loss["full"] + 0.15, loss  # the full-horizon optimum, within ES noise
