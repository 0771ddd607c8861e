"""``blur bench``: the evaluation engine against the machine's GEMM rate and PyTorch, in one run (DESIGN §7).

For each scale the bench measures, interleaved round by round so that every ratio compares numbers taken
under the same machine load:

* the float32 GEMM rate of the machine: a jitted JAX matmul of two large square matrices (and ``torch.mm``);
* the engine (:func:`workers.engine.evaluate`: fresh synapses, T inner steps, query scores for a population
  of P genomes on K tasks): canonical GFLOP/s (``canonical_flops × P × K × T / time``) and inner steps/s
  (``P·K·T / time``);
* the same math in PyTorch, vectorized over the population: all ``P·K`` networks in one set of tensors with
  the engine's state-axis-first layout, every product one ``torch.bmm`` / ``baddbmm_`` over ``P·K·k``
  batches, in-place updates into reused buffers, ``torch.no_grad`` (:func:`torch_step`);
* a per-genome PyTorch loop: a Python loop over genomes and tasks that trains one network at a time with
  the same step function (``P·K = 1``).

No pass reads the backward block of layer 0 (the backward pass stops at layer 1), and XLA drops its update
from the engine's compiled scan as dead code. The timed PyTorch runs skip it as well, so all three do the
same work; ``torch_vectorized_all_blocks`` is the PyTorch step that updates every block, as
:func:`genome.step` does, for reference.

Before timing, the bench checks on a small case that both PyTorch versions compute the synapses of
:func:`genome.step` (float32 tolerance); a mismatch fails the run (exit 1).

Memory: ``memory_analysis()`` of the compiled engine at T and 4T inner steps, ``memory_ratio_4T`` on temp +
argument + output bytes (the argument bytes include the task data, which hold T support batches and so grow
with T) and ``memory_temp_ratio_4T`` on the engine's working memory alone. Process RSS is not reported: the
peak growth of identical warm calls varies from 0 to the full working set (XLA and malloc reuse freed
buffers), so it does not measure the engine.

Scales (``--quick`` keeps the network shapes and shrinks P, K, T and the repeats):

========  ============  ====  =====  =====  ====
scale     network       B     P      K      T
========  ============  ====  =====  =====  ====
digits    64-32-10      32    64     8      20
paper     196-512-10    128   16     4      8
========  ============  ====  =====  =====  ====

The paper's CMA-ES runs use far larger populations; P=16, K=4 keeps one engine call at a few seconds on a
small CPU while every product is already the full paper size (batched over 128 networks × 2 states).
Network: k = 2, tanh forward and backward activations, identity output, additive backward update, ``target``
feedback, no synapse normalization (the canonical math only). Data are random normal inputs and random
labels: the bench measures speed, not learning.

Every rate uses the canonical FLOP count (DESIGN §3: forward, backward and both Hebbian products on every
layer), so the cross ratios are exact ratios of inner steps/s. The products an episode really needs are
``executed_flops_per_step`` (:func:`executed_flops`; about half the canonical count at paper scale, where
the first layer dominates), so ``engine_vs_gemm`` overstates the engine's share of the GEMM rate by
``canonical / executed``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

import genome as G
from workers import engine as E
from workers.evaluator import request_devices, split_devices
from workers.task_types import Task
from workers.tasks import TaskConfig

#: tolerance of the PyTorch-vs-JAX check: max |synapse change difference| / max |JAX synapse change|, float32
CHECK_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Scale:
    """One benchmark configuration. ``loop_population`` genomes (× all tasks) go through the per-genome
    loop; its rate is per inner step, so a subset measures it as well as the whole population."""

    name: str
    layer_sizes: tuple[int, ...]
    batch_size: int
    population: int
    tasks: int
    steps: int
    loop_population: int
    query: int = 64
    num_states: int = 2


FULL_SCALES = (
    Scale("digits", (64, 32, 10), batch_size=32, population=64, tasks=8, steps=20, loop_population=16),
    Scale("paper", (196, 512, 10), batch_size=128, population=16, tasks=4, steps=8, loop_population=16),
)
QUICK_SCALES = (
    Scale("digits", (64, 32, 10), batch_size=32, population=16, tasks=4, steps=4, loop_population=4),
    Scale("paper", (196, 512, 10), batch_size=128, population=4, tasks=2, steps=2, loop_population=4),
)
FULL_ROUNDS, QUICK_ROUNDS = 3, 2
FULL_GEMM_SIZE, QUICK_GEMM_SIZE = 2048, 1024


def bench_spec(scale: Scale) -> G.NetworkSpec:
    return G.NetworkSpec(scale.layer_sizes, num_states=scale.num_states, forward_activation="tanh",
                         output_activation="identity", backward_activation="tanh", backward_update="additive",
                         feedback="target")


def executed_flops(spec: G.NetworkSpec, batch_size: int) -> int:
    """FLOPs of the products an episode's inner step really needs: the forward product and the forward
    Hebbian product on every layer, the backward product and backward Hebbian product on layers >= 1 (the
    backward pass stops at layer 1, so nothing reads layer 0's backward block). The k×k mixes are left out."""
    k, b = spec.num_states, batch_size
    total = 0
    for layer, (n_in, n_out) in enumerate(zip(spec.layer_sizes[:-1], spec.layer_sizes[1:])):
        total += 2 * 2 * b * k * (n_in + 1) * n_out
        total += 2 * 2 * b * k * n_out * n_in if layer >= 1 else 0
    return total


# ---------------------------------------------------------------------------------------------- PyTorch

# the population-vectorized PyTorch step lives in genome.torch_population; re-exported for the benchmark
from genome.torch_population import (  # noqa: E402
    TorchGenomes,
    Workspace,
    check_torch_support,
    torch_genomes,
    torch_init_synapses,
    torch_query_scores,
    torch_step,
)


def torch_episodes_vectorized(spec: G.NetworkSpec, g: TorchGenomes, tasks: Task, generator: torch.Generator,
                              workspace: Workspace | None = None, update_input_backward: bool = False,
                              initial: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None
                              ) -> torch.Tensor:
    """All P·K episodes at once: fresh synapses (or copies of ``initial``), T steps, query cross-entropy
    ``[P·K]`` (genome-major). ``tasks`` hold torch tensors."""
    ws = workspace if workspace is not None else Workspace()
    if initial is None:
        forward, backward = torch_init_synapses(spec, g.forward_transform.shape[0], generator)
    else:
        forward, backward = [b.clone() for b in initial[0]], [b.clone() for b in initial[1]]
    for t in range(tasks.support_x.shape[1]):
        torch_step(spec, g, forward, backward, tasks.support_x[:, t], tasks.support_y[:, t], ws,
                   update_input_backward)
    return torch_query_scores(spec, g, forward, tasks.query_x, tasks.query_y, ws)[1]


def torch_episodes_loop(spec: G.NetworkSpec, g: TorchGenomes, tasks: Task, generator: torch.Generator,
                        num_genomes: int, workspace: Workspace | None = None) -> list[float]:
    """The first ``num_genomes`` genomes × all K tasks, one network at a time (a Python loop); query
    cross-entropies in loop order. Like the timed vectorized runs, skips the dead ``backward[0]`` update."""
    ws = workspace if workspace is not None else Workspace()
    num_tasks = tasks.support_x.shape[0]
    losses = []
    for p in range(num_genomes):
        genome = g.select(slice(p * num_tasks, p * num_tasks + 1))
        for task in range(num_tasks):
            forward, backward = torch_init_synapses(spec, 1, generator)
            for t in range(tasks.support_x.shape[1]):
                torch_step(spec, genome, forward, backward, tasks.support_x[task : task + 1, t],
                           tasks.support_y[task : task + 1, t], ws, update_input_backward=False)
            one = slice(task, task + 1)
            losses.append(float(torch_query_scores(spec, genome, forward, tasks.query_x[one], tasks.query_y[one],
                                                   ws)[1]))
    return losses


# ---------------------------------------------------------------------------------------------- correctness


def check_torch_matches_jax(spec: G.NetworkSpec, num_genomes: int = 3, num_tasks: int = 2, batch_size: int = 8,
                            num_steps: int = 3, seed: int = 0) -> dict[str, float]:
    """Train the same networks with :func:`genome.step` (JAX), the vectorized PyTorch step and the
    per-genome PyTorch loop from the same synapses and batches; return, for each PyTorch version, the max
    difference of the synapse changes (final - initial, all blocks) relative to the largest JAX change.
    Comparing changes rather than synapses keeps the check sharp when ``η̃`` is small."""
    check_torch_support(spec)
    key = jax.random.key(seed)
    genome_key, synapse_key, x_key, y_key = jax.random.split(key, 4)
    vectors = _genome_vectors(spec, genome_key, num_genomes)
    synapse_keys = jax.random.split(synapse_key, num_genomes * num_tasks)
    synapses = jax.vmap(lambda k: G.init_synapses(spec, k))(synapse_keys)  # leading axis P·K
    xs = jax.random.normal(x_key, (num_tasks, num_steps, batch_size, spec.num_inputs))
    ys = jax.random.randint(y_key, (num_tasks, num_steps, batch_size), 0, spec.num_outputs)

    def train(vector, synapse, x, y):
        genome = G.unravel(spec, vector)
        return jax.lax.scan(lambda s, xy: (G.step(spec, genome, s, *xy), None), synapse, (x, y))[0]

    per_network = jax.vmap(train)(jnp.repeat(vectors, num_tasks, axis=0), synapses,
                                  jnp.tile(xs, (num_genomes, 1, 1, 1)), jnp.tile(ys, (num_genomes, 1, 1)))
    reference = [np.asarray(b) for b in (*per_network.forward, *per_network.backward)]

    g = torch_genomes(spec, vectors, repeats=num_tasks)
    tx, ty = torch.from_numpy(np.array(xs)), torch.from_numpy(np.array(ys))
    fresh = [torch.from_numpy(np.array(b)) for b in (*synapses.forward, *synapses.backward)]
    num_layers = spec.num_layers

    forward, backward = [b.clone() for b in fresh[:num_layers]], [b.clone() for b in fresh[num_layers:]]
    workspace = Workspace()
    for t in range(num_steps):
        torch_step(spec, g, forward, backward, tx[:, t], ty[:, t], workspace)
    vectorized = [b.numpy() for b in (*forward, *backward)]

    looped = [np.empty_like(b) for b in reference]
    for network in range(num_genomes * num_tasks):
        task = network % num_tasks
        one = slice(network, network + 1)
        forward, backward = [b[one].clone() for b in fresh[:num_layers]], [b[one].clone() for b in fresh[num_layers:]]
        for t in range(num_steps):
            torch_step(spec, g.select(one), forward, backward, tx[task : task + 1, t], ty[task : task + 1, t],
                       workspace)
        for block, out in zip((*forward, *backward), looped):
            out[network] = block[0].numpy()

    initial = [np.asarray(b) for b in fresh]
    change = [r - i for r, i in zip(reference, initial)]
    scale = max(float(np.max(np.abs(c))) for c in change)
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError("the check case does not change the synapses; pick another genome or seed")

    def relative_error(blocks: list[np.ndarray]) -> float:
        return max(float(np.max(np.abs((b - i) - c))) for b, i, c in zip(blocks, initial, change)) / scale

    return {"torch_vectorized_max_rel_err": relative_error(vectorized),
            "torch_loop_max_rel_err": relative_error(looped)}


# ---------------------------------------------------------------------------------------------- measurement


def _genome_vectors(spec: G.NetworkSpec, key: jax.Array, count: int) -> jax.Array:
    return jax.vmap(lambda k: G.ravel(spec, G.random_genome(spec, k, transform_std=0.5)))(jax.random.split(key, count))


def _random_tasks(scale: Scale, spec: G.NetworkSpec, num_steps: int, seed: int) -> Task:
    rng = np.random.default_rng(seed)
    k, b, q = scale.tasks, scale.batch_size, scale.query
    return Task(
        rng.standard_normal((k, num_steps, b, spec.num_inputs), dtype=np.float32),
        rng.integers(0, spec.num_outputs, (k, num_steps, b), dtype=np.int32),
        rng.standard_normal((k, q, spec.num_inputs), dtype=np.float32),
        rng.integers(0, spec.num_outputs, (k, q), dtype=np.int32),
    )


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gemm_rates(size: int, repeats: int = 3) -> tuple[float, float]:
    """float32 GEMM GFLOP/s of JAX (jit matmul) and torch.mm on ``size``² matrices (median of repeats)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    jax_time = statistics.median(_seconds(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
    ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
    torch.mm(ta, tb)
    torch_time = statistics.median(_seconds(lambda: torch.mm(ta, tb)) for _ in range(repeats))
    flops = 2.0 * size**3
    return flops / jax_time / 1e9, flops / torch_time / 1e9


def _compiled_memory(spec, vectors, tasks, keys, horizon: E.Horizon) -> dict[str, int]:
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), (vectors, tasks, keys))
    stats = E._evaluate.lower(spec, *shapes, E.Scoring(), horizon).compile().memory_analysis()
    total = (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes)
    return {"temp": int(stats.temp_size_in_bytes), "argument": int(stats.argument_size_in_bytes), "total": int(total)}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def bench_scale(scale: Scale, rounds: int, gemm_size: int, log: Callable[[str], None],
                quick: bool = False) -> dict[str, Any]:
    """Measure one scale; see the module docstring. Rates are medians over ``rounds`` interleaved rounds and
    each ratio is the median of the per-round ratios. The torch evaluator backend runs compiled
    (``torch.compile``, as ``evaluator.torch_compile`` defaults) except with ``quick`` (eager)."""
    spec = bench_spec(scale)
    check_torch_support(spec)
    key = jax.random.key(0)
    vectors = _genome_vectors(spec, key, scale.population)
    tasks = _random_tasks(scale, spec, scale.steps, seed=1)
    keys = jax.random.split(jax.random.key(2), scale.tasks)
    jax_tasks = Task(*(jnp.asarray(a) for a in tasks))
    torch_tasks = Task(*(torch.from_numpy(a) for a in tasks))
    g = torch_genomes(spec, vectors, repeats=scale.tasks)
    generator = torch.Generator().manual_seed(0)
    vectorized_workspace, loop_workspace = Workspace(), Workspace()

    horizon = E.Horizon(scale.steps)

    def run_engine() -> None:
        jax.block_until_ready(E.evaluate(spec, vectors, jax_tasks, keys, E.Scoring(), horizon))

    log(f"{scale.name}: compiling the engine")
    memory_t = _compiled_memory(spec, vectors, jax_tasks, keys, horizon)  # compiles what run_engine calls
    run_engine()
    # the engine as `evaluator.devices: auto` runs it: the population split over the host devices this process
    # started with (one per core when `blur bench` starts JAX; one, and no split row, once JAX had started)
    devices = split_devices("auto")
    engines = {"engine": run_engine}
    split = len(devices) > 1
    if split:
        def run_engine_split() -> None:
            jax.block_until_ready(E.evaluate_split(spec, vectors, jax_tasks, keys, E.Scoring(), horizon, devices))

        log(f"{scale.name}: compiling the engine split over {len(devices)} devices")
        run_engine_split()
        engines["engine_split"] = run_engine_split

    def run_torch_vectorized() -> None:
        torch_episodes_vectorized(spec, g, torch_tasks, generator, vectorized_workspace)

    def run_torch_vectorized_all_blocks() -> None:
        torch_episodes_vectorized(spec, g, torch_tasks, generator, vectorized_workspace, update_input_backward=True)

    def run_torch_loop() -> None:
        torch_episodes_loop(spec, g, torch_tasks, generator, scale.loop_population, loop_workspace)

    run_torch_vectorized()  # warm-up: buffers, thread pools
    torch_episodes_loop(spec, g, torch_tasks, generator, 1, loop_workspace)

    from workers import torch_engine

    precisions = ["float32"] + (["bfloat16"] if torch_engine.bf16_units(torch_engine.cpu_flags()) else [])
    compiled = not quick

    def run_backend(precision: str) -> Callable[[], None]:
        return lambda: torch_engine.evaluate(spec, vectors, tasks, keys, E.Scoring(), horizon, precision, compiled)

    backends = {f"torch_backend_{'fp32' if p == 'float32' else 'bf16'}": run_backend(p) for p in precisions}
    log(f"{scale.name}: {'compiling' if compiled else 'warming up'} the torch backend ({', '.join(precisions)})")
    for run in backends.values():
        run()

    episodes = scale.population * scale.tasks
    loop_episodes = scale.loop_population * scale.tasks
    canonical = E.canonical_flops(spec, scale.batch_size)
    methods = tuple(engines) + ("torch_vectorized", "torch_vectorized_all_blocks", "torch_loop") + tuple(backends)
    samples: dict[str, list[float]] = {name: [] for name in ("gemm_jax", "gemm_torch") + methods}
    for round_index in range(rounds):
        log(f"{scale.name}: round {round_index + 1}/{rounds}")
        gemm_jax, gemm_torch = _gemm_rates(gemm_size)
        samples["gemm_jax"].append(gemm_jax)
        samples["gemm_torch"].append(gemm_torch)
        for name, run in engines.items():
            samples[name].append(episodes * scale.steps / _seconds(run))
        samples["torch_vectorized"].append(episodes * scale.steps / _seconds(run_torch_vectorized))
        samples["torch_vectorized_all_blocks"].append(
            episodes * scale.steps / _seconds(run_torch_vectorized_all_blocks))
        samples["torch_loop"].append(loop_episodes * scale.steps / _seconds(run_torch_loop))
        for name, run in backends.items():
            samples[name].append(episodes * scale.steps / _seconds(run))

    def per_round_ratio(numerator: str, denominator: str, flops_denominator: bool = False) -> float:
        ratios = [n * (canonical / 1e9 if flops_denominator else 1.0) / d
                  for n, d in zip(samples[numerator], samples[denominator])]
        return statistics.median(ratios)

    steps_per_s = {name: statistics.median(samples[name]) for name in methods}
    gflops = {name: rate * canonical / 1e9 for name, rate in steps_per_s.items()}

    log(f"{scale.name}: memory at T={scale.steps} and 4T={4 * scale.steps}")
    tasks_4t = _random_tasks(scale, spec, 4 * scale.steps, seed=3)  # only its shapes are used
    memory_4t = _compiled_memory(spec, vectors, tasks_4t, keys, E.Horizon(4 * scale.steps))

    return {
        "layer_sizes": list(scale.layer_sizes),
        "num_states": scale.num_states,
        "batch_size": scale.batch_size,
        "population": scale.population,
        "tasks": scale.tasks,
        "steps": scale.steps,
        "loop_population": scale.loop_population,
        "rounds": rounds,
        "canonical_flops_per_step": canonical,
        "executed_flops_per_step": executed_flops(spec, scale.batch_size),
        "gemm_jax_gflops": statistics.median(samples["gemm_jax"]),
        "gemm_torch_gflops": statistics.median(samples["gemm_torch"]),
        "engine_gflops": gflops["engine"],
        "engine_steps_per_s": steps_per_s["engine"],
        "torch_vectorized_gflops": gflops["torch_vectorized"],
        "torch_vectorized_steps_per_s": steps_per_s["torch_vectorized"],
        "torch_vectorized_all_blocks_gflops": gflops["torch_vectorized_all_blocks"],
        "torch_vectorized_all_blocks_steps_per_s": steps_per_s["torch_vectorized_all_blocks"],
        "torch_loop_gflops": gflops["torch_loop"],
        "torch_loop_steps_per_s": steps_per_s["torch_loop"],
        "engine_vs_gemm": per_round_ratio("engine", "gemm_jax", flops_denominator=True),
        "engine_vs_torch_gemm": per_round_ratio("engine", "gemm_torch", flops_denominator=True),
        "engine_vs_torch_vectorized": per_round_ratio("engine", "torch_vectorized"),
        "engine_vs_torch_vectorized_all_blocks": per_round_ratio("engine", "torch_vectorized_all_blocks"),
        "engine_vs_torch_loop": per_round_ratio("engine", "torch_loop"),
        # the split engine (None without several devices): its rate, against the one-device engine and torch
        "engine_split_devices": len(devices) if split else None,
        "engine_split_gflops": gflops.get("engine_split"),
        "engine_split_vs_engine": per_round_ratio("engine_split", "engine") if split else None,
        "engine_split_vs_gemm": per_round_ratio("engine_split", "gemm_jax", flops_denominator=True) if split else None,
        "engine_split_vs_torch_vectorized": per_round_ratio("engine_split", "torch_vectorized") if split else None,
        "torch_backend_compiled": compiled,
        "torch_backend_fp32_steps_per_s": steps_per_s["torch_backend_fp32"],
        "torch_backend_bf16_steps_per_s": steps_per_s.get("torch_backend_bf16"),
        "torch_backend_fp32_vs_engine": per_round_ratio("torch_backend_fp32", "engine"),
        # the bf16 mode against the fp32 engine (JAX), and against the torch backend's own fp32
        "bf16_vs_fp32": per_round_ratio("torch_backend_bf16", "engine") if "torch_backend_bf16" in backends else None,
        "bf16_vs_torch_fp32": (per_round_ratio("torch_backend_bf16", "torch_backend_fp32")
                               if "torch_backend_bf16" in backends else None),
        "memory_bytes_T": memory_t["total"],
        "memory_bytes_4T": memory_4t["total"],
        "memory_ratio_4T": memory_4t["total"] / memory_t["total"],
        "memory_temp_bytes_T": memory_t["temp"],
        "memory_temp_bytes_4T": memory_4t["temp"],
        "memory_temp_ratio_4T": _ratio(memory_4t["temp"], memory_t["temp"]),
        "samples_steps_per_s": {name: samples[name] for name in methods},
        "samples_gemm_jax_gflops": samples["gemm_jax"],
    }


def bench_ray(spec: G.NetworkSpec, task_config: TaskConfig, episode_config: E.EpisodeConfig,
              num_workers_list: Sequence[int] = (1, 2), *, population_size: int = 64, num_tasks: int = 8,
              num_steps: int | None = None, repeats: int = 5, cpus_per_worker: float = 1.0,
              address: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Throughput of Ray with 1, 2, ... workers vs the in-process evaluator on the same work.

    Each configuration is warmed up (compiled) by one call, then timed over ``repeats`` calls with new task
    keys. Per pool size: episodes/s and inner steps/s, ``speedup_vs_in_process``, ``per_core_efficiency``
    (episodes/s per worker CPU over in-process episodes/s per core of this machine), ``overhead_share`` (the
    part of a call's wall time not covered by the busiest worker's compute: scheduling, transfer, driver) and
    ``dispatch_share`` (driver time outside waiting). A local Ray is started for the whole benchmark unless
    this process is connected or ``address`` is given.
    """
    import ray

    from workers.evaluator import LocalEvaluator
    from workers.ray import (RayEvaluator, _enable_token_auth_if_available, _shutdown_local_ray, _start_local_ray,
                             connection_mode)

    num_steps = episode_config.num_steps if num_steps is None else num_steps
    vectors = np.asarray(jax.vmap(lambda k: G.ravel(spec, G.random_genome(spec, k)))(
        jax.random.split(jax.random.key(seed), population_size)), np.float32)
    episodes = population_size * num_tasks
    cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def measure(evaluator) -> float:
        evaluator.evaluate(vectors, "train", jax.random.key(seed), num_tasks, num_steps)
        evaluator.pop_metrics()
        start = time.perf_counter()
        for r in range(repeats):
            evaluator.evaluate(vectors, "train", jax.random.key(seed + 1 + r), num_tasks, num_steps)
        return (time.perf_counter() - start) / repeats

    local = LocalEvaluator(spec, task_config, episode_config)
    seconds = measure(local)
    local.close()
    report: dict[str, Any] = {
        "population_size": population_size, "num_tasks": num_tasks, "num_steps": num_steps, "repeats": repeats,
        "cpu_count": cpu_count, "cpus_per_worker": cpus_per_worker,
        "in_process": {"backend": jax.default_backend(), "seconds_per_call": seconds,
                       "episodes_per_s": episodes / seconds, "inner_steps_per_s": episodes * num_steps / seconds},
        "ray": {},
    }
    base = report["in_process"]["episodes_per_s"]
    mode = connection_mode(address, os.environ, ray.is_initialized())  # one Ray for every pool size
    started = _start_local_ray(math.ceil(max(num_workers_list) * cpus_per_worker), False) if mode == "start" else []
    if mode == "connect":
        _enable_token_auth_if_available()
        ray.init(address=address)
    try:
        for n in num_workers_list:
            evaluator = RayEvaluator(spec, task_config, episode_config, num_workers=n, cpus_per_worker=cpus_per_worker)
            try:
                seconds = measure(evaluator)
                metrics = evaluator.pop_metrics()
            finally:
                evaluator.close()
            rate = episodes / seconds
            report["ray"][str(n)] = {
                "seconds_per_call": seconds, "episodes_per_s": rate, "inner_steps_per_s": rate * num_steps,
                "speedup_vs_in_process": rate / base,
                "per_core_efficiency": (rate / (n * cpus_per_worker)) / (base / cpu_count),
                "overhead_share": metrics["ray_overhead_time"] / metrics["ray_eval_time"],
                "dispatch_share": metrics["ray_dispatch_time"] / metrics["ray_eval_time"],
            }
    finally:
        if mode == "start":
            _shutdown_local_ray(started)
        elif mode == "connect":
            ray.shutdown()
    first = report["ray"][str(min(num_workers_list))]
    for row in report["ray"].values():
        row["scaling_vs_fewest_workers"] = row["episodes_per_s"] / first["episodes_per_s"]
    return report


def _ray_section(quick: bool) -> dict[str, Any]:
    """:func:`bench_ray` on digits tasks (64-32-3, the main job's network), or why it is unavailable."""
    try:
        importlib.import_module("workers.ray")
    except ImportError as error:
        return {"available": False, "reason": f"ray bench unavailable ({error})"}

    scale = (QUICK_SCALES if quick else FULL_SCALES)[0]
    spec = bench_spec(scale).replace(layer_sizes=scale.layer_sizes[:-1] + (3,))
    task_config = TaskConfig(family="digits", n_way=3, batch_size=scale.batch_size)
    try:
        result = bench_ray(spec, task_config, E.EpisodeConfig(num_steps=scale.steps), (1, 2),
                           population_size=scale.population, num_tasks=scale.tasks, num_steps=scale.steps,
                           repeats=2 if quick else 5)
    except Exception as error:  # noqa: BLE001 - reported in the output; the exit code says it failed
        return {"available": True, "error": f"{type(error).__name__}: {error}"}
    return {"available": True, "result": result}


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": _load_average(),
    }


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: a bench on a busy machine (load near the core count) is not reliable,
    PyTorch's OpenMP threads in particular slow down many-fold when they share cores."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def collect(quick: bool, with_ray: bool, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the whole bench and return its results as one JSON-ready dict."""
    scales = QUICK_SCALES if quick else FULL_SCALES
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    gemm_size = QUICK_GEMM_SIZE if quick else FULL_GEMM_SIZE
    log("checking that the PyTorch step matches genome.step")
    check = check_torch_matches_jax(bench_spec(scales[0]))
    check["tolerance"] = CHECK_TOLERANCE
    check["ok"] = max(check["torch_vectorized_max_rel_err"], check["torch_loop_max_rel_err"]) <= CHECK_TOLERANCE
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": machine_info(),
        "gemm_size": gemm_size,
        "correctness": check,
        "scales": {},
    }
    if check["ok"]:
        for scale in scales:
            results["scales"][scale.name] = bench_scale(scale, rounds, gemm_size, log, quick)
    if with_ray:
        log("ray")
        results["ray"] = _ray_section(quick)
    results["load_average_after"] = _load_average()
    return results


