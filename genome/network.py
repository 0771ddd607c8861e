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

from genome.params import Genome
from genome.spec import NetworkSpec


class Synapses(NamedTuple):
    """Synapse states of one network: a forward and a backward block per layer (see module docstring)."""

    forward: tuple[jax.Array, ...]
    backward: tuple[jax.Array, ...]


def _tie_states(block: jax.Array) -> jax.Array:
    return jnp.broadcast_to(block[:1], block.shape)


def _tied_backward(forward_block: jax.Array) -> jax.Array:
    """Backward block equal to the transposed forward block without its bias row."""
    return jnp.swapaxes(forward_block[:, :-1, :], 1, 2)


def init_synapses(spec: NetworkSpec, key: jax.Array, dtype=jnp.float32) -> Synapses:
    """Fresh synapses ~ N(0, spec.synapse_init_std²), honouring the symmetric flags."""
    k = spec.num_states
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
    return Synapses(tuple(forward), tuple(backward))


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


def _column_normalize(block: jax.Array) -> jax.Array:
    """``W / sqrt(Σ_i W[i, j, o]²)``: normalize the incoming weights of each destination neuron."""
    return block * jax.lax.rsqrt(jnp.sum(block * block, axis=1, keepdims=True) + 1e-12)


def _pass_blocks(spec: NetworkSpec, blocks: Sequence[jax.Array]) -> Sequence[jax.Array]:
    if spec.synapse_normalization == "activations":
        return [_column_normalize(b) for b in blocks]
    return blocks


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
    """Forward pass from all-zero neurons (DESIGN §2 step 1). Returns the neuron states of every layer."""
    k = spec.num_states
    x = jnp.asarray(x, synapses.forward[0].dtype)
    a = jnp.zeros((k,) + x.shape, x.dtype).at[0].set(x)  # the input goes to state 0 of layer 0
    states = [a]
    blocks = _pass_blocks(spec, synapses.forward)
    for layer, w in enumerate(blocks):
        delta = _forward_product(states[-1], genome.forward_transform, w)
        # a^{l+1} = act(f·a^{l+1} + η·Δ) with a^{l+1} = 0 at the start of every step, so f·a^{l+1} = 0.
        s = genome.neuron_update * delta
        is_output = layer == spec.num_layers - 1
        if spec.activation_norm and not is_output:
            s = _normalize_activation(spec, genome, s)
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
    f, eta = genome.neuron_keep, genome.neuron_update
    for layer in range(spec.num_layers - 1, 0, -1):
        mixed = _mix_states(states[layer + 1], genome.backward_transform)  # Σ_d a^{l+1}[b,j,d] µ[d,c]
        delta = jnp.matmul(mixed, blocks[layer])  # Σ_j Σ_d a^{l+1}[b,j,d] µ[d,c] V[j,i,c]
        a = states[layer]
        if spec.backward_update == "additive":
            a = activate(spec.backward_activation, f * a + eta * delta)
        elif spec.backward_update == "multiplicative":
            a = activate(spec.backward_activation, f * a * delta)
        else:  # multiplicative_second_state: state 0 kept, states >= 1 become act_b(f·a·Δ)
            rest = activate(spec.backward_activation, f * a[1:] * delta[1:]) if spec.num_states > 1 else a[1:]
            a = jnp.concatenate([a[:1], rest], axis=0)
        states[layer] = a
    return states


def _update_block(spec: NetworkSpec, genome: Genome, block: jax.Array, hebb: jax.Array) -> jax.Array:
    """Synapse update of one block from its Hebbian term (DESIGN §2 step 4). Source axis is 1."""
    if spec.oja:  # -sign(η̃)·|m|·W·Σ_r W[r]²: η̃·H always shrinks W
        column_norm = jnp.sum(block * block, axis=1, keepdims=True)
        hebb = hebb - jnp.sign(genome.synapse_update) * jnp.abs(genome.oja) * block * column_norm
    if spec.saturation:
        d_block = (genome.synapse_keep - 1.0) * block + genome.synapse_update * hebb
        d_block = d_block * jnp.exp(-jnp.abs(block) * (spec.saturation_epsilon + jnp.abs(genome.saturation)))
        block = block + d_block
    else:
        block = genome.synapse_keep * block + genome.synapse_update * hebb
    if spec.synapse_normalization == "stored":
        block = _column_normalize(block)
    if spec.symmetric_states:
        block = _tie_states(block)
    return block


