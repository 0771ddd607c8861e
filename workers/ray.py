"""The Ray evaluator (DESIGN §4): an actor pool behind the same interface as :class:`LocalEvaluator`.

This is the only module that imports ``ray``. Each actor builds one in-process evaluator (it loads the task
datasets itself from the task config, compiles the engine on first use and keeps it warm); a work unit is a
row range of the population plus the raw data of the task key, so messages stay small:

    driver: vectors [P, D] -> shards of ceil(P / live actors) rows (the last one padded to the same shape)
    actor:  LocalEvaluator.evaluate(shard, split, wrap_key_data(key_data), K, T) -> [rows, K] arrays

Evaluation is a pure function of (genome, task key, task index), so the assembled arrays equal the
in-process ones bit for bit, whatever the sharding. An actor that dies mid-generation (process killed, node
lost) is restarted by Ray (``max_restarts``) and its shards are re-run on a live actor, at most
``max_retries`` times each; results are assembled by shard index, so nothing is lost or counted twice. When
no actor is left and none can come back, :class:`WorkersLostError` is raised.

``address``: None starts a local Ray bound to 127.0.0.1 (closed again by :meth:`RayEvaluator.close`), or
connects to the cluster of ``RAY_ADDRESS`` (what ``ray job submit -- blur evolve ...`` sets); ``"auto"`` or
``host:port`` connect to a running cluster (with ``RAY_AUTH_MODE=token`` when a token is available). Remote
nodes need this package installed in the same environment.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import psutil
import ray
from ray import exceptions as ray_errors
from ray._private import ray_constants as _ray_constants

import genome as G
from workers.engine import EpisodeConfig
from workers.evaluator import Evaluation, LocalEvaluator
from workers.tasks import TaskConfig

__all__ = ["TIMING_METRICS", "RayEvaluator", "WorkersLostError", "actor_options", "check_device",
           "connection_mode"]

# metrics keys whose values are timings (excluded when comparing runs)
TIMING_METRICS = ("ray_eval_time", "ray_dispatch_time", "ray_overhead_time", "ray_worker_episodes_per_s")

# an actor or its node went away: the shard is re-run elsewhere
_RETRYABLE = (ray_errors.RayActorError, ray_errors.WorkerCrashedError, ray_errors.NodeDiedError,
              ray_errors.ObjectLostError, ray_errors.LocalRayletDiedError, ray_errors.OutOfMemoryError)
_GPU_MEMORY_SHARE = 0.9  # of a worker's GPU share that JAX may allocate
_LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # shards and results only; datasets never travel
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local Ray on 127.0.0.1 only


_log = logging.getLogger(__name__)


class WorkersLostError(RuntimeError):
    """Every Ray worker is gone and none came back (or a shard failed more than ``max_retries`` times)."""


# ----------------------------------------------------------------------------------------- resources


def _merge_xla_flags(flags: str, extra: Sequence[str]) -> str:
    names = {f.split("=", 1)[0] for f in extra}
    kept = [f for f in flags.split() if f.split("=", 1)[0] not in names]
    return " ".join(kept + list(extra))


def actor_options(cpus_per_worker: float, gpus_per_worker: float, max_restarts: int,
                  base_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Ray ``.options()`` of one worker actor: resources, restarts and its process environment.

    CPU workers: JAX on the CPU with one intra-op thread pool of ``floor(cpus_per_worker)`` threads
    (``PJRT_NPROC``; single-threaded Eigen for one CPU), so co-located actors do not oversubscribe cores.
    GPU workers: ``num_gpus`` (fractions share a GPU), JAX allocating on demand (no preallocation), with
    its allocator's memory fraction set to 90% of its GPU share. ``base_env`` (default ``os.environ``)
    supplies the ``XLA_FLAGS`` to extend.
    """
    base_env = os.environ if base_env is None else base_env
    threads = max(1, int(cpus_per_worker))
    env = {"PJRT_NPROC": str(threads), "OMP_NUM_THREADS": str(threads)}
    extra_flags = ["--xla_cpu_multi_thread_eigen=false"] if threads == 1 else []
    flags = _merge_xla_flags(base_env.get("XLA_FLAGS", ""), extra_flags)
    if flags:
        env["XLA_FLAGS"] = flags
    if gpus_per_worker > 0:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        # JAX refuses both names at once: override the deprecated one if the environment already uses it
        legacy = "XLA_PYTHON_CLIENT_MEM_FRACTION"
        fraction = _GPU_MEMORY_SHARE * min(gpus_per_worker, 1.0)
        env[legacy if legacy in base_env else "XLA_CLIENT_MEM_FRACTION"] = f"{fraction:.3f}"
    else:
        env["JAX_PLATFORMS"] = "cpu"
    return {
        "num_cpus": cpus_per_worker,
        "num_gpus": gpus_per_worker,
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # the evaluator re-runs failed shards itself, on any live actor
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": env},
    }


