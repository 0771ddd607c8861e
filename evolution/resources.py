"""Resource estimate before any work starts: peak memory and FLOPs of one evaluation call.

The engine vmaps every (genome, task) episode of a call at once, so its live memory is that of ``P × K``
episodes side by side (calls whose synapses exceed 32 MiB run in chunks of the population,
:func:`workers.engine.genomes_per_chunk`, and need less; the estimate stays the unchunked upper bound, so the
guard still refuses populations and widths that only a chunked loop could squeeze in — at a run time nobody
asked for): per episode the synapses (forward and backward blocks, ``k`` states each) held by the
scan carry, the update and the normalization temporaries (≈ 2 copies), the per-step neuron states of every
layer (forward, backward, pre-activations, Hebbian factors: ≈ 6 arrays of ``B × n × k``) and the query forward
pass; plus the task batch itself (``K × (T·B + Q)`` inputs) and the strategy's population. The estimate is
checked against XLA's ``memory_analysis`` of the compiled engine in the tests (within a small factor, on the
safe side). :func:`check_memory` refuses with a :class:`~evolution.config.ConfigError` — exit 2, naming the
estimate and the knob to turn — when it exceeds the cap (``evaluator.max_memory_gb``, default 90% of the
memory available now). Nothing is allocated to compute it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from evolution.config import ConfigError

_FLOAT = 4
_SYNAPSE_COPIES = 2  # the scan carry and the update temporaries
_STATE_ARRAYS = 6  # per-step neuron arrays per layer


@dataclass(frozen=True)
class Estimate:
    """Peak bytes and FLOPs of one evaluation call of ``population × tasks`` episodes."""

    peak_bytes: int
    flops: int
    population: int
    tasks: int

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def describe(self) -> str:
        return f"≈ {self.peak_gib:.2f} GiB peak, {self.flops / 1e9:.1f} GFLOP per call"


def estimate(layer_sizes, num_states: int, batch_size: int, num_query: int, num_steps: int,
             population: int, tasks: int, genome_dims: int = 0) -> Estimate:
    """Analytic peak memory / FLOPs of the engine on ``population`` genomes × ``tasks`` tasks."""
    k, b, q = num_states, batch_size, num_query
    pairs = list(zip(layer_sizes[:-1], layer_sizes[1:]))
    synapses = sum(2 * (n_in + 1) * n_out * k for n_in, n_out in pairs)
    states = sum(b * n * k for n in layer_sizes) * _STATE_ARRAYS
    query = q * max(layer_sizes) * k * 2
    per_episode = _FLOAT * (_SYNAPSE_COPIES * synapses + states + query)
    task_bytes = _FLOAT * tasks * (num_steps * b + q) * (layer_sizes[0] + 1)
    strategy_bytes = 8 * 4 * population * max(genome_dims, 1)  # population, its copies and fitness
    peak = population * tasks * per_episode + task_bytes + strategy_bytes
    step_flops = 0
    for n_in, n_out in pairs:  # forward, backward and two Hebbian products, plus the k × k state mixes
        step_flops += 4 * 2 * b * (n_in + 1) * n_out * k
        step_flops += 2 * b * k * k * (3 * (n_in + 1) + 3 * n_out)
    query_flops = sum(2 * q * (n_in + 1) * n_out * k for n_in, n_out in pairs)
    flops = population * tasks * (num_steps * step_flops + query_flops)
    return Estimate(int(peak), int(flops), int(population), int(tasks))


def available_bytes() -> int:
    """Memory available to a new allocation now (MemAvailable, else physical memory)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def memory_cap(max_memory_gb: float | None) -> tuple[int, str]:
    if max_memory_gb is not None:
        return int(max_memory_gb * 2**30), f"evaluator.max_memory_gb = {max_memory_gb:g}"
    cap = int(0.9 * available_bytes())
    return cap, f"90% of the available memory ({cap / 2**30:.1f} GiB)"


def check_memory(est: Estimate, max_memory_gb: float | None, what: str, knobs: str) -> None:
    """Refuse (ConfigError, exit 2) when ``est`` exceeds the memory cap, naming the estimate and the knobs."""
    cap, cap_text = memory_cap(max_memory_gb)
    if est.peak_bytes > cap:
        raise ConfigError(f"{what}: one evaluation of {est.population} genomes x {est.tasks} tasks needs "
                          f"{est.peak_gib:.1f} GiB (estimate), over {cap_text}; reduce {knobs}")


def check_run_config(config, spec, num_steps: int | None = None) -> Estimate:
    """The guard of ``blur evolve`` / ``blur resume`` / ``blur compare``: the largest call of the run
    (training generations at the longest horizon, and validation) must fit in memory."""
    from genome.params import num_dims

    steps = num_steps if num_steps is not None else _max_steps(config)
    population = config.strategy.population_size
    if config.evaluator.kind == "ray":
        population = math.ceil(population / config.evaluator.workers)  # one shard per worker process
    calls = [(population, config.run.tasks_per_generation), (2, config.run.validation_tasks)]
    worst = max((estimate(spec.layer_sizes, spec.num_states, config.task.batch_size, config.task.num_query,
                          steps, p, k, num_dims(spec)) for p, k in calls), key=lambda e: e.peak_bytes)
    check_memory(worst, config.evaluator.max_memory_gb, "resources",
                 "strategy.population_size, run.tasks_per_generation, network.hidden_sizes, task.batch_size "
                 "or episode.num_steps (or raise evaluator.max_memory_gb)")
    return worst


def _max_steps(config) -> int:
    steps = config.episode.num_steps
    curriculum = config.run.curriculum
    if curriculum.every_inner_steps > 0 and curriculum.increment > 0:
        return max(steps, curriculum.max_steps)
    if curriculum.every > 0 and curriculum.increment > 0:
        if curriculum.max_steps is not None:
            return max(steps, curriculum.max_steps)
        from evolution.config import MAX_STEPS

        return min(steps + curriculum.increment * (config.run.generations // curriculum.every), MAX_STEPS)
    return steps
