"""SGD / momentum / Adam baselines against hand-written training loops, and the learning-rate sweep."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from workers import baselines
from workers.task_types import Task
from workers.tasks import TaskConfig, make_family

LAYERS = (5, 7, 3)
NUM_STEPS, BATCH, NUM_QUERY = 6, 4, 10


@pytest.fixture(scope="module")
def toy_tasks() -> Task:
    """Two small random tasks with the task container's shapes and dtypes."""
    rng = np.random.default_rng(0)
    return Task(rng.normal(size=(2, NUM_STEPS, BATCH, LAYERS[0])).astype(np.float32),
                rng.integers(0, LAYERS[-1], (2, NUM_STEPS, BATCH)).astype(np.int32),
                rng.normal(size=(2, NUM_QUERY, LAYERS[0])).astype(np.float32),
                rng.integers(0, LAYERS[-1], (2, NUM_QUERY)).astype(np.int32))


def numpy_sgd(weights, task, k, learning_rate):
    """Hand-derived backprop of a sigmoid MLP with mean softmax cross-entropy, float64, plain SGD."""
    weights = [np.asarray(w, np.float64) for w in weights]

    def forward(x):
        activations = [x]
        for layer, w in enumerate(weights):
            z = np.concatenate([activations[-1], np.ones((len(x), 1))], axis=1) @ w
            activations.append(1 / (1 + np.exp(-z)) if layer < len(weights) - 1 else z)
        return activations

    def cross_entropy(logits, y):
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_probs[np.arange(len(y)), y].mean(), np.exp(log_probs)

    losses = []
    for t in range(NUM_STEPS):
        x, y = np.asarray(task.support_x[k, t], np.float64), np.asarray(task.support_y[k, t])
        activations = forward(x)
        loss, probs = cross_entropy(activations[-1], y)
        losses.append(loss)
        delta = (probs - np.eye(LAYERS[-1])[y]) / len(y)  # dL/dz of the output layer
        grads = [None] * len(weights)
        for layer in reversed(range(len(weights))):
            a_bar = np.concatenate([activations[layer], np.ones((len(x), 1))], axis=1)
            grads[layer] = a_bar.T @ delta
            if layer > 0:
                h = activations[layer]
                delta = (delta @ weights[layer][:-1].T) * h * (1 - h)  # sigmoid'(z) = h(1 - h)
        weights = [w - learning_rate * g for w, g in zip(weights, grads)]
    query_loss, _ = cross_entropy(forward(np.asarray(task.query_x[k], np.float64))[-1], np.asarray(task.query_y[k]))
    return np.array(losses), query_loss


def test_init_mlp_is_glorot_uniform_with_zero_bias_row():
    weights = baselines.init_mlp(jax.random.PRNGKey(0), (30, 20, 4))
    assert [w.shape for w in weights] == [(31, 20), (21, 4)]
    for w, (n_in, n_out) in zip(weights, [(30, 20), (20, 4)]):
        np.testing.assert_array_equal(w[-1], 0.0)
        limit = np.sqrt(6 / (n_in + n_out))
        assert float(jnp.abs(w[:-1]).max()) <= limit and float(jnp.abs(w[:-1]).max()) > 0.8 * limit


def test_sgd_baseline_equals_hand_written_numpy_sgd(toy_tasks):
    key = jax.random.PRNGKey(3)
    result = baselines.run_baseline("sgd", 0.7, LAYERS, toy_tasks, key)
    init_keys = baselines.task_init_keys(key, 2)
    for k in range(2):
        train_losses, query_loss = numpy_sgd(baselines.init_mlp(init_keys[k], LAYERS), toy_tasks, k, 0.7)
        np.testing.assert_allclose(result["train_loss"][k], train_losses, rtol=2e-5)
        np.testing.assert_allclose(result["loss"][k], query_loss, rtol=2e-5)
    assert result["train_loss"][0, -1] < result["train_loss"][0, 0] or result["train_loss"][1, -1] < 1.2


