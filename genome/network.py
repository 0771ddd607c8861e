"""The multi-state network and its learning step (DESIGN §2), in pure JAX.

Layout. The paper writes neurons ``a^l[b, i, c]`` and synapses ``W_l[i, j, c]``; here the state axis comes
first so that every pass is a batched matrix product over states (and, under ``vmap``, over genomes and
tasks) with no transposes:

* neurons ``a[l]``: ``[k, B, n_l]``; ``ā`` appends the bias unit (1 in every state): ``[k, B, n_l + 1]``;
* forward blocks ``W[l]``: ``[k, n_l + 1, n_{l+1}]`` (``W[c, i, j] = W_l[i, j, c]``, last row = bias);
* backward blocks ``V[l]``: ``[k, n_{l+1}, n_l]`` (``V[c, j, i] = V_l[j, i, c]``).

The k×k state mixes are applied to the (small) neuron tensors before the products, so no per-state outer
product is ever materialized. They are written as k broadcast multiply-adds (:func:`_mix_states`), not as
einsums: under ``vmap`` over genomes an einsum with the genome's k×k matrix becomes a batched dot whose
output layout forces transposed copies of the neuron tensors around every product. The Hebbian products
take their pre-synaptic operand already transposed (``[k, n, B]``, built by the mixing pass itself), so every
product in a step is a plain batched ``[M, K] @ [K, N]`` matmul that XLA's CPU backend hands to its fast GEMM
kernels. Together with the choice of where the bias unit enters the forward product (:func:`_forward_product`)
this made the engine 1.36× (196-512-10, B=128) to 1.49× (64-32-10, B=32) faster on CPU than the einsum
formulation (workers/bench.py scales, measured interleaved in one process).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from genome.params import Genome, layer_genome
from genome.spec import NetworkSpec


class Synapses(NamedTuple):
    """The inner state of one network: a forward and a backward block per layer (see module docstring), and,
    with ``spec.zero_out_neurons = False``, the neuron states ``[k, B, n_l]`` of every layer after the last
    step (empty otherwise)."""

    forward: tuple[jax.Array, ...]
    backward: tuple[jax.Array, ...]
    neurons: tuple[jax.Array, ...] = ()


def _tie_states(block: jax.Array) -> jax.Array:
    return jnp.broadcast_to(block[:1], block.shape)


def _tied_backward(forward_block: jax.Array) -> jax.Array:
    """Backward block equal to the transposed forward block without its bias row."""
    return jnp.swapaxes(forward_block[:, :-1, :], 1, 2)


def init_synapses(spec: NetworkSpec, key: jax.Array, dtype=jnp.float32, batch_size: int | None = None) -> Synapses:
    """Fresh synapses ~ N(0, spec.synapse_init_std²), honouring the symmetric flags; with
    ``spec.zero_out_neurons = False`` also all-zero neurons for batches of ``batch_size`` (required then)."""
    k = spec.num_states
    neurons = ()
    if not spec.zero_out_neurons:
        if batch_size is None:
            raise ValueError("zero_out_neurons = False carries neuron states: init_synapses needs the batch_size")
        neurons = tuple(jnp.zeros((k, int(batch_size), n), dtype) for n in spec.layer_sizes)
    forward, backward = [], []
    for layer, (n_in, n_out) in enumerate(zip(spec.layer_sizes[:-1], spec.layer_sizes[1:])):
        forward_key, backward_key = jax.random.split(jax.random.fold_in(key, layer))
        w = spec.synapse_init_std * jax.random.normal(forward_key, (k, n_in + 1, n_out), dtype)
        v = spec.synapse_init_std * jax.random.normal(backward_key, (k, n_out, n_in), dtype)
        if spec.symmetric_states:
            w, v = _tie_states(w), _tie_states(v)
        if spec.symmetric_in_out:
            v = _tied_backward(w)
        forward.append(w)
        backward.append(v)
    return Synapses(tuple(forward), tuple(backward), neurons)


# ---------------------------------------------------------------------------------------------- activations


def _sigmoid_grad(s: jax.Array) -> jax.Array:
    sig = jax.nn.sigmoid(s)
    return sig * (1.0 - sig)


_ELEMENTWISE = {
    "identity": lambda s: s,
    "relu": jax.nn.relu,
    "leaky_relu": lambda s: jax.nn.leaky_relu(s, 0.01),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu,
    "relu_tanh": lambda s: jax.nn.relu(jnp.tanh(s)),
}


def activate(name: str, s: jax.Array) -> jax.Array:
    """Apply activation ``name`` to states ``s`` of shape ``[k, ...]`` (state axis first)."""
    if name in _ELEMENTWISE:
        return _ELEMENTWISE[name](s)
    if name == "sigmoid_backprop":  # (σ(s0), σ'(s1), s2, ...)
        parts = [jax.nn.sigmoid(s[:1]), _sigmoid_grad(s[1:2]), s[2:]]
    elif name == "linear_backprop":  # (s0, 1, s2, ...)
        parts = [s[:1], jnp.ones_like(s[1:2]), s[2:]]
    else:  # NetworkSpec validates names; this guards direct calls.
        raise ValueError(f"unknown activation {name!r}")
    return jnp.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------------- passes


def _mix_states(a: jax.Array, matrix: jax.Array) -> jax.Array:
    """``Σ_d a[d] · matrix[d, c]`` for every destination state ``c``: ``[k, ...] -> [k, ...]``.

    k broadcast multiply-adds (k is tiny) that fuse into one elementwise pass; see the module docstring."""
    k = matrix.shape[0]
    column = (k,) + (1,) * (a.ndim - 1)
    mixed = jnp.reshape(matrix[0], column) * a[:1]
    for d in range(1, k):
        mixed = mixed + jnp.reshape(matrix[d], column) * a[d : d + 1]
    return mixed


def _mixed_with_bias(a: jax.Array, matrix: jax.Array) -> jax.Array:
    """``Σ_d ā[b, i, d] · matrix[d, c]``: the mix of ``a [k, B, n]`` with the bias unit appended, ``[k, B, n + 1]``.
    The bias unit is 1 in every state, so its mix is ``Σ_d matrix[d, c]``."""
    mixed = _mix_states(a, matrix)
    bias = jnp.reshape(jnp.sum(matrix, axis=0), (-1, 1, 1)).astype(mixed.dtype)
    return jnp.concatenate([mixed, jnp.broadcast_to(bias, mixed.shape[:-1] + (1,))], axis=-1)


def _transposed(a: jax.Array) -> jax.Array:
    """Neurons ``[k, B, n] -> [k, n, B]`` (the pre-synaptic operand of a Hebbian product)."""
    return jnp.swapaxes(a, 1, 2)


def _column_normalize(block: jax.Array, epsilon: float) -> jax.Array:
    """``W / sqrt(Σ_i W[i, j, o]² + ε)``: normalize the incoming weights of each destination neuron."""
    return block * jax.lax.rsqrt(jnp.sum(block * block, axis=1, keepdims=True) + epsilon)


def _pass_blocks(spec: NetworkSpec, blocks: Sequence[jax.Array]) -> Sequence[jax.Array]:
    if spec.synapse_normalization == "activations":
        return [_column_normalize(b, spec.synapse_normalization_epsilon) for b in blocks]
    return blocks


def normalize_at_start(spec: NetworkSpec, synapses: Synapses) -> Synapses:
    """``synapse_normalization: start``: every stored block normalized per destination neuron before a step
    (the published ``normalize_synapses`` state update); other modes return ``synapses`` unchanged."""
    if spec.synapse_normalization != "start":
        return synapses
    eps = spec.synapse_normalization_epsilon
    return Synapses(tuple(_column_normalize(w, eps) for w in synapses.forward),
                    tuple(_column_normalize(v, eps) for v in synapses.backward), synapses.neurons)


def _normalize_activation(spec: NetworkSpec, genome: Genome, s: jax.Array) -> jax.Array:
    """Per-state batch normalization over the batch axis with the genome's multiplier and shift."""
    mean = jnp.mean(s, axis=1, keepdims=True)
    var = jnp.var(s, axis=1, keepdims=True)
    normalized = (s - mean) * jax.lax.rsqrt(var + spec.norm_epsilon)
    return genome.norm_scale[:, None, None] * normalized + genome.norm_shift[:, None, None]


