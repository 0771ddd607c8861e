"""The evaluator interface and its in-process backend (DESIGN §4).

An evaluator scores genome vectors on tasks that it samples itself from a task key, so that a remote
backend only ever receives small messages (vectors and keys), never data:

    evaluate(vectors [P, D], split, task_key, num_tasks, num_steps) -> Evaluation ([P, K] NumPy arrays)

Task ``i`` of a call is ``family(split).sample(task_key, ...)[i]`` (a function of ``fold_in(task_key, i)``)
and its initial synapses come from :func:`synapse_keys`, also a function of ``(task_key, i)`` only.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import genome as G
from workers import engine
from workers.tasks import TaskConfig, TaskFamily, make_family

_SYNAPSE_SALT = 0x5A1


class Evaluation(NamedTuple):
    """Per-episode results as NumPy arrays ``[P, K]`` (lower fitness is better)."""

    fitness: np.ndarray
    accuracy: np.ndarray
    cross_entropy: np.ndarray
    diverged: np.ndarray


class Evaluator(Protocol):
    """What the run loop needs of an evaluation backend."""

    spec: G.NetworkSpec

    def evaluate(self, vectors: np.ndarray, split: str, task_key: jax.Array, num_tasks: int,
                 num_steps: int, setting: int = 0) -> Evaluation: ...

    def describe(self) -> dict[str, Any]:
        """What evaluates (kind, devices, workers) for provenance.json."""
        ...

    def pop_metrics(self) -> dict[str, Any]:
        """Metrics accumulated since the previous call, which starts a new window (the run loop calls it once
        per generation); an explicit call, never a side effect of reading an attribute."""
        ...

    def close(self) -> None: ...


@functools.partial(jax.jit, static_argnums=1)
def synapse_keys(task_key: jax.Array, num_tasks: int) -> jax.Array:
    """Initial-synapse key of each task: a function of (task_key, task index) only (one compiled program of
    integer hashing, the same keys as the operations run one by one)."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(task_key, i), _SYNAPSE_SALT))(
        jnp.arange(num_tasks)
    )


BACKENDS = ("jax", "torch")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def request_devices(devices: int | str) -> int:
    """Ask JAX for the host devices that ``evaluator.devices`` splits over, if its backend has not started
    yet (the run calls this before anything computes); returns the count wanted."""
    from jax._src import xla_bridge

    wanted = available_cores() if devices == "auto" else int(devices)
    if wanted > 1 and not xla_bridge.backends_are_initialized() and jax.config.jax_num_cpu_devices < wanted:
        jax.config.update("jax_num_cpu_devices", wanted)
    return wanted


def split_devices(devices: int | str) -> list[jax.Device]:
    """The devices of JAX's default backend that an in-process evaluation splits its population over
    (``evaluator.devices``): ``devices`` of them, or with ``"auto"`` every one (on the CPU, one host device
    per available core). JAX fixes its number of host devices when its backend starts, so this asks for them
    (``jax_num_cpu_devices``) if the backend has not started yet; once it has, ``"auto"`` takes the devices
    there are and a count beyond them is an error naming what to change."""
    wanted = request_devices(devices)
    local = jax.local_devices()
    if devices == "auto":
        return local if local[0].platform != "cpu" else local[:wanted]
    if len(local) < wanted:
        raise ValueError(f"evaluator.devices: {wanted}, but this process has {len(local)} {local[0].platform} "
                         f"device(s) (JAX's host devices are fixed when it starts); set evaluator.devices: "
                         f"{len(local)} or auto")
    return local[:wanted]


