"""genome.step against the independent port of the published BLUR code (tests/published_blur.py).

Float64, random genomes and synapses, 10 consecutive steps (inner step index t = 0..9), every synapse
block compared after every step at 1e-10 relative. The one published behaviour the engine does not carry
(the synapse-weights Oja sum also runs over the two diagonal blocks of the published [N, N, k] tensor,
which the engine does not store) is pinned as an asserted difference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import published_blur as P

import genome as G

STEPS = 10


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield

TWO_PAIRS, THREE_PAIRS = (3, 4, 2), (3, 4, 3, 2)


def published_options(spec: G.NetworkSpec) -> dict:
    """The published NetworkSpec / OjasSpec fields for ``spec``."""
    options = {
        "forward_activation": spec.forward_activation, "backward_activation": spec.backward_activation,
        "last_layer_activation": spec.output_activation, "backward_update": spec.backward_update,
        "symmetric_in_out": spec.symmetric_in_out, "symmetric_states": spec.symmetric_states,
        "normalize_synapses": spec.synapse_normalization == "start",
        "normalize_in_activations": spec.synapse_normalization == "activations",
        "normalization_eps": spec.synapse_normalization_epsilon,
        "supervised_every": spec.supervised_every if spec.supervised_every > 1 else None,
        "forward_synapse_update": spec.forward_synapse_update,
        "use_forward_activations_for_synapse_update": spec.use_forward_activations_for_synapse_update,
        "saturation_eps": spec.saturation_epsilon if spec.saturation else None,
        "zero_out_neurons": spec.zero_out_neurons,
    }
    if spec.oja:
        options["oja"] = {"use_synapse_weights": spec.oja_variant == "synapse_weights",
                          "use_multiplier": spec.oja_use_multiplier, "extra_multiplier": spec.oja_extra_multiplier}
    return options


def random_genomes(spec: G.NetworkSpec, rng):
    """One random genome of a single layer pair: ours and the published genome dict, the same numbers."""
    k = spec.num_states
    matrix = lambda: rng.normal(0.0, 0.7, (k, k))  # noqa: E731
    g = G.neutral_genome(spec.replace(per_layer_genome=False), jnp.float64)._replace(
        forward_transform=jnp.asarray(matrix()), backward_transform=jnp.asarray(matrix()),
        pre_transform=jnp.asarray(matrix()), post_transform=jnp.asarray(matrix()),
        neuron_keep=jnp.asarray(rng.uniform(0.6, 1.2)), neuron_update=jnp.asarray(rng.uniform(0.6, 1.2)),
        synapse_keep=jnp.asarray(rng.uniform(0.9, 1.05)), synapse_update=jnp.asarray(rng.uniform(-0.05, 0.05)),
        oja=jnp.asarray(rng.uniform(0.5, 1.5)), saturation=jnp.asarray(rng.uniform(0.5, 1.5)),
        forward_pre_transform=jnp.asarray(matrix()), forward_post_transform=jnp.asarray(matrix()),
        forward_synapse_keep=jnp.asarray(rng.uniform(0.9, 1.05)),
        forward_synapse_update=jnp.asarray(rng.uniform(-0.05, 0.05)))
    transform = rng.normal(0.0, 3.0, (2 * k, 2 * k))  # the diagonal k×k blocks are never read
    transform[:k, k:], transform[k:, :k] = g.forward_transform, g.backward_transform

    def genes(prefix):
        return {"pre": np.asarray(getattr(g, prefix + "pre_transform")),
                "post": np.asarray(getattr(g, prefix + "post_transform")),
                "keep": float(g.forward_synapse_keep if prefix else g.synapse_keep),
                "update": float(g.forward_synapse_update if prefix else g.synapse_update),
                "saturation": float(g.saturation), "ojas_multiplier": float(g.oja)}

    published = {"neuron": {"transform": transform, "keep": float(g.neuron_keep), "update": float(g.neuron_update)},
                 "synapse": genes(""), "forward_synapse": genes("forward_")}
    return g, published


def random_case(spec: G.NetworkSpec, seed: int):
    """A random genome (per layer pair with ``spec.per_layer_genome``) and random published synapse tensors
    (diagonal blocks and the backward bias column random too)."""
    rng = np.random.default_rng(seed)
    k = spec.num_states
    if spec.per_layer_genome:
        layers = [random_genomes(spec, rng) for _ in range(spec.num_layers)]
        g = jax.tree.map(lambda *a: jnp.stack(a), *[ours for ours, _ in layers])
        published = [theirs for _, theirs in layers]
    else:
        g, published = random_genomes(spec, rng)
    sizes = spec.layer_sizes
    synapses = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        s = rng.normal(0.0, 0.5, (n_in + 1 + n_out, n_in + 1 + n_out, k))
        if spec.symmetric_in_out:
            s = P.sync_in_out(s, n_in)
        if spec.symmetric_states:
            s = P.sync_states(s)
        synapses.append(s)
    batches = [(rng.normal(size=(5, sizes[0])), rng.integers(0, sizes[-1], 5)) for _ in range(STEPS)]
    return g, published, synapses, batches


def ours_from_published(spec, synapses, neurons=()) -> G.Synapses:
    forward, backward = [], []
    for n_in, s in zip(spec.layer_sizes, synapses):
        forward.append(jnp.asarray(np.transpose(s[: n_in + 1, n_in + 1 :], (2, 0, 1))))
        backward.append(jnp.asarray(np.transpose(s[n_in + 1 :, :n_in], (2, 0, 1))))
    return G.Synapses(tuple(forward), tuple(backward), neurons)


def zero_diagonal_blocks(spec, synapses):
    out = []
    for n_in, s in zip(spec.layer_sizes, synapses):
        s = s.copy()
        s[: n_in + 1, : n_in + 1] = 0.0
        s[n_in + 1 :, n_in + 1 :] = 0.0
        out.append(s)
    return out


@functools.lru_cache(maxsize=None)
def jitted_step(spec):
    return jax.jit(functools.partial(G.step_states, spec))


def run_both(spec: G.NetworkSpec, seed: int, mask_diagonal: bool = False):
    """Max difference over the 10 steps of every synapse block and of the hidden neuron states, relative to
    the largest published value of each."""
    g, published, synapses, batches = random_case(spec, seed)
    options = published_options(spec)
    if mask_diagonal:
        synapses = zero_diagonal_blocks(spec, synapses)
    ours = ours_from_published(spec, synapses)
    if not spec.zero_out_neurons:  # the published first state: all-zero layers
        ours = ours._replace(neurons=tuple(jnp.zeros((spec.num_states, 5, n), jnp.float64) for n in spec.layer_sizes))
    worst, layers = 0.0, None
    for t, (x, y) in enumerate(batches):
        target = 2.0 * np.eye(spec.num_outputs)[y] - 1.0
        synapses, layers = P.network_step(spec.layer_sizes, synapses, published, x, target, options, t, layers)
        if mask_diagonal:
            synapses = zero_diagonal_blocks(spec, synapses)
        ours, states = jitted_step(spec)(g, ours, jnp.asarray(x), jnp.asarray(y), t)
        expected = ours_from_published(spec, synapses, () if spec.zero_out_neurons else tuple(
            np.transpose(a, (2, 0, 1)) for a in layers))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
            assert np.all(np.isfinite(b)), "the case must stay finite to compare anything"
            worst = max(worst, float(np.max(np.abs(np.asarray(a) - b)) / (np.max(np.abs(b)) + 1e-300)))
        for a, b in zip(states[1:-1], layers[1:-1]):  # hidden neuron states after the step
            a = np.transpose(np.asarray(a), (1, 2, 0))
            worst = max(worst, float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)))
    return worst


OFFICIAL = dict(forward_activation="relu_tanh", backward_activation="relu_tanh", output_activation="tanh")
OPTIONS = {
    "official_preset": {},
    "supervised_every_3": dict(supervised_every=3),
    "forward_synapse_update": dict(forward_synapse_update=True),
    "forward_activations_for_update": dict(use_forward_activations_for_synapse_update=True),
    "oja_activations": dict(oja=True),
    "oja_activations_multiplier": dict(oja=True, oja_use_multiplier=True, oja_extra_multiplier=0.7),
    "normalize_at_start": dict(synapse_normalization="start"),
    "normalize_in_activations": dict(synapse_normalization="activations", synapse_normalization_epsilon=1e-9),
    "saturation": dict(saturation=True, saturation_epsilon=0.05),
    "per_layer_genome": dict(per_layer_genome=True),
    "neurons_persist": dict(zero_out_neurons=False),
    "neurons_persist_supervised_every_2": dict(zero_out_neurons=False, supervised_every=2, forward_synapse_update=True),
    "combined_a": dict(per_layer_genome=True, supervised_every=2, forward_synapse_update=True, oja=True, synapse_normalization="start",
                       backward_update="multiplicative_second_state"),
    "combined_b": dict(per_layer_genome=True, use_forward_activations_for_synapse_update=True, saturation=True, saturation_epsilon=0.01,
                       synapse_normalization="activations", synapse_normalization_epsilon=1e-9,
                       backward_update="multiplicative"),
}


@pytest.mark.parametrize("sizes", [TWO_PAIRS, THREE_PAIRS], ids=["2pairs", "3pairs"])
@pytest.mark.parametrize("num_states", [1, 2, 4])
@pytest.mark.parametrize("symmetric", ["none", "in_out", "states", "both"])
@pytest.mark.parametrize("mode", ["additive", "multiplicative", "multiplicative_second_state"])
def test_backward_modes_and_symmetric_flags_match_the_published_step(mode, symmetric, num_states, sizes):
    spec = G.NetworkSpec.official(sizes, num_states, backward_update=mode, backward_activation="tanh",
                                  symmetric_in_out=symmetric in ("in_out", "both"),
                                  symmetric_states=symmetric in ("states", "both"))
    assert run_both(spec, seed=num_states + 10 * len(sizes)) < 1e-10


@pytest.mark.parametrize("num_states", [1, 2, 4])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_published_option_matches_the_published_step(option, num_states):
    spec = G.NetworkSpec.official(THREE_PAIRS if option.startswith(("combined", "per_layer")) else TWO_PAIRS, num_states,
                                  **OPTIONS[option])
    assert run_both(spec, seed=num_states) < 1e-10


def test_official_preset_is_the_published_default_network_spec():
    spec = G.NetworkSpec.official((4, 5, 3))
    assert (spec.forward_activation, spec.backward_activation, spec.output_activation) == \
        ("relu_tanh", "relu_tanh", "tanh")
    assert spec.backward_update == "additive" and spec.feedback == "target" and spec.batch_reduction == "sum"
    assert not (spec.symmetric_in_out or spec.symmetric_states or spec.forward_synapse_update)
    assert spec.supervised_every == 1 and spec.synapse_normalization_epsilon == 1e-9


@pytest.mark.parametrize("num_states", [1, 2])
def test_synapse_weights_oja_differs_only_by_the_diagonal_blocks_the_engine_does_not_store(num_states):
    spec = G.NetworkSpec.official(TWO_PAIRS, num_states, oja=True, oja_variant="synapse_weights",
                                  oja_use_multiplier=True)
    # with the published tensor's diagonal blocks held at zero the engine is the published update exactly
    assert run_both(spec, seed=3, mask_diagonal=True) < 1e-10
    # the published code also sums the (unused, Hebbian-updated) diagonal blocks into the Oja strength
    assert run_both(spec, seed=3) > 1e-4


def test_backprop_genome_is_unaffected_by_the_published_second_state_form():
    """keep = 1 and an identity backward activation: the published form equals state-0 pass-through."""
    bp_spec, bp = G.backprop_genome((4, 6, 3), 0.3, loss="cross_entropy", dtype=jnp.float64)
    skip = bp_spec.replace(backward_update="multiplicative_skip_first_state")
    assert bp_spec.backward_update == "multiplicative_second_state"
    syn = G.init_synapses(bp_spec, jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 4), jnp.float64)
    y = jnp.arange(7) % 3
    for _ in range(3):
        a, b = G.step(bp_spec, bp, syn, x, y), G.step(skip, bp, syn, x, y)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(u, v)
        syn = a


@pytest.mark.parametrize("changes, message", [
    (dict(supervised_every=0), "supervised_every"),
    (dict(forward_synapse_update=True, use_forward_activations_for_synapse_update=True), "cannot be combined"),
    (dict(synapse_normalization="start", symmetric_in_out=True), "drift"),
    (dict(oja=True, oja_variant="activations", symmetric_states=True), "drift"),
    (dict(oja_variant="weights"), "oja_variant"),
])
def test_option_combinations_the_published_code_does_not_define_are_spec_errors(changes, message):
    with pytest.raises(G.SpecError, match=message):
        G.NetworkSpec((3, 4, 2), **changes)
