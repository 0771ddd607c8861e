"""The vectorized evaluation engine (DESIGN §3): genomes × tasks -> fitness, in pure JAX.

An *episode* gives one (genome, task) pair fresh synapses from the task's synapse key, runs ``num_steps``
inner learning steps on the task's support batches (``lax.scan``, so memory does not grow with the number
of steps) and scores state 0 of the last layer on the query set. :func:`evaluate` vmaps episodes over tasks
and genomes and is compiled once per (spec, config, shapes): new genomes and new tasks of the same shapes
never recompile.

Fitness is lower-is-better: query softmax cross-entropy or error rate. A diverging episode (non-finite
logits or loss) scores the worst value of the metric — error rate 1, cross-entropy ``config.max_loss`` — and
is counted in ``diverged``; finite cross-entropies are clipped at ``max_loss`` too, so one episode's score
never depends on the rest of the batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import genome as G
from workers.task_types import Task
from workers.unroll import EpisodeResult, num_updates, query_scores, score, unroll

FITNESS_METRICS = ("cross_entropy", "error_rate")
AGGREGATIONS = ("mean", "median", "quantile", "worst")


@dataclass(frozen=True)
class EpisodeConfig:
    """Static episode settings (a ``jit`` static argument).

    num_steps: inner steps T (support batches consumed).
    skip_last_update: the last support batch is forward-only (the paper's variant); the network learns
      from T-1 batches.
    fitness: ``cross_entropy`` or ``error_rate`` of the query set.
    aggregate: how :func:`aggregate_fitness` reduces the task axis: mean, median, quantile or worst.
    quantile: the quantile for ``aggregate="quantile"``.
    max_loss: cap (and divergence score) of the query cross-entropy.
    curve_steps: step counts at which query accuracy is also recorded (learning curves), each in 0..T.
    """

    num_steps: int
    skip_last_update: bool = False
    fitness: str = "cross_entropy"
    aggregate: str = "mean"
    quantile: float = 0.5
    max_loss: float = 20.0
    curve_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "curve_steps", tuple(int(s) for s in self.curve_steps))
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {self.num_steps}")
        if self.fitness not in FITNESS_METRICS:
            raise ValueError(f"fitness must be one of {', '.join(FITNESS_METRICS)}; got {self.fitness!r}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATIONS)}; got {self.aggregate!r}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if any(s < 0 or s > self.num_steps for s in self.curve_steps):
            raise ValueError(f"curve_steps must lie in 0..{self.num_steps}, got {self.curve_steps}")


def _learn(spec, genome, synapses, task, start, stop):
    """Inner steps on support batches ``start..stop-1`` (:func:`workers.unroll.unroll`)."""
    return unroll(spec, genome, synapses, task, start, stop - start)


def train(spec: G.NetworkSpec, genome: G.Genome, task: Task, synapse_key: jax.Array, config: EpisodeConfig):
    """Fresh synapses, then the inner steps of ``config``; returns (final synapses, curve accuracies)."""
    synapses = G.init_synapses(spec, synapse_key)
    updates = num_updates(config)
    curve = []
    done = 0
    for target in sorted(set(config.curve_steps)):  # learn in segments between curve points
        target = min(target, updates)
        synapses = _learn(spec, genome, synapses, task, done, target)
        done = target
        curve.append(query_scores(G.predict(spec, genome, synapses, task.query_x), task.query_y)[0])
    synapses = _learn(spec, genome, synapses, task, done, updates)
    order = [sorted(set(config.curve_steps)).index(s) for s in config.curve_steps]
    curve_values = jnp.stack([curve[i] for i in order]) if curve else jnp.zeros((0,))
    return synapses, curve_values


def episode(
    spec: G.NetworkSpec, genome: G.Genome, task: Task, synapse_key: jax.Array, config: EpisodeConfig
) -> EpisodeResult:
    """One fitness sample of ``genome`` on ``task``. Differentiable with respect to ``genome``."""
    synapses, curve = train(spec, genome, task, synapse_key, config)
    return score(spec, genome, synapses, task, config, curve)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _evaluate(spec, vectors, tasks, synapse_keys, config):
    genomes = jax.vmap(G.unravel, (None, 0))(spec, vectors)
    over_tasks = jax.vmap(episode, (None, None, 0, 0, None))
    return jax.vmap(over_tasks, (None, 0, None, None, None))(spec, genomes, tasks, synapse_keys, config)


def evaluate(
    spec: G.NetworkSpec, vectors: jax.Array, tasks: Task, synapse_keys: jax.Array, config: EpisodeConfig
) -> EpisodeResult:
    """Score genome vectors ``[P, D]`` on a task batch (leading axis K) -> :class:`EpisodeResult` ``[P, K]``.

    ``synapse_keys [K]`` give each task's initial synapses, shared by every genome (common random numbers).
    Episode (p, k) depends only on (vectors[p], tasks[k], synapse_keys[k], config).
    """
    return _evaluate(spec, jnp.asarray(vectors, jnp.float32), tasks, synapse_keys, config)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _evaluate_window(spec, vectors, tasks, synapses, start, config, length):
    genomes = jax.vmap(G.unravel, (None, 0))(spec, vectors)

    def one(genome, task, syn):
        syn = unroll(spec, genome, syn, task, start, length)
        return score(spec, genome, syn, task, config, jnp.zeros((0,))), syn

    return jax.vmap(jax.vmap(one, (None, 0, 0)), (0, None, 0))(genomes, tasks, synapses)


def evaluate_window(spec: G.NetworkSpec, vectors: jax.Array, tasks: Task, synapses: G.Synapses, start,
                    length: int, config: EpisodeConfig) -> tuple[EpisodeResult, G.Synapses]:
    """Truncated unrolls (PES / NRES): candidate ``p`` continues its own ``synapses [P, K, ...]`` for
    ``length`` inner steps from support batch ``start`` of each task and is scored on the query set after
    them (the partial-unroll fitness). Returns (results ``[P, K]``, the synapses after the window)."""
    return _evaluate_window(spec, jnp.asarray(vectors, jnp.float32), tasks, synapses,
                            jnp.asarray(start, jnp.int32), config, int(length))


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_window_synapses(spec: G.NetworkSpec, synapse_keys: jax.Array, population: int) -> G.Synapses:
    """Fresh synapses ``[P, K, ...]``: task k's initial synapses (as in :func:`evaluate`) for every candidate."""
    per_task = jax.vmap(lambda key: G.init_synapses(spec, key))(synapse_keys)
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (population,) + a.shape), per_task)


