"""PyTorch interop: train torch networks with a genome, on any torch device, matching the JAX engine.

The only module of :mod:`genome` that imports torch (``import genome`` does not import it). It mirrors
:mod:`genome.network` operation for operation, in the same state-axis-first layout:

* neurons ``[k, B, n_l]``; forward blocks ``forward[l]``: ``[k, n_l + 1, n_{l+1}]`` (last row = bias);
  backward blocks ``backward[l]``: ``[k, n_{l+1}, n_l]``;
* a :class:`TorchGenome` has the fields of :class:`genome.Genome`, as tensors.

Typical use::

    spec, genome = load_genome("runs/x/best.genome", device="cuda")
    mlp = MultiStateMLP.from_linear(spec, genome, [torch.nn.Linear(784, 100), torch.nn.Linear(100, 10)])
    for x, y in batches:
        mlp.step(x, y)              # one BLUR step: forward, feedback, backward, Hebbian update
    logits = mlp.predict(x_test)    # state 0 of the last layer
    layers = mlp.to_linear()        # state-0 forward blocks as nn.Linear layers

Exchange with JAX goes through DLPack: :func:`tensor_from_jax` / :func:`jax_from_tensor` share memory
when both sides live on the same device (checked on CPU by the tests; a device change copies). JAX arrays are
immutable, so :meth:`MultiStateMLP.step` never writes into a synapse tensor: it computes new blocks and
replaces the entries of ``forward`` / ``backward`` (the lists are updated in place). Tensors shared with JAX
therefore stay valid, and ``to_jax_synapses()`` is a zero-copy snapshot that later steps do not change.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from genome import io as genome_io
from genome.network import Synapses
from genome.params import Genome
from genome.spec import NetworkSpec

__all__ = [
    "MultiStateMLP",
    "TorchGenome",
    "genome_to_torch",
    "jax_from_tensor",
    "load_genome",
    "tensor_from_jax",
]

Device = torch.device | str | None


class TorchGenome(NamedTuple):
    """:class:`genome.Genome` with torch tensors (same fields, shapes and meaning)."""

    forward_transform: torch.Tensor  # ν [k, k]
    backward_transform: torch.Tensor  # µ [k, k]
    pre_transform: torch.Tensor  # ν̃ [k, k]
    post_transform: torch.Tensor  # µ̃ [k, k]
    neuron_keep: torch.Tensor  # f []
    neuron_update: torch.Tensor  # η []
    synapse_keep: torch.Tensor  # f̃ []
    synapse_update: torch.Tensor  # η̃ []
    norm_scale: torch.Tensor  # [k]
    norm_shift: torch.Tensor  # [k]
    oja: torch.Tensor  # []
    saturation: torch.Tensor  # []
    forward_pre_transform: torch.Tensor  # [k, k]
    forward_post_transform: torch.Tensor  # [k, k]
    forward_synapse_keep: torch.Tensor  # []
    forward_synapse_update: torch.Tensor  # []

    def to(self, device: Device = None, dtype: torch.dtype | None = None) -> "TorchGenome":
        return TorchGenome(*(t.to(device=device, dtype=dtype) for t in self))


# ---------------------------------------------------------------------------------------------- conversions


def genome_to_torch(genome: Genome | TorchGenome, device: Device = None, dtype: torch.dtype = torch.float32
                    ) -> TorchGenome:
    """A :class:`TorchGenome` from a JAX (or NumPy, or torch) genome; values are copied to ``device``."""
    fields = {}
    for name, value in genome._asdict().items():
        if isinstance(value, torch.Tensor):
            fields[name] = value.detach().to(device=device, dtype=dtype)
        else:
            fields[name] = torch.as_tensor(np.array(value), dtype=dtype, device=device)  # writable copy
    return TorchGenome(**fields)


def load_genome(path: str | os.PathLike, device: Device = None, dtype: torch.dtype = torch.float32
                ) -> tuple[NetworkSpec, TorchGenome]:
    """Read a genome file written by :func:`genome.save` into torch tensors.

    Reading goes through :func:`genome.load`, so a missing, truncated or foreign file raises the same one-line
    :class:`genome.GenomeFileError`. The file's free-form metadata is available from :func:`genome.load`.
    """
    spec, genome, _ = genome_io.load(path)
    return spec, genome_to_torch(genome, device, dtype)


def tensor_from_jax(array: jax.Array, device: Device = None) -> torch.Tensor:
    """A torch tensor viewing ``array`` through DLPack (no copy); moved (copied) only if ``device`` differs.

    The result shares memory with the JAX array: do not write into it (JAX assumes its arrays never change).
    """
    tensor = torch.from_dlpack(array)
    return tensor if device is None else tensor.to(device)


def jax_from_tensor(tensor: torch.Tensor) -> jax.Array:
    """A JAX array viewing ``tensor`` through DLPack, on the matching JAX device (no copy where JAX can alias
    the buffer; on CPU it does for contiguous tensors). Do not write into ``tensor`` while the array is used."""
    return jnp.from_dlpack(tensor.detach().contiguous())


# ---------------------------------------------------------------------------------------------- activations


def _sigmoid_grad(s: torch.Tensor) -> torch.Tensor:
    sig = torch.sigmoid(s)
    return sig * (1.0 - sig)


_ELEMENTWISE = {
    "identity": lambda s: s,
    "relu": torch.relu,
    "leaky_relu": lambda s: F.leaky_relu(s, 0.01),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "relu_tanh": lambda s: torch.relu(torch.tanh(s)),
}


def activate(name: str, s: torch.Tensor) -> torch.Tensor:
    """Activation ``name`` on states ``s`` ``[k, ...]``; the torch twin of :func:`genome.activate`."""
    if name in _ELEMENTWISE:
        return _ELEMENTWISE[name](s)
    if name == "sigmoid_backprop":  # (σ(s0), σ'(s1), s2, ...)
        parts = [torch.sigmoid(s[:1]), _sigmoid_grad(s[1:2]), s[2:]]
    elif name == "linear_backprop":  # (s0, 1, s2, ...)
        parts = [s[:1], torch.ones_like(s[1:2]), s[2:]]
    else:
        raise ValueError(f"unknown activation {name!r}")
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------------------------- passes


def _with_bias(a: torch.Tensor) -> torch.Tensor:
    """``ā``: append a bias unit equal to 1 in every state. ``[k, B, n] -> [k, B, n + 1]``."""
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def _column_normalize(block: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``W / sqrt(Σ_i W[i, j, o]² + ε)`` over the source axis 1."""
    return block * torch.rsqrt(torch.sum(block * block, dim=1, keepdim=True) + epsilon)


