"""Gradient-based outer loops: the meta-loss, each meta-gradient estimator against central differences
(float64) or against the exact gradient in expectation, compiled memory at T and 4T, EvoGrad on a
loss-weighting problem, and the optax outer loop with its budget accounting.

Compilation dominates the run time on CPU, so tests share shapes and static configs: the float32 checks
reuse the estimators compiled by the memory test (``small(name)`` at T = 4 and 16, two tasks) and the
float64 checks share one T = 7 problem.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import genome as G
from evolution import evograd as EG
from evolution import gradients as GR
from evolution import outer_loop as OL
from workers import engine as E
from workers.task_types import Task
from workers.unroll import init_unroll

SPEC = G.NetworkSpec((4, 5, 3), num_states=2)  # the paper's defaults: tanh, ±1 target feedback, additive
NUM_STEPS = 7  # odd: windows of 2 and the √T segments of remat="sqrt" end in masked padding
HORIZON = E.Horizon(NUM_STEPS)
NUM_TASKS = 2
SHORT, LONG = 4, 16  # T and 4T of the memory test, also the unroll lengths of the curriculum test
MEDIUM = (8, 8)  # tasks and steps of the engine-equivalence and meta-training tests
MEDIUM_EPISODE = E.EpisodeConfig(num_steps=MEDIUM[1])
MEDIUM_HORIZON = MEDIUM_EPISODE.horizon()


def teacher_tasks(seed, num_tasks=NUM_TASKS, num_steps=NUM_STEPS, batch=6, query=12):
    """Gaussian inputs labelled by a random linear teacher per task (NumPy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(num_tasks, SPEC.num_inputs, SPEC.num_outputs))
    support_x = rng.normal(size=(num_tasks, num_steps, batch, SPEC.num_inputs))
    query_x = rng.normal(size=(num_tasks, query, SPEC.num_inputs))
    support_y = np.argmax(np.einsum("ktbi,kio->ktbo", support_x, teacher), axis=-1)
    query_y = np.argmax(np.einsum("kqi,kio->kqo", query_x, teacher), axis=-1)
    return Task(jnp.asarray(support_x, jnp.float32), jnp.asarray(support_y, jnp.int32),
                jnp.asarray(query_x, jnp.float32), jnp.asarray(query_y, jnp.int32))


def random_rule(dtype=jnp.float32):
    """A random rule whose synapses move noticeably in a few steps (η̃ = -0.05)."""
    genome = G.random_genome(SPEC, jax.random.key(2), transform_std=0.5)._replace(synapse_update=jnp.asarray(-0.05))
    return G.ravel(SPEC, genome).astype(dtype)


def hebbian_rule():
    """Supervised Hebbian rule: the target (post state 1) drives the state-0 synapses; learns slowly."""
    genome = G.neutral_genome(SPEC)._replace(post_transform=jnp.asarray([[0.0, 1.0], [1.0, 0.0]]),
                                             synapse_update=jnp.asarray(0.005))
    return G.ravel(SPEC, genome)


def small(name, **changes):
    """The float32 estimator configs shared by the memory, engine and outer-loop tests."""
    return GR.EstimatorConfig(name, truncation=2, pes_pairs=2, **changes)


SYNAPSE_KEYS = jax.random.split(jax.random.key(1), NUM_TASKS)
TASKS = teacher_tasks(0)


def central_differences(fn, vector, step=1e-5):
    """Central differences of a scalar function of a float64 vector, one coordinate at a time."""
    eye = np.eye(vector.shape[0])
    return np.array([(float(fn(vector + step * e)) - float(fn(vector - step * e))) / (2 * step) for e in eye])


def estimate(vector, state, estimator, key=jax.random.key(7), tasks=TASKS, horizon=HORIZON):
    return GR.estimate(SPEC, vector, tasks, state, key, horizon=horizon, estimator=estimator)


def fresh_state(estimator, dtype=jnp.float64):
    return GR.init_state(SPEC, SYNAPSE_KEYS, estimator, dtype)


