"""The Ray evaluator on real Ray clusters on loopback (no mocks): the same arrays as the in-process
evaluator, a whole smoke run identical to the in-process run, a worker killed mid-generation changing
nothing, and no process left behind.

``TestOnExistingCluster`` starts ``ray start --head`` (token auth on, dashboard off) as a subprocess and
connects to it like ``--ray-address host:port`` would; the tests after it start their own local Ray in
this process. Every process a test started is ended by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import psutil
import pytest

import genome as G
from evolution.config import load_config
from evolution.run import TIMING_KEYS, Run, evaluator_settings, local_evaluator, network_spec
from workers.evaluator import LocalEvaluator
from workers.ray import TIMING_METRICS, RayEvaluator, WorkersLostError, actor_options, check_device, connection_mode

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_vectors(spec: G.NetworkSpec, num: int, seed: int = 0) -> np.ndarray:
    keys = jax.random.split(jax.random.key(seed), num)
    return np.asarray(jax.vmap(lambda k: G.ravel(spec, G.random_genome(spec, k)))(keys), np.float64)


def in_background(fn, *args):
    """Run ``fn(*args)`` in a thread (the driver computes its reference meanwhile); returns a join function."""
    out = {}

    def target():
        try:
            out["result"] = fn(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in join
            out["error"] = error

    thread = threading.Thread(target=target)
    thread.start()

    def join():
        thread.join(timeout=300)
        if "error" in out:
            raise out["error"]
        return out["result"]

    return join


def assert_same_evaluation(actual, expected) -> None:
    for name, a, b in zip(expected._fields, actual, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)


def end_processes(processes, grace_s: float = 5.0) -> list[psutil.Process]:
    """Give ``processes`` (started by this test) ``grace_s`` to exit, then terminate and kill the stragglers
    by pid (gcs_server and Ray's monitor may ignore SIGTERM); returns the stragglers."""
    _, stragglers = psutil.wait_procs(processes, timeout=grace_s)
    alive = stragglers
    for method in ("terminate", "kill"):
        for p in alive:
            try:
                getattr(p, method)()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5)
    return stragglers


def loopback_only(processes) -> list[str]:
    """Listening addresses of ``processes`` that are not loopback."""
    bad = []
    for p in processes:
        try:
            for c in p.net_connections():
                if c.status == psutil.CONN_LISTEN and c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1"):
                    bad.append(f"{p.name()} {c.laddr.ip}:{c.laddr.port}")
        except psutil.NoSuchProcess:
            pass
    return bad


