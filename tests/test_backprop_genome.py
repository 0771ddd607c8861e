"""The backprop genome equals SGD of an independently written autograd MLP, step by step."""

from __future__ import annotations

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


def run_both(layer_sizes, loss, dtype, learning_rate=0.5):
    key = jax.random.key(len(layer_sizes) + (loss == "mse"))
    init_key, x_key, y_key = jax.random.split(key, 3)
    weights = [
        jax.random.normal(k, (n + 1, m), dtype) * (1.0 / np.sqrt(n))
        for k, n, m in zip(jax.random.split(init_key, len(layer_sizes) - 1), layer_sizes[:-1], layer_sizes[1:])
    ]
    xs = jax.random.normal(x_key, (NUM_STEPS, 8, layer_sizes[0]), dtype)
    ys = jax.random.randint(y_key, (NUM_STEPS, 8), 0, layer_sizes[-1])
    initial = list(weights)
    spec, genome = G.backprop_genome(layer_sizes, learning_rate, loss=loss, dtype=dtype)
    synapses = G.synapses_from_weights(spec, weights)
    blur_step = jax.jit(G.step, static_argnums=0)
    sgd_grad = jax.jit(jax.grad(mlp_loss), static_argnums=3)
    worst_weight, worst_pred = 0.0, 0.0
    for t in range(NUM_STEPS):
        grads = sgd_grad(weights, xs[t], ys[t], loss)
        weights = [w - learning_rate * g for w, g in zip(weights, grads)]
        synapses = blur_step(spec, genome, synapses, xs[t], ys[t])
        for w, b in zip(weights, G.weights_from_synapses(spec, synapses)):
            worst_weight = max(worst_weight, float(jnp.max(jnp.abs(w - b))))
        pred_gap = G.predict(spec, genome, synapses, xs[0]) - mlp_logits(weights, xs[0])
        worst_pred = max(worst_pred, float(jnp.max(jnp.abs(pred_gap))))
    moved = max(float(jnp.max(jnp.abs(w - w0))) for w, w0 in zip(weights, initial))
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