def relative_error(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ------------------------------------------------------------------------------------------- meta-loss


def test_meta_loss_equals_the_engines_mean_episode_cross_entropy():
    tasks, keys, horizon = teacher_tasks(0, *MEDIUM), jax.random.split(jax.random.key(1), MEDIUM[0]), MEDIUM_HORIZON
    vectors = jnp.stack([random_rule(), hebbian_rule()])
    engine = E.evaluate(SPEC, vectors, tasks, keys, MEDIUM_EPISODE.scoring, horizon)
    for vector, episodes, fitness in zip(vectors, engine.cross_entropy, engine.fitness):
        state = GR.init_state(SPEC, keys, small("full"))
        ours = GR.estimate(SPEC, vector, tasks, state, jax.random.key(0), horizon=horizon, estimator=small("full"))
        np.testing.assert_allclose(ours.loss, jnp.mean(episodes), rtol=1e-5)
        # the ES fitness (cross-entropy, below the cap) aggregated over tasks is the same number
        np.testing.assert_allclose(GR.meta_loss(SPEC, vector, tasks, keys, horizon),
                                   E.aggregate_fitness(np.asarray(fitness), MEDIUM_EPISODE.scoring), rtol=1e-5)
    loss = GR.meta_loss(SPEC, vectors[1], tasks, keys, horizon)
    np.testing.assert_allclose(loss, jnp.mean(engine.cross_entropy[1]), rtol=1e-5)
    assert float(loss) < float(jnp.mean(engine.cross_entropy[0]))  # the Hebbian rule learns, the random one not


# ------------------------------------------------------------------------------------------- backprop


@pytest.mark.parametrize("remat", ["none", "sqrt"])
def test_full_backprop_matches_central_differences(remat):
    with jax.enable_x64(True):
        vector = random_rule(jnp.float64)
        estimator = GR.EstimatorConfig("full", remat=remat)
        state = fresh_state(estimator)
        exact = estimate(vector, state, estimator)
        numeric = central_differences(lambda v: estimate(v, state, estimator).loss, vector)
        assert relative_error(exact.grad, numeric) < 1e-7
        assert int(exact.inner_steps) == NUM_STEPS * NUM_TASKS and GR.done(exact.state, HORIZON)


def test_truncated_backprop_with_window_T_equals_full_backprop():
    with jax.enable_x64(True):
        vector = random_rule(jnp.float64)
        full = estimate(vector, fresh_state(GR.EstimatorConfig("full")), GR.EstimatorConfig("full"))
        estimator = GR.EstimatorConfig("truncated", truncation=NUM_STEPS)
        truncated = estimate(vector, fresh_state(estimator), estimator)
        np.testing.assert_allclose(truncated.loss, full.loss, rtol=1e-13)
        np.testing.assert_allclose(truncated.grad, full.grad, rtol=1e-10, atol=1e-15)
        assert GR.done(truncated.state, HORIZON)


def test_truncated_backprop_carries_the_state_and_matches_central_differences_of_each_window():
    with jax.enable_x64(True):
        vector = random_rule(jnp.float64)
        estimator = GR.EstimatorConfig("truncated", truncation=2)
        state, steps = fresh_state(estimator), []
        while not GR.done(state, HORIZON):
            start = state
            result = estimate(vector, start, estimator)
            numeric = central_differences(lambda v: estimate(v, start, estimator).loss, vector)
            assert relative_error(result.grad, numeric) < 1e-7
            steps.append(int(result.state.step))
            state = result.state
        assert steps == [2, 4, 6, 7]  # the last window has one real step and one masked one
        # the carried synapses are those of the uninterrupted unroll (and so is the last window's loss)
        full = estimate(vector, fresh_state(GR.EstimatorConfig("full")), GR.EstimatorConfig("full"))
        for carried, direct in zip(jax.tree.leaves(state.synapses), jax.tree.leaves(full.state.synapses)):
            np.testing.assert_allclose(carried, direct, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(result.loss, full.loss, rtol=1e-12)


# ------------------------------------------------------------------------------------------- PES


def horizon_gradients(vector, horizons):
    """Exact gradients of the mean query loss after t inner steps (genome used in all t steps), per t."""
    synapses = init_unroll(SPEC, SYNAPSE_KEYS, dtype=vector.dtype).synapses

    @jax.jit
    def grad_at(stop):
        return jax.grad(lambda v: GR.window_loss(SPEC, v, TASKS, synapses, 0, NUM_STEPS, stop, "none")[0])(vector)

    return np.stack([grad_at(t) for t in horizons])


def test_pes_is_unbiased_for_the_full_unroll_gradient_at_every_truncation():
    """24 independent PES unrolls × 250 antithetic pairs, windows of 2 steps over T = 7. At every window
    end t_w = 2, 4, 6, 7 the mean estimate matches the exact gradient of the loss after t_w steps: every
    coordinate within 5 standard errors (from the spread of the 24 unrolls) and relative error < 0.15.
    Truncated backprop (which ignores the earlier windows) misses by > 0.3 from the second window on."""
    chains, horizons = 24, [2, 4, 6, 7]
    with jax.enable_x64(True):
        vector = random_rule(jnp.float64)
        exact = horizon_gradients(vector, horizons)
        estimator = GR.EstimatorConfig("pes", truncation=2, pes_pairs=250, pes_sigma=1e-3)
        estimates = np.zeros((chains, len(horizons), vector.shape[0]))
        for chain in range(chains):
            state = fresh_state(estimator)
            for window in range(len(horizons)):
                result = estimate(vector, state, estimator, key=jax.random.key(1000 * chain + window))
                estimates[chain, window], state = result.grad, result.state
        mean, stderr = estimates.mean(axis=0), estimates.std(axis=0, ddof=1) / np.sqrt(chains)
        assert np.all(np.abs(mean - exact) < 5 * stderr + 1e-12)
        for window in range(len(horizons)):
            assert relative_error(mean[window], exact[window]) < 0.15, window
        truncation = GR.EstimatorConfig("truncated", truncation=2)
        state = fresh_state(truncation)
        for window in range(len(horizons)):
            result = estimate(vector, state, truncation)
            if window > 0:
                assert relative_error(result.grad, exact[window]) > 0.3, window
            state = result.state


# ------------------------------------------------------------------------------------------- EvoGrad


def test_evograd_hypergradient_matches_central_differences_of_its_first_order_objective():
    with jax.enable_x64(True):
        vector = random_rule(jnp.float64)
        estimator = GR.EstimatorConfig("evograd", truncation=1)
        state = fresh_state(estimator)
        for _ in range(3):  # train the network online for a few steps first
            state = estimate(vector, state, estimator).state
        result = estimate(vector, state, estimator)
        numeric = central_differences(lambda v: estimate(v, state, estimator).loss, vector)
        assert relative_error(result.grad, numeric) < 1e-6
        assert int(result.state.step) == 4 and int(result.inner_steps) == NUM_TASKS * (2 + 1)  # K + advance


def _noisy_label_problem(key, num=64, dim=5, noise=0.3):
    """Logistic regression whose first 30% training labels are flipped; clean validation set."""
    w_key, x_key, v_key = jax.random.split(key, 3)
    teacher = jax.random.normal(w_key, (dim,))
    x, xv = jax.random.normal(x_key, (num, dim)), jax.random.normal(v_key, (num, dim))
    y, yv = (x @ teacher > 0).astype(x.dtype), (xv @ teacher > 0).astype(x.dtype)
    noisy = jnp.arange(num) < int(noise * num)
    return x, jnp.where(noisy, 1 - y, y), xv, yv, noisy


def _bce(params, x, y):
    logits = x @ params["w"] + params["b"]
    return jnp.logaddexp(0.0, logits) - y * logits


def _weighted_loss(params, weight_logits, x, y):
    """Per-example loss weights 2·sigmoid(λ_i) (1 at λ = 0): the meta-parameters inside the training loss."""
    return jnp.mean(2 * jax.nn.sigmoid(weight_logits) * _bce(params, x, y))


def test_original_evograd_expectation_is_the_one_step_lookahead_hypergradient():
    """E[EvoGrad] = ∂/∂λ ℓ_val(θ - α ∇θ ℓ_train(θ, λ)) with α = σ²/(2τ), to first order in σ (K = 2).
    Mean of 8000 draws: every coordinate within 5 standard errors, relative error < 0.05."""
    draws, sigma, temperature = 8000, 1e-3, 0.05
    with jax.enable_x64(True):
        x, y, xv, yv, _ = _noisy_label_problem(jax.random.key(0))
        params = {"w": 0.3 * jax.random.normal(jax.random.key(5), (5,)), "b": jnp.zeros(())}
        weight_logits = 0.5 * jax.random.normal(jax.random.key(6), (x.shape[0],))
        train_fn = lambda p, m: _weighted_loss(p, m, x, y)  # noqa: E731
        val_fn = lambda p: jnp.mean(_bce(p, xv, yv))  # noqa: E731
        alpha = sigma**2 / (2 * temperature)

        def lookahead(logits):  # one SGD step of size α on the weighted training loss, then validation
            step = jax.grad(train_fn)(params, logits)
            return val_fn(jax.tree.map(lambda p, g: p - alpha * g, params, step))

        def one(key):
            return EG.hypergradient(key, params, weight_logits, train_fn, val_fn, 2, sigma, temperature)[1]

        exact = np.asarray(jax.grad(lookahead)(weight_logits))
        samples = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), draws)))
        mean, stderr = samples.mean(axis=0), samples.std(axis=0) / np.sqrt(draws)
        assert np.all(np.abs(mean - exact) < 5 * stderr)
        assert relative_error(mean, exact) < 0.05