def connection_mode(address: str | None, environ: Mapping[str, str], initialized: bool) -> str:
    """How an evaluator gets its Ray: ``"reuse"`` the one this process is connected to, ``"start"`` a local
    Ray of its own (no address, no ``RAY_ADDRESS``), or ``"connect"`` to ``address`` / ``"auto"`` / the
    ``RAY_ADDRESS`` that ``ray job submit`` sets for its entrypoint."""
    if initialized:
        return "reuse"
    return "start" if address is None and not environ.get("RAY_ADDRESS") else "connect"


def check_device(require_gpu: bool, backend: str) -> None:
    """A GPU worker whose JAX sees no GPU is a configuration error, not a silent CPU run."""
    if require_gpu and backend not in ("gpu", "cuda", "rocm"):
        raise RuntimeError(f"gpus_per_worker > 0 but JAX in the worker runs on {backend!r}: install a CUDA "
                           "build of jaxlib on the worker nodes (pip install 'jax[cuda12]')")


# -------------------------------------------------------------------------------------------- actor


def _key_message(task_key: jax.Array) -> tuple[np.ndarray, str | None]:
    """(uint32 key data, implementation name or None for a raw uint32 key)."""
    if jnp.issubdtype(task_key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(task_key)), str(jax.random.key_impl(task_key))
    return np.asarray(task_key), None


def _unwrap_key(data: np.ndarray, impl: str | None) -> jax.Array:
    return jnp.asarray(data) if impl is None else jax.random.wrap_key_data(data, impl=impl)


class _Worker:
    """One actor. Transport only: NumPy in, the in-process evaluator, NumPy out."""

    def __init__(self, spec: G.NetworkSpec, task_config: TaskConfig, episode_config: EpisodeConfig,
                 require_gpu: bool, backend: str = "jax", compiled: bool = True, settings: tuple = ()):
        check_device(require_gpu, jax.default_backend())
        self._evaluator = LocalEvaluator(spec, task_config, episode_config, backend, compiled, settings)
        for setting in range(len(self._evaluator.settings)):  # load the data now: a bad path fails at startup
            self._evaluator.family("train", setting)

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "hostname": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(), "backend": jax.default_backend(),
                "device": str(jax.devices()[0]), "threads": os.environ.get("PJRT_NPROC"),
                "engine": self._evaluator.describe()}

    def evaluate(self, vectors: np.ndarray, unit: WorkUnit) -> ShardResult:
        start = time.perf_counter()
        result = self._evaluator.evaluate(vectors, unit.split, _unwrap_key(unit.key_data, unit.key_impl),
                                          unit.num_tasks, unit.num_steps, unit.setting)
        return ShardResult(tuple(result), time.perf_counter() - start)


_RemoteWorker = ray.remote(_Worker)


class WorkUnit(NamedTuple):
    """What one shard's message carries besides its rows: a split, the task key as raw data, K, T and the
    setting (an index into the settings every worker was given as data at startup)."""

    split: str
    key_data: np.ndarray
    key_impl: str | None
    num_tasks: int
    num_steps: int
    setting: int = 0


class ShardResult(NamedTuple):
    """An actor's answer for one shard: the Evaluation arrays of its rows and the seconds it computed."""

    arrays: tuple
    seconds: float


@dataclass
class _Slot:
    """The driver's view of one actor."""

    index: int
    handle: Any
    state: str = "starting"  # starting | alive | suspect (died, may be restarting) | dead
    info: dict = field(default_factory=dict)
    restarts: int = 0  # restarts seen (the actor answered again)
    deaths: int = 0  # failures seen; beyond max_restarts Ray does not restart it
    busy_seconds: float = 0.0  # in the current metrics window
    episodes: int = 0