def _forward_product(a: jax.Array, nu: jax.Array, w: jax.Array) -> jax.Array:
    """Forward pass, ``Δ[b,j,c] = Σ_i Σ_d ā[b,i,d] ν[d,c] W[i,j,c]``, for ``a [k, B, n]``, ``w [k, n + 1, m]``.

    The bias unit enters either as an appended neuron column (a copy of ``B·(n+1)`` per state) or, when the
    batch is larger than the layer's output (a thin layer such as the 512 -> 10 output layer), as the
    bias row ``(Σ_d ν[d,c]) W[n,j,c]`` split off the weights (a copy of ``n·m``); both are the same sum."""
    if a.shape[1] <= w.shape[-1]:
        return jnp.matmul(_mixed_with_bias(a, nu), w)
    bias = jnp.reshape(jnp.sum(nu, axis=0), (-1, 1, 1)).astype(w.dtype)
    return jnp.matmul(_mix_states(a, nu), w[:, :-1]) + bias * w[:, -1:]


def forward(spec: NetworkSpec, genome: Genome, synapses: Synapses, x: jax.Array) -> list[jax.Array]:
    """Forward pass (DESIGN §2 step 1) from all-zero neurons, or from ``synapses.neurons`` where they are
    carried (``zero_out_neurons = False``). Returns the neuron states of every layer."""
    k = spec.num_states
    x = jnp.asarray(x, synapses.forward[0].dtype)
    a = jnp.zeros((k,) + x.shape, x.dtype).at[0].set(x)  # the input goes to state 0 of layer 0
    states = [a]
    blocks = _pass_blocks(spec, synapses.forward)
    for layer, w in enumerate(blocks):
        g = layer_genome(spec, genome, layer)
        delta = _forward_product(states[-1], g.forward_transform, w)
        # a^{l+1} = act(f·a^{l+1} + η·Δ); with a^{l+1} = 0 at the start of every step f·a^{l+1} = 0.
        s = g.neuron_update * delta
        if synapses.neurons:
            s = g.neuron_keep * synapses.neurons[layer + 1].astype(s.dtype) + s
        is_output = layer == spec.num_layers - 1
        if spec.activation_norm and not is_output:
            s = _normalize_activation(spec, g, s)
        states.append(activate(spec.output_activation if is_output else spec.forward_activation, s))
    return states


