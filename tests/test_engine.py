"""The evaluation engine: determinism across batch compositions, no recompilation, flat memory in T,
divergence handling, learning curves and aggregation."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genome as G
from workers import engine as E
from workers.task_types import Task

SPEC = G.NetworkSpec((6, 5, 3), num_states=2)


def random_tasks(key, num_tasks, num_steps, batch=8, query=16, spec=SPEC):
    kx, ky, qx, qy = jax.random.split(key, 4)
    return Task(
        jax.random.normal(kx, (num_tasks, num_steps, batch, spec.num_inputs)),
        jax.random.randint(ky, (num_tasks, num_steps, batch), 0, spec.num_outputs),
        jax.random.normal(qx, (num_tasks, query, spec.num_inputs)),
        jax.random.randint(qy, (num_tasks, query), 0, spec.num_outputs),
    )


def population(key, size, spec=SPEC):
    return jax.vmap(lambda k: G.ravel(spec, G.random_genome(spec, k)))(jax.random.split(key, size))


def take(tree, index):
    return jax.tree.map(lambda a: a[index], tree)


def test_episode_is_bit_identical_alone_or_in_any_batch():
    config = (E.Scoring(), E.Horizon(4))
    tasks = random_tasks(jax.random.key(0), 5, 4)
    keys = jax.random.split(jax.random.key(1), 5)
    vectors = population(jax.random.key(2), 6)
    full = E.evaluate(SPEC, vectors, tasks, keys, *config)
    alone = E.evaluate(SPEC, vectors[3:4], take(tasks, slice(2, 3)), keys[2:3], *config)
    np.testing.assert_array_equal(alone.fitness[0, 0], full.fitness[3, 2])
    subset = E.evaluate(SPEC, vectors[jnp.array([5, 1, 3])], take(tasks, jnp.array([4, 2])), keys[jnp.array([4, 2])], *config)
    np.testing.assert_array_equal(subset.fitness, full.fitness[jnp.array([5, 1, 3])][:, jnp.array([4, 2])])
    np.testing.assert_array_equal(subset.accuracy, full.accuracy[jnp.array([5, 1, 3])][:, jnp.array([4, 2])])


def test_second_call_with_new_genomes_and_tasks_does_not_recompile():
    config = (E.Scoring(fitness="error_rate"), E.Horizon(3))
    first = E.evaluate(SPEC, population(jax.random.key(0), 4), random_tasks(jax.random.key(1), 2, 3),
                       jax.random.split(jax.random.key(2), 2), *config)
    before = E.compiled_cache_size()
    second = E.evaluate(SPEC, population(jax.random.key(3), 4), random_tasks(jax.random.key(4), 2, 3),
                        jax.random.split(jax.random.key(5), 2), *config)
    assert E.compiled_cache_size() == before
    assert not np.array_equal(first.fitness, second.fitness)


def test_compiled_memory_does_not_grow_with_the_number_of_steps():
    def temp_bytes(num_steps):
        tasks = random_tasks(jax.random.key(0), 4, num_steps, batch=16)
        compiled = E._evaluate.lower(SPEC, population(jax.random.key(1), 8), tasks,
                                     jax.random.split(jax.random.key(2), 4), E.Scoring(),
                                     E.Horizon(num_steps)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(40) <= 1.1 * temp_bytes(10)


def test_diverging_genomes_get_the_worst_finite_fitness_and_are_counted():
    vectors = population(jax.random.key(0), 3)
    wild = G.ravel(SPEC, G.random_genome(SPEC, jax.random.key(9))._replace(
        synapse_update=jnp.asarray(50.0), neuron_update=jnp.asarray(1e4), synapse_keep=jnp.asarray(1e3)))
    vectors = vectors.at[1].set(wild)
    tasks = random_tasks(jax.random.key(1), 2, 6)
    keys = jax.random.split(jax.random.key(2), 2)
    for metric, worst in (("cross_entropy", 20.0), ("error_rate", 1.0)):
        result = E.evaluate(SPEC, vectors, tasks, keys, E.Scoring(fitness=metric), E.Horizon(6))
        assert bool(jnp.all(result.diverged[1])) and not bool(jnp.any(result.diverged[0]))
        np.testing.assert_array_equal(result.fitness[1], worst)
        assert bool(jnp.all(jnp.isfinite(result.fitness)))
        assert bool(jnp.all(result.fitness[0] < worst))


def test_learning_curve_points_match_separate_shorter_episodes():
    tasks = random_tasks(jax.random.key(0), 2, 6)
    keys = jax.random.split(jax.random.key(1), 2)
    spec, genome = G.backprop_genome(SPEC.layer_sizes, 0.5, loss="cross_entropy")
    vectors = G.ravel(spec, genome)[None]
    curve = E.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(6, curve_steps=(6, 0, 3))).curve
    for column, steps in enumerate((6, 0, 3)):
        short = E.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(steps)).accuracy
        np.testing.assert_allclose(curve[..., column], short, atol=1e-6)


def test_a_learning_curve_keeps_one_copy_of_the_step_in_the_program():
    """Curve points do not multiply the program (and its compile time): the steps up to the last point run as a
    loop over the points, so 21 points over 20 steps trace to the size of 3 points (with a copy of the step per
    segment the engine's program was 14x the plain episode's); the baselines' training does the same."""
    from workers import baselines

    tasks = random_tasks(jax.random.key(0), 2, 20)
    keys = jax.random.split(jax.random.key(1), 2)
    vectors = population(jax.random.key(2), 2)

    def engine_size(curve_steps):
        return len(str(jax.make_jaxpr(lambda v: E.evaluate(SPEC, v, tasks, keys, E.Scoring(),
                                                           E.Horizon(20, curve_steps=curve_steps)))(vectors)))

    def baseline_size(curve_steps):
        return len(str(jax.make_jaxpr(lambda t: baselines.run_baseline("adam", 0.1, SPEC.layer_sizes, t, keys[0],
                                                                       curve_steps=curve_steps))(tasks)))

    every_step, three = tuple(range(21)), (0, 10, 20)
    assert engine_size(every_step) < 1.1 * engine_size(three)
    assert baseline_size(every_step) < 1.1 * baseline_size(three)