def _tie_states(block: torch.Tensor) -> torch.Tensor:
    return block[:1].expand_as(block).contiguous()


def _tied_backward(forward_block: torch.Tensor) -> torch.Tensor:
    """Backward block equal to the transposed forward block without its bias row."""
    return forward_block[:, :-1, :].transpose(1, 2).contiguous()


def _mix(a: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """``Σ_d a[d, ...] T[d, c]`` -> ``[c, ...]``: apply a k×k state transform to a state-first tensor."""
    return torch.einsum("d...,dc->c...", a, transform)


class MultiStateMLP:
    """A BLUR multi-state network whose synapses are torch tensors (DESIGN §2), for every spec variant.

    Attributes:
      spec: the :class:`genome.NetworkSpec`.
      genome: the :class:`TorchGenome`, on the synapses' device and dtype.
      forward: forward blocks ``[k, n_l + 1, n_{l+1}]`` per layer (last row = bias).
      backward: backward blocks ``[k, n_{l+1}, n_l]`` per layer.

    Build one with :meth:`init` (fresh random synapses), :meth:`from_linear` (tied synapses from
    ``nn.Linear`` layers), :meth:`from_jax_synapses` or the constructor (tensors in the layout above).
    """

    def __init__(self, spec: NetworkSpec, genome: TorchGenome | Genome, forward: Sequence[torch.Tensor],
                 backward: Sequence[torch.Tensor]):
        if len(forward) != spec.num_layers or len(backward) != spec.num_layers:
            raise ValueError(f"expected {spec.num_layers} forward and backward blocks, "
                             f"got {len(forward)} and {len(backward)}")
        k = spec.num_states
        for layer, (w, v) in enumerate(zip(forward, backward)):
            n_in, n_out = spec.layer_sizes[layer], spec.layer_sizes[layer + 1]
            if tuple(w.shape) != (k, n_in + 1, n_out) or tuple(v.shape) != (k, n_out, n_in):
                raise ValueError(f"layer {layer}: blocks must have shapes {(k, n_in + 1, n_out)} and "
                                 f"{(k, n_out, n_in)}, got {tuple(w.shape)} and {tuple(v.shape)}")
        first = forward[0]
        self.spec = spec
        self.forward = [w.detach().to(device=first.device, dtype=first.dtype) for w in forward]
        self.backward = [v.detach().to(device=first.device, dtype=first.dtype) for v in backward]
        self.genome = genome_to_torch(genome, first.device, first.dtype)
        self.step_index = 0  # inner steps taken (``spec.supervised_every`` reads it)
        self.neurons: list[torch.Tensor] = []  # the carried neuron states (``spec.zero_out_neurons = False``)

    # ------------------------------------------------------------------------------------------ builders

    @classmethod
    def init(cls, spec: NetworkSpec, genome: TorchGenome | Genome, seed: int | torch.Generator = 0,
             device: Device = None, dtype: torch.dtype = torch.float32) -> "MultiStateMLP":
        """Fresh synapses ~ N(0, spec.synapse_init_std²), honouring the symmetric flags.

        Same distribution as :func:`genome.init_synapses`, not the same numbers (torch's generator); for
        identical starts build the JAX synapses and use :meth:`from_jax_synapses`.
        """
        generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
        k, std = spec.num_states, spec.synapse_init_std
        forward, backward = [], []
        for n_in, n_out in zip(spec.layer_sizes[:-1], spec.layer_sizes[1:]):
            w = std * torch.randn((k, n_in + 1, n_out), generator=generator, dtype=dtype)
            v = std * torch.randn((k, n_out, n_in), generator=generator, dtype=dtype)
            if spec.symmetric_states:
                w, v = _tie_states(w), _tie_states(v)
            if spec.symmetric_in_out:
                v = _tied_backward(w)
            forward.append(w.to(device))
            backward.append(v.to(device))
        return cls(spec, genome, forward, backward)

    @classmethod
    def from_linear(cls, spec: NetworkSpec, genome: TorchGenome | Genome, layers: Sequence[torch.nn.Linear],
                    device: Device = None, dtype: torch.dtype | None = None) -> "MultiStateMLP":
        """Tied synapses from ``nn.Linear`` layers, as :func:`genome.synapses_from_weights` does.

        ``nn.Linear`` keeps ``weight [out, in]`` and ``bias [out]``; the forward block of every state is
        ``[weight.T; bias]`` (``[in + 1, out]``, last row = bias; a missing bias is 0) and the backward block
        is ``weight`` itself (the transposed forward block without the bias row). Values are copied.
        """
        if len(layers) != spec.num_layers:
            raise ValueError(f"expected {spec.num_layers} nn.Linear layers, got {len(layers)}")
        forward, backward = [], []
        for layer, linear in enumerate(layers):
            n_in, n_out = spec.layer_sizes[layer], spec.layer_sizes[layer + 1]
            if (linear.in_features, linear.out_features) != (n_in, n_out):
                raise ValueError(f"layers[{layer}] maps {linear.in_features} -> {linear.out_features}, "
                                 f"the spec needs {n_in} -> {n_out}")
            weight = linear.weight.detach()
            bias = linear.bias.detach() if linear.bias is not None else weight.new_zeros(n_out)
            block = torch.cat([weight.T, bias[None, :]], dim=0).to(device=device, dtype=dtype)
            w = block[None].expand(spec.num_states, -1, -1).contiguous()
            forward.append(w)
            backward.append(_tied_backward(w))
        return cls(spec, genome, forward, backward)

    @classmethod
    def from_jax_synapses(cls, spec: NetworkSpec, genome: TorchGenome | Genome, synapses: Synapses,
                          device: Device = None) -> "MultiStateMLP":
        """Wrap JAX :class:`genome.Synapses` through DLPack: zero-copy on the same device (step never writes
        into the tensors, so the JAX arrays stay intact); copied to ``device`` if that differs."""
        forward = [tensor_from_jax(w, device) for w in synapses.forward]
        backward = [tensor_from_jax(v, device) for v in synapses.backward]
        mlp = cls(spec, genome, forward, backward)
        mlp.neurons = [tensor_from_jax(a, device) for a in synapses.neurons]
        return mlp

    # ------------------------------------------------------------------------------------------ exports

    def to_jax_synapses(self) -> Synapses:
        """The current synapses as JAX :class:`genome.Synapses` through DLPack (zero-copy on a shared
        device; a snapshot, since later steps replace rather than overwrite the tensors)."""
        return Synapses(tuple(jax_from_tensor(w) for w in self.forward),
                        tuple(jax_from_tensor(v) for v in self.backward),
                        tuple(jax_from_tensor(a) for a in self.neurons))

    def to_linear(self, layers: Sequence[torch.nn.Linear] | None = None) -> list[torch.nn.Linear]:
        """State-0 forward blocks as ``nn.Linear`` layers (``weight = W[0, :-1].T``, ``bias = W[0, -1]``), as
        :func:`genome.weights_from_synapses` does. With ``layers``, their parameters are overwritten in place
        (and they are returned); otherwise new layers on the synapses' device and dtype are made."""
        if layers is None:
            layers = [torch.nn.Linear(n_in, n_out, device=self.device, dtype=self.dtype)
                      for n_in, n_out in zip(self.spec.layer_sizes[:-1], self.spec.layer_sizes[1:])]
        if len(layers) != self.spec.num_layers:
            raise ValueError(f"expected {self.spec.num_layers} nn.Linear layers, got {len(layers)}")
        with torch.no_grad():
            for linear, w in zip(layers, self.forward):
                linear.weight.copy_(w[0, :-1].T)
                if linear.bias is not None:
                    linear.bias.copy_(w[0, -1])
        return list(layers)

    @property
    def device(self) -> torch.device:
        return self.forward[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.forward[0].dtype

    def to(self, device: Device = None, dtype: torch.dtype | None = None) -> "MultiStateMLP":
        """Move (or cast) synapses and genome; returns ``self``."""
        self.forward = [w.to(device=device, dtype=dtype) for w in self.forward]
        self.backward = [v.to(device=device, dtype=dtype) for v in self.backward]
        self.genome = self.genome.to(device, dtype)
        return self

    # ------------------------------------------------------------------------------------------ learning

    def _as_tensor(self, value: Any) -> torch.Tensor:
        """A torch tensor on the synapses' device from a tensor, a JAX array (DLPack) or an array-like."""
        if isinstance(value, jax.Array):
            value = torch.from_dlpack(value)
        elif not isinstance(value, torch.Tensor):
            array = np.asarray(value)
            value = torch.as_tensor(array if array.flags.writeable else array.copy())
        return value.to(self.device)

    def _inputs(self, x: Any) -> torch.Tensor:
        x = self._as_tensor(x).to(self.dtype)
        return x.reshape(x.shape[0], -1)

    def _pass_blocks(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.spec.synapse_normalization == "activations":
            return [_column_normalize(b, self.spec.synapse_normalization_epsilon) for b in blocks]
        return blocks

    def _normalize_at_start(self) -> None:
        if self.spec.synapse_normalization == "start":
            eps = self.spec.synapse_normalization_epsilon
            self.forward[:] = [_column_normalize(w, eps) for w in self.forward]
            self.backward[:] = [_column_normalize(v, eps) for v in self.backward]

    def _layer(self, layer: int) -> TorchGenome:
        """The genome of layer pair ``layer`` (its slice under ``spec.per_layer_genome``)."""
        if not self.spec.per_layer_genome:
            return self.genome
        return TorchGenome(*(t[layer] for t in self.genome))

    def _normalize_activation(self, s: torch.Tensor, g: TorchGenome) -> torch.Tensor:
        mean = torch.mean(s, dim=1, keepdim=True)
        var = torch.var(s, dim=1, keepdim=True, unbiased=False)
        normalized = (s - mean) * torch.rsqrt(var + self.spec.norm_epsilon)
        return g.norm_scale[:, None, None] * normalized + g.norm_shift[:, None, None]

    def _forward_states(self, x: torch.Tensor, carried: bool = False) -> list[torch.Tensor]:
        """DESIGN §2 step 1, from all-zero neurons (or, with ``carried``, from the neurons of the previous step
        when ``spec.zero_out_neurons`` is false); the input goes to state 0 of layer 0."""
        spec = self.spec
        a = x.new_zeros((spec.num_states,) + tuple(x.shape))
        a[0] = x
        states = [a]
        for layer, w in enumerate(self._pass_blocks(self.forward)):
            g = self._layer(layer)
            delta = torch.bmm(_mix(_with_bias(states[-1]), g.forward_transform), w)  # Σ_i Σ_d ā ν W
            s = g.neuron_update * delta  # f·a^{l+1} = 0 when neurons start the step at 0
            if carried and self.neurons and not spec.zero_out_neurons:
                s = g.neuron_keep * self.neurons[layer + 1] + s
            is_output = layer == spec.num_layers - 1
            if spec.activation_norm and not is_output:
                s = self._normalize_activation(s, g)
            states.append(activate(spec.output_activation if is_output else spec.forward_activation, s))
        return states

    def _feedback(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """DESIGN §2 step 2: the label signal goes into state 1 (state 0 when k = 1), states >= 2 are 0."""
        spec = self.spec
        onehot = F.one_hot(labels, spec.num_outputs).to(output.dtype)
        z = output[0]
        if spec.feedback == "target":
            signal = 2.0 * onehot - 1.0
        elif spec.feedback == "error_mse":
            signal = z - onehot
        else:  # error_cross_entropy
            signal = torch.softmax(z, dim=-1) - onehot
        output = output.clone()
        output[min(1, spec.num_states - 1)] = signal
        output[2:] = 0.0
        return output

    def _backward_states(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """DESIGN §2 step 3, l = L-1 .. 1; layer 0 never changes."""
        spec = self.spec
        states = list(states)
        blocks = self._pass_blocks(self.backward)
        act_b = spec.backward_activation
        for layer in range(spec.num_layers - 1, 0, -1):
            g = self._layer(layer)
            f, eta = g.neuron_keep, g.neuron_update
            delta = torch.bmm(_mix(states[layer + 1], g.backward_transform), blocks[layer])  # Σ_j Σ_d a µ V
            a = states[layer]
            if spec.backward_update == "additive":
                a = activate(act_b, f * a + eta * delta)
            elif spec.backward_update == "multiplicative":
                a = activate(act_b, f * a * delta)
            elif spec.backward_update == "multiplicative_second_state":  # published: act_b(f·[a0, a·Δ])
                a = activate(act_b, f * torch.cat([a[:1], a[1:] * delta[1:]], dim=0))
            elif spec.num_states > 1:  # multiplicative_skip_first_state: state 0 kept
                a = torch.cat([a[:1], activate(act_b, f * a[1:] * delta[1:])], dim=0)
            states[layer] = a
        return states

    def _update_block(self, g: TorchGenome, genes: tuple, block: torch.Tensor, hebb: torch.Tensor,
                      post: torch.Tensor, scale: float) -> torch.Tensor:
        """DESIGN §2 step 4 for one block (source axis 1): Oja, saturation, normalization, state tie.
        ``g``: the layer's genome; ``genes``: (ν̃, µ̃, f̃, η̃) of the update; ``post``: the destination's mixed
        states ``[o, b, j]``."""
        spec = self.spec
        _, _, keep, update = genes
        if spec.oja:  # -sign(η̃)·extra·[|m|]·W·S
            if spec.oja_variant == "synapse_weights":
                strength = torch.sum(block * block, dim=1, keepdim=True)
            else:
                strength = scale * torch.sum(post * post, dim=1, keepdim=True)
            factor = spec.oja_extra_multiplier * (torch.abs(g.oja) if spec.oja_use_multiplier else 1.0)
            hebb = hebb - torch.sign(update) * factor * block * strength
        if spec.saturation:
            d_block = (keep - 1.0) * block + update * hebb
            d_block = d_block * torch.exp(-torch.abs(block) * (spec.saturation_epsilon + torch.abs(g.saturation)))
            block = block + d_block
        else:
            block = keep * block + update * hebb
        if spec.synapse_normalization == "stored":
            block = _column_normalize(block, spec.synapse_normalization_epsilon)
        if spec.symmetric_states:
            block = _tie_states(block)
        return block

    def _hebbian_update(self, states: list[torch.Tensor], pre_states: list[torch.Tensor] | None = None,
                        forward_pass: bool = False) -> None:
        spec = self.spec
        pre_states = states if pre_states is None else pre_states
        scale = 1.0 / states[0].shape[1] if spec.batch_reduction == "mean" else 1.0
        forward, backward = [], []
        for layer in range(spec.num_layers):
            g = self._layer(layer)
            genes = ((g.forward_pre_transform, g.forward_post_transform, g.forward_synapse_keep,
                      g.forward_synapse_update) if forward_pass
                     else (g.pre_transform, g.post_transform, g.synapse_keep, g.synapse_update))
            nu_t, mu_t = genes[0], genes[1]
            a_in, a_out = pre_states[layer], states[layer + 1]
            pre = _mix(_with_bias(a_in), nu_t)  # Σ_e ā^l[b,i,e] ν̃[e,o]
            post = torch.einsum("od,dbj->obj", mu_t, a_out)  # Σ_d µ̃[o,d] a^{l+1}[b,j,d]
            w = self._update_block(g, genes, self.forward[layer], scale * torch.bmm(pre.transpose(1, 2), post), post,
                                   scale)
            if spec.symmetric_in_out:
                v = _tied_backward(w)
            else:
                pre_b = _mix(a_out, nu_t)
                post_b = torch.einsum("od,dbi->obi", mu_t, a_in)
                v = self._update_block(g, genes, self.backward[layer], scale * torch.bmm(pre_b.transpose(1, 2), post_b),
                                       post_b, scale)
            forward.append(w)
            backward.append(v)
        self.forward[:], self.backward[:] = forward, backward

    @torch.no_grad()
    def step(self, x: Any, y: Any, t: int | None = None) -> None:
        """One inner learning step on a batch: forward, feedback, backward, Hebbian update (DESIGN §2).

        ``x``: ``[B, n_in]`` (or ``[B, ...]``, flattened), ``y``: ``[B]`` integer labels; tensors or arrays,
        moved to the synapses' device. ``t``: the inner step index for ``spec.supervised_every`` (default:
        the steps this network has taken). Updates ``forward`` / ``backward`` in place (new tensors in the
        lists).
        """
        spec = self.spec
        t = self.step_index if t is None else int(t)
        self.step_index += 1
        x = self._inputs(x)
        y = self._as_tensor(y).long()
        self._normalize_at_start()
        forward_states = self._forward_states(x, carried=True)
        if spec.forward_synapse_update:
            self._hebbian_update(forward_states, forward_pass=True)
        if t % spec.supervised_every:  # a forward-only step
            if not spec.zero_out_neurons:
                self.neurons = forward_states
            return
        states = list(forward_states)
        states[-1] = self._feedback(states[-1], y)
        pre = forward_states if spec.use_forward_activations_for_synapse_update else None
        states = self._backward_states(states)
        self._hebbian_update(states, pre)
        if not spec.zero_out_neurons:
            self.neurons = states

    @torch.no_grad()
    def predict(self, x: Any) -> torch.Tensor:
        """State 0 of the last layer after a forward pass: logits ``[B, n_out]`` (from normalized synapses
        under ``synapse_normalization: start``, as :func:`genome.predict`; the stored ones are not changed)."""
        if self.spec.synapse_normalization == "start":
            eps = self.spec.synapse_normalization_epsilon
            saved = self.forward
            self.forward = [_column_normalize(w, eps) for w in saved]
            try:
                return self._forward_states(self._inputs(x))[-1][0]
            finally:
                self.forward = saved
        return self._forward_states(self._inputs(x))[-1][0]