def feedback(spec: NetworkSpec, output: jax.Array, labels: jax.Array) -> jax.Array:
    """Write the label signal into the last layer (DESIGN §2 step 2). ``output``: ``[k, B, n_out]``."""
    k, n_out = spec.num_states, spec.num_outputs
    onehot = jax.nn.one_hot(labels, n_out, dtype=output.dtype)
    z = output[0]
    if spec.feedback == "target":
        signal = 2.0 * onehot - 1.0  # ±1 one-hot target
    elif spec.feedback == "error_mse":
        signal = z - onehot  # d/dz of ½‖z - onehot‖²
    else:  # error_cross_entropy
        signal = jax.nn.softmax(z, axis=-1) - onehot  # d/dz of -log softmax(z)[label]
    slot = min(1, k - 1)
    output = output.at[slot].set(signal)
    return output.at[2:].set(0.0) if k > 2 else output


def backward(spec: NetworkSpec, genome: Genome, synapses: Synapses, states: list[jax.Array]) -> list[jax.Array]:
    """Backward pass, l = L-1 .. 1; layer 0 never changes (DESIGN §2 step 3)."""
    states = list(states)
    blocks = _pass_blocks(spec, synapses.backward)
    for layer in range(spec.num_layers - 1, 0, -1):
        g = layer_genome(spec, genome, layer)
        f, eta = g.neuron_keep, g.neuron_update
        mixed = _mix_states(states[layer + 1], g.backward_transform)  # Σ_d a^{l+1}[b,j,d] µ[d,c]
        delta = jnp.matmul(mixed, blocks[layer])  # Σ_j Σ_d a^{l+1}[b,j,d] µ[d,c] V[j,i,c]
        a = states[layer]
        if spec.backward_update == "additive":
            a = activate(spec.backward_activation, f * a + eta * delta)
        elif spec.backward_update == "multiplicative":
            a = activate(spec.backward_activation, f * a * delta)
        elif spec.backward_update == "multiplicative_second_state":  # the published code: act_b(f·[a0, a·Δ])
            a = activate(spec.backward_activation, f * jnp.concatenate([a[:1], a[1:] * delta[1:]], axis=0))
        else:  # multiplicative_skip_first_state: state 0 untouched, states >= 1 become act_b(f·a·Δ)
            rest = activate(spec.backward_activation, f * a[1:] * delta[1:]) if spec.num_states > 1 else a[1:]
            a = jnp.concatenate([a[:1], rest], axis=0)
        states[layer] = a
    return states