def test_skip_last_update_equals_one_step_fewer():
    tasks = random_tasks(jax.random.key(0), 2, 5)
    keys = jax.random.split(jax.random.key(1), 2)
    vectors = population(jax.random.key(2), 2)
    skipped = E.evaluate(SPEC, vectors, tasks, keys, E.Scoring(), E.Horizon(5, skip_last_update=True))
    shorter = E.evaluate(SPEC, vectors, tasks, keys, E.Scoring(), E.Horizon(4))
    np.testing.assert_array_equal(skipped.fitness, shorter.fitness)


def test_aggregations_reduce_the_task_axis():
    fitness = jnp.asarray([[1.0, 2.0, 3.0, 10.0]])
    assert float(E.aggregate_fitness(fitness, E.Scoring(aggregate="mean"))[0]) == 4.0
    assert float(E.aggregate_fitness(fitness, E.Scoring(aggregate="median"))[0]) == 2.5
    assert float(E.aggregate_fitness(fitness, E.Scoring(aggregate="worst"))[0]) == 10.0
    assert float(E.aggregate_fitness(fitness, E.Scoring(aggregate="quantile", quantile=0.0))[0]) == 1.0
    with pytest.raises(ValueError, match="aggregate"):
        E.EpisodeConfig(1, aggregate="best")
    with pytest.raises(ValueError, match="curve_steps"):
        E.Horizon(3, curve_steps=(4,))


def test_episode_config_hands_out_its_scoring_and_a_horizon_per_call():
    episode = E.EpisodeConfig(7, skip_last_update=True, fitness="error_rate", max_loss=5.0, curve_steps=(2,))
    assert episode.scoring == E.Scoring(fitness="error_rate", max_loss=5.0)
    assert episode.horizon() == E.Horizon(7, skip_last_update=True)  # evaluation calls record no curve
    assert episode.horizon(12, curve_steps=(0, 12)) == E.Horizon(12, True, (0, 12))


def test_canonical_flops_count_four_products_and_the_state_mixes():
    spec = G.NetworkSpec((2, 3), num_states=1)
    # one layer: 4 products of 2·B·(n_in+1)·n_out·k = 4·2·1·3·3·1 = 72; mixes 2·B·k²·(3+3+3+3+3+2) = 34
    assert E.canonical_flops(spec, 1) == 72 + 34