# ---------------------------------------------------------------------------------------------- output

_TARGETS = {"engine_vs_gemm": 0.5, "engine_vs_torch_vectorized": 1.5, "engine_vs_torch_loop": 10.0,
            "memory_ratio_4T": 1.1}


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"blur bench ({results['mode']}): {machine['cpu']}, {machine['cpu_count']} cores; jax {machine['jax']} "
        f"({machine['jax_backend']}), torch {machine['torch']} ({machine['torch_threads']} threads)",
    ]
    load = (machine.get("load_average") or [None])[0], (results.get("load_average_after") or [None])[0]
    lines.append(f"load average (1 min) before / after: {load[0]} / {load[1]}")
    busiest = max((v for v in load if v is not None), default=0.0)
    if machine.get("cpu_count") and busiest > 0.75 * machine["cpu_count"] + 1:
        lines.append(f"warning: other work was running (load {busiest} on {machine['cpu_count']} cores); PyTorch's "
                     "OpenMP threads slow down many-fold when they share cores, so its ratios are unreliable")
    check = results["correctness"]
    lines.append(f"PyTorch step vs genome.step (max rel. error of synapses): vectorized "
                 f"{check['torch_vectorized_max_rel_err']:.1e}, loop {check['torch_loop_max_rel_err']:.1e} "
                 f"(tolerance {check['tolerance']:.0e}) -> {'ok' if check['ok'] else 'MISMATCH'}")
    scales = results["scales"]
    if scales:
        names = list(scales)
        rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
            ("network", lambda s: "-".join(map(str, s["layer_sizes"])) + f", k={s['num_states']}"),
            ("B / P / K / T", lambda s: f"{s['batch_size']} / {s['population']} / {s['tasks']} / {s['steps']}"),
            ("canonical MFLOP per inner step", lambda s: f"{s['canonical_flops_per_step'] / 1e6:.2f}"),
            (f"GEMM {results['gemm_size']}² jax GFLOP/s", lambda s: f"{s['gemm_jax_gflops']:.1f}"),
            (f"GEMM {results['gemm_size']}² torch GFLOP/s", lambda s: f"{s['gemm_torch_gflops']:.1f}"),
            ("engine GFLOP/s", lambda s: f"{s['engine_gflops']:.1f}"),
            ("engine inner steps/s", lambda s: f"{s['engine_steps_per_s']:.0f}"),
            ("torch vectorized GFLOP/s", lambda s: f"{s['torch_vectorized_gflops']:.1f}"),
            ("torch vectorized inner steps/s", lambda s: f"{s['torch_vectorized_steps_per_s']:.0f}"),
            ("  all blocks (V_0 update too) GFLOP/s", lambda s: f"{s['torch_vectorized_all_blocks_gflops']:.1f}"),
            ("torch loop GFLOP/s", lambda s: f"{s['torch_loop_gflops']:.1f}"),
            ("torch loop inner steps/s", lambda s: f"{s['torch_loop_steps_per_s']:.0f}"),
            ("engine / GEMM (target >= 0.5)", lambda s: _number(s["engine_vs_gemm"])),
            ("engine / torch vectorized (>= 1.5)", lambda s: _number(s["engine_vs_torch_vectorized"])),
            ("  engine / torch vectorized, all blocks", lambda s: _number(s["engine_vs_torch_vectorized_all_blocks"])),
            ("engine / torch loop (>= 10)", lambda s: _number(s["engine_vs_torch_loop"], 1)),
            ("engine split over host devices", lambda s: _number(s["engine_split_devices"], 0)),
            ("  split GFLOP/s", lambda s: _number(s["engine_split_gflops"], 1)),
            ("  split / one-device engine", lambda s: _number(s["engine_split_vs_engine"])),
            ("  split / GEMM", lambda s: _number(s["engine_split_vs_gemm"])),
            ("  split / torch vectorized (>= 1.5)", lambda s: _number(s["engine_split_vs_torch_vectorized"])),
            ("torch backend fp32 inner steps/s", lambda s: f"{s['torch_backend_fp32_steps_per_s']:.0f}"),
            ("torch backend bf16 inner steps/s", lambda s: _number(s["torch_backend_bf16_steps_per_s"], 0)),
            ("torch backend fp32 / engine", lambda s: _number(s["torch_backend_fp32_vs_engine"])),
            ("bf16 / fp32 engine (>= 2)", lambda s: _number(s["bf16_vs_fp32"])),
            ("memory at T, MiB (temp+args+out)", lambda s: _mib(s["memory_bytes_T"])),
            ("memory at 4T, MiB", lambda s: _mib(s["memory_bytes_4T"])),
            ("memory ratio 4T/T (<= 1.1)", lambda s: _number(s["memory_ratio_4T"], 3)),
            ("  temp only: ratio 4T/T", lambda s: _number(s["memory_temp_ratio_4T"], 3)),
        ]
        width = max(len(label) for label, _ in rows) + 2
        column = max(20, *(len(render(scales[n])) + 2 for n in names for _, render in rows))
        lines.append("")
        lines.append("".ljust(width) + "".join(n.rjust(column) for n in names))
        for label, render in rows:
            lines.append(label.ljust(width) + "".join(render(scales[n]).rjust(column) for n in names))
        lines.append("")
        lines.append("Ratios are medians of per-round ratios (each round measures everything once, interleaved); "
                     "the torch backend ran " + ("compiled." if any(v["torch_backend_compiled"] for v in
                                                                     scales.values()) else "eager."))
    if "ray" in results:
        ray = results["ray"]
        if not ray.get("available"):
            lines.append(ray.get("reason", "ray bench unavailable"))
        elif "error" in ray:
            lines.append(f"ray bench failed: {ray['error']}")
        else:
            lines.extend(_format_ray(ray["result"]))
    return "\n".join(lines)