class SynapticGenes(NamedTuple):
    """The genome's parameters of one Hebbian update: the backward-pass update (:func:`backward_genes`) or the
    forward-pass one of ``spec.forward_synapse_update`` (:func:`forward_genes`)."""

    pre_transform: jax.Array  # ν̃ [k, k]
    post_transform: jax.Array  # µ̃ [k, k]
    keep: jax.Array  # f̃ []
    update: jax.Array  # η̃ []
    oja: jax.Array  # [] Oja multiplier (shared)
    saturation: jax.Array  # [] saturation (shared)


def backward_genes(genome: Genome) -> SynapticGenes:
    return SynapticGenes(genome.pre_transform, genome.post_transform, genome.synapse_keep, genome.synapse_update,
                         genome.oja, genome.saturation)


def forward_genes(genome: Genome) -> SynapticGenes:
    return SynapticGenes(genome.forward_pre_transform, genome.forward_post_transform, genome.forward_synapse_keep,
                         genome.forward_synapse_update, genome.oja, genome.saturation)


def _update_block(spec: NetworkSpec, genes: SynapticGenes, block: jax.Array, hebb: jax.Array,
                  post: jax.Array, scale: float) -> jax.Array:
    """Synapse update of one block from its Hebbian term (DESIGN §2 step 4). Source axis is 1.

    ``post``: the destination neurons' mixed states ``Σ_d µ̃[o,d] a[b,j,d]`` as ``[o, b, j]`` (the
    activation-based Oja term); ``scale``: the batch reduction factor."""
    if spec.oja:  # -sign(η̃)·extra·[|m|]·W·S: η̃·(H + oja term) always shrinks W
        if spec.oja_variant == "synapse_weights":
            strength = jnp.sum(block * block, axis=1, keepdims=True)  # Σ_r W[r, j, o]²
        else:  # activations: Σ_b (µ̃·a_j)², per destination neuron and state
            strength = scale * jnp.sum(post * post, axis=1, keepdims=True)
        factor = spec.oja_extra_multiplier * (jnp.abs(genes.oja) if spec.oja_use_multiplier else 1.0)
        hebb = hebb - jnp.sign(genes.update) * factor * block * strength
    if spec.saturation:
        d_block = (genes.keep - 1.0) * block + genes.update * hebb
        d_block = d_block * jnp.exp(-jnp.abs(block) * (spec.saturation_epsilon + jnp.abs(genes.saturation)))
        block = block + d_block
    else:
        block = genes.keep * block + genes.update * hebb
    if spec.synapse_normalization == "stored":
        block = _column_normalize(block, spec.synapse_normalization_epsilon)
    if spec.symmetric_states:
        block = _tie_states(block)
    return block


def hebbian_update(spec: NetworkSpec, genome: Genome, synapses: Synapses, states: list[jax.Array],
                   pre_states: list[jax.Array] | None = None, genes_of=None) -> Synapses:
    """Update every synapse block from the neuron states (DESIGN §2 step 4).

    Block l pairs ``pre_states[l]`` (default ``states[l]``) with ``states[l + 1]``; ``genes_of(genome)``
    picks the update's parameters from (the layer's) genome: :func:`backward_genes` (default) or
    :func:`forward_genes`."""
    genes_of = backward_genes if genes_of is None else genes_of
    pre_states = states if pre_states is None else pre_states
    scale = 1.0 / states[0].shape[1] if spec.batch_reduction == "mean" else 1.0
    forward_blocks, backward_blocks = [], []
    for layer in range(spec.num_layers):
        genes = genes_of(layer_genome(spec, genome, layer))
        nu_t, mu_t = genes.pre_transform, genes.post_transform
        a_in, a_out = pre_states[layer], states[layer + 1]
        pre_t = _mix_states(_transposed(a_in), nu_t)  # Σ_e a^l[b,i,e] ν̃[e,o], as [o, i, b]
        post = _mix_states(a_out, mu_t.T)  # Σ_d µ̃[o,d] a^{l+1}[b,j,d], as [o, b, j]
        # H_f[i,j,o] = Σ_b pre[b,i,o] post[b,j,o]; the bias unit's pre is Σ_e ν̃[e,o] for every b, so the
        # bias row is that times Σ_b post (cheaper than appending a bias row to pre_t before the product).
        bias_row = jnp.reshape(jnp.sum(nu_t, axis=0), (-1, 1, 1)) * jnp.sum(post, axis=1, keepdims=True)
        h_forward = scale * jnp.concatenate([jnp.matmul(pre_t, post), bias_row.astype(post.dtype)], axis=1)
        w = _update_block(spec, genes, synapses.forward[layer], h_forward, post, scale)
        if spec.symmetric_in_out:
            v = _tied_backward(w)
        else:
            pre_b_t = _mix_states(_transposed(a_out), nu_t)  # Σ_e a^{l+1}[b,j,e] ν̃[e,o], as [o, j, b]
            post_b = _mix_states(a_in, mu_t.T)  # Σ_d µ̃[o,d] a^l[b,i,d], as [o, b, i]
            h_backward = scale * jnp.matmul(pre_b_t, post_b)  # H_b[j,i,o] = Σ_b pre_b[b,j,o] post_b[b,i,o]
            v = _update_block(spec, genes, synapses.backward[layer], h_backward, post_b, scale)
        forward_blocks.append(w)
        backward_blocks.append(v)
    return Synapses(tuple(forward_blocks), tuple(backward_blocks), synapses.neurons)


