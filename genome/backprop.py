"""Plain backprop as an exact special case of the multi-state network (DESIGN §2).

With k = 2, ν = [[1, 1], [0, 0]], µ = I, ν̃ = I, µ̃ = [[0, 1], [1, 0]], f = η = f̃ = 1, η̃ = -lr, hidden
activation (σ(s₀), σ'(s₁)), linear output (s₀, 1), identity backward activation, the
``multiplicative_second_state`` backward update, both symmetric flags, tied synapses and feedback writing
∂L/∂z_out into state 1, one step is one SGD step of the plain MLP on the mean loss over the batch:

* forward: state 0 carries σ(z), state 1 carries σ'(z) of the same pre-activation z;
* backward: state 1 becomes σ'(z)·Σ_j δ_j W[i, j] = δ_i while state 0 is kept;
* Hebbian: H[0] = Σ_b ā[b, i]·δ[b, j] = ∂L/∂W (``batch_reduction="mean"`` divides by B).
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from genome.network import Synapses, _tied_backward
from genome.params import Genome, neutral_genome
from genome.spec import NetworkSpec


def backprop_genome(
    layer_sizes: Sequence[int],
    learning_rate: float,
    loss: Literal["mse", "cross_entropy"] = "mse",
    dtype=jnp.float32,
) -> tuple[NetworkSpec, Genome]:
    """(spec, genome) whose step equals SGD with ``learning_rate`` on the mean ``loss`` over the batch.

    The MLP has sigmoid hidden layers and a linear output; ``mse`` is ½‖z - onehot(y)‖² per example,
    ``cross_entropy`` is softmax cross-entropy.
    """
    if loss not in ("mse", "cross_entropy"):
        raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {loss!r}")
    spec = NetworkSpec(
        layer_sizes=tuple(layer_sizes),
        num_states=2,
        forward_activation="sigmoid_backprop",
        output_activation="linear_backprop",
        backward_activation="identity",
        backward_update="multiplicative_second_state",
        feedback="error_mse" if loss == "mse" else "error_cross_entropy",
        symmetric_in_out=True,
        symmetric_states=True,
        batch_reduction="mean",
    )
    genome = neutral_genome(spec, dtype)._replace(
        forward_transform=jnp.asarray([[1.0, 1.0], [0.0, 0.0]], dtype),
        backward_transform=jnp.eye(2, dtype=dtype),
        pre_transform=jnp.eye(2, dtype=dtype),
        post_transform=jnp.asarray([[0.0, 1.0], [1.0, 0.0]], dtype),
        synapse_update=jnp.asarray(-learning_rate, dtype),
    )
    return spec, genome


def synapses_from_weights(spec: NetworkSpec, weights: Sequence[jax.Array]) -> Synapses:
    """Tied synapses from plain MLP weights ``[(n_l + 1, n_{l+1}), ...]`` whose last row is the bias.

    Every state gets the same block and each backward block is the transposed forward block.
    """
    if len(weights) != spec.num_layers:
        raise ValueError(f"expected {spec.num_layers} weight matrices, got {len(weights)}")
    forward = []
    for layer, w in enumerate(weights):
        expected = (spec.layer_sizes[layer] + 1, spec.layer_sizes[layer + 1])
        if tuple(w.shape) != expected:
            raise ValueError(f"weights[{layer}] must have shape {expected}, got {tuple(w.shape)}")
        forward.append(jnp.broadcast_to(jnp.asarray(w), (spec.num_states,) + expected))
    return Synapses(tuple(forward), tuple(_tied_backward(w) for w in forward))


def weights_from_synapses(spec: NetworkSpec, synapses: Synapses) -> list[jax.Array]:
    """The state-0 forward blocks as plain MLP weights ``[(n_l + 1, n_{l+1}), ...]`` (last row = bias)."""
    del spec
    return [w[0] for w in synapses.forward]