def test_original_evograd_learns_loss_weights_that_downweight_flipped_labels():
    x, y, xv, yv, noisy = _noisy_label_problem(jax.random.key(0))
    params = {"w": jnp.zeros((5,)), "b": jnp.zeros(())}
    train_fn = lambda p, m: _weighted_loss(p, m, x, y)  # noqa: E731
    val_fn = lambda p: jnp.mean(_bce(p, xv, yv))  # noqa: E731

    @jax.jit
    def run(key, meta_learning_rate):
        return EG.train(key, params, jnp.zeros(x.shape[0]), train_fn, val_fn, 400, optax.sgd(0.5),
                        optax.adam(meta_learning_rate))[0]

    learned, frozen = run(jax.random.key(2), 0.03), run(jax.random.key(2), 0.0)
    weights, noisy = np.asarray(2 * jax.nn.sigmoid(learned.meta_params)), np.asarray(noisy)
    assert weights[noisy].mean() < 0.7 * weights[~noisy].mean()
    assert float(val_fn(learned.params)) < 0.6 * float(val_fn(frozen.params))


# ------------------------------------------------------------------------------------------- memory


def test_compiled_memory_grows_with_T_for_full_backprop_only():
    vector = random_rule()
    temp = {}
    for name in GR.ESTIMATORS:
        # a faster compile where nothing else runs the estimator (same buffers); the curriculum test below
        # runs truncated at both lengths and reuses these compilations
        options = None if name == "truncated" else {"xla_backend_optimization_level": 0}
        for steps in (SHORT, LONG):
            temp[name, steps] = GR.estimator_memory(SPEC, vector, teacher_tasks(0, num_steps=steps), SYNAPSE_KEYS,
                                                    E.Horizon(steps), small(name), options)["temp"]
    assert temp["full", LONG] > 2.5 * temp["full", SHORT] > 0
    for name in ("truncated", "pes", "evograd"):
        assert 0 < temp[name, LONG] <= temp[name, SHORT], (name, temp)


