"""The vectorized evaluation engine (DESIGN §3): genomes × tasks -> fitness, in pure JAX.

An *episode* gives one (genome, task) pair fresh synapses from the task's synapse key, runs ``num_steps``
inner learning steps on the task's support batches (``lax.scan``, so memory does not grow with the number
of steps) and scores state 0 of the last layer on the query set. :func:`evaluate` vmaps episodes over tasks
and genomes and is compiled once per (spec, scoring, horizon, shapes): new genomes and new tasks of the same shapes
never recompile.

Fitness is lower-is-better: query softmax cross-entropy or error rate. A diverging episode (non-finite
logits or loss) scores the worst value of the metric — error rate 1, cross-entropy ``scoring.max_loss`` — and
is counted in ``diverged``; finite cross-entropies are clipped at ``max_loss`` too, so one episode's score
never depends on the rest of the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import genome as G
from workers.task_types import Task
from workers.unroll import (EpisodeResult, Horizon, Scoring, curve_windows, finish_unroll, init_unroll, num_updates,
                            query_scores, score, unroll)


#: ``episode.precision`` values (bfloat16: :mod:`workers.torch_engine` only)
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class EpisodeConfig:
    """The ``episode:`` section of a run config: the run's :class:`Scoring` and its base :class:`Horizon`.

    Engine functions take the two parts, never this record: ``episode.scoring`` is static for the run,
    ``episode.horizon(num_steps)`` builds the horizon of one call (the curriculum changes ``num_steps``;
    curve points are asked for by the caller that records a learning curve).

    num_steps: base inner steps T. skip_last_update, curve_steps: see :class:`Horizon`; fitness,
    aggregate, quantile, max_loss: see :class:`Scoring`. precision: the arithmetic of the products of the
    evaluator's episodes, ``float32`` or ``bfloat16`` (the torch backend, :mod:`workers.torch_engine`).
    """

    num_steps: int = 10
    skip_last_update: bool = False
    fitness: str = "cross_entropy"
    aggregate: str = "mean"
    quantile: float = 0.5
    max_loss: float = 20.0
    curve_steps: tuple[int, ...] = ()
    precision: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "curve_steps", tuple(int(s) for s in self.curve_steps))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        _ = self.scoring  # validates
        self.horizon(curve_steps=self.curve_steps)

    @property
    def scoring(self) -> Scoring:
        return Scoring(self.fitness, self.aggregate, self.quantile, self.max_loss)

    def horizon(self, num_steps: int | None = None, curve_steps: Sequence[int] = ()) -> Horizon:
        """The horizon of one call: ``num_steps`` (default the base T) with this episode's
        ``skip_last_update``; ``curve_steps`` only where given (evaluation calls record no curve)."""
        return Horizon(self.num_steps if num_steps is None else num_steps, self.skip_last_update,
                       tuple(curve_steps))


def _learn(spec, genome, synapses, task, start, stop):
    """Inner steps on support batches ``start..stop-1`` (:func:`workers.unroll.unroll`)."""
    return unroll(spec, genome, synapses, task, start, stop - start)


def train(spec: G.NetworkSpec, genome: G.Genome, task: Task, synapse_key: jax.Array, horizon: Horizon):
    """Fresh synapses, then the inner steps of ``horizon``; returns (final synapses, curve accuracies).

    With curve points, the steps up to the last one run as a loop over the points (:func:`curve_windows`): each
    trip runs the steps from the previous point to this one and scores the query set. The program holds one copy
    of the step whatever the number of points (a copy per segment made a 21-point curve of T = 20 take 10.9 s to
    trace, lower and compile, against 1.0 s for the plain episode and 1.3 s now, 6-5-3 network at the tests' flags)."""
    synapses = G.init_synapses(spec, synapse_key, batch_size=task.support_x.shape[1])
    updates = num_updates(horizon)
    targets, order, width = curve_windows(horizon.curve_steps, updates)
    done, curve = 0, jnp.zeros((0,))
    if targets:

        def segment(carry, target):
            synapses, start = carry
            synapses = unroll(spec, genome, synapses, task, start, width, stop=target)
            return (synapses, target), query_scores(G.query_logits(spec, genome, synapses, task.query_x),
                                                    task.query_y)[0]

        (synapses, _), at_points = jax.lax.scan(segment, (synapses, jnp.int32(0)), jnp.asarray(targets, jnp.int32))
        done = targets[-1]
        curve = at_points[jnp.asarray(order)]
    synapses = finish_unroll(spec, genome, _learn(spec, genome, synapses, task, done, updates), task, horizon)
    return synapses, curve


def episode(spec: G.NetworkSpec, genome: G.Genome, task: Task, synapse_key: jax.Array, scoring: Scoring,
            horizon: Horizon) -> EpisodeResult:
    """One fitness sample of ``genome`` on ``task``. Differentiable with respect to ``genome``."""
    synapses, curve = train(spec, genome, task, synapse_key, horizon)
    return score(spec, genome, synapses, task, scoring, curve)


#: synapse bytes (all blocks, float32) of the networks one chunk of the population trains side by side
CHUNK_BYTES = 4 << 20
#: calls whose synapses fit in this many bytes run unchunked (they stay in the last-level cache anyway)
UNCHUNKED_BYTES = 32 << 20


def synapse_bytes(layer_sizes: Sequence[int], num_states: int) -> int:
    """float32 bytes of one network's synapses (every forward and backward block)."""
    return 4 * num_states * sum((n_in + 1) * n_out + n_out * n_in for n_in, n_out in zip(layer_sizes[:-1],
                                                                                           layer_sizes[1:]))


def genomes_per_chunk(layer_sizes: Sequence[int], num_states: int, population: int, num_tasks: int) -> int:
    """Genomes whose ``num_tasks`` episodes run side by side in one step of :func:`evaluate`'s loop over the
    population: all of them when their synapses fit in :data:`UNCHUNKED_BYTES` (every small-network config:
    bit-identical to an unchunked engine), else about :data:`CHUNK_BYTES` of synapses (at least one genome),
    evened out over the chunks so that the padding of the last one is less than one chunk's worth."""
    per_genome = synapse_bytes(layer_sizes, num_states) * max(1, num_tasks)
    if population * per_genome <= UNCHUNKED_BYTES:
        return population
    chunks = -(-population // max(1, CHUNK_BYTES // per_genome))
    return -(-population // chunks)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _evaluate(spec, vectors, tasks, synapse_keys, scoring, horizon):
    def evaluate_chunk(chunk_vectors):
        genomes = jax.vmap(G.unravel, (None, 0))(spec, chunk_vectors)
        over_tasks = jax.vmap(episode, (None, None, 0, 0, None, None))
        return jax.vmap(over_tasks, (None, 0, None, None, None, None))(spec, genomes, tasks, synapse_keys, scoring,
                                                                       horizon)

    population, dims = vectors.shape
    size = genomes_per_chunk(spec.layer_sizes, spec.num_states, population, synapse_keys.shape[0])
    if size == population:
        return evaluate_chunk(vectors)
    # Large networks: a loop over chunks of the population (lax.map), so that each inner step's elementwise
    # passes over the synapses stay within the caches instead of streaming [P, K, k, n, m] tensors through
    # memory (2x faster at the paper's 196-512-10, P = 80). The last chunk is padded with copies of the
    # last genome; every episode still depends only on its own genome, task and key.
    padded = _pad_population(vectors, size)
    results = jax.lax.map(evaluate_chunk, padded.reshape(-1, size, dims))
    return jax.tree.map(lambda a: a.reshape(padded.shape[:1] + a.shape[2:])[:population], results)


def _pad_population(vectors: jax.Array, multiple: int) -> jax.Array:
    """``vectors [P, D]`` padded with copies of the last genome to a multiple of ``multiple`` rows."""
    population = vectors.shape[0]
    missing = -(-population // multiple) * multiple - population
    return jnp.concatenate([vectors, jnp.broadcast_to(vectors[-1:], (missing,) + vectors.shape[1:])])


def evaluate(spec: G.NetworkSpec, vectors: jax.Array, tasks: Task, synapse_keys: jax.Array, scoring: Scoring,
             horizon: Horizon) -> EpisodeResult:
    """Score genome vectors ``[P, D]`` on a task batch (leading axis K) -> :class:`EpisodeResult` ``[P, K]``.

    ``synapse_keys [K]`` give each task's initial synapses, shared by every genome (common random numbers).
    Episode (p, k) depends only on (vectors[p], tasks[k], synapse_keys[k], scoring, horizon).
    """
    return _evaluate(spec, jnp.asarray(vectors, jnp.float32), tasks, synapse_keys, scoring, horizon)


def evaluate_split(spec: G.NetworkSpec, vectors: jax.Array, tasks: Task, synapse_keys: jax.Array, scoring: Scoring,
                   horizon: Horizon, devices: Sequence[jax.Device]) -> EpisodeResult:
    """:func:`evaluate` with the population split evenly over ``devices`` (``jax.shard_map``): each device
    scores its share of the genomes, on a copy of the tasks, side by side with the others (on the CPU, host
    devices run on threads of their own: the small products of an inner step use two cores better this way
    than through one device's two-thread GEMMs). The population is padded with copies of its last genome to
    a multiple of the device count. Each device's share gets, bit for bit, the arrays :func:`evaluate` gives
    that share alone; those equal the whole population's arrays to float rounding (XLA's code for a smaller
    batch may sum in another order: 2.4e-7 apart in a cross-entropy of the 64-8-3 smoke network, identical
    arrays at the paper's 196-512-10)."""
    mesh = jax.sharding.Mesh(np.asarray(devices), ("population",))
    return _evaluate_split(spec, jnp.asarray(vectors, jnp.float32), tasks, synapse_keys, scoring, horizon, mesh)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _evaluate_split(spec, vectors, tasks, synapse_keys, scoring, horizon, mesh):
    share, whole = jax.sharding.PartitionSpec("population"), jax.sharding.PartitionSpec()
    # each device runs the whole engine on its share and never talks to the others (no collectives), so the
    # per-device values need no varying-axis bookkeeping (check_vma=False)
    per_device = jax.shard_map(lambda v, t, k: _evaluate(spec, v, t, k, scoring, horizon), mesh=mesh,
                               in_specs=(share, whole, whole), out_specs=share, check_vma=False)
    results = per_device(_pad_population(vectors, mesh.size), tasks, synapse_keys)
    return jax.tree.map(lambda a: a[:vectors.shape[0]], results)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _evaluate_window(spec, vectors, tasks, synapses, start, scoring, length):
    genomes = jax.vmap(G.unravel, (None, 0))(spec, vectors)

    def one(genome, task, syn):
        syn = unroll(spec, genome, syn, task, start, length)
        return score(spec, genome, syn, task, scoring, jnp.zeros((0,))), syn

    return jax.vmap(jax.vmap(one, (None, 0, 0)), (0, None, 0))(genomes, tasks, synapses)


def evaluate_window(spec: G.NetworkSpec, vectors: jax.Array, tasks: Task, synapses: G.Synapses, start,
                    length: int, scoring: Scoring) -> tuple[EpisodeResult, G.Synapses]:
    """Truncated unrolls (PES / NRES): candidate ``p`` continues its own ``synapses [P, K, ...]`` for
    ``length`` inner steps from support batch ``start`` of each task and is scored on the query set after
    them (the partial-unroll fitness). Returns (results ``[P, K]``, the synapses after the window)."""
    return _evaluate_window(spec, jnp.asarray(vectors, jnp.float32), tasks, synapses,
                            jnp.asarray(start, jnp.int32), scoring, int(length))


def init_window_synapses(spec: G.NetworkSpec, synapse_keys: jax.Array, population: int,
                         batch_size: int | None = None) -> G.Synapses:
    """Fresh synapses ``[P, K, ...]``: task k's initial synapses (as in :func:`evaluate`) for every candidate
    (``batch_size``: the support batch size, for specs that carry neuron states)."""
    return init_unroll(spec, synapse_keys, population, batch_size=batch_size).synapses


def compiled_cache_size() -> int:
    """Number of compiled variants of the engine (used to check that generations do not recompile)."""
    return _evaluate._cache_size() + _evaluate_split._cache_size()


def aggregate_fitness(fitness: jax.Array | np.ndarray, scoring: Scoring) -> jax.Array | np.ndarray:
    """Reduce ``fitness [P, K]`` over tasks to ``[P]`` with ``scoring.aggregate``.

    NumPy in, NumPy out (the driver's path: no device dispatch); JAX arrays stay in JAX (jit/grad)."""
    xp = np if isinstance(fitness, np.ndarray) else jnp
    if scoring.aggregate == "mean":
        return xp.mean(fitness, axis=-1)
    if scoring.aggregate == "median":
        return xp.median(fitness, axis=-1)
    if scoring.aggregate == "quantile":
        return xp.quantile(fitness, scoring.quantile, axis=-1)
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