def hebbian_update(spec: NetworkSpec, genome: Genome, synapses: Synapses, states: list[jax.Array]) -> Synapses:
    """Update every synapse block from the post-backward neuron states (DESIGN §2 step 4)."""
    scale = 1.0 / states[0].shape[1] if spec.batch_reduction == "mean" else 1.0
    nu_t, mu_t = genome.pre_transform, genome.post_transform
    forward_blocks, backward_blocks = [], []
    for layer in range(spec.num_layers):
        a_in, a_out = states[layer], states[layer + 1]
        pre_t = _mix_states(_transposed(a_in), nu_t)  # Σ_e a^l[b,i,e] ν̃[e,o], as [o, i, b]
        post = _mix_states(a_out, mu_t.T)  # Σ_d µ̃[o,d] a^{l+1}[b,j,d], as [o, b, j]
        # H_f[i,j,o] = Σ_b pre[b,i,o] post[b,j,o]; the bias unit's pre is Σ_e ν̃[e,o] for every b, so the
        # bias row is that times Σ_b post (cheaper than appending a bias row to pre_t before the product).
        bias_row = jnp.reshape(jnp.sum(nu_t, axis=0), (-1, 1, 1)) * jnp.sum(post, axis=1, keepdims=True)
        h_forward = scale * jnp.concatenate([jnp.matmul(pre_t, post), bias_row.astype(post.dtype)], axis=1)
        w = _update_block(spec, genome, synapses.forward[layer], h_forward)
        if spec.symmetric_in_out:
            v = _tied_backward(w)
        else:
            pre_b_t = _mix_states(_transposed(a_out), nu_t)  # Σ_e a^{l+1}[b,j,e] ν̃[e,o], as [o, j, b]
            post_b = _mix_states(a_in, mu_t.T)  # Σ_d µ̃[o,d] a^l[b,i,d], as [o, b, i]
            h_backward = scale * jnp.matmul(pre_b_t, post_b)  # H_b[j,i,o] = Σ_b pre_b[b,j,o] post_b[b,i,o]
            v = _update_block(spec, genome, synapses.backward[layer], h_backward)
        forward_blocks.append(w)
        backward_blocks.append(v)
    return Synapses(tuple(forward_blocks), tuple(backward_blocks))


def step_states(
    spec: NetworkSpec, genome: Genome, synapses: Synapses, x: jax.Array, y: jax.Array
) -> tuple[Synapses, list[jax.Array]]:
    """One inner learning step; also returns the post-backward neuron states (for inspection and tests)."""
    states = forward(spec, genome, synapses, x)
    states[-1] = feedback(spec, states[-1], y)
    states = backward(spec, genome, synapses, states)
    return hebbian_update(spec, genome, synapses, states), states


def step(spec: NetworkSpec, genome: Genome, synapses: Synapses, x: jax.Array, y: jax.Array) -> Synapses:
    """One inner learning step on a batch: forward, feedback, backward, Hebbian update.

    ``x``: ``[B, n_in]`` inputs, ``y``: ``[B]`` integer labels. Pure: vmap over genomes and/or synapses,
    jit with ``spec`` static, differentiate with respect to ``genome``.
    """
    return step_states(spec, genome, synapses, x, y)[0]


def predict(spec: NetworkSpec, genome: Genome, synapses: Synapses, x: jax.Array) -> jax.Array:
    """State 0 of the last layer after a forward pass: ``[B, n_out]``."""
    return forward(spec, genome, synapses, x)[-1][0]