def test_backprop_genome_episode_equals_the_sgd_baseline_on_the_same_batches():
    """The engine and the baselines see exactly the same data: same tasks, same init, same lr -> same scores."""
    from workers import baselines
    from workers.evaluator import synapse_keys
    from workers.tasks import TaskConfig, make_family

    family = make_family(TaskConfig(family="digits", n_way=3, batch_size=8, num_query=24), "validation")
    task_key = jax.random.key(3)
    tasks = family.sample(task_key, 4, 12)
    spec, genome = G.backprop_genome((family.num_inputs, 10, 3), 0.7, loss="cross_entropy")
    keys = synapse_keys(task_key, 4)
    curve_steps = (0, 6, 12)
    result = E.evaluate(spec, G.ravel(spec, genome)[None], tasks, keys,
                        E.Scoring(), E.Horizon(12, curve_steps=curve_steps))
    init = jax.vmap(lambda k: G.weights_from_synapses(spec, G.init_synapses(spec, k)))(keys)
    sgd = baselines.run_baseline("sgd", 0.7, spec.layer_sizes, tasks, task_key, curve_steps=curve_steps,
                                 activation="sigmoid", init_weights=init)
    np.testing.assert_allclose(result.accuracy[0], sgd["accuracy"], atol=1e-6)
    np.testing.assert_allclose(result.curve[0], sgd["curve_accuracy"], atol=1e-6)
    np.testing.assert_allclose(result.cross_entropy[0], sgd["loss"], rtol=1e-4, atol=1e-5)
    assert float(jnp.mean(sgd["accuracy"])) > float(jnp.mean(sgd["curve_accuracy"][:, 0])) + 0.1  # it learned


def test_skip_last_update_still_runs_the_published_forward_only_last_step():
    """With a forward-pass Hebbian update the published unroll's last batch still changes the synapses: ES
    fitness and the gradient meta-loss both include it, and it differs from dropping the batch."""
    from evolution import gradients as GR

    spec = G.NetworkSpec((4, 5, 3), num_states=2, forward_synapse_update=True)
    g = G.random_genome(spec, jax.random.key(4))._replace(forward_synapse_update=jnp.asarray(-0.2))
    vectors = G.ravel(spec, g)[None]
    tasks = random_tasks(jax.random.key(0), 2, 5, spec=spec)
    keys = jax.random.split(jax.random.key(1), 2)
    skipped = E.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(5, skip_last_update=True))
    dropped = E.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4))
    assert not np.allclose(skipped.cross_entropy, dropped.cross_entropy)
    by_hand = []
    for k in range(2):
        task = take(tasks, k)
        syn = G.init_synapses(spec, keys[k])
        for t in range(4):
            syn = G.step(spec, g, syn, task.support_x[t], task.support_y[t], t)
        syn = G.forward_only_step(spec, g, syn, task.support_x[4])
        logits = G.predict(spec, g, syn, task.query_x)
        by_hand.append(-jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), task.query_y]))
    np.testing.assert_allclose(skipped.cross_entropy[0], by_hand, rtol=1e-5)
    loss = GR.meta_loss(spec, vectors[0], tasks, keys, E.Horizon(5, skip_last_update=True))
    np.testing.assert_allclose(loss, np.mean(by_hand), rtol=1e-5)


def test_a_population_trained_in_chunks_scores_like_one_trained_at_once(monkeypatch):
    """Large calls loop over chunks of the population (the last one padded): same episodes, same shapes."""
    config = (E.Scoring(), E.Horizon(3))
    tasks = random_tasks(jax.random.key(7), 3, 3)
    keys = jax.random.split(jax.random.key(8), 3)
    vectors = population(jax.random.key(9), 7)
    whole = E.evaluate(SPEC, vectors, tasks, keys, *config)
    loops = E._evaluate.lower(SPEC, vectors, tasks, keys, *config).as_text().count("stablehlo.while")
    per_genome = E.synapse_bytes(SPEC.layer_sizes, SPEC.num_states) * 3
    monkeypatch.setattr(E, "UNCHUNKED_BYTES", 0)
    monkeypatch.setattr(E, "CHUNK_BYTES", 3 * per_genome)  # 3 chunks of 3 genomes, the last one padded
    assert E.genomes_per_chunk(SPEC.layer_sizes, SPEC.num_states, 7, 3) == 3
    E._evaluate.clear_cache()  # the constants are read when the engine is traced
    chunked = E.evaluate(SPEC, vectors, tasks, keys, *config)
    chunked_loops = E._evaluate.lower(SPEC, vectors, tasks, keys, *config).as_text().count("stablehlo.while")
    E._evaluate.clear_cache()
    assert chunked_loops > loops  # the loop over chunks
    assert chunked.fitness.shape == (7, 3)
    np.testing.assert_allclose(chunked.cross_entropy, whole.cross_entropy, rtol=1e-5)
    np.testing.assert_array_equal(chunked.accuracy, whole.accuracy)
    monkeypatch.setattr(E, "UNCHUNKED_BYTES", 64 * per_genome)
    assert E.genomes_per_chunk(SPEC.layer_sizes, SPEC.num_states, 7, 3) == 7  # small calls stay whole