class HeadNode:
    """``ray start --head`` in a private temp dir; its processes are found by that dir or its GCS port."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are limited
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.seen: dict[int, psutil.Process] = {}
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        if not (Path.home() / ".ray" / "auth_token").is_file():  # the user's token, as `ray start` expects
            subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
        command = [RAY, "start", "--head", f"--port={self.port}", "--num-cpus=4", "--num-gpus=1",
                   "--include-dashboard=false", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                   f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--metrics-export-port={free_port()}"]
        try:
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
        finally:
            self.processes()

    def processes(self) -> list[psutil.Process]:
        markers = (self.temp_dir, self.address)
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and any(m in arg for arg in (p.info["cmdline"] or []) for m in markers):
                self.seen[p.pid] = p
        for p in list(self.seen.values()):
            try:
                self.seen.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return [p for p in self.seen.values() if p.is_running()]

    def stop(self) -> list[psutil.Process]:
        """Terminate (then kill) every process of this head node; returns those still alive (none)."""
        processes = self.processes()
        end_processes(processes, grace_s=0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return [p for p in processes if p.is_running()]


@pytest.fixture(scope="class")  # torn down after TestOnExistingCluster, before the own-Ray tests
def head():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_MODE", raising=False)  # the evaluator turns token auth on itself
        mp.delenv("RAY_ADDRESS", raising=False)
        node = HeadNode()
        try:
            yield node
        finally:
            assert node.stop() == [], "processes of the head node survived"


@pytest.fixture(scope="class")
def smoke(head):
    config = load_config(SMOKE, ["evaluator.kind=ray", "evaluator.workers=2",
                                 f"evaluator.ray_address={head.address}"])
    spec = network_spec(config)
    evaluator = RayEvaluator.from_config(spec, config)
    try:
        yield config, spec, evaluator
    finally:
        evaluator.close()


class TestOnExistingCluster:
    """A driver connecting to a running cluster (``evaluator.ray_address``), as `blur evolve --ray-address`."""

    def test_connects_with_token_auth_and_two_single_threaded_cpu_workers(self, head, smoke):
        _, _, evaluator = smoke
        info = evaluator.describe()
        assert os.environ["RAY_AUTH_MODE"] == "token"
        assert info["address"] == head.address and not info["started_ray"]
        assert [w["state"] for w in info["workers"]] == ["alive", "alive"]
        assert {w["threads"] for w in info["workers"]} == {"1"} and {w["backend"] for w in info["workers"]} == {"cpu"}
        worker_pids = {w["pid"] for w in info["workers"]}
        assert worker_pids <= {p.pid for p in head.processes()}  # the workers run on that cluster
        assert loopback_only(head.processes()) == []

    def test_same_arrays_as_in_process_evaluator(self, smoke):
        config, spec, evaluator = smoke
        local = LocalEvaluator(spec, config.task, config.episode)
        vectors = smoke_vectors(spec, 6)
        key, pair_key = jax.random.key(11), jax.random.key(12)

        def on_ray():
            return (evaluator.evaluate(vectors, "train", key, 3, 4),
                    evaluator.evaluate(vectors[:5], "train", key, 3, 4),  # uneven shards, the last one padded
                    evaluator.evaluate(vectors[:2], "validation", pair_key, 4, 4))

        join = in_background(on_ray)
        expected = local.evaluate(vectors, "train", key, 3, 4)
        expected_pair = local.evaluate(vectors[:2], "validation", pair_key, 4, 4)
        full, five, pair = join()
        assert_same_evaluation(full, expected)
        assert_same_evaluation(five, type(expected)(*(a[:5] for a in expected)))
        # The workers run XLA single-threaded (--xla_cpu_multi_thread_eigen=false), the driver does not: on some
        # CPUs one product of this 2-genome call then sums in another order, 1 ulp apart (seen: 1.0767940 vs
        # 1.0767939). Every other array must match bit for bit; this one to float32 rounding.
        for name, a, b in zip(expected_pair._fields, pair, expected_pair):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if a.dtype == np.float32:
                np.testing.assert_allclose(a, b, rtol=4e-7, atol=0, err_msg=name)
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)
        metrics = evaluator.pop_metrics()
        assert (metrics["ray_calls"], metrics["ray_shards"], metrics["ray_failures"]) == (3, 6, 0)
        assert evaluator.pop_metrics()["ray_calls"] == 0  # each call starts a new window

    def test_smoke_run_gives_the_same_metrics_and_best_genome_as_in_process(self, smoke, tmp_path):
        config, spec, evaluator = smoke
        local_config = load_config(SMOKE)
        ray_run = Run.create(config, tmp_path / "ray", lambda c, s: evaluator)
        ray_run.run()
        local_run = Run.create(local_config, tmp_path / "local", local_evaluator)
        local_run.run()
        ray_rows, local_rows = ray_run.metrics.read(), local_run.metrics.read()
        assert len(ray_rows) == len(local_rows) == config.run.generations
        for ray_row, local_row in zip(ray_rows, local_rows):
            assert ray_row["ray_workers"] == 2 and ray_row["ray_failures"] == 0
            assert set(TIMING_METRICS) <= set(ray_row)
            for key, value in local_row.items():
                if key not in TIMING_KEYS:
                    assert ray_row[key] == value, key
        ray_spec, ray_best, ray_meta = G.load(tmp_path / "ray" / "best.genome")
        local_spec, local_best, local_meta = G.load(tmp_path / "local" / "best.genome")
        assert ray_spec == local_spec and ray_meta["score"] == local_meta["score"]
        for a, b in zip(jax.tree.leaves(ray_best), jax.tree.leaves(local_best)):
            np.testing.assert_array_equal(a, b)
        provenance = (tmp_path / "ray" / "provenance.json").read_text()
        assert '"kind": "ray"' in provenance and '"num_workers": 2' in provenance

    def test_a_multi_setting_run_on_ray_equals_the_in_process_run(self, head, tmp_path):
        """Settings travel to the workers as data (specs and task configs); each call names its setting."""
        settings_config = SMOKE.parents[1] / "tests" / "data" / "settings_smoke.yaml"
        overrides = ["run.generations=3"]
        # a second pool, of one worker, next to the class's smoke pool: each worker compiles every setting's
        # programs, and one is enough to show that the settings travel as data
        config = load_config(settings_config, overrides + ["evaluator.kind=ray", "evaluator.workers=1",
                                                           f"evaluator.ray_address={head.address}"])
        spec = network_spec(config)
        evaluator = RayEvaluator.from_config(spec, config, evaluator_settings(config))
        try:
            ray_run = Run.create(config, tmp_path / "ray", lambda c, s: evaluator)
            ray_run.run()
        finally:
            evaluator.close()
        local_run = Run.create(load_config(settings_config, overrides), tmp_path / "local", local_evaluator)
        local_run.run()
        ray_rows, local_rows = ray_run.metrics.read(), local_run.metrics.read()
        assert len(ray_rows) == len(local_rows) == 3 and ray_rows[0]["settings"] == ["three-way", "two-way-deep"]
        for ray_row, local_row in zip(ray_rows, local_rows):
            for key, value in local_row.items():
                if key not in TIMING_KEYS:
                    assert ray_row[key] == value, key
        local_run.close()
        ray_run.close()

    def test_killing_a_worker_mid_generation_loses_and_changes_nothing(self, smoke):
        config, spec, evaluator = smoke
        vectors = smoke_vectors(spec, 6, seed=1)
        key = jax.random.key(21)
        # num_steps 5 is a new shape: the workers compile for seconds, so the kill lands mid-shard
        join = in_background(evaluator.evaluate, vectors, "train", key, 3, 5)
        deadline = time.monotonic() + 60
        while not evaluator.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = evaluator.in_flight()[0]
        os.kill(victim["pid"], signal.SIGKILL)
        expected = LocalEvaluator(spec, config.task, config.episode).evaluate(vectors, "train", key, 3, 5)
        assert_same_evaluation(join(), expected)
        first = evaluator.pop_metrics()
        assert first["ray_failures"] == 1 and first["ray_retries"] == 1 and first["ray_shards"] == 2
        assert f"pid {victim['pid']}" in first["ray_failure_log"][0]
        # Ray restarts the dead actor in a new process. Between evaluations nothing else asks it, so
        # worker_pids itself must take in the restarted actor's answer (it once only read a cached view).
        deadline = time.monotonic() + 120
        while evaluator.worker_pids()[victim["worker"]] in (None, victim["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        new_pid = evaluator.worker_pids()[victim["worker"]]
        assert new_pid not in (None, victim["pid"])
        worker = evaluator.describe()["workers"][victim["worker"]]
        assert worker["pid"] == new_pid and worker["state"] == "alive" and worker["restarts"] == 1
        # the restarted worker takes its shard again, and the results are still the local ones
        assert_same_evaluation(evaluator.evaluate(vectors, "train", key, 3, 5), expected)
        second = evaluator.pop_metrics()
        assert second["ray_failures"] == 0 and second["ray_workers"] == 2
        # the restart is counted once, in the window that saw the restarted actor answer: the first one when it
        # was back before the survivor finished the re-run shard, else the second (worker_pids above)
        assert first["ray_restarts"] + second["ray_restarts"] == 1

    def test_gpu_worker_without_a_usable_gpu_fails_clearly(self, head, smoke):
        # The head advertises one (logical) GPU: half of it is granted, the actor starts with the GPU
        # environment, and JAX there sees only the CPU.
        config, spec, _ = smoke
        with pytest.raises(RuntimeError, match="gpus_per_worker > 0 but JAX in the worker runs on 'cpu'"):
            RayEvaluator(spec, config.task, config.episode, num_workers=1, gpus_per_worker=0.5, cpus_per_worker=0)


def test_connection_mode_starts_only_without_any_address():
    assert connection_mode(None, {}, initialized=False) == "start"
    assert connection_mode(None, {"RAY_ADDRESS": "10.0.0.1:6379"}, initialized=False) == "connect"  # ray job submit
    assert connection_mode("auto", {}, initialized=False) == "connect"
    assert connection_mode("127.0.0.1:6379", {}, initialized=False) == "connect"
    assert connection_mode(None, {}, initialized=True) == "reuse"


def test_actor_options_size_xla_threads_and_gpu_memory():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=true"}
    cpu = actor_options(1.0, 0.0, 3, base)
    env = cpu["runtime_env"]["env_vars"]
    assert (cpu["num_cpus"], cpu["num_gpus"], cpu["max_restarts"], cpu["max_task_retries"]) == (1.0, 0.0, 3, 0)
    assert env["PJRT_NPROC"] == "1" and env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=1",
                                        "--xla_cpu_multi_thread_eigen=false"]  # replaced, not repeated
    four = actor_options(4.0, 0.0, 3, {})["runtime_env"]["env_vars"]
    assert four["PJRT_NPROC"] == "4" and "XLA_FLAGS" not in four
    gpu = actor_options(1.0, 0.5, 2, base)
    env = gpu["runtime_env"]["env_vars"]
    assert gpu["num_gpus"] == 0.5 and "JAX_PLATFORMS" not in env
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and float(env["XLA_CLIENT_MEM_FRACTION"]) == 0.45
    assert float(actor_options(1.0, 2.0, 2, {})["runtime_env"]["env_vars"]["XLA_CLIENT_MEM_FRACTION"]) == 0.9
    legacy = actor_options(1.0, 0.25, 2, {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".8"})["runtime_env"]["env_vars"]
    assert legacy["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225" and "XLA_CLIENT_MEM_FRACTION" not in legacy
    check_device(True, "gpu")
    check_device(False, "cpu")
    with pytest.raises(RuntimeError, match="jax\\[cuda12\\]"):
        check_device(True, "cpu")


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # Ray forks to exec its daemons at once
def test_losing_a_node_mid_generation_reruns_its_shards_elsewhere(monkeypatch):
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Cluster points /tmp/ray/ray_current_cluster (shared by every local Ray user) at itself and deletes it
    # at shutdown: keep whatever another cluster wrote there.
    address_file = Path(get_ray_address_file(None))
    saved = address_file.read_bytes() if address_file.exists() else None
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    config = load_config(SMOKE)
    spec = network_spec(config)
    vectors, key = smoke_vectors(spec, 6, seed=2), jax.random.key(31)
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={"num_cpus": 1})
    cluster_address = cluster.address
    evaluator = None
    try:
        doomed = cluster.add_node(num_cpus=1)
        cluster.connect()
        evaluator = RayEvaluator(spec, config.task, config.episode, num_workers=2)  # one per node: 1 CPU each
        nodes = {w["node_id"] for w in evaluator.describe()["workers"]}
        assert nodes == {cluster.head_node.node_id, doomed.node_id}
        join = in_background(evaluator.evaluate, vectors, "train", key, 3, 4)
        deadline = time.monotonic() + 60
        while len(evaluator.in_flight()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        cluster.remove_node(doomed, allow_graceful=False)  # mid-compile: its shard is in flight
        expected = LocalEvaluator(spec, config.task, config.episode).evaluate(vectors, "train", key, 3, 4)
        assert_same_evaluation(join(), expected)
        metrics = evaluator.pop_metrics()
        assert metrics["ray_failures"] == 1 and metrics["ray_retries"] == 1 and metrics["ray_workers"] == 1
    finally:
        cleanup = [ray.shutdown, cluster.shutdown]
        if evaluator is not None:
            cleanup.insert(0, evaluator.close)  # kills its actors; the test started (and stops) this Ray
        for step in cleanup:
            try:
                step()
            except Exception:  # noqa: BLE001 - the processes are reaped below whatever happened
                pass
        if saved is not None:
            address_file.write_bytes(saved)
        elif address_file.exists() and address_file.read_text().strip() == cluster_address:
            address_file.unlink()
        leftover = end_processes([p for p in psutil.Process().children(recursive=True) if p.pid not in before])
    assert leftover == []


def test_own_local_ray_all_workers_lost_then_close_leaves_no_process(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    config = load_config(SMOKE)
    spec = network_spec(config)
    evaluator = RayEvaluator(spec, config.task, config.episode, num_workers=2, max_restarts=0)
    started = []
    try:
        assert evaluator.started_ray
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert {pid for pid in evaluator.worker_pids()} <= {p.pid for p in started}
        assert loopback_only(started) == []
        for pid in evaluator.worker_pids():
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkersLostError, match="all 2 Ray workers are lost"):
            evaluator.evaluate(smoke_vectors(spec, 4), "train", jax.random.key(0), 3, 4)
    finally:
        evaluator.close()
        leftover = end_processes(started, grace_s=0)  # close() has waited for them: any left is a leak
    assert started and leftover == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