class LocalEvaluator:
    """In-process evaluator: the jit/vmap engine on the local default device (CPU or GPU), or with
    ``backend="torch"`` the same episodes on torch's CPU GEMM (:mod:`workers.torch_engine`, fp32 or bf16 as
    ``episode_config.precision`` says; ``compiled``: through ``torch.compile``).

    ``settings``: the (spec, task config) pairs of a multi-setting run, as data; ``evaluate(..., setting=s)``
    evaluates on setting ``s`` (default: the one setting ``(spec, task_config)``). Every setting's compiled
    engine stays in JAX's cache, so alternating settings never recompiles."""

    def __init__(self, spec: G.NetworkSpec, task_config: TaskConfig, episode_config: engine.EpisodeConfig,
                 backend: str = "jax", compiled: bool = True,
                 settings: Sequence[tuple[G.NetworkSpec, TaskConfig]] = (), devices: int | str = 1):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if backend == "jax" and episode_config.precision != "float32":
            raise ValueError(f"episode.precision: {episode_config.precision} runs on evaluator.backend: torch "
                             "(the JAX engine evaluates in float32)")
        self.spec = spec
        self.task_config = task_config
        self.settings = tuple(settings) or ((spec, task_config),)
        self.episode_config = episode_config
        self.scoring = episode_config.scoring
        self.backend, self.compiled = backend, bool(compiled)
        if backend == "torch":
            from workers import torch_engine

            for setting_spec, _ in self.settings:
                torch_engine.check_support(setting_spec)
            torch_engine.check_precision(episode_config.precision)
            self._torch = torch_engine
        self.devices = split_devices(devices if backend == "jax" else 1)  # the torch backend runs on one
        self._families: dict[tuple[str, int], TaskFamily] = {}
        self._window_tasks = None  # (key, tasks) of the current truncated unroll
        self.eval_seconds = 0.0
        self.sample_seconds = 0.0  # the part of eval_seconds spent sampling task batches

    def family(self, split: str, setting: int = 0) -> TaskFamily:
        if (split, setting) not in self._families:
            if not 0 <= setting < len(self.settings):
                raise ValueError(f"setting {setting} does not exist (this evaluator has {len(self.settings)})")
            spec, task_config = self.settings[setting]
            family = make_family(task_config, split)
            if (family.num_inputs, family.num_classes) != (spec.num_inputs, spec.num_outputs):
                raise ValueError(
                    f"task split {split!r} has {family.num_inputs} inputs / {family.num_classes} classes but the "
                    f"network is {spec.layer_sizes}"
                )
            self._families[split, setting] = family
        return self._families[split, setting]

    def evaluate(self, vectors, split: str, task_key: jax.Array, num_tasks: int, num_steps: int,
                 setting: int = 0) -> Evaluation:
        start = time.perf_counter()
        tasks = jax.block_until_ready(self.family(split, setting).sample(task_key, num_tasks, num_steps))
        self.sample_seconds += time.perf_counter() - start
        spec = self.settings[setting][0]
        if self.backend == "torch":
            result = self._torch.evaluate(spec, np.asarray(vectors, np.float32), tasks,
                                          synapse_keys(task_key, num_tasks), self.scoring,
                                          self.episode_config.horizon(num_steps), self.episode_config.precision,
                                          self.compiled)
        elif len(self.devices) > 1:
            result = engine.evaluate_split(spec, vectors, tasks, synapse_keys(task_key, num_tasks), self.scoring,
                                           self.episode_config.horizon(num_steps), self.devices)
        else:
            result = engine.evaluate(spec, jnp.asarray(vectors, jnp.float32), tasks,
                                     synapse_keys(task_key, num_tasks), self.scoring,
                                     self.episode_config.horizon(num_steps))
        out = Evaluation(*(np.asarray(a) for a in (result.fitness, result.accuracy, result.cross_entropy,
                                                   result.diverged)))
        self.eval_seconds += time.perf_counter() - start
        return out

    def evaluate_window(self, vectors, synapses, split: str, task_key: jax.Array, num_tasks: int,
                        unroll_length: int, start: int, length: int) -> tuple[Evaluation, G.Synapses]:
        """Partial unrolls of truncation-aware strategies (see :func:`engine.evaluate_window`): the unroll's
        tasks are ``sample(task_key, num_tasks, unroll_length)``, the same whatever the window;
        ``synapses=None`` starts every candidate from the tasks' fresh synapses."""
        if self.backend != "jax":
            raise ValueError("truncated unrolls (evaluate_window) run on the JAX engine; use evaluator.backend: jax")
        start_time = time.perf_counter()
        tasks = self._unroll_tasks(split, task_key, num_tasks, unroll_length)
        vectors = jnp.asarray(vectors, jnp.float32)
        if synapses is None:
            synapses = engine.init_window_synapses(self.spec, synapse_keys(task_key, num_tasks), vectors.shape[0],
                                                   tasks.support_x.shape[2])
        result, synapses = engine.evaluate_window(self.spec, vectors, tasks, synapses, start, length, self.scoring)
        out = Evaluation(*(np.asarray(a) for a in (result.fitness, result.accuracy, result.cross_entropy,
                                                   result.diverged)))
        self.eval_seconds += time.perf_counter() - start_time
        return out, synapses

    def _unroll_tasks(self, split: str, task_key: jax.Array, num_tasks: int, unroll_length: int):
        """The unroll's task batch, sampled once and reused by each of its windows."""
        cache_key = (split, np.asarray(jax.random.key_data(task_key)).tobytes(), num_tasks, unroll_length)
        if self._window_tasks is None or self._window_tasks[0] != cache_key:
            self._window_tasks = (cache_key, self.family(split).sample(task_key, num_tasks, unroll_length))
        return self._window_tasks[1]

    def describe(self) -> dict[str, Any]:
        if self.backend == "torch":
            return {"kind": "local", **self._torch.describe(self.episode_config.precision),
                    "torch_compile": self.compiled}
        return {"kind": "local", "backend": "jax", "precision": "float32", "devices": [str(d) for d in jax.devices()],
                "split_over": len(self.devices)}

    def pop_metrics(self) -> dict[str, Any]:
        return {}  # the run loop measures in-process evaluation time itself

    def close(self) -> None:
        self._families.clear()
        self._window_tasks = None
