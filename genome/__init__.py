"""What is evolved: the BLUR spec, genome pytree, multi-state network, backprop genome and genome files."""

from genome.backprop import backprop_genome, synapses_from_weights, weights_from_synapses
from genome.errors import UserError
from genome.io import FORMAT_NAME, GenomeFileError, load, save
from genome.network import Synapses, activate, backward, feedback, forward, hebbian_update, init_synapses
from genome.network import forward_only_step, has_forward_only_effects, predict, query_logits, step, step_states
from genome.params import PARAMETERIZATION_VERSION, Genome, layer_genome, neutral_genome, num_dims, random_genome
from genome.params import ravel, unravel
from genome.spec import NetworkSpec, SpecError

__all__ = [
    "FORMAT_NAME",
    "PARAMETERIZATION_VERSION",
    "Genome",
    "layer_genome",
    "GenomeFileError",
    "UserError",
    "NetworkSpec",
    "SpecError",
    "Synapses",
    "activate",
    "backprop_genome",
    "backward",
    "feedback",
    "forward",
    "hebbian_update",
    "init_synapses",
    "load",
    "neutral_genome",
    "num_dims",
    "forward_only_step",
    "has_forward_only_effects",
    "predict",
    "query_logits",
    "random_genome",
    "ravel",
    "save",
    "step",
    "step_states",
    "synapses_from_weights",
    "unravel",
    "weights_from_synapses",
]