def _forward_phase(spec: NetworkSpec, genome: Genome, synapses: Synapses,
                   x: jax.Array) -> tuple[Synapses, list[jax.Array]]:
    """The part of every step before the feedback: normalization at the start, the forward pass and the
    forward-pass Hebbian update. Returns (synapses, forward states)."""
    synapses = normalize_at_start(spec, synapses)
    forward_states = forward(spec, genome, synapses, x)
    if spec.forward_synapse_update:
        synapses = hebbian_update(spec, genome, synapses, forward_states, genes_of=forward_genes)
    return synapses, forward_states


def _carry(spec: NetworkSpec, synapses: Synapses, states: list[jax.Array]) -> Synapses:
    """``zero_out_neurons = False``: the step's final neuron states persist into the next step."""
    return synapses if spec.zero_out_neurons else synapses._replace(neurons=tuple(states))


def step_states(
    spec: NetworkSpec, genome: Genome, synapses: Synapses, x: jax.Array, y: jax.Array, t=0
) -> tuple[Synapses, list[jax.Array]]:
    """One inner learning step (inner step index ``t``); also returns the final neuron states (for
    inspection and tests): after the backward pass, or after the forward pass on a forward-only step."""
    synapses, forward_states = _forward_phase(spec, genome, synapses, x)

    def supervised(synapses):
        states = list(forward_states)
        states[-1] = feedback(spec, states[-1], y)
        states = backward(spec, genome, synapses, states)
        pre = forward_states if spec.use_forward_activations_for_synapse_update else None
        return _carry(spec, hebbian_update(spec, genome, synapses, states, pre), states), states

    if spec.supervised_every == 1:
        return supervised(synapses)
    return jax.lax.cond(jnp.asarray(t) % spec.supervised_every == 0, supervised,
                        lambda synapses: (_carry(spec, synapses, forward_states), list(forward_states)), synapses)


def has_forward_only_effects(spec: NetworkSpec) -> bool:
    """Whether a forward-only step changes the synapses (forward-pass Hebbian update, normalization at the
    start of a step): then the published unroll's last step, forward-only, matters."""
    return spec.forward_synapse_update or spec.synapse_normalization == "start"


def forward_only_step(spec: NetworkSpec, genome: Genome, synapses: Synapses, x: jax.Array) -> Synapses:
    """A step without feedback and backward pass (the published ``network_step`` with both backward flags
    off, as its unroll runs the last support batch): :func:`_forward_phase`; carried neurons become the
    forward states."""
    synapses, states = _forward_phase(spec, genome, synapses, x)
    return _carry(spec, synapses, states)


def step(spec: NetworkSpec, genome: Genome, synapses: Synapses, x: jax.Array, y: jax.Array, t=0) -> Synapses:
    """One inner learning step on a batch: forward, feedback, backward, Hebbian update.

    ``x``: ``[B, n_in]`` inputs, ``y``: ``[B]`` integer labels, ``t``: the inner step index (only
    ``spec.supervised_every`` reads it; may be traced). Pure: vmap over genomes and/or synapses, jit with
    ``spec`` static, differentiate with respect to ``genome``.
    """
    return step_states(spec, genome, synapses, x, y, t)[0]