@dataclass
class _Window:
    """Metrics accumulated since ``pop_metrics`` was last called (one generation in the run loop)."""

    calls: int = 0
    shards: int = 0
    failures: int = 0
    retries: int = 0
    restarts: int = 0
    eval_time: float = 0.0
    dispatch_time: float = 0.0
    overhead_time: float = 0.0
    failure_log: list = field(default_factory=list)


class _Call:
    """One ``evaluate`` call: shards of ``ceil(P / num_actors)`` rows (the last padded by repeating its last
    row, so every shard has the same shape and compiles once per actor), their attempts and results."""

    def __init__(self, vectors: np.ndarray, message: WorkUnit, num_actors: int):
        self.vectors, self.message = vectors, message
        num_rows = len(vectors)
        self.shard_size = max(1, math.ceil(num_rows / max(1, min(num_actors, num_rows))))
        self.bounds = [(a, min(a + self.shard_size, num_rows)) for a in range(0, max(num_rows, 1), self.shard_size)]
        self.num_shards = len(self.bounds)
        self.results: list[tuple | None] = [None] * self.num_shards
        self.attempts = [0] * self.num_shards
        self.pending: dict[Any, tuple[int, _Slot]] = {}  # object ref -> (shard, actor)
        self.waiting: list[int] = []  # shards whose actor died, to re-submit
        self.busy: dict[int, float] = {}  # actor index -> compute seconds in this call

    def num_rows(self, shard: int) -> int:
        a, b = self.bounds[shard]
        return b - a

    def shard_vectors(self, shard: int) -> np.ndarray:
        a, b = self.bounds[shard]
        block = self.vectors[a:b]
        if 0 < len(block) < self.shard_size:
            block = np.concatenate([block, np.repeat(block[-1:], self.shard_size - len(block), axis=0)])
        return block

    def load(self, slot: _Slot) -> int:
        return sum(1 for _, s in self.pending.values() if s is slot)

    def assemble(self) -> Evaluation:
        return Evaluation(*(np.concatenate([r[i][: self.num_rows(k)] for k, r in enumerate(self.results)])
                            for i in range(len(Evaluation._fields))))


# ----------------------------------------------------------------------------------------- evaluator


