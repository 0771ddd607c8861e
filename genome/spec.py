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
    "relu_tanh",  # relu(tanh(s)): the published code's default hidden and backward activation
    # State-dependent activations (state 0 / state 1 differ; states >= 2 pass through unchanged):
    "sigmoid_backprop",  # (sigma(s0), sigma'(s1)): a hidden neuron of the backprop special case
    "linear_backprop",  # (s0, 1): the output neuron of the backprop special case
)
BACKWARD_UPDATES = ("additive", "multiplicative", "multiplicative_second_state", "multiplicative_skip_first_state")
FEEDBACK_MODES = ("target", "error_mse", "error_cross_entropy")
SYNAPSE_NORMALIZATIONS = ("none", "stored", "activations", "start")
BATCH_REDUCTIONS = ("sum", "mean")
OJA_VARIANTS = ("synapse_weights", "activations")

BackwardUpdate = Literal["additive", "multiplicative", "multiplicative_second_state",
                         "multiplicative_skip_first_state"]
FeedbackMode = Literal["target", "error_mse", "error_cross_entropy"]


class SpecError(UserError):
    """A NetworkSpec field has an impossible value."""


# The published code's defaults (``blur.default_network_spec`` and the option defaults of ``blur.NetworkSpec``,
# ``OjasSpec``, ``normalize_synapses``), for :meth:`NetworkSpec.official` and ``network.preset: official``;
# its unroll also skips the last step's update (``has_more_steps``): ``episode.skip_last_update``.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "forward_activation": "relu_tanh",
    "backward_activation": "relu_tanh",
    "output_activation": "tanh",
    "backward_update": "additive",
    "feedback": "target",
    "symmetric_in_out": False,
    "symmetric_states": False,
    "batch_reduction": "sum",
    "oja_variant": "activations",
    "oja_use_multiplier": False,
    "oja_extra_multiplier": 1.0,
    "synapse_normalization_epsilon": 1e-9,
    "supervised_every": 1,
    "forward_synapse_update": False,
    "use_forward_activations_for_synapse_update": False,
    "per_layer_genome": False,
    "zero_out_neurons": True,
}

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
      backward_update: how the backward message ``Δ`` changes a neuron (DESIGN §2 step 3): ``additive``
        ``act_b(f·a + η·Δ)``; ``multiplicative`` ``act_b(f·a·Δ)``; ``multiplicative_second_state`` the
        published code's ``act_b(f·[a_0, a_1·Δ_1, ..., a_{k-1}·Δ_{k-1}])`` (state 0 keeps its value before
        ``f`` and ``act_b``, which apply to every state); ``multiplicative_skip_first_state`` state 0 passes
        through untouched and states >= 1 become ``act_b(f·a·Δ)`` (the published code's comment).
      feedback: what the last layer receives: ``target`` writes the ±1 one-hot target into state 1 (the
        paper's default); ``error_mse`` writes ``z - onehot`` and ``error_cross_entropy`` writes
        ``softmax(z) - onehot`` (per-example dL/dz of ½‖z - t‖² and of softmax cross-entropy). States >= 2
        of the last layer are set to 0. With ``k = 1`` the single state is overwritten by the feedback.
      symmetric_in_out: backward blocks are the transposed forward blocks (without the bias row), always.
      symmetric_states: every synapse state equals state 0, always.
      activation_norm: per-state batch normalization of hidden pre-activations with the genome's
        ``norm_scale`` / ``norm_shift`` (statistics over the batch, per neuron and state).
      oja: add Oja's decay to the Hebbian term, always shrinking (``× -sign(η̃)``).
      oja_variant: ``synapse_weights``: ``-W[i,j,o]·Σ_r W[r,j,o]²`` over the block's source rows;
        ``activations`` (the published default): ``-W[i,j,o]·Σ_b (Σ_d µ̃[o,d]·a_j[b,d])²`` with ``a_j`` the
        destination neuron's states (batch-scaled like the Hebbian term).
      oja_use_multiplier: scale the term by the genome's ``|oja|`` (in the genome only when true).
      oja_extra_multiplier: a fixed factor of the term (the published ``extra_multiplier``).
      saturation: exp saturation of synapse updates with the genome's ``saturation``.
      saturation_epsilon: ``ε`` in ``dW *= exp(-|W| (ε + |s|))``.
      synapse_normalization: ``none``; ``stored`` divides stored blocks by their per-destination norm
        after every update; ``activations`` uses normalized blocks only inside the passes (the published
        ``normalize_in_activations``); ``start`` normalizes the stored blocks at the start of every step
        (the published ``normalize_synapses``).
      synapse_normalization_epsilon: ``W / sqrt(Σ W² + ε)`` (the published code uses 1e-9).
      batch_reduction: the Hebbian term sums over the batch (``sum``, the paper) or averages (``mean``).
      synapse_init_std: std of the normal synapse initialization (the paper's 0.1).
      norm_epsilon: variance epsilon of the activation normalization.
      supervised_every: ``n``: feedback, backward pass and backward synapse update happen on inner steps
        ``t`` with ``t % n == 0`` only; the other steps are forward-only (the published ``supervised_every``).
      forward_synapse_update: a Hebbian update right after the forward pass as well, from the forward
        states, with the genome's own ``forward_*`` transforms and rates (the published
        ``forward_synapse_update`` with a separate ``forward_synapse`` genome).
      use_forward_activations_for_synapse_update: the pre-synaptic side (layer l of block l) of the
        backward-pass Hebbian update uses the forward-pass states, the post-synaptic side the states after
        the backward pass (the published flag of the same name).
      per_layer_genome: one genome per layer pair: every genome field gets a leading axis of length
        ``num_layers`` and pair l (its forward step, the backward step into layer l, its Hebbian updates)
        uses slice l (the published ``per_layer_genome``); the flat vector is the per-layer vectors in order.
      zero_out_neurons: every step starts from all-zero neurons (true, the published default); false: the
        neuron states persist from step to step (``Synapses.neurons``, carried by the unroll like the
        synapses), so the forward pass computes ``act(f·a_prev + η·Δ)``; layer 0 still gets the input in
        state 0 and zeros elsewhere. The query read-out (:func:`genome.predict`) always starts from zero
        neurons.
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
    oja_variant: str = "synapse_weights"
    oja_use_multiplier: bool = True
    oja_extra_multiplier: float = 1.0
    synapse_normalization_epsilon: float = 1e-12
    supervised_every: int = 1
    forward_synapse_update: bool = False
    use_forward_activations_for_synapse_update: bool = False
    per_layer_genome: bool = False
    zero_out_neurons: bool = True

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
        _check_choice("oja_variant", self.oja_variant, OJA_VARIANTS)
        for name in ("symmetric_in_out", "symmetric_states", "activation_norm", "oja", "saturation",
                     "oja_use_multiplier", "forward_synapse_update", "use_forward_activations_for_synapse_update",
                     "per_layer_genome", "zero_out_neurons"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.supervised_every, bool) or not isinstance(self.supervised_every, int) \
                or not 1 <= self.supervised_every <= 1 << 20:
            raise SpecError(f"supervised_every must be an integer >= 1, got {self.supervised_every!r}")
        if self.forward_synapse_update and self.use_forward_activations_for_synapse_update:
            raise SpecError("forward_synapse_update and use_forward_activations_for_synapse_update cannot be "
                            "combined (the published code does not define it: its forward update has no "
                            "forward state to read)")
        drifting = [name for name, on in (("synapse_normalization: start", self.synapse_normalization == "start"),
                                          ("oja_variant: activations", self.oja and self.oja_variant == "activations"))
                    if on]
        if drifting and (self.symmetric_in_out or self.symmetric_states):
            raise SpecError(f"{drifting[0]} with symmetric_in_out / symmetric_states: the published code lets the "
                            "tied blocks drift apart under it, so the symmetric flags could not hold")
        for name in ("synapse_init_std", "norm_epsilon", "saturation_epsilon", "oja_extra_multiplier",
                     "synapse_normalization_epsilon"):
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

    @classmethod
    def official(cls, layer_sizes: tuple[int, ...], num_states: int = 2, **changes: Any) -> "NetworkSpec":
        """The published code's default network (:data:`OFFICIAL_DEFAULTS`), with ``changes`` on top."""
        return cls(layer_sizes=tuple(layer_sizes), num_states=num_states, **{**OFFICIAL_DEFAULTS, **changes})

    def non_default_options(self) -> dict[str, Any]:
        """The fields (other than the shape) that differ from the defaults: what a genome file "uses"."""
        defaults = NetworkSpec(self.layer_sizes)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("layer_sizes", "num_states") and getattr(self, f.name) != getattr(defaults, f.name)}

    def replace(self, **changes: Any) -> "NetworkSpec":
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
