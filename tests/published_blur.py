"""An independent NumPy port of the published BLUR step, in the published code's layout.

Written from google-research/google-research, folder ``blur/`` (``blur.py``: ``network_step``,
``dense_neuron_update``, ``compute_neuron_state``, ``get_hebbian_update``, ``get_ojas_update``,
``compute_synapse_state``, ``default_state_update``; ``synapse_util.py``: ``synapse_submatrix``,
``sync_in_and_out_synapse``, ``sync_states_synapse``, ``normalize_synapses``; ``genome_util.py``), not from
this project's engine. Layout as published, state axis last:

* layers ``[B, n, k]``; one synapse tensor per layer pair ``S [N, N, k]``, ``N = n_in + 1 + n_out``: the
  forward block is ``S[:n_in+1, n_in+1:]`` (last of its rows the bias), the backward block
  ``S[n_in+1:, :n_in+1]`` (its last column, the bias column, is updated but never read by a pass), the two
  diagonal blocks are updated by the Hebbian rule too and read only by the synapse-weights Oja variant;
* the neuron genome: ``transform [2k, 2k]`` (``[:k, k:]`` forward, ``[k:, :k]`` backward), ``keep``,
  ``update``; a synaptic genome: ``pre``, ``post`` ``[k, k]``, ``keep``, ``update``, ``saturation``,
  ``ojas_multiplier``.

Options are a plain dict (the published ``NetworkSpec`` fields and ``OjasSpec``). Float64, loops where
clearer. With ``k = 1`` the published feedback does not fit (it writes the target into state 1); this port,
like the project, writes it into the single state.
"""

from __future__ import annotations

import numpy as np

ELEMENTWISE = {
    "identity": lambda s: s,
    "relu": lambda s: np.maximum(s, 0.0),
    "tanh": np.tanh,
    "relu_tanh": lambda s: np.maximum(np.tanh(s), 0.0),
    "sigmoid": lambda s: 1.0 / (1.0 + np.exp(-s)),
}


def concat_row(a, value):
    """Append one neuron (the bias unit) of ``value`` in every state: ``[B, n, k] -> [B, n + 1, k]``."""
    return np.concatenate([a, np.full(a.shape[:-2] + (1, a.shape[-1]), value)], axis=-2)


def normalize(block, eps):
    """synapse_util.normalize_synapses: across the input axis (-3)."""
    return block / np.sqrt(np.sum(block**2, axis=-3, keepdims=True) + eps)


def combine(forward, backward):
    """synapse_util.combine_in_out_synapses: diagonal blocks zero."""
    a, b, k = forward.shape
    top = np.concatenate([np.zeros((a, a, k)), forward], axis=1)
    bottom = np.concatenate([backward, np.zeros((b, b, k))], axis=1)
    return np.concatenate([top, bottom], axis=0)


def sync_in_out(s, n_in):
    forward = s[: n_in + 1, n_in + 1 :]
    return combine(forward, np.transpose(forward, (1, 0, 2)))


def sync_states(s):
    return np.repeat(s[..., :1], s.shape[-1], axis=-1)


def compute_neuron_state(old, update, keep, eta, act, mode):
    """blur.compute_neuron_state."""
    if mode == "multiplicative_second_state":
        new = np.concatenate([old[..., 0:1], old[..., 1:] * update[..., 1:]], axis=-1) * keep
    elif mode == "multiplicative":
        new = old * update * keep
    else:  # additive
        new = old * keep + update * eta
    return ELEMENTWISE[act](new)


def hebbian(pre, post, genes, options):
    """blur.get_hebbian_update (+ get_ojas_update) -> the full [N, N, k] update before the rates."""
    x = np.concatenate([concat_row(pre, 1.0), post], axis=-2)  # [B, N, k]
    k = x.shape[-1]
    h = np.zeros((x.shape[1], x.shape[1], k))
    for o in range(k):
        left = sum(x[:, :, kk, None] * genes["pre"][kk, o] for kk in range(k))  # [B, N, 1]
        right = sum(genes["post"][o, ll] * x[:, None, :, ll] for ll in range(k))  # [B, 1, N]
        h[:, :, o] = np.sum(left * right, axis=0)
    n_in = pre.shape[-2]
    if options.get("symmetric_in_out"):
        h = sync_in_out(h, n_in)
    if options.get("symmetric_states"):
        h = sync_states(h)
    return h