def test_a_query_set_over_several_tiles_scores_like_predict_episode_by_episode(monkeypatch):
    """Query sets larger than one tile take the folded, tiled pass inside the chunked, vmapped engine: every
    episode's cross-entropy and accuracy are those of plain steps and :func:`genome.predict` by hand."""
    monkeypatch.setattr(G.network, "QUERY_TILE", 8)  # 21 query rows: three tiles, the last one padded
    per_genome = E.synapse_bytes(SPEC.layer_sizes, SPEC.num_states) * 2
    monkeypatch.setattr(E, "UNCHUNKED_BYTES", 0)  # and the population trained in chunks, as at paper scale
    monkeypatch.setattr(E, "CHUNK_BYTES", 2 * per_genome)
    assert E.genomes_per_chunk(SPEC.layer_sizes, SPEC.num_states, 3, 2) == 2
    tasks = random_tasks(jax.random.key(11), 2, 3, query=21)
    keys = jax.random.split(jax.random.key(12), 2)
    vectors = population(jax.random.key(13), 3)
    E._evaluate.clear_cache()  # the constants are read when the engine is traced
    result = E.evaluate(SPEC, vectors, tasks, keys, E.Scoring(), E.Horizon(3))
    E._evaluate.clear_cache()
    for p in range(3):
        g = G.unravel(SPEC, vectors[p])
        for k in range(2):
            task, syn = take(tasks, k), G.init_synapses(SPEC, keys[k])
            for t in range(3):
                syn = G.step(SPEC, g, syn, task.support_x[t], task.support_y[t], t)
            logits = G.predict(SPEC, g, syn, task.query_x)
            cross_entropy = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(21), task.query_y])
            np.testing.assert_allclose(result.cross_entropy[p, k], cross_entropy, rtol=1e-5)
            assert result.accuracy[p, k] == jnp.mean(jnp.argmax(logits, axis=-1) == task.query_y)


SPLIT = """
import sys
import jax, jax.numpy as jnp, numpy as np
import genome as G
from workers import engine as E
from workers.evaluator import split_devices
from workers.task_types import Task
from workers.unroll import Horizon, Scoring

devices = split_devices(3)  # before anything starts JAX's backend: three host devices
assert [d.platform for d in devices] == ["cpu"] * 3, devices
spec = G.NetworkSpec((6, 5, 3), num_states=2, forward_activation="tanh")
rng = np.random.default_rng(0)
tasks = Task(jnp.asarray(rng.normal(size=(2, 4, 7, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, (2, 4, 7)), jnp.int32),
             jnp.asarray(rng.normal(size=(2, 9, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, (2, 9)), jnp.int32))
keys = jax.random.split(jax.random.key(1), 2)
horizon = Horizon(4, curve_steps=(1, 4))
for population in (5, 6, 1):  # padded to 6, whole, padded to 3
    vectors = jnp.asarray(0.3 * rng.normal(size=(population, G.num_dims(spec))), jnp.float32)
    split = E.evaluate_split(spec, vectors, tasks, keys, Scoring(), horizon, devices)
    share = -(-population // 3)
    padded = jnp.concatenate([vectors, jnp.broadcast_to(vectors[-1:], (3 * share - population, vectors.shape[1]))])
    shares = [E.evaluate(spec, padded[i * share:(i + 1) * share], tasks, keys, Scoring(), horizon) for i in range(3)]
    for i, (a, *parts) in enumerate(zip(split, *shares)):
        expected = np.concatenate([np.asarray(p) for p in parts])[:population]
        assert a.shape == (population, 2) + expected.shape[2:], (a.shape, expected.shape)
        np.testing.assert_array_equal(np.asarray(a), expected)
        np.testing.assert_allclose(np.asarray(a), np.asarray(E.evaluate(spec, vectors, tasks, keys, Scoring(),
                                                                        horizon)[i]), rtol=1e-5, atol=1e-6)
    assert np.asarray(split.accuracy).std() > 0  # the genomes differ
try:
    split_devices(4)  # JAX's backend has started with three
except ValueError as error:
    print(error)
else:
    sys.exit("no error for four devices")
"""


def test_a_population_split_over_host_devices_scores_bit_for_bit_like_one_device():
    """``evaluator.devices``: the population split over three host devices (padded to a multiple of three)
    gives, bit for bit, the arrays of the one-device engine run on each device's share, and the whole
    population's arrays to float rounding (XLA's code for a smaller batch may sum in another order); asking
    for more devices than JAX started with is an error naming the setting. In a fresh process: JAX fixes its
    host devices when it starts."""
    proc = subprocess.run([sys.executable, "-c", SPLIT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip().splitlines()[-1]
    assert message.startswith("evaluator.devices: 4, but this process has 3 cpu device(s)"), message
