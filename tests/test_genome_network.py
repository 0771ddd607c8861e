"""The fast multi-state step against the slow reference, each variant on hand-checkable cases, vmap, grad."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genome as G
from reference_blur import reference_step

SIZES = (3, 4, 2)


def to_paper(block):  # [k, a, b] -> [a, b, k]
    return np.transpose(np.asarray(block), (1, 2, 0))


def from_paper(block):
    return jnp.asarray(np.transpose(block, (2, 0, 1)))


def random_case(spec, seed, dtype=jnp.float64):
    key = jax.random.key(seed)
    genome_key, synapse_key, x_key, y_key, extra_key = jax.random.split(key, 5)
    g = G.random_genome(spec, genome_key, dtype=dtype)
    extras = jax.random.uniform(extra_key, (6,), dtype, 0.5, 1.5)
    g = g._replace(
        neuron_keep=extras[0], neuron_update=extras[1], synapse_keep=extras[2], synapse_update=-0.1 * extras[3],
        norm_scale=jnp.linspace(0.5, 1.5, spec.num_states), norm_shift=jnp.linspace(-0.2, 0.3, spec.num_states),
        oja=0.3 * extras[4], saturation=extras[5],
    )
    syn = G.init_synapses(spec, synapse_key, dtype=dtype)
    syn = jax.tree.map(lambda w: 5.0 * w, syn)  # O(0.5) synapses so every term matters
    x = jax.random.normal(x_key, (3, spec.num_inputs), dtype)
    y = jax.random.randint(y_key, (3,), 0, spec.num_outputs)
    return g, syn, x, y


VARIANTS = {
    "additive_target": {},
    "multiplicative": dict(backward_update="multiplicative", forward_activation="sigmoid"),
    "second_state_mse": dict(backward_update="multiplicative_second_state", feedback="error_mse"),
    "skip_first_state_relu_tanh": dict(backward_update="multiplicative_skip_first_state", forward_activation="relu_tanh",
                                       backward_activation="relu_tanh"),
    "cross_entropy_relu": dict(feedback="error_cross_entropy", forward_activation="relu", backward_activation="tanh"),
    "oja_mean": dict(oja=True, batch_reduction="mean"),
    "saturation": dict(saturation=True, saturation_epsilon=0.01),
    "norm_stored": dict(synapse_normalization="stored"),
    "norm_in_activations": dict(synapse_normalization="activations", forward_activation="elu"),
    "activation_norm": dict(activation_norm=True, forward_activation="leaky_relu"),
    "symmetric_both": dict(symmetric_in_out=True, symmetric_states=True),
    "backprop_activations": dict(forward_activation="sigmoid_backprop", output_activation="linear_backprop"),
}


@pytest.mark.parametrize("num_states", [1, 2, 4])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_matches_slow_reference(variant, num_states):
    with jax.enable_x64(True):
        spec = G.NetworkSpec(SIZES, num_states=num_states, **VARIANTS[variant])
        g, syn, x, y = random_case(spec, seed=num_states)
        new, states = jax.jit(G.step_states, static_argnums=0)(spec, g, syn, x, y)
        ref_w, ref_v, ref_states = reference_step(
            spec,
            {k: np.asarray(v) for k, v in g._asdict().items()},
            [to_paper(w) for w in syn.forward],
            [to_paper(v) for v in syn.backward],
            np.asarray(x),
            np.asarray(y),
        )
        for fast, slow in zip(states, ref_states):
            np.testing.assert_allclose(to_paper(fast), slow, rtol=1e-10, atol=1e-12)
        for fast, slow in zip(new.forward + new.backward, ref_w + ref_v):
            np.testing.assert_allclose(to_paper(fast), slow, rtol=1e-10, atol=1e-12)


def test_symmetric_flags_tie_blocks_after_many_steps():
    spec = G.NetworkSpec((5, 6, 3), num_states=3, symmetric_in_out=True, symmetric_states=True)
    g, syn, x, y = random_case(spec, seed=3, dtype=jnp.float32)
    for w, v in zip(syn.forward, syn.backward):
        np.testing.assert_array_equal(v, jnp.swapaxes(w[:, :-1], 1, 2))
    for _ in range(5):
        syn = G.step(spec, g, syn, x, y)
    for w, v in zip(syn.forward, syn.backward):
        np.testing.assert_array_equal(v, jnp.swapaxes(w[:, :-1], 1, 2))  # in/out tie
        for o in range(3):
            np.testing.assert_array_equal(w[o], w[0])  # state tie
    # and without the flags the blocks really differ
    free = dataclasses.replace(spec, symmetric_in_out=False, symmetric_states=False)
    free_syn = G.init_synapses(free, jax.random.key(0))
    assert not np.allclose(free_syn.backward[0], jnp.swapaxes(free_syn.forward[0][:, :-1], 1, 2))
    assert not np.allclose(free_syn.forward[0][1], free_syn.forward[0][0])


def test_oja_shrinks_a_large_weight_whatever_the_rate_sign():
    spec = G.NetworkSpec((2, 1), num_states=1, oja=True)
    for rate in (-0.05, 0.05):
        g = G.neutral_genome(spec)._replace(
            pre_transform=jnp.zeros((1, 1)), synapse_update=jnp.asarray(rate), oja=jnp.asarray(1.0)
        )
        big = jnp.asarray([[[3.0], [0.0], [0.0]]])  # [k, n_in + 1, n_out]
        syn = G.Synapses((big,), (jnp.zeros((1, 1, 2)),))
        new = G.step(spec, g, syn, jnp.ones((4, 2)), jnp.zeros((4,), jnp.int32))
        # Hebbian part is zero (ν̃ = 0): only the Oja decay acts, w ← w - |η̃|·|m|·w·w²
        np.testing.assert_allclose(new.forward[0][0, 0, 0], 3.0 - abs(rate) * 27.0, rtol=1e-6)


def test_multiplicative_skip_first_state_passes_state_zero_through():
    spec = G.NetworkSpec((3, 4, 2), num_states=3, backward_update="multiplicative_skip_first_state")
    g, syn, x, y = random_case(spec, seed=5, dtype=jnp.float32)
    states_fwd = G.forward(spec, g, syn, x)
    _, states = G.step_states(spec, g, syn, x, y)
    np.testing.assert_array_equal(states[1][0], states_fwd[1][0])
    assert not np.allclose(states[1][1:], states_fwd[1][1:])


def test_multiplicative_second_state_is_the_published_code_keep_and_activation_on_every_state():
    spec = G.NetworkSpec((3, 4, 2), num_states=3, backward_update="multiplicative_second_state",
                         backward_activation="tanh")
    g, syn, x, y = random_case(spec, seed=5, dtype=jnp.float32)
    states_fwd = G.forward(spec, g, syn, x)
    _, states = G.step_states(spec, g, syn, x, y)
    # state 0: act_b(f · a0), not a0 (the published code's compute_neuron_state)
    np.testing.assert_allclose(states[1][0], jnp.tanh(g.neuron_keep * states_fwd[1][0]), rtol=1e-6)
    assert not np.allclose(states[1][0], states_fwd[1][0])


def test_target_feedback_writes_plus_minus_one_into_state_one():
    spec = G.NetworkSpec((3, 4, 3), num_states=3)
    out = jnp.full((3, 2, 3), 7.0)
    fed = G.feedback(spec, out, jnp.asarray([2, 0]))
    np.testing.assert_array_equal(fed[1], [[-1, -1, 1], [1, -1, -1]])
    np.testing.assert_array_equal(fed[0], out[0])
    np.testing.assert_array_equal(fed[2], 0.0)


def test_stored_normalization_keeps_unit_columns():
    spec = G.NetworkSpec((4, 5, 3), num_states=2, synapse_normalization="stored")
    g, syn, x, y = random_case(spec, seed=7, dtype=jnp.float32)
    new = G.step(spec, g, syn, x, y)
    for block in new.forward + new.backward:
        np.testing.assert_allclose(jnp.sum(block**2, axis=1), 1.0, rtol=1e-6)


def test_saturation_damps_updates_of_large_weights():
    spec = G.NetworkSpec((2, 1), num_states=1, saturation=True)
    g = G.neutral_genome(spec)._replace(synapse_update=jnp.asarray(0.1), saturation=jnp.asarray(1.0))
    blocks = jnp.asarray([[[0.0], [4.0], [0.0]]])
    syn = G.Synapses((blocks,), (jnp.zeros((1, 1, 2)),))
    x, y = jnp.ones((1, 2)), jnp.zeros((1,), jnp.int32)
    new = G.step(spec, g, syn, x, y)
    plain = G.step(dataclasses.replace(spec, saturation=False), g, syn, x, y)
    d_sat = new.forward[0] - blocks
    d_plain = plain.forward[0] - blocks
    np.testing.assert_allclose(d_sat[0, 0, 0], d_plain[0, 0, 0], rtol=1e-6)  # |W| = 0: undamped
    np.testing.assert_allclose(d_sat[0, 1, 0], d_plain[0, 1, 0] * np.exp(-4.0), rtol=1e-4)


def test_vmap_over_population_and_synapse_sets_equals_loop():
    spec = G.NetworkSpec((6, 5, 3), num_states=2, oja=True, activation_norm=True)
    keys = jax.random.split(jax.random.key(0), 4)
    genomes = jax.vmap(lambda k: G.random_genome(spec, k))(keys)
    synapses = jax.vmap(lambda k: G.init_synapses(spec, k))(jax.random.split(jax.random.key(1), 3))
    x = jax.random.normal(jax.random.key(2), (8, 6))
    y = jnp.arange(8) % 3
    step = jax.vmap(jax.vmap(G.step, (None, None, 0, None, None)), (None, 0, None, None, None))
    batched = jax.jit(step, static_argnums=0)(spec, genomes, synapses, x, y)
    predict = jax.vmap(jax.vmap(G.predict, (None, None, 0, None)), (None, 0, 0, None))
    preds = predict(spec, genomes, batched, x)
    single_step = jax.jit(G.step, static_argnums=0)
    for p in range(4):
        g = jax.tree.map(lambda a: a[p], genomes)
        for s in range(3):
            syn = jax.tree.map(lambda a: a[s], synapses)
            single = single_step(spec, g, syn, x, y)
            for fast, slow in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
                np.testing.assert_allclose(fast[p, s], slow, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(preds[p, s], G.predict(spec, g, single, x), rtol=1e-5, atol=1e-6)


def test_grad_through_scan_matches_finite_differences():
    with jax.enable_x64(True):
        spec = G.NetworkSpec((4, 5, 3), num_states=2, forward_activation="tanh", oja=True, saturation=True)
        g, syn, x, y = random_case(spec, seed=11)
        g = g._replace(synapse_update=jnp.asarray(-0.05))
        xs = jax.random.normal(jax.random.key(3), (5, 6, 4), jnp.float64)
        ys = jax.random.randint(jax.random.key(4), (5, 6), 0, 3)

        def meta_loss(vector):
            genome = G.unravel(spec, vector)
            final, _ = jax.lax.scan(lambda s, b: (G.step(spec, genome, s, *b), None), syn, (xs, ys))
            logits = G.predict(spec, genome, final, x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), y])

        meta_loss = jax.jit(meta_loss)
        vector = G.ravel(spec, g)
        grad = jax.grad(meta_loss)(vector)
        eps = 1e-6
        fd = np.array([(meta_loss(vector.at[i].add(eps)) - meta_loss(vector.at[i].add(-eps))) / (2 * eps)
                       for i in range(vector.size)])
        assert np.abs(grad).max() > 1e-3
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


QUERY_VARIANTS = dict(VARIANTS, per_layer=dict(per_layer_genome=True, forward_activation="elu"),
                      norm_at_start=dict(synapse_normalization="start", output_activation="tanh"))


@pytest.mark.parametrize("num_states", [1, 2, 3])
@pytest.mark.parametrize("variant", sorted(QUERY_VARIANTS))
def test_query_logits_equal_predict_over_whole_and_padded_tiles(variant, num_states, monkeypatch):
    """The folded, tiled query pass of large query sets (the engine's scoring) is the forward pass of
    :func:`predict`: the same logits in float64 for a set of two whole tiles and one of three tiles, the last
    padded; for a set within one tile it is :func:`predict`'s own program (small-query configs score as before)."""
    monkeypatch.setattr(G.network, "QUERY_TILE", 8)
    with jax.enable_x64(True):
        spec = G.NetworkSpec((5, 7, 6, 4), num_states=num_states, **QUERY_VARIANTS[variant])
        g, syn, _, _ = random_case(spec, seed=num_states)
        if spec.per_layer_genome:  # random_case's hand-set scalars are shared; a genome per layer pair here
            g = G.random_genome(spec, jax.random.key(num_states), dtype=jnp.float64)

        def folded(g, s, xs):
            return [G.query_logits(spec, g, s, x) for x in xs]

        def plain(g, s, xs):
            return [G.predict(spec, g, s, x) for x in xs]

        within, *tiled = [jax.random.normal(jax.random.key(rows), (rows, spec.num_inputs), jnp.float64)
                          for rows in (8, 16, 21)]
        # within one tile, query_logits is predict's program itself, so configs with small query sets score as
        # before: the same jaxpr (which is what the engine compiles), whatever program it is compiled into
        assert str(jax.make_jaxpr(folded)(g, syn, [within])) == str(jax.make_jaxpr(plain)(g, syn, [within]))
        # one program per function for both tiled sets (a program per set and function compiled 3x as often)
        for x, a, b in zip(tiled, jax.jit(folded)(g, syn, tiled), jax.jit(plain)(g, syn, tiled)):
            assert a.shape == b.shape == (x.shape[0], spec.num_outputs)
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
