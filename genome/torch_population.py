"""A population-vectorized PyTorch BLUR step: many networks, each with its own genome, in one set of batched
products — the PyTorch counterpart of the JAX engine's vmapped step, measured by ``blur bench``.

It covers the plain rule (elementwise activations; no symmetric flags, normalization, Oja or saturation:
:func:`check_torch_support`), writes into reusable buffers (:class:`Workspace`), and is checked against the
JAX engine by the benchmark's own tests. :mod:`genome.torch_interop` is the full-featured, one-network
PyTorch port (every variant, nn.Linear / DLPack conversions); this module trades coverage for throughput.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

import genome as G

__all__ = ["TorchGenomes", "Workspace", "check_torch_support", "torch_genomes", "torch_init_synapses", "torch_query_scores", "torch_step"]


class TorchGenomes(NamedTuple):
    """The genome fields the bench's PyTorch step uses, one row per network: matrices ``[N, k, k]``,
    scalars ``[N]``."""

    forward_transform: torch.Tensor
    backward_transform: torch.Tensor
    pre_transform: torch.Tensor
    post_transform: torch.Tensor
    neuron_keep: torch.Tensor
    neuron_update: torch.Tensor
    synapse_keep: torch.Tensor
    synapse_update: torch.Tensor

    def select(self, index: slice) -> "TorchGenomes":
        return TorchGenomes(*(t[index] for t in self))


_TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda s: s,
    "relu": torch.relu_,
    "leaky_relu": lambda s: torch.nn.functional.leaky_relu_(s, 0.01),
    "tanh": torch.tanh_,
    "sigmoid": torch.sigmoid_,
    "elu": torch.nn.functional.elu_,
    "relu_tanh": lambda s: torch.relu_(torch.tanh_(s)),
}


def check_torch_support(spec: G.NetworkSpec) -> None:
    """The bench's PyTorch step covers the plain rule: elementwise activations, no symmetric flags,
    normalization, Oja or saturation."""
    unsupported = [name for name in ("symmetric_in_out", "symmetric_states", "activation_norm", "oja", "saturation",
                                     "forward_synapse_update", "use_forward_activations_for_synapse_update",
                                     "per_layer_genome")
                   if getattr(spec, name)]
    unsupported += ["zero_out_neurons"] if not spec.zero_out_neurons else []
    if spec.supervised_every != 1:
        unsupported.append("supervised_every")
    unsupported += [name for name in ("forward_activation", "output_activation", "backward_activation")
                    if getattr(spec, name) not in _TORCH_ACTIVATIONS]
    if spec.synapse_normalization != "none":
        unsupported.append("synapse_normalization")
    if unsupported:
        raise ValueError(f"the bench's PyTorch step does not implement {', '.join(unsupported)}")


def torch_genomes(spec: G.NetworkSpec, vectors: jax.Array, repeats: int = 1) -> TorchGenomes:
    """Genome vectors ``[P, D]`` -> :class:`TorchGenomes` with each genome repeated ``repeats`` times
    (network ``p·repeats + r`` belongs to genome ``p``)."""
    genomes = jax.vmap(G.unravel, (None, 0))(spec, jnp.asarray(vectors, jnp.float32))
    fields = [np.array(getattr(genomes, name), np.float32) for name in TorchGenomes._fields]
    return TorchGenomes(*(torch.from_numpy(f).repeat_interleave(repeats, dim=0).contiguous() for f in fields))


class Workspace:
    """Output buffers reused from step to step, keyed by name and shape. A fresh tensor of more than
    glibc's mmap threshold (32 MiB at most) is a fresh ``mmap`` whose pages fault in on first touch, which
    on a small CPU costs several times the arithmetic that fills it (paper scale: 7 ms against 1 ms for a
    [64, 2, 128, 512] mix); a warm step with a workspace allocates nothing large."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def __call__(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        key = (name, tuple(shape))
        if key not in self._buffers:
            self._buffers[key] = torch.empty(key[1])
        return self._buffers[key]


