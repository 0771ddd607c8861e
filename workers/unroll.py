"""The inner loop, in one place: the rule's unroll over support batches and the query scores of the result.

Every outer loop is built on these functions — ES fitness (:func:`workers.engine.episode` /
:func:`workers.engine.evaluate`), the gradient meta-loss and each meta-gradient estimator
(:mod:`evolution.gradients`) — so the quantity a gradient method differentiates is literally the quantity
evolution scores:

* :func:`num_updates`: inner steps that update the synapses (T, or T-1 with ``skip_last_update``);
* :func:`unroll`: ``length`` rule steps from support batch ``start`` (optionally masked at ``stop``,
  optionally rematerialized for backprop);
* :func:`query_outputs`: (accuracy, cross-entropy, diverged) of state 0 of the last layer on the query set;
  :func:`query_loss` is its differentiable cross-entropy, :func:`score` the ES fitness of it;
* :func:`init_unroll` / :class:`UnrollState`: the state a truncated unroll carries between windows (the
  synapses of each task, optionally of each candidate, and the inner-step index).

Two small records say what an episode is. :class:`Scoring` is static for a run (fitness metric, task
aggregation, the loss cap); :class:`Horizon` is what a call varies (inner steps, learning-curve points).
``workers.engine.EpisodeConfig`` — the ``episode:`` section of a config file — holds both and hands them
out (``episode.scoring``, ``episode.horizon(num_steps)``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

import genome as G
from workers.task_types import Task

__all__ = ["AGGREGATIONS", "EpisodeResult", "FITNESS_METRICS", "Horizon", "Scoring", "UnrollState",
           "curve_windows", "finish_unroll", "init_task_synapses", "init_unroll", "num_updates", "query_loss",
           "query_outputs", "query_scores", "score", "unroll"]

FITNESS_METRICS = ("cross_entropy", "error_rate")
AGGREGATIONS = ("mean", "median", "quantile", "worst")


@dataclass(frozen=True)
class Scoring:
    """How an episode is scored; static for a run (a ``jit`` static argument).

    fitness: ``cross_entropy`` or ``error_rate`` of the query set.
    aggregate: how ``workers.engine.aggregate_fitness`` reduces the task axis: mean, median, quantile or worst.
    quantile: the quantile for ``aggregate="quantile"``.
    max_loss: cap (and divergence score) of the query cross-entropy.
    """

    fitness: str = "cross_entropy"
    aggregate: str = "mean"
    quantile: float = 0.5
    max_loss: float = 20.0

    def __post_init__(self) -> None:
        if self.fitness not in FITNESS_METRICS:
            raise ValueError(f"fitness must be one of {', '.join(FITNESS_METRICS)}; got {self.fitness!r}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATIONS)}; got {self.aggregate!r}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")


@dataclass(frozen=True)
class Horizon:
    """Which inner steps one call runs (a ``jit`` static argument; varies per call with the curriculum).

    num_steps: inner steps T (support batches consumed).
    skip_last_update: the last support batch is forward-only (the paper's variant); the network learns
      from T-1 batches.
    curve_steps: step counts at which query accuracy is also recorded (learning curves), each in 0..T.
    """

    num_steps: int
    skip_last_update: bool = False
    curve_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_steps", int(self.num_steps))
        object.__setattr__(self, "curve_steps", tuple(int(s) for s in self.curve_steps))
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {self.num_steps}")
        if any(s < 0 or s > self.num_steps for s in self.curve_steps):
            raise ValueError(f"curve_steps must lie in 0..{self.num_steps}, got {self.curve_steps}")


class UnrollState(NamedTuple):
    """Inner-loop state carried across the windows of a truncated unroll.

    synapses: per task ``[K, ...]``, or per candidate and task ``[C, K, ...]`` (ES populations, PES pairs).
    step: inner steps done in the current unroll (int32 scalar).
    perturbation: PES accumulated perturbations ``[C/2, D]`` (``[0, D]`` when the outer loop has none).
    """

    synapses: G.Synapses
    step: jax.Array
    perturbation: jax.Array


class EpisodeResult(NamedTuple):
    """Per-episode outcome; :func:`evaluate` returns it with leading axes ``[P, K]``."""

    fitness: jax.Array  # lower is better
    accuracy: jax.Array
    cross_entropy: jax.Array  # raw (unclipped, may be non-finite)
    diverged: jax.Array  # bool
    curve: jax.Array  # [len(curve_steps)] query accuracy after each recorded step count


def query_scores(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(accuracy, mean softmax cross-entropy) of ``logits [Q, n]`` against integer ``labels [Q]``."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    cross_entropy = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))
    return accuracy, cross_entropy


def curve_windows(curve_steps: Sequence[int], updates: int) -> tuple[list[int], list[int], int]:
    """How a training that records ``curve_steps`` runs its first steps as one loop over the points (one copy of
    the step in the program, whatever the number of points): (the update count at each distinct point in
    increasing order, at most ``updates``; for each entry of ``curve_steps``, the index of its count in that list;
    the width of the loop's window of steps, the widest gap between consecutive counts, from 0). Each trip runs
    the window from the previous count, masks the steps at or past its own count, and scores the query set."""
    points = sorted(set(int(s) for s in curve_steps))
    targets = [min(point, updates) for point in points]
    width = max((b - a for a, b in zip([0, *targets[:-1]], targets)), default=0)
    return targets, [points.index(int(s)) for s in curve_steps], width


def num_updates(horizon: Horizon) -> int:
    """Inner steps that update the synapses (T, or T-1 with ``skip_last_update``), as in the engine."""
    return horizon.num_steps - 1 if horizon.skip_last_update and horizon.num_steps > 0 else horizon.num_steps


def query_loss(spec: G.NetworkSpec, genome: G.Genome, synapses: G.Synapses, task: Task) -> jax.Array:
    """Softmax cross-entropy of state 0 of the last layer on the task's query set (one task): the
    cross-entropy of :func:`query_outputs`, which ES fitness scores too."""
    return query_outputs(spec, genome, synapses, task)[1]


def unroll(spec: G.NetworkSpec, genome: G.Genome, synapses: G.Synapses, task: Task, start, length: int,
           stop=None, remat: str = "none") -> G.Synapses:
    """``length`` rule steps on support batches ``start, start+1, ...`` of one task.

    Steps whose index is ``>= stop`` leave the synapses unchanged (fixed-size windows at the end of an
    unroll). ``start`` and ``stop`` may be traced. ``remat``: see the module docstring.
    """

    def body(syn, t):
        x = jax.lax.dynamic_index_in_dim(task.support_x, t, keepdims=False)
        y = jax.lax.dynamic_index_in_dim(task.support_y, t, keepdims=False)
        new = G.step(spec, genome, syn, x, y, t)
        if stop is not None:
            new = jax.tree.map(lambda n, o: jnp.where(t < stop, n, o), new, syn)
        return new, None

    if length == 0:
        return synapses
    if remat == "none":
        return jax.lax.scan(body, synapses, start + jnp.arange(length))[0]
    if remat == "step":
        return jax.lax.scan(jax.checkpoint(body), synapses, start + jnp.arange(length))[0]
    # sqrt: checkpointed segments; only the segment boundaries are stored, a segment is recomputed on the
    # way back. Padding steps beyond `length` are masked out.
    segment = math.ceil(math.sqrt(length))
    num_segments = math.ceil(length / segment)
    if num_segments * segment != length:
        stop = start + length if stop is None else jnp.minimum(stop, start + length)
        return unroll(spec, genome, synapses, task, start, num_segments * segment, stop, remat)

    @jax.checkpoint
    def run_segment(syn, ts):
        return jax.lax.scan(body, syn, ts)[0], None

    times = (start + jnp.arange(length)).reshape(num_segments, segment)
    return jax.lax.scan(run_segment, synapses, times)[0]


def finish_unroll(spec: G.NetworkSpec, genome: G.Genome, synapses: G.Synapses, task: Task,
                  horizon: Horizon) -> G.Synapses:
    """With ``skip_last_update``, the published unroll still runs its last support batch forward-only; that
    changes the synapses only under :func:`genome.has_forward_only_effects` options, where it is applied
    here (after the :func:`num_updates` rule steps); otherwise ``synapses`` come back unchanged."""
    if not (horizon.skip_last_update and horizon.num_steps > 0 and G.has_forward_only_effects(spec)):
        return synapses
    x = jax.lax.dynamic_index_in_dim(task.support_x, horizon.num_steps - 1, keepdims=False)
    return G.forward_only_step(spec, genome, synapses, x)


def init_task_synapses(spec: G.NetworkSpec, synapse_keys: jax.Array, dtype=jnp.float32,
                       batch_size: int | None = None) -> G.Synapses:
    """Fresh synapses for each task ``[K, ...]``: the engine's float32 initialization, cast to ``dtype`` (so
    a float64 meta-loss starts from exactly the synapses that evolution's episodes start from).
    ``batch_size``: the support batch size, for specs that carry neuron states."""
    per_task = [_init_float32(spec, key, batch_size) for key in synapse_keys]  # one compilation whatever K is
    return jax.tree.map(lambda *a: jnp.stack(a).astype(dtype), *per_task)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_float32(spec, key, batch_size):
    return G.init_synapses(spec, key, jnp.float32, batch_size)


def init_unroll(spec: G.NetworkSpec, synapse_keys: jax.Array, copies: int = 0, dtype=jnp.float32,
                perturbations: int = 0, batch_size: int | None = None) -> UnrollState:
    """The state at the start of an unroll: task k's fresh synapses (from ``synapse_keys[k]``, as every
    episode starts), stacked ``copies`` times in front when ``copies > 0`` (one per ES candidate or PES
    run, all starting alike), step 0, and ``perturbations`` zero rows of accumulated PES noise.

    The initial state depends on the keys only, not on the genome or the tasks (BLUR synapses start
    from the spec's initialization), so those are not arguments; ``batch_size`` is needed only by specs
    that carry neuron states (``zero_out_neurons = False``)."""
    synapses = init_task_synapses(spec, synapse_keys, dtype, batch_size)
    if copies:
        synapses = jax.tree.map(lambda a: jnp.broadcast_to(a, (copies,) + a.shape), synapses)
    return UnrollState(synapses, jnp.zeros((), jnp.int32), jnp.zeros((perturbations, G.num_dims(spec)), dtype))


def query_outputs(spec: G.NetworkSpec, genome: G.Genome, synapses: G.Synapses, task: Task):
    """(accuracy, raw cross-entropy, diverged) of state 0 of the last layer on the task's query set
    (:func:`genome.query_logits`: :func:`genome.predict`'s logits, computed for a large query set)."""
    logits = G.query_logits(spec, genome, synapses, task.query_x)
    accuracy, cross_entropy = query_scores(logits, task.query_y)
    diverged = ~(jnp.all(jnp.isfinite(logits)) & jnp.isfinite(cross_entropy))
    return accuracy, cross_entropy, diverged


def score(spec: G.NetworkSpec, genome: G.Genome, synapses: G.Synapses, task: Task, scoring: Scoring,
          curve: jax.Array) -> EpisodeResult:
    """The ES fitness of trained ``synapses``: query cross-entropy (capped at ``scoring.max_loss``) or error
    rate; a diverged episode scores the worst value. ``curve``: accuracies recorded along the unroll."""
    accuracy, cross_entropy, diverged = query_outputs(spec, genome, synapses, task)
    if scoring.fitness == "cross_entropy":
        fitness = jnp.where(diverged, scoring.max_loss, jnp.minimum(cross_entropy, scoring.max_loss))
    else:
        fitness = jnp.where(diverged, 1.0, 1.0 - accuracy)
    accuracy = jnp.where(diverged, 0.0, accuracy)
    curve = jnp.where(jnp.isfinite(curve), curve, 0.0)
    return EpisodeResult(fitness, accuracy, cross_entropy, diverged, curve)