def compiled_cache_size() -> int:
    """Number of compiled variants of the engine (used to check that generations do not recompile)."""
    return _evaluate._cache_size()


def aggregate_fitness(fitness: jax.Array | np.ndarray, config: EpisodeConfig) -> jax.Array | np.ndarray:
    """Reduce ``fitness [P, K]`` over tasks to ``[P]`` with ``config.aggregate``.

    NumPy in, NumPy out (the driver's path: no device dispatch); JAX arrays stay in JAX (jit/grad)."""
    xp = np if isinstance(fitness, np.ndarray) else jnp
    if config.aggregate == "mean":
        return xp.mean(fitness, axis=-1)
    if config.aggregate == "median":
        return xp.median(fitness, axis=-1)
    if config.aggregate == "quantile":
        return xp.quantile(fitness, config.quantile, axis=-1)
    return xp.max(fitness, axis=-1)  # worst


def canonical_flops(spec: G.NetworkSpec, batch_size: int) -> int:
    """Canonical FLOPs of one inner step (DESIGN §3): per layer 2·B·(n_l+1)·n_{l+1}·k for each of forward,
    backward and the two Hebbian blocks, plus the k×k state mixes of every pass."""
    k, b = spec.num_states, batch_size
    total = 0
    for n_in, n_out in zip(spec.layer_sizes[:-1], spec.layer_sizes[1:]):
        total += 4 * 2 * b * (n_in + 1) * n_out * k
        # state mixes: forward (ā·ν), backward (a·µ), Hebbian pre/post of the forward and backward blocks
        total += 2 * b * k * k * ((n_in + 1) + n_out + (n_in + 1) + n_out + n_out + n_in)
    return total
