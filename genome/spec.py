"""The static half of a learning rule: network shape and every discrete modelling choice.

A :class:`NetworkSpec` is hashable and frozen, so it can be a ``jax.jit`` static argument. Everything that
could be evolved or differentiated lives in :class:`genome.Genome` instead.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

from genome.errors import UserError

ACTIVATIONS = (
    "identity",
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "elu",
    # State-dependent activations (state 0 / state 1 differ; states >= 2 pass through unchanged):
    "sigmoid_backprop",  # (sigma(s0), sigma'(s1)): a hidden neuron of the backprop special case
    "linear_backprop",  # (s0, 1): the output neuron of the backprop special case
)
BACKWARD_UPDATES = ("additive", "multiplicative", "multiplicative_second_state")
FEEDBACK_MODES = ("target", "error_mse", "error_cross_entropy")
SYNAPSE_NORMALIZATIONS = ("none", "stored", "activations")
BATCH_REDUCTIONS = ("sum", "mean")

BackwardUpdate = Literal["additive", "multiplicative", "multiplicative_second_state"]
FeedbackMode = Literal["target", "error_mse", "error_cross_entropy"]


class SpecError(UserError):
    """A NetworkSpec field has an impossible value."""


MAX_LAYER_WIDTH = 1 << 20  # neurons in one layer
MAX_NUM_STATES = 64  # k: the genome has 4k² + 4 numbers
MAX_LAYERS = 64


@dataclass(frozen=True)
class NetworkSpec:
    """Shape and modelling choices of a BLUR multi-state network (DESIGN §2).

    Attributes:
      layer_sizes: neurons per layer, input first, e.g. ``(64, 32, 10)``; at least two layers.
      num_states: ``k``, states per neuron and per synapse (``k >= 1``).
      forward_activation: activation of hidden layers on the forward pass.
      output_activation: activation of the last layer on the forward pass.
      backward_activation: ``act_b`` applied on the backward pass.
      backward_update: how the backward message ``Δ`` changes a neuron (DESIGN §2 step 3).
      feedback: what the last layer receives: ``target`` writes the ±1 one-hot target into state 1 (the
        paper's default); ``error_mse`` writes ``z - onehot`` and ``error_cross_entropy`` writes
        ``softmax(z) - onehot`` (per-example dL/dz of ½‖z - t‖² and of softmax cross-entropy). States >= 2
        of the last layer are set to 0. With ``k = 1`` the single state is overwritten by the feedback.
      symmetric_in_out: backward blocks are the transposed forward blocks (without the bias row), always.
      symmetric_states: every synapse state equals state 0, always.
      activation_norm: per-state batch normalization of hidden pre-activations with the genome's
        ``norm_scale`` / ``norm_shift`` (statistics over the batch, per neuron and state).
      oja: add Oja's decay to the Hebbian term, scaled by the genome's ``oja``.
      saturation: exp saturation of synapse updates with the genome's ``saturation``.
      saturation_epsilon: ``ε`` in ``dW *= exp(-|W| (ε + |s|))``.
      synapse_normalization: ``none``; ``stored`` divides stored blocks by their per-destination norm
        after every update; ``activations`` uses normalized blocks only inside the passes.
      batch_reduction: the Hebbian term sums over the batch (``sum``, the paper) or averages (``mean``).
      synapse_init_std: std of the normal synapse initialization (the paper's 0.1).
      norm_epsilon: variance epsilon of the activation normalization.
    """

    layer_sizes: tuple[int, ...]
    num_states: int = 2
    forward_activation: str = "tanh"
    output_activation: str = "identity"
    backward_activation: str = "identity"
    backward_update: BackwardUpdate = "additive"
    feedback: FeedbackMode = "target"
    symmetric_in_out: bool = False
    symmetric_states: bool = False
    activation_norm: bool = False
    oja: bool = False
    saturation: bool = False
    saturation_epsilon: float = 0.0
    synapse_normalization: str = "none"
    batch_reduction: str = "sum"
    synapse_init_std: float = 0.1
    norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_sizes", tuple(int(n) for n in self.layer_sizes))
        if len(self.layer_sizes) < 2 or any(n < 1 for n in self.layer_sizes):
            raise SpecError(f"layer_sizes must list at least two positive widths, got {self.layer_sizes}")
        if len(self.layer_sizes) > MAX_LAYERS + 1 or any(n > MAX_LAYER_WIDTH for n in self.layer_sizes):
            raise SpecError(f"layer_sizes must list at most {MAX_LAYERS + 1} widths of at most {MAX_LAYER_WIDTH}, "
                            f"got {self.layer_sizes[:8]}{'...' if len(self.layer_sizes) > 8 else ''}")
        try:
            if isinstance(self.num_states, bool):
                raise TypeError
            object.__setattr__(self, "num_states", operator.index(self.num_states))
        except TypeError:
            raise SpecError(f"num_states must be an integer, got {self.num_states!r}") from None
        if not 1 <= self.num_states <= MAX_NUM_STATES:
            raise SpecError(f"num_states must be in [1, {MAX_NUM_STATES}], got {self.num_states}")
        for name in ("forward_activation", "output_activation", "backward_activation"):
            _check_choice(name, getattr(self, name), ACTIVATIONS)
        _check_choice("backward_update", self.backward_update, BACKWARD_UPDATES)
        _check_choice("feedback", self.feedback, FEEDBACK_MODES)
        _check_choice("synapse_normalization", self.synapse_normalization, SYNAPSE_NORMALIZATIONS)
        _check_choice("batch_reduction", self.batch_reduction, BATCH_REDUCTIONS)
        for name in ("synapse_init_std", "norm_epsilon", "saturation_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SpecError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def num_layers(self) -> int:
        """Number of synapse layers ``L`` (one less than the number of neuron layers)."""
        return len(self.layer_sizes) - 1

    @property
    def num_inputs(self) -> int:
        return self.layer_sizes[0]

    @property
    def num_outputs(self) -> int:
        return self.layer_sizes[-1]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layer_sizes"] = list(self.layer_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NetworkSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown NetworkSpec field(s): {', '.join(unknown)}")
        return cls(**{**data, "layer_sizes": tuple(data["layer_sizes"])})

    def replace(self, **changes: Any) -> "NetworkSpec":
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