class RayEvaluator:
    """Evaluate genome vectors on a pool of Ray actors; same results as :class:`LocalEvaluator`."""

    def __init__(self, spec: G.NetworkSpec, task_config: TaskConfig, episode_config: EpisodeConfig, *,
                 num_workers: int = 2, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 address: str | None = None, max_retries: int = 3, max_restarts: int | None = None,
                 startup_timeout_s: float = 300.0, restart_timeout_s: float = 300.0, backend: str = "jax",
                 compiled: bool = True, settings: tuple = ()):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.spec = spec
        self.task_config = task_config
        self.settings = tuple(settings)  # (spec, task config) pairs, shipped to every worker as data
        self.episode_config = episode_config
        self.num_workers = num_workers
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self.max_retries = max_retries
        self.max_restarts = max_retries if max_restarts is None else max_restarts
        self.restart_timeout_s = restart_timeout_s
        self._lock = threading.Lock()  # guards _in_flight, read from other threads
        self._driver = threading.Lock()  # held by evaluate: only one thread drives the actors at a time
        self._in_flight: dict[int, _Slot] = {}
        self._probes: dict[Any, _Slot] = {}  # info() calls to actors that died: answered once restarted
        self._last_death = ""
        self._window = _Window()
        self._closed = False
        self._slots: list[_Slot] = []
        self._owned_processes: list[psutil.Process] = []
        self.started_ray = self.connected = False
        try:
            self.address = self._init_ray(address)
            options = actor_options(cpus_per_worker, gpus_per_worker, self.max_restarts)
            self._slots = [_Slot(i, _RemoteWorker.options(**options).remote(
                spec, task_config, self.episode_config, gpus_per_worker > 0, backend, compiled, self.settings))
                for i in range(num_workers)]
            self._await_startup(startup_timeout_s)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, spec: G.NetworkSpec, config: Any, settings: tuple = ()) -> RayEvaluator:
        """From an ``evolution.config.Config`` (duck-typed: ``task``, ``episode`` and ``evaluator``);
        ``settings``: the (spec, task config) pairs of a multi-setting run."""
        ev = config.evaluator
        return cls(spec, config.task, config.episode, num_workers=ev.workers, cpus_per_worker=ev.cpus_per_worker,
                   gpus_per_worker=ev.gpus_per_worker, address=ev.ray_address, max_retries=ev.max_retries,
                   backend=ev.backend, compiled=ev.torch_compile, settings=settings)

    # ------------------------------------------------------------------------------------ cluster
    def _init_ray(self, address: str | None) -> str:
        """Use, start or connect to Ray (see :func:`connection_mode`); returns the cluster address."""
        mode = connection_mode(address, os.environ, ray.is_initialized())
        if mode == "start":
            self._owned_processes = _start_local_ray(math.ceil(self.num_workers * self.cpus_per_worker),
                                                     self.gpus_per_worker > 0)
            self.started_ray = self.connected = True
            gpus = ray.cluster_resources().get("GPU", 0.0)
            if self.gpus_per_worker > 0 and gpus < self.gpus_per_worker:
                raise RuntimeError(f"gpus_per_worker={self.gpus_per_worker:g} but this machine has {gpus:g} GPUs")
        elif mode == "connect":
            _enable_token_auth_if_available()
            ray.init(address=address)  # None: RAY_ADDRESS
            self.connected = True
        return ray.get_runtime_context().gcs_address

    def _await_startup(self, timeout_s: float) -> None:
        refs = {slot.handle.info.remote(): slot for slot in self._slots}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise RuntimeError(
                f"{len(pending)} of {self.num_workers} Ray workers did not start within {timeout_s:.0f}s; each "
                f"needs {self.cpus_per_worker:g} CPU / {self.gpus_per_worker:g} GPU and the cluster has "
                f"{ray.cluster_resources()}")
        for ref in ready:
            slot = refs[ref]
            try:
                slot.info = ray.get(ref)
            except ray_errors.RayActorError as error:
                raise RuntimeError(f"Ray worker {slot.index} failed to start: {error}") from None
            slot.state = "alive"

    def describe(self) -> dict[str, Any]:
        """Cluster shape and worker placement, for a run's provenance."""
        self._refresh()
        nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
        return {
            "kind": "ray", "ray_version": ray.__version__, "address": self.address,
            "started_ray": self.started_ray, "num_workers": self.num_workers,
            "cpus_per_worker": self.cpus_per_worker, "gpus_per_worker": self.gpus_per_worker,
            "max_retries": self.max_retries, "max_restarts": self.max_restarts,
            "num_nodes": len(nodes),
            "cluster_resources": {k: v for k, v in ray.cluster_resources().items()
                                  if k in ("CPU", "GPU", "memory")} if ray.is_initialized() else {},
            "workers": [{"index": s.index, "state": s.state, "restarts": s.restarts, **s.info} for s in self._slots],
        }

    def worker_pids(self) -> list[int | None]:
        """Process id of each worker as last seen (None once dead); a restarted worker's new pid shows once
        its restart probe has answered, which this call checks for without waiting."""
        self._refresh()
        return [s.info.get("pid") if s.state != "dead" else None for s in self._slots]

    def in_flight(self) -> list[dict[str, Any]]:
        """Shards dispatched and not yet returned: ``{"shard", "worker", "pid"}`` each."""
        with self._lock:
            return [{"shard": shard, "worker": slot.index, "pid": slot.info.get("pid")}
                    for shard, slot in self._in_flight.items()]

    def _refresh(self) -> None:
        """Take in the answers of restarted actors, unless an evaluation in another thread is driving them
        (it takes them in itself)."""
        if self._closed or not self._driver.acquire(blocking=False):
            return
        try:
            self._poll_probes(timeout=0)
        finally:
            self._driver.release()

    # ----------------------------------------------------------------------------------- evaluate
    def evaluate(self, vectors, split: str, task_key: jax.Array, num_tasks: int, num_steps: int,
                 setting: int = 0) -> Evaluation:
        if self._closed:
            raise RuntimeError("RayEvaluator is closed")
        with self._driver:
            return self._evaluate(vectors, split, task_key, num_tasks, num_steps, setting)

    def _evaluate(self, vectors, split: str, task_key: jax.Array, num_tasks: int, num_steps: int,
                  setting: int) -> Evaluation:
        start = time.perf_counter()
        self._poll_probes(timeout=0)
        usable = [s for s in self._slots if s.state == "alive"] or [s for s in self._slots if s.state == "suspect"]
        if not usable:
            raise WorkersLostError(f"all {self.num_workers} Ray workers are lost (restarts exhausted or nodes "
                                   f"gone); last: {self._last_death}")
        call = _Call(np.asarray(vectors), WorkUnit(split, *_key_message(task_key), int(num_tasks), int(num_steps),
                                                   int(setting)),
                     len(usable))
        try:
            for shard in range(call.num_shards):
                self._submit(call, shard, usable[shard % len(usable)])
            waited = self._collect(call)
        finally:
            with self._lock:
                self._in_flight.clear()
        out = call.assemble()
        wall = time.perf_counter() - start
        window = self._window
        window.calls += 1
        window.shards += call.num_shards
        window.eval_time += wall
        window.dispatch_time += wall - waited
        window.overhead_time += max(0.0, wall - max(call.busy.values(), default=0.0))
        return out

    def _submit(self, call: _Call, shard: int, slot: _Slot) -> None:
        call.attempts[shard] += 1
        call.pending[slot.handle.evaluate.remote(call.shard_vectors(shard), call.message)] = (shard, slot)
        with self._lock:
            self._in_flight[shard] = slot

    def _collect(self, call: _Call) -> float:
        """Gather shard results, re-submitting the shards of failed actors; returns the seconds spent waiting."""
        waited = 0.0
        probe_deadline = None
        while call.pending or call.waiting:
            if call.pending:
                probe_deadline = None
            else:  # every shard waits for an actor to come back
                if not self._probes:
                    raise WorkersLostError(
                        f"all {self.num_workers} Ray workers are lost (restarts exhausted or nodes gone); "
                        f"{len(call.waiting)} of {call.num_shards} shard(s) not evaluated; last: {self._last_death}")
                probe_deadline = probe_deadline or time.perf_counter() + self.restart_timeout_s
                if time.perf_counter() > probe_deadline:
                    raise WorkersLostError(f"no Ray worker came back within {self.restart_timeout_s:.0f}s")
            wait_start = time.perf_counter()
            ready, _ = ray.wait(list(call.pending) + list(self._probes), num_returns=1, timeout=1.0)
            waited += time.perf_counter() - wait_start
            for ref in ready:
                if ref in self._probes:
                    self._finish_probe(ref)
                else:
                    self._finish_shard(call, ref)
            alive = [s for s in self._slots if s.state == "alive"]
            while call.waiting and alive:
                self._submit(call, call.waiting.pop(0), min(alive, key=call.load))
        return waited

    def _finish_shard(self, call: _Call, ref) -> None:
        shard, slot = call.pending.pop(ref)
        with self._lock:
            self._in_flight.pop(shard, None)
        try:
            arrays, seconds = ray.get(ref)  # a ShardResult
        except _RETRYABLE as error:
            self._window.failures += 1
            self._window.failure_log.append(
                f"worker {slot.index} (pid {slot.info.get('pid')}, node {str(slot.info.get('node_id'))[:12]}): "
                f"shard {shard} attempt {call.attempts[shard]}: {type(error).__name__}")
            _log.warning("Ray %s; re-running the shard", self._window.failure_log[-1])
            if slot.state == "alive":
                self._lost(slot, error)
            if call.attempts[shard] > self.max_retries:
                raise WorkersLostError(f"shard {shard} failed {call.attempts[shard]} times "
                                       f"(evaluator.max_retries={self.max_retries})") from error
            self._window.retries += 1
            call.waiting.append(shard)
            return
        if call.results[shard] is None:  # each shard is counted once
            call.results[shard] = arrays
            call.busy[slot.index] = call.busy.get(slot.index, 0.0) + seconds
            slot.busy_seconds += seconds
            slot.episodes += call.num_rows(shard) * call.message.num_tasks

    def _poll_probes(self, timeout: float) -> None:
        if self._probes:
            ready, _ = ray.wait(list(self._probes), num_returns=len(self._probes), timeout=timeout)
            for ref in ready:
                self._finish_probe(ref)

    def _finish_probe(self, ref) -> None:
        slot = self._probes.pop(ref)
        try:
            info = ray.get(ref)
        except ray_errors.ActorUnavailableError:
            self._probes[slot.handle.info.remote()] = slot  # temporarily unreachable: ask again
            return
        except _RETRYABLE as error:
            self._lost(slot, error)
            return
        slot.info, slot.state = info, "alive"
        slot.restarts += 1
        self._window.restarts += 1

    def _lost(self, slot: _Slot, error: Exception) -> None:
        """``slot``'s actor died: wait for Ray to restart it (a probe answers then) unless it cannot."""
        slot.deaths += 1
        init_failed = isinstance(error, ray_errors.RayActorError) and error.actor_init_failed
        if init_failed or slot.deaths > self.max_restarts:
            slot.state = "dead"
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            self._last_death = f"worker {slot.index}: {reason}"
            self._window.failure_log.append(f"worker {slot.index} is dead ({reason})")
            _log.warning("Ray worker %d is dead: %s", slot.index, reason)
            return
        slot.state = "suspect"
        self._probes[slot.handle.info.remote()] = slot

    # ------------------------------------------------------------------------------------ metrics
    def pop_metrics(self) -> dict[str, Any]:
        """Metrics since the previous call (the run loop reads them once per generation), then reset."""
        window, self._window = self._window, _Window()
        throughput = [round(s.episodes / s.busy_seconds, 3) if s.busy_seconds > 0 else None for s in self._slots]
        for slot in self._slots:
            slot.busy_seconds, slot.episodes = 0.0, 0
        metrics = {
            "ray_workers": sum(s.state == "alive" for s in self._slots),
            "ray_calls": window.calls,
            "ray_shards": window.shards,
            "ray_failures": window.failures,
            "ray_retries": window.retries,
            "ray_restarts": window.restarts,
            "ray_eval_time": window.eval_time,
            "ray_dispatch_time": window.dispatch_time,
            "ray_overhead_time": window.overhead_time,
            "ray_worker_episodes_per_s": throughput,
        }
        if window.failure_log:
            metrics["ray_failure_log"] = window.failure_log
        return metrics

    # -------------------------------------------------------------------------------------- close
    def close(self) -> None:
        """Stop this evaluator's actors; shut Ray down only if this evaluator started it (or disconnect if it
        connected). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if ray.is_initialized():
            for slot in self._slots:
                try:
                    ray.kill(slot.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        if self.started_ray:
            _shutdown_local_ray(self._owned_processes)
        elif self.connected:
            ray.shutdown()  # disconnect this driver; the cluster keeps running


def _start_local_ray(num_cpus: int, with_gpus: bool) -> list[psutil.Process]:
    """Start a local Ray bound to 127.0.0.1 (dashboard off); returns the processes it started."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # Ray's switch for single-machine clusters: every process binds to 127.0.0.1. The started processes read
    # it from the environment, this driver from the constant Ray computed at import.
    saved_env = os.environ.get(_LOOPBACK_ENV)
    saved_flag = getattr(_ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_LOOPBACK_ENV] = "0"
    _ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with warnings.catch_warnings():  # Ray forks only to exec its daemons at once: no JAX state is used
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                     num_gpus=None if with_gpus else 0, object_store_memory=_LOCAL_OBJECT_STORE_BYTES)
    finally:
        _ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = saved_env
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def _shutdown_local_ray(started: list[psutil.Process], timeout_s: float = 10.0) -> None:
    """``ray.shutdown()``, then make sure the processes that Ray started (and their children, the workers)
    have exited: wait, then terminate and kill stragglers. Touches no other process."""
    processes = {p.pid: p for p in started}
    for p in started:
        try:
            processes.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    ray.shutdown()
    _, alive = psutil.wait_procs(list(processes.values()), timeout=timeout_s)
    for signal_fn in ("terminate", "kill"):
        for p in alive:
            try:
                getattr(p, signal_fn)()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=timeout_s)


def _enable_token_auth_if_available() -> None:
    """Connect with token authentication when a token exists and RAY_AUTH_MODE is not set explicitly."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    token_files = [Path(path)] if path else [Path.home() / ".ray" / "auth_token"]
    if os.environ.get("RAY_AUTH_TOKEN") or any(f.is_file() for f in token_files):
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # refresh Ray's cached config so this process sees the mode (as `ray start` does)
            from ray._raylet import Config

            Config.initialize("")
        except Exception:  # noqa: BLE001 - older Ray: the environment variable is enough
            pass
