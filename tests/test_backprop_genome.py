"""The backprop genome equals SGD of an independently written autograd MLP, step by step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genome as G

NUM_STEPS = 20


def mlp_logits(weights, x):
    """Plain MLP: sigmoid hidden layers, linear output; each weight matrix's last row is the bias."""
    h = x
    for i, w in enumerate(weights):
        z = h @ w[:-1] + w[-1][None, :]
        h = jax.nn.sigmoid(z) if i < len(weights) - 1 else z
    return h


def mlp_loss(weights, x, y, loss):
    z = mlp_logits(weights, x)
    onehot = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
    if loss == "mse":
        return jnp.mean(0.5 * jnp.sum((z - onehot) ** 2, axis=-1))
    return jnp.mean(-jnp.sum(onehot * jax.nn.log_softmax(z), axis=-1))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _run_both(spec, genome, loss, learning_rate, weights, xs, ys):
    """NUM_STEPS steps of SGD on ``weights`` (autograd of `mlp_loss`) and of the backprop genome on the same
    weights as synapses, side by side in one program: (SGD's final weights, the largest gap between the two
    weights after any step, the largest gap between their predictions on the first batch after any step)."""

    def both(carry, batch):
        weights, synapses = carry
        x, y = batch
        grads = jax.grad(mlp_loss)(weights, x, y, loss)
        weights = [w - learning_rate * g for w, g in zip(weights, grads)]
        synapses = G.step(spec, genome, synapses, x, y)
        weight_gap = jnp.max(jnp.stack([jnp.max(jnp.abs(w - b))
                                        for w, b in zip(weights, G.weights_from_synapses(spec, synapses))]))
        pred_gap = jnp.max(jnp.abs(G.predict(spec, genome, synapses, xs[0]) - mlp_logits(weights, xs[0])))
        return (weights, synapses), (weight_gap, pred_gap)

    (weights, _), (weight_gaps, pred_gaps) = jax.lax.scan(both, (weights, G.synapses_from_weights(spec, weights)),
                                                          (xs, ys))
    return weights, jnp.max(weight_gaps), jnp.max(pred_gaps)


def run_both(layer_sizes, loss, dtype, learning_rate=0.5):
    key = jax.random.key(len(layer_sizes) + (loss == "mse"))
    init_key, x_key, y_key = jax.random.split(key, 3)
    weights = [
        jax.random.normal(k, (n + 1, m), dtype) * (1.0 / np.sqrt(n))
        for k, n, m in zip(jax.random.split(init_key, len(layer_sizes) - 1), layer_sizes[:-1], layer_sizes[1:])
    ]
    xs = jax.random.normal(x_key, (NUM_STEPS, 8, layer_sizes[0]), dtype)
    ys = jax.random.randint(y_key, (NUM_STEPS, 8), 0, layer_sizes[-1])
    spec, genome = G.backprop_genome(layer_sizes, learning_rate, loss=loss, dtype=dtype)
    final_weights, worst_weight, worst_pred = _run_both(spec, genome, loss, learning_rate, weights, xs, ys)
    worst_weight, worst_pred = float(worst_weight), float(worst_pred)
    moved = max(float(jnp.max(jnp.abs(w - w0))) for w, w0 in zip(final_weights, weights))
    return worst_weight, worst_pred, moved


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("layer_sizes", [(5, 7, 3), (5, 7, 6, 3), (5, 7, 6, 4, 3)], ids=["1h", "2h", "3h"])
def test_backprop_genome_equals_sgd_float32(layer_sizes, loss):
    worst_weight, worst_pred, moved = run_both(layer_sizes, loss, jnp.float32)
    assert moved > 0.02  # the weights really moved (2000x the tolerance)
    assert worst_weight <= 1e-5
    assert worst_pred <= 1e-5


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("layer_sizes", [(5, 7, 3), (5, 7, 6, 3), (5, 7, 6, 4, 3)], ids=["1h", "2h", "3h"])
def test_backprop_genome_equals_sgd_float64(layer_sizes, loss):
    with jax.enable_x64(True):
        worst_weight, worst_pred, _ = run_both(layer_sizes, loss, jnp.float64)
    assert worst_weight <= 1e-10
    assert worst_pred <= 1e-10


def test_backprop_genome_spec_is_the_documented_special_case():
    spec, genome = G.backprop_genome((4, 3, 2), 0.1)
    assert spec.num_states == 2 and spec.symmetric_in_out and spec.symmetric_states
    assert spec.backward_update == "multiplicative_second_state" and spec.batch_reduction == "mean"
    np.testing.assert_array_equal(genome.forward_transform, [[1, 1], [0, 0]])
    np.testing.assert_array_equal(genome.post_transform, [[0, 1], [1, 0]])
    np.testing.assert_allclose(genome.synapse_update, -0.1)
    with pytest.raises(ValueError, match="loss"):
        G.backprop_genome((4, 3, 2), 0.1, loss="hinge")


def test_weights_round_trip_through_tied_synapses():
    spec = G.NetworkSpec((3, 4, 2), num_states=3)
    weights = [jnp.arange(16.0).reshape(4, 4), jnp.arange(10.0).reshape(5, 2)]
    synapses = G.synapses_from_weights(spec, weights)
    for w, back in zip(weights, G.weights_from_synapses(spec, synapses)):
        np.testing.assert_array_equal(w, back)
    np.testing.assert_array_equal(synapses.backward[1][2], weights[1][:-1].T)
    with pytest.raises(ValueError, match="shape"):
        G.synapses_from_weights(spec, [weights[1], weights[0]])
