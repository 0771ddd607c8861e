"""The dynamic half of a learning rule: the genome pytree, its random initializer and its flat vector.

Flat parameterization (version 1), the vector that strategies see, field by field in this order:

==========================  =======  ==============================================================
field                       size     vector entry ``u`` -> genome value
==========================  =======  ==============================================================
forward_transform  ν        k²       identity (row-major, ``[d, c]`` = source state d -> dest. c)
backward_transform µ        k²       identity
pre_transform      ν̃        k²       identity
post_transform     µ̃        k²       identity
neuron_keep        f        1        identity
neuron_update      η        1        identity
synapse_keep       f̃        1        identity
synapse_update     η̃        1        ``1e-3 · sinh(u)``: a signed log scale (|η̃| ≈ 5e-4·e^|u| for |u| > 2)
norm_scale, norm_shift      k, k     identity; only when ``spec.activation_norm``
oja                m        1        ``1e-2 · sinh(u)``; only when ``spec.oja`` and ``spec.oja_use_multiplier``
saturation         s        1        identity; only when ``spec.saturation``
forward_pre_transform,      k², k²,  as their backward-pass counterparts; only when
forward_post_transform,     1, 1     ``spec.forward_synapse_update`` (the published ``forward_synapse``
forward_synapse_keep,                genome: the Hebbian update after the forward pass)
forward_synapse_update
==========================  =======  ==============================================================

With ``spec.per_layer_genome`` every field gets a leading layer axis ``[L, ...]`` and the vector is the L
per-layer vectors above, layer 0 first (``num_dims`` = L × the single-genome length).

Rates live on very different scales (η̃ ≈ 1e-3, matrices ≈ 1); the ``sinh`` maps give a unit step in ``u``
a comparable effect everywhere while keeping the sign and zero reachable. ``unravel(spec, ravel(spec, g))``
returns ``g`` and ``ravel(spec, unravel(spec, v))`` returns ``v``, both to float round-off (the ``sinh`` /
``asinh`` pair; every identity entry round-trips bit-exactly). Fields that the spec does not use are left out
of the vector and come back at their neutral values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from genome.spec import NetworkSpec

PARAMETERIZATION_VERSION = 1

_SYNAPSE_UPDATE_SCALE = 1e-3
_OJA_SCALE = 1e-2


class Genome(NamedTuple):
    """Everything that could be evolved or differentiated; shared by every neuron, synapse and layer.

    Matrices are ``[k, k]`` and map source state ``d`` (row) to destination state ``c`` (column), except
    ``post_transform`` which is applied as ``Σ_d µ̃[o, d] a[..., d]`` (DESIGN §2 step 4).
    """

    forward_transform: jax.Array  # ν [k, k]
    backward_transform: jax.Array  # µ [k, k]
    pre_transform: jax.Array  # ν̃ [k, k]
    post_transform: jax.Array  # µ̃ [k, k]
    neuron_keep: jax.Array  # f []
    neuron_update: jax.Array  # η []
    synapse_keep: jax.Array  # f̃ []
    synapse_update: jax.Array  # η̃ []
    norm_scale: jax.Array  # [k], used when spec.activation_norm
    norm_shift: jax.Array  # [k], used when spec.activation_norm
    oja: jax.Array  # [], used when spec.oja and spec.oja_use_multiplier
    saturation: jax.Array  # [], used when spec.saturation
    forward_pre_transform: jax.Array  # [k, k], used when spec.forward_synapse_update
    forward_post_transform: jax.Array  # [k, k], used when spec.forward_synapse_update
    forward_synapse_keep: jax.Array  # [], used when spec.forward_synapse_update
    forward_synapse_update: jax.Array  # [], used when spec.forward_synapse_update


_MATRICES = ("forward_transform", "backward_transform", "pre_transform", "post_transform")
_SCALARS = ("neuron_keep", "neuron_update", "synapse_keep")
FORWARD_SYNAPSE_FIELDS = ("forward_pre_transform", "forward_post_transform", "forward_synapse_keep",
                          "forward_synapse_update")


def _single(spec: NetworkSpec) -> NetworkSpec:
    """The spec of one layer pair's genome."""
    return dataclasses.replace(spec, per_layer_genome=False)


def layer_genome(spec: NetworkSpec, genome: Genome, layer: int) -> Genome:
    """The genome that layer pair ``layer`` uses: ``genome`` itself, or its slice ``layer`` when
    ``spec.per_layer_genome``."""
    if not spec.per_layer_genome:
        return genome
    return jax.tree.map(lambda a: a[layer], genome)


def neutral_genome(spec: NetworkSpec, dtype=jnp.float32) -> Genome:
    """The paper's default scalars with identity matrices; a base for hand-built genomes."""
    # built in NumPy and copied in: no eager JAX operation to compile in every process that makes one
    k = spec.num_states
    layers = (spec.num_layers,) if spec.per_layer_genome else ()
    np_dtype = np.dtype(dtype)

    def const(value, shape=()):
        return jnp.asarray(np.broadcast_to(np.asarray(value, np_dtype), layers + shape))

    eye = const(np.eye(k), (k, k))
    one = const(1.0)
    return Genome(
        forward_transform=eye,
        backward_transform=eye,
        pre_transform=eye,
        post_transform=eye,
        neuron_keep=one,
        neuron_update=one,
        synapse_keep=one,
        synapse_update=const(-1e-3),
        norm_scale=const(1.0, (k,)),
        norm_shift=const(0.0, (k,)),
        oja=one,
        saturation=one,
        forward_pre_transform=eye,
        forward_post_transform=eye,
        forward_synapse_keep=one,
        forward_synapse_update=const(-1e-3),
    )