def _format_ray(result: Any) -> list[str]:
    """Rows of ``bench_ray``'s report (falls back to its JSON if the layout is unknown)."""
    try:
        local = result["in_process"]
        lines = [f"Ray (digits 64-32-3, P={result['population_size']}, K={result['num_tasks']}, "
                 f"T={result['num_steps']}): in-process {local['inner_steps_per_s']:.0f} inner steps/s"]
        for workers, row in result["ray"].items():
            lines.append(f"  {workers} worker(s): {row['inner_steps_per_s']:.0f} inner steps/s, "
                         f"x{row['speedup_vs_in_process']:.2f} in-process, per-core efficiency "
                         f"{row['per_core_efficiency']:.2f}, overhead {100 * row['overhead_share']:.1f}%")
        return lines
    except (KeyError, TypeError, AttributeError):
        return ["ray: " + json.dumps(result, default=_json_default)]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def run_bench(quick: bool = False, as_json: bool = False, with_ray: bool = False,
              extend: Callable[[dict[str, Any], Callable[[str], None]], None] | None = None,
              extend_table: Callable[[dict[str, Any]], list[str]] | None = None) -> int:
    """``blur bench``: print the results (a table, or one JSON object with ``as_json``). Exit code 0, or 1
    when the PyTorch check fails or the Ray bench raised. ``extend(results, log)`` adds sections measured by
    higher layers (the paper run, :mod:`evolution.benchmarks`), ``extend_table(results)`` their table lines."""

    def log(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    request_devices("auto")  # before anything starts JAX: the host devices of the split engine's row
    results = collect(quick, with_ray, log)
    if extend is not None and results["correctness"]["ok"]:
        extend(results, log)
    if as_json:
        print(json.dumps(results, default=_json_default))
    else:
        print("\n".join([format_table(results)] + (extend_table(results) if extend_table else [])))
    failed = not results["correctness"]["ok"] or "error" in results.get("ray", {})
    return 1 if failed else 0


__all__ = [
    "FULL_SCALES",
    "QUICK_SCALES",
    "Scale",
    "TorchGenomes",
    "Workspace",
    "bench_scale",
    "bench_spec",
    "check_torch_matches_jax",
    "collect",
    "executed_flops",
    "format_table",
    "run_bench",
    "torch_episodes_loop",
    "torch_episodes_vectorized",
    "torch_genomes",
    "torch_step",
]
