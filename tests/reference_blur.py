"""A slow, obvious NumPy reference of one BLUR step, written from DESIGN §2 in the paper's index order.

Neurons a[l][b, i, c]; synapses W[l][i, j, c] (last row = bias) and V[l][j, i, c]. Explicit loops, float64.
Used only to pin the fast implementation in genome/network.py.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(s):
    return 1.0 / (1.0 + np.exp(-s))


def act(name, s):
    """s: [..., k] with the state axis LAST (paper order)."""
    s = np.array(s, dtype=np.float64)
    if name == "identity":
        return s
    if name == "relu":
        return np.maximum(s, 0.0)
    if name == "leaky_relu":
        return np.where(s > 0, s, 0.01 * s)
    if name == "tanh":
        return np.tanh(s)
    if name == "sigmoid":
        return _sigmoid(s)
    if name == "elu":
        return np.where(s > 0, s, np.expm1(np.minimum(s, 0)))
    if name == "relu_tanh":
        return np.maximum(np.tanh(s), 0.0)
    out = s.copy()
    if name == "sigmoid_backprop":
        out[..., 0] = _sigmoid(s[..., 0])
        if s.shape[-1] > 1:
            out[..., 1] = _sigmoid(s[..., 1]) * (1 - _sigmoid(s[..., 1]))
        return out
    if name == "linear_backprop":
        if s.shape[-1] > 1:
            out[..., 1] = 1.0
        return out
    raise ValueError(name)


def with_bias(a):
    batch, n, k = a.shape
    out = np.ones((batch, n + 1, k))
    out[:, :n, :] = a
    return out


def reference_step(spec, g, W, V, x, y):
    """One step. g: dict of numpy genome fields; W, V: lists in paper layout. Returns (W, V, states)."""
    k, sizes, num_layers = spec.num_states, spec.layer_sizes, spec.num_layers
    batch = x.shape[0]
    nu, mu, nu_t, mu_t = g["forward_transform"], g["backward_transform"], g["pre_transform"], g["post_transform"]
    f, eta, f_t, eta_t = g["neuron_keep"], g["neuron_update"], g["synapse_keep"], g["synapse_update"]

    def norm_cols(block):  # block[src, dst, c]: divide by sqrt(Σ_src block²)
        out = np.empty_like(block)
        for j in range(block.shape[1]):
            for c in range(k):
                out[:, j, c] = block[:, j, c] / np.sqrt(np.sum(block[:, j, c] ** 2) + 1e-12)
        return out

    Wp = [norm_cols(w) for w in W] if spec.synapse_normalization == "activations" else W
    Vp = [norm_cols(v) for v in V] if spec.synapse_normalization == "activations" else V

    a = [np.zeros((batch, n, k)) for n in sizes]
    a[0][:, :, 0] = x
    for l in range(num_layers):  # forward
        ab = with_bias(a[l])
        delta = np.zeros((batch, sizes[l + 1], k))
        for b in range(batch):
            for j in range(sizes[l + 1]):
                for c in range(k):
                    delta[b, j, c] = sum(
                        ab[b, i, d] * nu[d, c] * Wp[l][i, j, c] for i in range(sizes[l] + 1) for d in range(k)
                    )
        s = f * a[l + 1] + eta * delta
        last = l == num_layers - 1
        if spec.activation_norm and not last:
            for j in range(sizes[l + 1]):
                for c in range(k):
                    col = s[:, j, c]
                    s[:, j, c] = (col - col.mean()) / np.sqrt(col.var() + spec.norm_epsilon) * g["norm_scale"][
                        c
                    ] + g["norm_shift"][c]
        a[l + 1] = act(spec.output_activation if last else spec.forward_activation, s)

    # feedback
    z = a[-1][:, :, 0].copy()
    onehot = np.zeros_like(z)
    onehot[np.arange(batch), y] = 1.0
    if spec.feedback == "target":
        signal = 2 * onehot - 1
    elif spec.feedback == "error_mse":
        signal = z - onehot
    else:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        signal = e / e.sum(axis=1, keepdims=True) - onehot
    a[-1][:, :, min(1, k - 1)] = signal
    if k > 2:
        a[-1][:, :, 2:] = 0.0

    for l in range(num_layers - 1, 0, -1):  # backward
        delta = np.zeros((batch, sizes[l], k))
        for b in range(batch):
            for i in range(sizes[l]):
                for c in range(k):
                    delta[b, i, c] = sum(
                        a[l + 1][b, j, d] * mu[d, c] * Vp[l][j, i, c] for j in range(sizes[l + 1]) for d in range(k)
                    )
        if spec.backward_update == "additive":
            a[l] = act(spec.backward_activation, f * a[l] + eta * delta)
        elif spec.backward_update == "multiplicative":
            a[l] = act(spec.backward_activation, f * a[l] * delta)
        elif spec.backward_update == "multiplicative_second_state":
            new = a[l] * delta
            new[:, :, 0] = a[l][:, :, 0]
            a[l] = act(spec.backward_activation, f * new)
        else:  # multiplicative_skip_first_state
            new = a[l].copy()
            new[:, :, 1:] = act(spec.backward_activation, f * a[l][:, :, 1:] * delta[:, :, 1:])
            a[l] = new

    def update(block, hebb):
        if spec.oja:
            for j in range(block.shape[1]):
                for o in range(k):
                    hebb[:, j, o] -= np.sign(eta_t) * abs(g["oja"]) * block[:, j, o] * np.sum(block[:, j, o] ** 2)
        if spec.saturation:
            d = (f_t - 1) * block + eta_t * hebb
            d = d * np.exp(-np.abs(block) * (spec.saturation_epsilon + abs(g["saturation"])))
            new = block + d
        else:
            new = f_t * block + eta_t * hebb
        if spec.synapse_normalization == "stored":
            new = norm_cols(new)
        if spec.symmetric_states:
            for o in range(k):
                new[:, :, o] = new[:, :, 0]
        return new

    scale = 1.0 / batch if spec.batch_reduction == "mean" else 1.0
    W_new, V_new = [], []
    for l in range(num_layers):  # Hebbian
        ab = with_bias(a[l])
        hf = np.zeros((sizes[l] + 1, sizes[l + 1], k))
        for i in range(sizes[l] + 1):
            for j in range(sizes[l + 1]):
                for o in range(k):
                    hf[i, j, o] = scale * sum(
                        sum(ab[b, i, e] * nu_t[e, o] for e in range(k))
                        * sum(mu_t[o, d] * a[l + 1][b, j, d] for d in range(k))
                        for b in range(batch)
                    )
        w = update(W[l].copy(), hf)
        if spec.symmetric_in_out:
            v = np.transpose(w[:-1], (1, 0, 2)).copy()
        else:
            hb = np.zeros((sizes[l + 1], sizes[l], k))
            for j in range(sizes[l + 1]):
                for i in range(sizes[l]):
                    for o in range(k):
                        hb[j, i, o] = scale * sum(
                            sum(a[l + 1][b, j, e] * nu_t[e, o] for e in range(k))
                            * sum(mu_t[o, d] * a[l][b, i, d] for d in range(k))
                            for b in range(batch)
                        )
            v = update(V[l].copy(), hb)
        W_new.append(w)
        V_new.append(v)
    return W_new, V_new, a