loss_and_grad = jax.jit(jax.value_and_grad(baselines.mlp_loss))


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_momentum_and_adam_follow_their_update_rules(toy_tasks, name):
    key, lr = jax.random.PRNGKey(1), 0.05
    result = baselines.run_baseline(name, lr, LAYERS, toy_tasks, key)
    weights = baselines.init_mlp(baselines.task_init_keys(key, 2)[1], LAYERS)
    first = [jnp.zeros_like(w) for w in weights]
    second = [jnp.zeros_like(w) for w in weights]
    losses = []
    for t in range(1, NUM_STEPS + 1):
        loss, grads = loss_and_grad(weights, toy_tasks.support_x[1, t - 1], toy_tasks.support_y[1, t - 1])
        losses.append(loss)
        if name == "momentum":  # heavy ball: v = g + 0.9 v, W -= lr v
            first = [g + 0.9 * v for g, v in zip(grads, first)]
            weights = [w - lr * v for w, v in zip(weights, first)]
        else:  # Adam with bias correction
            first = [0.9 * m + 0.1 * g for m, g in zip(first, grads)]
            second = [0.999 * v + 0.001 * g * g for v, g in zip(second, grads)]
            weights = [w - lr * (m / (1 - 0.9 ** t)) / (jnp.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
                       for w, m, v in zip(weights, first, second)]
    np.testing.assert_allclose(result["train_loss"][1], np.array(losses), rtol=1e-5)
    query = baselines.mlp_loss(weights, toy_tasks.query_x[1], toy_tasks.query_y[1])
    np.testing.assert_allclose(result["loss"][1], query, rtol=1e-5)


def test_curve_points_equal_shorter_runs(toy_tasks):
    key = jax.random.PRNGKey(2)
    full = baselines.run_baseline("sgd", 0.5, LAYERS, toy_tasks, key, curve_steps=(NUM_STEPS, 0, 2))
    short = baselines.run_baseline("sgd", 0.5, LAYERS, toy_tasks._replace(support_x=toy_tasks.support_x[:, :2],
                                                                         support_y=toy_tasks.support_y[:, :2]), key)
    untrained = baselines.run_baseline("sgd", 0.0, LAYERS, toy_tasks, key)
    np.testing.assert_allclose(full["curve_loss"][:, 0], full["loss"], rtol=1e-6)
    np.testing.assert_allclose(full["curve_loss"][:, 1], untrained["loss"], rtol=1e-6)
    np.testing.assert_allclose(full["curve_loss"][:, 2], short["loss"], rtol=1e-6)
    np.testing.assert_allclose(full["curve_accuracy"][:, 2], short["accuracy"])
    with pytest.raises(ValueError, match="curve_steps"):
        baselines.run_baseline("sgd", 0.1, LAYERS, toy_tasks, key, curve_steps=(NUM_STEPS + 1,))


def test_diverged_tasks_count_as_wrong(toy_tasks):
    result = baselines.run_baseline("sgd", np.inf, LAYERS, toy_tasks, jax.random.PRNGKey(0))
    assert bool(np.all(result["diverged"])) and np.all(np.asarray(result["accuracy"]) == 0.0)


@pytest.fixture(scope="module")
def digits_tasks():
    config = TaskConfig(family="digits", batch_size=16, num_query=30)
    sample = lambda split, seed: make_family(config, split).sample(jax.random.PRNGKey(seed), 8, 15)
    return sample("train", 0), sample("validation", 1)


def test_sweep_learns_digits_and_never_picks_a_clearly_bad_rate(digits_tasks):
    tasks, validation = digits_tasks
    rates = (1e-5, 0.03, 1.0, 1e4)
    result = baselines.sweep(tasks, (64, 32, 3), jax.random.PRNGKey(0), learning_rates=rates,
                             optimizers=("sgd", "adam"), validation_tasks=validation)
    sgd, adam = result["sgd"], result["adam"]
    assert sgd["selected_on"] == "validation" and set(sgd["sweep"]) == set(rates)
    assert sgd["best_lr"] not in (1e-5, 1e4) and adam["best_lr"] not in (1e-5, 1e4)
    assert sgd["sweep"][1e-5] < 0.5 and sgd["sweep"][sgd["best_lr"]] > 0.7  # chance is 1/3
    assert adam["best_accuracy"] > 0.7 and max(adam["sweep"].values()) == adam["sweep"][adam["best_lr"]]


def test_sweep_without_validation_reports_the_selection_score(digits_tasks):
    tasks, _ = digits_tasks
    result = baselines.sweep(tasks, (64, 32, 3), jax.random.PRNGKey(0), learning_rates=(1e-5, 1.0),
                             optimizers=("sgd",))["sgd"]
    assert result["selected_on"] == "tasks" and result["best_lr"] == 1.0
    assert result["best_accuracy"] == result["sweep"][1.0]


def test_the_report_progress_counts_every_training_run_and_ends_at_the_total():
    import io

    import jax

    import genome as G
    from workers.report import Progress, compare_on_heldout, report_units
    from workers.tasks import TaskConfig

    spec = G.NetworkSpec((64, 8, 3))
    stream = io.StringIO()
    units = report_units(1, (0.1, 1.0), ("sgd", "adam"), True)
    progress = Progress("held-out report", units, every=0.0, stream=stream)
    compare_on_heldout(spec, {"rule": G.neutral_genome(spec)}, TaskConfig(family="digits", n_way=3, batch_size=8,
                       num_query=24), 3, jax.random.key(0), num_test_tasks=2, num_tuning_tasks=2,
                       learning_rates=(0.1, 1.0), baseline_names=("sgd", "adam"), progress=progress)
    lines = stream.getvalue().splitlines()
    assert units == 1 + 3 + 2 * 4 and progress.done == units and len(lines) == units
    assert lines[-1].startswith(f"held-out report: {units}/{units} (") and "ETA 0s" in lines[-1]