def ojas_update(pre, post, synapse, genes, oja):
    """blur.get_ojas_update: W[i,j,o] · Σ over the j-th column's second operand."""
    if oja["use_synapse_weights"]:
        act_sq = -synapse**2 * oja["extra_multiplier"]  # indexed [r, j, o], summed over r below
        total = np.sum(act_sq, axis=0)  # [N, k]
    else:
        act = np.concatenate([concat_row(pre, 0.0), post], axis=-2)  # [B, N, k]
        mixed = np.einsum("bjl,ol->bjo", act, genes["post"])
        act_sq = -mixed * mixed * oja["extra_multiplier"]
        total = np.sum(act_sq, axis=0)  # Σ_b: [N, k]
    if oja["use_multiplier"]:
        total = total * abs(genes["ojas_multiplier"])
    total = total * np.sign(genes["update"])
    return synapse * total[None, :, :]


def synapse_update(pre, post, synapse, genes, options):
    """blur.dense_synapse_update + compute_synapse_state."""
    h = hebbian(pre, post, genes, options)
    if options.get("oja"):
        h = h + ojas_update(pre, post, synapse, genes, options["oja"])
    if options.get("saturation_eps") is not None:
        dw = synapse * (genes["keep"] - 1.0) + h * genes["update"]
        dw = dw * np.exp(-np.abs(synapse) * (options["saturation_eps"] + abs(genes["saturation"])))
        return synapse + dw
    return synapse * genes["keep"] + h * genes["update"]


def network_step(layers_shape, synapses, genome, x, target, options, step, previous=None):
    """blur.network_step. ``previous``: the layers after the previous step (kept when
    ``options["zero_out_neurons"]`` is false, else zeroed). ``target``: ±1 one-hot ``[B, n_out]``; ``genome``: one genome
    dict, or a list of them, one per layer pair (``per_layer_genome``: ``genome_util.get_genome(g, i)``).
    Returns (synapses, layers)."""
    sizes = [n for n in layers_shape]

    def get_genome(i):
        return genome[i] if isinstance(genome, list) else genome

    k = get_genome(0)["neuron"]["transform"].shape[0] // 2
    batch = x.shape[0]
    synapses = [s.copy() for s in synapses]
    eps = options.get("normalization_eps", 1e-9)
    if options.get("zero_out_neurons", True) or previous is None:
        layers = [np.zeros((batch, n, k)) for n in sizes]
    else:
        layers = [a.copy() for a in previous]
    layers[0] = np.concatenate([x[..., None], np.zeros_like(layers[0][..., 1:])], axis=-1)
    if options.get("normalize_synapses"):  # default_state_update
        for i, s in enumerate(synapses):
            n_in = sizes[i]
            synapses[i] = combine(normalize(s[: n_in + 1, n_in + 1 :], eps), normalize(s[n_in + 1 :, : n_in + 1], eps))

    def sub(s, n_in, forward):
        block = s[: n_in + 1, n_in + 1 :] if forward else s[n_in + 1 :, :n_in]
        return normalize(block, eps) if options.get("normalize_in_activations") else block

    num_layers = len(sizes) - 1
    for i in range(num_layers):  # forward: update_network_neurons(backward=False)
        neuron = get_genome(i)["neuron"]
        nu = neuron["transform"][:k, k:]
        act = options["last_layer_activation"] if i + 1 == num_layers else options["forward_activation"]
        update = np.einsum("bik,kl,ijl->bjl", concat_row(layers[i], 1.0), nu, sub(synapses[i], sizes[i], True))
        layers[i + 1] = compute_neuron_state(layers[i + 1], update, neuron["keep"], neuron["update"], act, "additive")
    if options.get("forward_synapse_update"):
        for i in range(num_layers):
            synapses[i] = synapse_update(layers[i], layers[i + 1], synapses[i], get_genome(i)["forward_synapse"],
                                         options)
    forward_layers = [a.copy() for a in layers]
    supervised_every = options.get("supervised_every")
    if supervised_every is not None and step % supervised_every != 0:
        return synapses, layers
    last = layers[-1]  # concat_groundtruth_in
    if k == 1:
        layers[-1] = target[..., None].astype(float)
    else:
        layers[-1] = np.concatenate([last[..., 0:1], target[..., None], np.zeros_like(last[..., 2:])], axis=-1)
    for i in reversed(range(num_layers)):  # backward: layer 0 is not updatable
        neuron = get_genome(i)["neuron"]
        mu = neuron["transform"][k:, :k]
        update = np.einsum("bjk,kl,jil->bil", layers[i + 1], mu, sub(synapses[i], sizes[i], False))
        new = compute_neuron_state(layers[i], update, neuron["keep"], neuron["update"],
                                   options["backward_activation"], options["backward_update"])
        if i > 0:
            layers[i] = new
    pre_layers = forward_layers if options.get("use_forward_activations_for_synapse_update") else layers
    for i in reversed(range(num_layers)):
        synapses[i] = synapse_update(pre_layers[i], layers[i + 1], synapses[i], get_genome(i)["synapse"], options)
    return synapses, layers