def random_genome(spec: NetworkSpec, key: jax.Array, transform_std: float = 1.0, dtype=jnp.float32) -> Genome:
    """A random genome with the paper's defaults: the four k×k transforms ~ N(0, transform_std²),
    ``f = η = f̃ = 1``, ``η̃ = -1e-3``, norm multiplier 1 / shift 0, Oja multiplier 1, saturation 1.
    Per-layer genomes draw layer l from ``fold_in(key, l)``."""
    if spec.per_layer_genome:
        layers = [random_genome(_single(spec), jax.random.fold_in(key, layer), transform_std, dtype)
                  for layer in range(spec.num_layers)]
        return jax.tree.map(lambda *a: jnp.stack(a), *layers)
    keys = jax.random.split(key, len(_MATRICES))
    k = spec.num_states
    matrices = {
        name: transform_std * jax.random.normal(sub, (k, k), dtype) for name, sub in zip(_MATRICES, keys)
    }
    if spec.forward_synapse_update:  # its own draws; the four matrices above are unchanged
        pre_key, post_key = jax.random.split(jax.random.fold_in(key, 1))
        matrices["forward_pre_transform"] = transform_std * jax.random.normal(pre_key, (k, k), dtype)
        matrices["forward_post_transform"] = transform_std * jax.random.normal(post_key, (k, k), dtype)
    return neutral_genome(spec, dtype)._replace(**matrices)


def num_dims(spec: NetworkSpec) -> int:
    """Length of the flat genome vector for ``spec``."""
    if spec.per_layer_genome:
        return spec.num_layers * num_dims(_single(spec))
    k = spec.num_states
    dims = 4 * k * k + 4
    dims += 2 * k if spec.activation_norm else 0
    dims += 1 if spec.oja and spec.oja_use_multiplier else 0
    dims += 1 if spec.saturation else 0
    dims += 2 * k * k + 2 if spec.forward_synapse_update else 0
    return dims


def ravel(spec: NetworkSpec, genome: Genome) -> jax.Array:
    """The flat, ES-scaled vector of ``genome`` (see the module docstring for the parameterization)."""
    if spec.per_layer_genome:
        single = _single(spec)
        return jnp.concatenate([ravel(single, layer_genome(spec, genome, layer)) for layer in range(spec.num_layers)])
    parts = [jnp.ravel(getattr(genome, name)) for name in _MATRICES]
    parts += [jnp.reshape(getattr(genome, name), (1,)) for name in _SCALARS]
    parts.append(jnp.reshape(jnp.arcsinh(genome.synapse_update / _SYNAPSE_UPDATE_SCALE), (1,)))
    if spec.activation_norm:
        parts += [jnp.ravel(genome.norm_scale), jnp.ravel(genome.norm_shift)]
    if spec.oja and spec.oja_use_multiplier:
        parts.append(jnp.reshape(jnp.arcsinh(genome.oja / _OJA_SCALE), (1,)))
    if spec.saturation:
        parts.append(jnp.reshape(genome.saturation, (1,)))
    if spec.forward_synapse_update:
        parts += [jnp.ravel(genome.forward_pre_transform), jnp.ravel(genome.forward_post_transform),
                  jnp.reshape(genome.forward_synapse_keep, (1,)),
                  jnp.reshape(jnp.arcsinh(genome.forward_synapse_update / _SYNAPSE_UPDATE_SCALE), (1,))]
    return jnp.concatenate(parts)


def unravel(spec: NetworkSpec, vector: jax.Array) -> Genome:
    """Inverse of :func:`ravel`. Works under ``jit``/``vmap``/``grad``; raises on a wrong length."""
    vector = jnp.asarray(vector)
    if vector.shape != (num_dims(spec),):
        raise ValueError(f"genome vector must have shape ({num_dims(spec)},) for this spec, got {vector.shape}")
    if spec.per_layer_genome:
        single = _single(spec)
        return jax.vmap(functools.partial(unravel, single))(jnp.reshape(vector, (spec.num_layers, -1)))
    k = spec.num_states
    fields = dict(neutral_genome(spec, vector.dtype)._asdict())
    offset = 0

    def take(size: int) -> jax.Array:
        nonlocal offset
        chunk = vector[offset : offset + size]
        offset += size
        return chunk

    for name in _MATRICES:
        fields[name] = jnp.reshape(take(k * k), (k, k))
    for name in _SCALARS:
        fields[name] = take(1)[0]
    fields["synapse_update"] = _SYNAPSE_UPDATE_SCALE * jnp.sinh(take(1)[0])
    if spec.activation_norm:
        fields["norm_scale"] = take(k)
        fields["norm_shift"] = take(k)
    if spec.oja and spec.oja_use_multiplier:
        fields["oja"] = _OJA_SCALE * jnp.sinh(take(1)[0])
    if spec.saturation:
        fields["saturation"] = take(1)[0]
    if spec.forward_synapse_update:
        fields["forward_pre_transform"] = jnp.reshape(take(k * k), (k, k))
        fields["forward_post_transform"] = jnp.reshape(take(k * k), (k, k))
        fields["forward_synapse_keep"] = take(1)[0]
        fields["forward_synapse_update"] = _SYNAPSE_UPDATE_SCALE * jnp.sinh(take(1)[0])
    return Genome(**fields)