# ------------------------------------------------------------------------------------------- outer loop


def sample_tasks(key, num_tasks, num_steps):
    return teacher_tasks(np.asarray(jax.random.key_data(key)), num_tasks, num_steps)


def test_outer_loop_reduces_the_held_out_meta_loss():
    """20 Adam steps (lr 0.05) of full backprop from the slow Hebbian rule, 8 tasks of T = 8 per step: the
    meta-loss on 8 held-out tasks drops from ≈ ln 3 (chance) by more than 0.2."""
    held_out, held_out_keys = teacher_tasks(100, *MEDIUM), jax.random.split(jax.random.key(101), MEDIUM[0])

    def held_out_loss(vectors):
        result = E.evaluate(SPEC, jnp.stack(vectors), held_out, held_out_keys, E.Scoring(), MEDIUM_HORIZON)
        return np.asarray(result.cross_entropy).mean(axis=1)

    initial = hebbian_rule()
    config = OL.OuterLoopConfig(small("full"), learning_rate=0.05, num_meta_steps=20, tasks_per_step=MEDIUM[0],
                                validate_every=10)
    result = OL.run_outer_loop(jax.random.key(4), SPEC, initial, sample_tasks, MEDIUM_EPISODE, config,
                               validate_fn=lambda v: {"held_out_loss": float(held_out_loss([v, v])[0])})
    before, after = held_out_loss([initial, result.vector])
    assert after < before - 0.2, (before, after)
    assert result.history[19]["held_out_loss"] == pytest.approx(after, rel=1e-6)
    assert "held_out_loss" in result.history[9] and "held_out_loss" not in result.history[10]
    budget = result.budget
    assert budget.stop_reason == "num_meta_steps" and budget.meta_steps == 20 and budget.skipped == 0
    assert budget.inner_steps == 20 * MEDIUM[0] * MEDIUM[1] and list(budget.memory) == [MEDIUM[1]]
    assert 0 <= budget.compile_time < budget.wall_time