def _mix(a: torch.Tensor, matrix: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``Σ_d a[:, d] · matrix[:, d, c]`` for networks ``a [N, k, ...]``, ``matrix [N, k, k]``, written into
    ``out [N, k, ...]``: k broadcast multiply-adds (k is tiny)."""
    n, k = matrix.shape[:2]
    column = (n, k) + (1,) * (a.dim() - 2)
    torch.mul(matrix[:, 0].reshape(column), a[:, :1], out=out)
    for d in range(1, k):
        out.addcmul_(matrix[:, d].reshape(column), a[:, d : d + 1])
    return out


def _mix_with_bias(a: torch.Tensor, matrix: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``Σ_d ā[:, d] · matrix[:, d, c]``: the mix with the bias unit appended as the last neuron, written into
    ``out [N, k, B, n + 1]``. The bias unit is 1 in every state, so its mix is ``Σ_d matrix[:, d, c]``."""
    n = a.shape[-1]
    _mix(a, matrix, out=out[..., :n])
    out[..., n] = matrix.sum(dim=1)[:, :, None]
    return out


def _forward(spec: G.NetworkSpec, g: TorchGenomes, forward: Sequence[torch.Tensor], x: torch.Tensor,
             ws: Workspace) -> list[torch.Tensor]:
    """Forward pass of N networks from all-zero neurons; ``x [K, B, n_in]`` is shared by the ``N / K`` genomes
    (network ``p·K + t`` sees task ``t``). Returns the neuron states ``[N, k, B, n_l]`` of every layer."""
    num_networks, k = g.forward_transform.shape[:2]
    num_tasks, batch, n_in = x.shape
    a = ws("input", (num_networks, k, batch, n_in)).zero_()
    a.view(num_networks // num_tasks, num_tasks, k, batch, n_in)[:, :, 0] = x
    states = [a]
    for layer, w in enumerate(forward):
        n, n_out = states[-1].shape[-1], w.shape[-1]
        mixed = _mix_with_bias(states[-1], g.forward_transform, ws("mixed", (num_networks, k, batch, n + 1)))
        delta = ws(f"forward{layer}", (num_networks, k, batch, n_out))  # Σ_i Σ_d ā[b,i,d] ν[d,c] W[i,j,c]
        torch.bmm(mixed.view(num_networks * k, batch, n + 1), w.view(num_networks * k, n + 1, n_out),
                  out=delta.view(num_networks * k, batch, n_out))
        s = delta.mul_(g.neuron_update.view(-1, 1, 1, 1))
        is_output = layer == spec.num_layers - 1
        states.append(_TORCH_ACTIVATIONS[spec.output_activation if is_output else spec.forward_activation](s))
    return states


def _feedback(spec: G.NetworkSpec, output: torch.Tensor, y: torch.Tensor) -> None:
    """Write the label signal into the last layer in place (DESIGN §2 step 2); ``y [K, B]``."""
    num_networks, k, batch, n_out = output.shape
    onehot = torch.nn.functional.one_hot(y.long(), n_out).to(output.dtype)  # [K, B, n_out]
    grouped = output.view(num_networks // y.shape[0], y.shape[0], k, batch, n_out)
    if spec.feedback == "target":
        signal = 2.0 * onehot - 1.0
    elif spec.feedback == "error_mse":
        signal = grouped[:, :, 0] - onehot
    else:  # error_cross_entropy
        signal = torch.softmax(grouped[:, :, 0], dim=-1) - onehot
    grouped[:, :, min(1, k - 1)] = signal
    grouped[:, :, 2:] = 0.0


def _backward(spec: G.NetworkSpec, g: TorchGenomes, backward: Sequence[torch.Tensor], states: list[torch.Tensor],
              ws: Workspace) -> None:
    """Backward pass l = L-1 .. 1, replacing ``states[l]`` (DESIGN §2 step 3)."""
    num_networks, k = g.backward_transform.shape[:2]
    f, eta = g.neuron_keep.view(-1, 1, 1, 1), g.neuron_update.view(-1, 1, 1, 1)
    act_b = _TORCH_ACTIVATIONS[spec.backward_activation]
    for layer in range(spec.num_layers - 1, 0, -1):
        a_out, a = states[layer + 1], states[layer]
        batch, n_out, n = a_out.shape[2], a_out.shape[3], a.shape[3]
        mixed = _mix(a_out, g.backward_transform, ws("mixed", a_out.shape))  # Σ_d a^{l+1}[b,j,d] µ[d,c]
        delta = ws(f"backward{layer}", a.shape)  # Σ_j Σ_d a^{l+1}[b,j,d] µ[d,c] V[j,i,c]
        torch.bmm(mixed.view(num_networks * k, batch, n_out), backward[layer].view(num_networks * k, n_out, n),
                  out=delta.view(num_networks * k, batch, n))
        if spec.backward_update == "additive":
            states[layer] = act_b(delta.mul_(eta).addcmul_(a, f))
        elif spec.backward_update == "multiplicative":
            states[layer] = act_b(delta.mul_(a).mul_(f))
        elif spec.backward_update == "multiplicative_second_state":  # published: act_b(f·[a0, a·Δ])
            delta[:, 1:].mul_(a[:, 1:])
            delta[:, :1].copy_(a[:, :1])
            states[layer] = act_b(delta.mul_(f))
        else:  # multiplicative_skip_first_state: state 0 kept
            states[layer] = torch.cat([a[:, :1], act_b(delta[:, 1:].mul_(a[:, 1:]).mul_(f))], dim=1)


def _hebbian_update(spec: G.NetworkSpec, g: TorchGenomes, forward: Sequence[torch.Tensor],
                    backward: Sequence[torch.Tensor], states: list[torch.Tensor], ws: Workspace,
                    update_input_backward: bool) -> None:
    """``W ← f̃·W + η̃·H`` for every block, in place (DESIGN §2 step 4). ``η̃`` (and the batch scale) multiply
    the small post-synaptic operand, so each block is one ``mul_`` and one ``baddbmm_``. Without
    ``update_input_backward`` the backward block of layer 0 is left alone (see :func:`torch_step`)."""
    num_networks, k = g.pre_transform.shape[:2]
    batch = states[0].shape[2]
    scale = 1.0 / batch if spec.batch_reduction == "mean" else 1.0
    keep = g.synapse_keep.view(-1, 1, 1, 1)
    rate = (g.synapse_update * scale).view(-1, 1, 1, 1)
    post_transform = g.post_transform.transpose(1, 2)  # Σ_d µ̃[o, d] a[d] = mix with µ̃ᵀ
    nk = num_networks * k
    for layer in range(spec.num_layers):
        a_in, a_out = states[layer], states[layer + 1]
        n_in, n_out = a_in.shape[3], a_out.shape[3]
        pre = _mix_with_bias(a_in, g.pre_transform, ws("pre", (num_networks, k, batch, n_in + 1)))  # ā^l ν̃
        post = _mix(a_out, post_transform, ws("post", a_out.shape)).mul_(rate)  # η̃ · Σ_d µ̃[o,d] a^{l+1}[d]
        w = forward[layer].mul_(keep)
        w.view(nk, n_in + 1, n_out).baddbmm_(pre.view(nk, batch, n_in + 1).transpose(1, 2),
                                             post.view(nk, batch, n_out))
        if layer == 0 and not update_input_backward:
            continue
        pre_b = _mix(a_out, g.pre_transform, ws("pre_b", a_out.shape))
        post_b = _mix(a_in, post_transform, ws("post_b", a_in.shape)).mul_(rate)
        v = backward[layer].mul_(keep)
        v.view(nk, n_out, n_in).baddbmm_(pre_b.view(nk, batch, n_out).transpose(1, 2), post_b.view(nk, batch, n_in))


@torch.no_grad()
def torch_step(spec: G.NetworkSpec, g: TorchGenomes, forward: list[torch.Tensor], backward: list[torch.Tensor],
               x: torch.Tensor, y: torch.Tensor, workspace: Workspace | None = None,
               update_input_backward: bool = True) -> None:
    """One BLUR inner step of N networks at once, updating the synapse tensors in place.

    Layout as in :mod:`genome.network` with a leading network axis: ``forward[l] [N, k, n_l + 1, n_{l+1}]``,
    ``backward[l] [N, k, n_{l+1}, n_l]``; ``x [K, B, n_in]`` and ``y [K, B]`` are the batches of K tasks,
    network ``p·K + t`` (genome p) trains on task t. With N = K = 1 this is one network. Pass the same
    ``workspace`` to every step to reuse its buffers.

    ``update_input_backward=False`` skips the update of ``backward[0]``: no pass reads that block (the
    backward pass stops at layer 1), so an episode's neuron states and query scores do not depend on it.
    XLA removes the same dead update from the engine's compiled scan; the timed PyTorch runs skip it too.
    """
    ws = workspace if workspace is not None else Workspace()
    states = _forward(spec, g, forward, x, ws)
    _feedback(spec, states[-1], y)
    _backward(spec, g, backward, states, ws)
    _hebbian_update(spec, g, forward, backward, states, ws, update_input_backward)


def torch_init_synapses(spec: G.NetworkSpec, num_networks: int, generator: torch.Generator
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fresh synapses ~ N(0, spec.synapse_init_std²) for N networks (the torch side's episode start). Drawn
    network by network, so N networks at once get the same values as N one-network calls in a row."""
    k, std = spec.num_states, spec.synapse_init_std
    shapes = [((k, n_in + 1, n_out), (k, n_out, n_in)) for n_in, n_out in zip(spec.layer_sizes[:-1],
                                                                             spec.layer_sizes[1:])]
    forward = [torch.empty((num_networks,) + f) for f, _ in shapes]
    backward = [torch.empty((num_networks,) + b) for _, b in shapes]
    for network in range(num_networks):
        for w, v in zip(forward, backward):
            w[network].normal_(generator=generator)
            v[network].normal_(generator=generator)
    for block in forward + backward:
        block.mul_(std)
    return forward, backward


@torch.no_grad()
def torch_query_scores(spec: G.NetworkSpec, g: TorchGenomes, forward: Sequence[torch.Tensor], x: torch.Tensor,
                       y: torch.Tensor, workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query accuracy and cross-entropy of state 0 of the last layer, ``[N]`` each."""
    logits = _forward(spec, g, forward, x, workspace if workspace is not None else Workspace())[-1][:, 0]
    labels = y.long().repeat(logits.shape[0] // y.shape[0], 1)  # [N, Q]
    cross_entropy = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
    accuracy = (logits.argmax(-1) == labels).float().mean(1)
    return accuracy, cross_entropy