def predict(spec: NetworkSpec, genome: Genome, synapses: Synapses, x: jax.Array) -> jax.Array:
    """State 0 of the last layer after a forward pass: ``[B, n_out]`` (from synapses normalized first under
    ``synapse_normalization: start``, as the published query step does; always from zero neurons)."""
    return forward(spec, genome, normalize_at_start(spec, synapses)._replace(neurons=()), x)[-1][0]


#: query rows per tile of :func:`query_logits` (a tile's neuron states stay in the CPU's caches)
QUERY_TILE = 512


def _folded_layers(spec: NetworkSpec, genome: Genome, blocks: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    """Per layer, the forward pass of state-interleaved neurons as one product: (weights, bias) with
    ``s[q, c, j] = Σ_{d,i} a[q, d, i] · (η ν[d, c] W[c, i, j]) + η Σ_d ν[d, c] W[c, n, j]``, weights
    ``[k·n, c·m]`` (rows ``(d, i)``, columns ``(c, j)``; layer 0 reads only state 0 of its input, so its
    rows are ``i``) and bias ``[c·m]``. Of the last layer only state 0 is kept."""
    k = spec.num_states
    layers = []
    for layer, w in enumerate(blocks):
        g = layer_genome(spec, genome, layer)
        targets = 1 if layer == spec.num_layers - 1 else k
        coef = g.neuron_update * g.forward_transform[:, :targets]  # η ν[d, c]
        n, m = w.shape[1] - 1, w.shape[2]
        sources = 1 if layer == 0 else k
        big = coef[:sources, :, None, None] * w[None, :targets, :-1]  # [d, c, i, j]
        big = jnp.transpose(big, (0, 2, 1, 3)).reshape(sources * n, targets * m)
        bias = (jnp.sum(coef, axis=0)[:, None] * w[:targets, -1]).reshape(targets * m)
        layers.append((big, bias))
    return layers


def query_logits(spec: NetworkSpec, genome: Genome, synapses: Synapses, x: jax.Array) -> jax.Array:
    """:func:`predict`'s logits ``[Q, n_out]``, computed for a large query set (the paper's 2560 examples).

    A query set of at most :data:`QUERY_TILE` rows is :func:`predict` itself (bit for bit: every small-query
    config scores exactly as before). A larger one runs with the neuron states interleaved per example
    (``[Q, k·n]``) so that each layer is one product with the k×k mix and η folded into the (small) synapse
    block instead of the (large) neuron tensor, only state 0 of the last layer computed, and the rows in
    tiles of :data:`QUERY_TILE` (the last one zero-padded) so that a tile's states stay in cache: the same
    sums in another order, equal to :func:`predict` to float rounding. Per-batch activation normalization
    needs the whole batch at once: that option always uses :func:`predict`."""
    if spec.activation_norm or x.shape[0] <= QUERY_TILE:
        return predict(spec, genome, synapses, x)
    synapses = normalize_at_start(spec, synapses)
    x = jnp.asarray(x, synapses.forward[0].dtype)
    layers = _folded_layers(spec, genome, _pass_blocks(spec, synapses.forward))

    def rows(a):  # [q, n_in] -> [q, n_out]
        for layer, (big, bias) in enumerate(layers):
            last = layer == spec.num_layers - 1
            s = (jnp.matmul(a, big) + bias[None]).reshape(a.shape[0], 1 if last else spec.num_states, -1)
            states = activate(spec.output_activation if last else spec.forward_activation, jnp.moveaxis(s, 1, 0))
            a = jnp.moveaxis(states, 0, 1).reshape(a.shape[0], -1)  # [q, c·m], states interleaved per example
        return a

    num_rows = x.shape[0]
    tiles = -(-num_rows // QUERY_TILE)
    padded = jnp.concatenate([x, jnp.zeros((tiles * QUERY_TILE - num_rows,) + x.shape[1:], x.dtype)])
    out = jax.lax.map(rows, padded.reshape((tiles, QUERY_TILE) + x.shape[1:]))
    return out.reshape((tiles * QUERY_TILE,) + out.shape[2:])[:num_rows]