def test_outer_loop_curriculum_budget_stop_and_non_finite_steps():
    config = OL.OuterLoopConfig(small("truncated"), num_meta_steps=100, tasks_per_step=NUM_TASKS, max_inner_steps=20,
                                curriculum_every=2, curriculum_increment=LONG - SHORT, curriculum_max_steps=LONG)
    result = OL.run_outer_loop(jax.random.key(4), SPEC, random_rule(), sample_tasks, E.EpisodeConfig(num_steps=SHORT),
                               config)
    assert result.budget.stop_reason == "max_inner_steps"
    assert [row["num_steps"] for row in result.history] == [SHORT, SHORT, LONG, LONG, LONG]  # the curriculum
    assert [row["inner_steps"] for row in result.history] == [4, 8, 12, 16, 20]  # windows of 2 steps × 2 tasks
    assert result.budget.memory[SHORT]["temp"] == result.budget.memory[LONG]["temp"] > 0
    synapse_update = 4 * SPEC.num_states**2 + 3  # its flat entry u, with η̃ = 1e-3·sinh(u)
    exploding = G.ravel(SPEC, G.neutral_genome(SPEC)).at[synapse_update].set(100.0)  # η̃ overflows
    config = OL.OuterLoopConfig(small("truncated"), num_meta_steps=3, tasks_per_step=NUM_TASKS)
    result = OL.run_outer_loop(jax.random.key(4), SPEC, exploding, sample_tasks, E.EpisodeConfig(num_steps=SHORT),
                               config)
    assert result.budget.skipped == 3 and np.array_equal(result.vector, exploding)


def test_estimator_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="estimator.name"):
        GR.EstimatorConfig("reinforce")
    with pytest.raises(ValueError, match="estimator.evograd_temperature"):
        GR.EstimatorConfig("evograd", evograd_temperature=0.0)


def test_compare_config_parses_the_smoke_file_and_names_bad_keys():
    from pathlib import Path

    from evolution.compare import load_compare_config, parse_compare
    from evolution.config import ConfigError

    smoke = Path(__file__).resolve().parent.parent / "configs" / "compare_smoke.yaml"
    config, compare = load_compare_config(smoke, ["compare.seeds=[3]", "episode.num_steps=5"])
    assert compare.seeds == (3,) and config.episode.num_steps == 5
    assert {m.kind for m in compare.methods} == {"es", "gradient", "learned_init"}
    bad = [({"methods": [{"name": "a", "kind": "es", "colour": 1}]}, r"compare.methods\[0\].colour: unknown key"),
           ({"methods": [{"name": "a", "kind": "gradient", "estimator": "reinforce"}]}, "estimator.name"),
           ({"methods": [{"name": "a", "kind": "es"}], "inner_step_budget": "lots"}, "compare.inner_step_budget"),
           ({"methods": [{"name": "a", "kind": "es"}, {"name": "a", "kind": "es"}]}, "unique")]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_compare(data)


# ------------------------------------------------------------------------------------------- BMG


def test_bmg_without_a_target_is_the_plain_meta_gradient():
    with jax.enable_x64(True):
        vector = random_rule(jnp.float64)
        plain = GR.EstimatorConfig("bmg", truncation=NUM_STEPS, bmg_matching="query_loss", bmg_bootstrap=0)
        bmg = estimate(vector, fresh_state(plain), plain)
        full = estimate(vector, fresh_state(GR.EstimatorConfig("full")), GR.EstimatorConfig("full"))
        np.testing.assert_allclose(bmg.loss, full.loss, rtol=1e-12)
        np.testing.assert_allclose(bmg.grad, full.grad, rtol=1e-10, atol=1e-14)
        assert GR.done(bmg.state, HORIZON)


@pytest.mark.parametrize("matching, target_lr", [("kl", 0.2), ("squared", 0.0)])
def test_bmg_matching_loss_gradient_matches_finite_differences(matching, target_lr):
    with jax.enable_x64(True):
        vector = random_rule(jnp.float64)
        estimator = GR.EstimatorConfig("bmg", truncation=3, bmg_bootstrap=3, bmg_matching=matching,
                                       bmg_target_lr=target_lr)
        state = fresh_state(estimator)
        result = estimate(vector, state, estimator)
        args = (TASKS, state.synapses, 0, 3, NUM_STEPS, HORIZON, estimator)
        _, (_, targets) = GR.bmg_objective(SPEC, vector, *args)  # the target built at the current genome
        fixed = jax.jit(lambda v: GR.bmg_objective(SPEC, v, *args, targets=targets)[0])
        numeric = central_differences(fixed, vector)  # the matching loss with its target held fixed
        assert float(result.loss) > 0 and np.abs(np.asarray(result.grad)).max() > 1e-6
        np.testing.assert_allclose(result.grad, numeric, rtol=1e-4, atol=1e-9)
        assert int(result.inner_steps) == (3 + 3) * NUM_TASKS
    with pytest.raises(ValueError, match="bmg_matching"):
        GR.EstimatorConfig("bmg", bmg_matching="cosine")
    with pytest.raises(ValueError, match="bmg_bootstrap"):
        GR.EstimatorConfig("bmg", bmg_bootstrap=-1)


def test_the_optimistic_outer_optimizer_steps_along_twice_the_gradient_minus_the_previous_one():
    config = OL.OuterLoopConfig(learning_rate=0.1, clip_norm=1e9, outer_optimizer="optimistic")
    opt = OL.optimizer(config)
    params = jnp.zeros(3)
    state = opt.init(params)
    g0, g1 = jnp.asarray([1.0, 0.0, -1.0]), jnp.asarray([0.5, 2.0, 0.0])
    u0, state = opt.update(g0, state, params)
    u1, state = opt.update(g1, state, params)
    np.testing.assert_allclose(u0, -0.1 * g0, rtol=1e-6)  # no previous gradient yet: g_{-1} = g_0
    np.testing.assert_allclose(u1, -0.1 * (2 * g1 - g0), rtol=1e-6)
    with pytest.raises(ValueError, match="outer_optimizer"):
        OL.OuterLoopConfig(outer_optimizer="lion")
