"""Bad input never runs, crashes or damages anything; run directories survive locks, signals, full disks and
hostile checkpoints (exit codes, one-line messages, directories unchanged, resumes identical)."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (LIGHT_REPORT, MAIN_FOR_EACH_ARGV, ROOT, SMOKE, blur, blur_here, evolve_here, evolve_signalled_at,
                     metric_rows, mount_tmpfs, resume_here, same_genome, set_args)

import genome as G
from evolution import rundir
from evolution.checkpoint import config_identity, load_checkpoint, save_checkpoint
from evolution.cli import main
from evolution.config import ConfigError, config_from_dict, load_config
from evolution.strategies.base import pack_state

# a small, complete run (8 generations, a one-baseline report) for the many kill / resume cases
QUICK = ["run.generations=8", "run.validation_every=2", *LIGHT_REPORT]


def cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles, exit_code=2):
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def snapshot(path: Path) -> dict:
    """Every entry under ``path`` with its bytes (or link target): to check that nothing changed."""
    if not path.exists() and not path.is_symlink():
        return {"<absent>": None}
    if path.is_file():
        return {"": path.read_bytes()}
    if not path.is_dir():
        return {"": f"special {path.stat().st_mode}"}
    result = {}
    for entry in sorted(path.rglob("*")):
        key = str(entry.relative_to(path))
        result[key] = os.readlink(entry) if entry.is_symlink() else (entry.read_bytes() if entry.is_file() else "dir")
    return result


def same_run(a: Path, b: Path) -> None:
    """``b`` ended exactly like ``a``: metrics without timings, best genome, held-out report."""
    assert metric_rows(b) == metric_rows(a)
    same_genome(a, b)
    reports = [json.loads((path / "report.json").read_text()) for path in (a, b)]
    for report in reports:
        assert report.pop("report_seconds") >= 0  # the report phase's wall time, the one timing in it
    assert reports[0] == reports[1]


def wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``proc`` stopped itself (a SIGSTOP failpoint)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.02)
    raise AssertionError("the process never reached its SIGSTOP failpoint")


@pytest.fixture(scope="module")
def quick_reference(tmp_path_factory):
    return evolve_here(tmp_path_factory.mktemp("quick") / "reference", QUICK)


@pytest.fixture
def finished_run(quick_reference, tmp_path):
    """A private copy of the finished quick run (its key stays valid: same run id)."""
    out = tmp_path / "run"
    shutil.copytree(quick_reference, out, symlinks=True)
    return out


# ------------------------------------------------------------------------------------ config values

BAD_VALUES = [
    (["episode.max_loss=.nan"], "episode.max_loss"),
    (["episode.max_loss=.inf"], "episode.max_loss"),
    (["episode.max_loss=-1"], "episode.max_loss"),
    (["report.learning_rates=[0.1, .nan]"], "report.learning_rates[1]"),
    (["report.learning_rates=[-0.1]"], "report.learning_rates[0]"),
    (["report.learning_rates=[]"], "report.learning_rates"),
    (["report.tuning_tasks=0"], "report.tuning_tasks"),
    (["run.max_evaluations=-5"], "run.max_evaluations"),
    (["run.target_fitness=.nan"], "run.target_fitness"),
    (["run.max_wall_time=.nan"], "run.max_wall_time"),
    (["seed=-1"], "seed"),
    (["seed=1180591620717411303424"], "seed"),
    (["network.synapse_init_std=.nan"], "network.synapse_init_std"),
    (["network.synapse_init_std=.inf"], "network.synapse_init_std"),
    (["network.norm_epsilon=-1e-5"], "network.norm_epsilon"),
    (["evaluator.max_retries=-1"], "evaluator.max_retries"),
    (["strategy.options={tolfun: .nan}"], "strategy.options.tolfun"),
    (["episode.num_steps=1000000000"], "episode.num_steps"),
    (["episode.num_steps=0"], "episode.num_steps"),
    (["network.num_states=100000"], "network.num_states"),
    (["run.curriculum.max_steps=-3"], "run.curriculum.max_steps"),
    (["run.curriculum.max_steps=2"], "run.curriculum.max_steps"),  # below the base horizon of 4
    (["run.tasks_per_generation=100000000"], "run.tasks_per_generation"),
    (["task.batch_size=100000000"], "task.batch_size"),
    (["task.n_way=11"], "n_way=11"),  # digits' meta-train split has 7 classes
    (["strategy.options={nonsense: 1}"], "strategy.options"),
    (["strategy.options={CMA_diagonal: [1, 2]}"], "strategy.options"),
    (["strategy.sigma=.inf"], "strategy.sigma"),
    (["strategy.name=open_es", "strategy.options={lrate_init: .nan}"], "strategy.options.lrate_init"),
    (["strategy.name=open_es", "strategy.options={optimizer: nope}"], "strategy.options"),
    (["strategy.name=open_es", "strategy.population_size=7"], "strategy.population_size"),
    (["strategy.options={tolfun: '9**9**9'}"], "strategy.options.tolfun"),  # never evaluated
    (["strategy.options={tolx: '__import__(\"os\").system(\"true\")'}"], "strategy.options.tolx"),
    (["network.hidden_sizes=[100000000]"], "network.hidden_sizes[0]"),
    (["strategy.population_size=10000000"], "strategy.population_size"),
    (["evaluator.devices=0"], "evaluator.devices"),
    (["evaluator.devices=many"], "evaluator.devices"),
    (["evaluator.devices=2", "evaluator.backend=torch"], "evaluator.devices"),
    (["evaluator.devices=2", "evaluator.kind=ray"], "evaluator.devices"),
]


@pytest.mark.parametrize("overrides, key", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_exit_2_before_anything_is_written(overrides, key, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(["evolve", SMOKE, "--out", out, *set_args(overrides)], capsys)
    assert_one_line_error(code, err, key)
    assert not out.exists()


def test_a_huge_seed_flag_and_a_huge_seed_in_the_file(tmp_path, capsys):
    code, _, err = cli(["evolve", SMOKE, "--out", tmp_path / "a", "--seed", 2**70], capsys)
    assert_one_line_error(code, err, "seed", "9223372036854775807")
    config = tmp_path / "seed.yaml"
    config.write_text(SMOKE.read_text().replace("seed: 0", f"seed: {2**70}"))
    code, _, err = cli(["evolve", config, "--out", tmp_path / "b"], capsys)
    assert_one_line_error(code, err, "seed")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_numbers_as_people_write_them_are_numbers():
    config = config_from_dict({}, ["strategy.sigma=1e6", "episode.max_loss=2E+1", "run.max_wall_time=3.5e2",
                                   "episode.num_steps=4"])
    assert config.strategy.sigma == 1e6 and config.episode.max_loss == 20.0 and config.run.max_wall_time == 350.0
    assert config_from_dict({"strategy": {"sigma": 1e-3}}).strategy.sigma == 1e-3


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8))


def test_yaml_bombs_and_huge_documents_are_refused_quickly(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS)
    start = time.perf_counter()
    code, _, err = cli(["evolve", bomb, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "expands to more than")
    value = LAUGHS.replace("\n", ", ").rstrip(", ")
    code, _, err = cli(["evolve", SMOKE, "--out", tmp_path / "o", "--set", f"strategy.options={{{value}}}"], capsys)
    assert_one_line_error(code, err, "--set strategy.options", "expands to more than")
    big = tmp_path / "big.yaml"
    big.write_text("seed: 0\n" + "#" * (2 << 20))
    code, _, err = cli(["evolve", big, "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "larger than")
    code, _, err = cli(["evolve", SMOKE, "--out", tmp_path / "o", "--set", "seed=" + "9" * 70000], capsys)
    assert_one_line_error(code, err, "--set seed", "larger than")
    assert time.perf_counter() - start < 10 and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="recursive"):
        load_config_text(tmp_path, "a: &a [*a]\n")


def load_config_text(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


# ------------------------------------------------------------------------------------ --out

def test_out_must_be_new_or_empty_and_is_never_damaged(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    for name in ("config.yaml", "best.genome", "provenance.json", "report.md"):
        (user / name).write_text(f"my own {name}\n")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "metrics.jsonl").symlink_to(tmp_path / "outside.jsonl")
    cases = [(user, "not empty"), (a_file, "not a directory"), (Path("/dev/null"), "not a directory"),
             (dangling, "already exists")]
    before = {str(path): snapshot(path) for path, _ in cases}
    for path, message in cases:
        code, _, err = cli(["evolve", SMOKE, "--out", path], capsys)
        assert_one_line_error(code, err, str(path), message)
        assert snapshot(path) == before[str(path)]
    assert not (tmp_path / "outside.jsonl").exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine
    code, _, err = cli(["evolve", SMOKE, "--out", empty, "--quiet", *set_args(["run.generations=1", *LIGHT_REPORT])],
                       capsys)
    assert code == 0, err


@pytest.fixture
def read_only_dir(tmp_path):
    yield mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    subprocess.run(["umount", str(tmp_path / "ro")], check=True)


def test_out_on_a_read_only_file_system(read_only_dir, capsys):
    for out in (read_only_dir, read_only_dir / "run"):
        code, _, err = cli(["evolve", SMOKE, "--out", out], capsys)
        assert_one_line_error(code, err, str(read_only_dir))
    assert list(read_only_dir.iterdir()) == []


# ------------------------------------------------------------------------------------ genome files

def _write_genome(path, spec_dict, tensors):
    from safetensors.numpy import save

    header = {"format": "blur-evolve-genome", "parameterization_version": str(G.PARAMETERIZATION_VERSION),
              "spec": json.dumps(spec_dict), "metadata": "{}"}
    path.write_bytes(save(tensors, metadata=header))
    return path


def bad_genomes(tmp_path):
    spec, genome = G.backprop_genome((64, 8, 3), 0.5)
    tensors = {name: np.array(value) for name, value in genome._asdict().items()}
    files = {}
    for bad in (np.nan, np.inf):
        changed = {**tensors, "forward_transform": tensors["forward_transform"].copy()}
        changed["forward_transform"].flat[0] = bad
        files[f"value {bad}"] = (_write_genome(tmp_path / f"{bad}.genome", spec.to_dict(), changed), "NaN or infinite")
    files["k = 20000"] = (_write_genome(tmp_path / "k.genome", {**spec.to_dict(), "num_states": 20000}, tensors),
                          "num_states")
    files["width 1e8"] = (_write_genome(tmp_path / "w.genome", {**spec.to_dict(), "layer_sizes": [10**8, 8, 3]},
                                        tensors), "layer_sizes")
    return files


PEAK = MAIN_FOR_EACH_ARGV + """
status = open("/proc/self/status").read()
peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1])
open(sys.argv[2], "w").write(json.dumps({"results": results, "peak": peak}))
"""


def run_with_peak_memory(tmp_path, *argvs) -> tuple[list[tuple[int, str]], int]:
    """``blur ARGV`` for each of ``argvs``, one after the other in one fresh interpreter: ([(exit code, stderr)],
    the peak resident KiB of that process). A peak under a bound says that none of them allocated more."""
    record = tmp_path / "peak.json"
    proc = subprocess.run([sys.executable, "-c", PEAK, json.dumps([[str(a) for a in argv] for argv in argvs]),
                           str(record)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads(record.read_text())
    return [tuple(result) for result in recorded["results"]], recorded["peak"]


def test_genome_files_with_non_finite_values_or_absurd_specs_are_refused(tmp_path):
    cases = [(name, path, message, argv) for name, (path, message) in bad_genomes(tmp_path).items()
             for argv in (["inspect", path], ["evaluate", path, "--task", "digits"])]
    results, peak = run_with_peak_memory(tmp_path, *(argv for *_, argv in cases))
    for (name, path, message, _), (code, err) in zip(cases, results):
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and message in err and str(path) in err, (name, err)
    assert peak < 1_500_000, peak  # KiB: none of them allocated anything large


# ------------------------------------------------------------------------------------ resource guard

@pytest.mark.parametrize("override", ["strategy.population_size=1000000", "network.hidden_sizes=[1000000]"])
def test_the_resource_guard_refuses_before_allocating(override, tmp_path, capsys):
    start = time.perf_counter()
    code, _, err = cli(["evolve", SMOKE, "--out", tmp_path / "o", "--set", override], capsys)
    assert time.perf_counter() - start < 5
    assert_one_line_error(code, err, "GiB (estimate)", "reduce strategy.population_size")
    assert not (tmp_path / "o").exists()
    [(code, err)], peak = run_with_peak_memory(tmp_path, ["evolve", SMOKE, "--out", tmp_path / "o", "--set",
                                                          override])
    assert code == 2 and err.count("\n") == 1 and peak < 1_500_000, (err, peak)


def test_the_memory_estimate_is_on_the_safe_side_of_the_compiled_engine():
    import jax
    import jax.numpy as jnp

    from evolution.resources import estimate
    from workers import engine as E
    from workers.task_types import Task

    S = jax.ShapeDtypeStruct
    for layers, k, b, q, t, p, n in [((64, 32, 3), 2, 16, 48, 20, 16, 8), ((196, 512, 10), 2, 128, 256, 15, 8, 1),
                                     ((64, 128, 64, 10), 3, 32, 64, 10, 8, 4)]:
        spec = G.NetworkSpec(layers, num_states=k)
        tasks = Task(S((n, t, b, layers[0]), jnp.float32), S((n, t, b), jnp.int32), S((n, q, layers[0]), jnp.float32),
                     S((n, q), jnp.int32))
        keys = jax.eval_shape(lambda n=n: jax.random.split(jax.random.key(0), n))
        stats = E._evaluate.lower(spec, S((p, G.num_dims(spec)), jnp.float32), tasks, keys,
                                  E.Scoring(), E.Horizon(t)).compile().memory_analysis()
        compiled = (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
                    - stats.alias_size_in_bytes)
        ratio = estimate(layers, k, b, q, t, p, n, G.num_dims(spec)).peak_bytes / compiled
        assert 1.0 <= ratio <= 4.0, (layers, ratio)


def test_evaluate_and_compare_check_values_and_resources(tmp_path, capsys):
    for argv, needle in [(["--batch-size", 0], "--batch-size"), (["--tasks", 10**9], "--tasks"),
                         (["--steps", 10**9], "--steps"), (["--n-way", 11], "n_way=11"),
                         (["--hidden", 1000000, "--tasks", 64], "GiB (estimate)"), (["--seed", 2**70], "--seed")]:
        code, _, err = cli(["evaluate", "random", "--task", "digits", *argv], capsys)
        assert_one_line_error(code, err, needle)
    compare = ROOT / "configs" / "compare_smoke.yaml"
    for override, needle in [("compare.heldout_tasks=0", "compare.heldout_tasks"),
                             ("strategy.population_size=900000", "GiB (estimate)"),
                             ("compare.seeds=[-1]", "compare.seeds[0]")]:
        code, _, err = cli(["compare", compare, "--out", tmp_path / "c", "--set", override], capsys)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------ locks

def test_one_run_per_directory_and_a_stale_lock_is_taken_over(quick_reference, tmp_path):
    out = tmp_path / "run"
    holder = evolve_signalled_at(out, 3, QUICK, signal="SIGSTOP")
    wait_stopped(holder)
    before = snapshot(out)
    for argv in (["evolve", SMOKE, "--out", out, "--quiet", *set_args(QUICK)], ["resume", out, "--quiet"]):
        code, err = blur_here(*argv)
        assert code == 2 and f"in use by blur process {holder.pid}" in err, err
        assert len(err.strip().splitlines()) == 1
    assert snapshot(out) == before
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    code, err = resume_here(out)
    assert code == 0, err
    assert f"took over the lock left by process {holder.pid}" in err
    same_run(quick_reference, out)


def test_resume_of_a_directory_that_is_not_a_run_changes_nothing(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    code, _, err = cli(["resume", tmp_path], capsys)
    assert_one_line_error(code, err, "not a run directory")
    assert snapshot(tmp_path) == before


def test_the_lock_is_exclusive_within_a_process_and_released_on_close(tmp_path):
    out = tmp_path / "d"
    lock = rundir.create_run_dir(out)
    (out / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match=f"in use by blur process {os.getpid()}"):
        rundir.open_run_dir(out)
    lock.release()
    rundir.open_run_dir(out).release()


# ------------------------------------------------------------------------------------ signals

def kill_moments(count=10, seed=2026):
    """Seeded moments: a signal at the n-th pass of a failpoint, at least one inside each kind of write and in
    the report phase. Counts stay below the passes a quick run makes (checkpoint 10, metrics 8, best >= 1)."""
    rng = random.Random(seed)
    signals = ("SIGKILL", "SIGINT", "SIGTERM")
    moments = [("write:checkpoint.ckpt", rng.randint(2, 9), "SIGKILL"), ("append:metrics.jsonl", rng.randint(1, 8),
               "SIGKILL"), ("report", 1, "SIGTERM"), ("write:best.genome", 1, "SIGINT"),
               ("write:checkpoint.ckpt", 1, "SIGKILL")]  # before the first checkpoint: the run starts over
    points = [("write:checkpoint.ckpt", 2, 9), ("append:metrics.jsonl", 1, 8), ("generation", 1, 7), ("report", 1, 1)]
    while len(moments) < count:
        point, low, high = rng.choice(points)
        moments.append((point, rng.randint(low, high), rng.choice(signals)))
    return moments


def test_signals_at_ten_seeded_moments_resume_identically(quick_reference, tmp_path):
    """Ten runs killed at once, then resumed. A SIGKILL half-way through a metrics row leaves a torn last
    line, one inside an atomic write leaves its temporary, one before the first checkpoint leaves no checkpoint
    (the resume starts the run over); every resumed run ends exactly like the uninterrupted one."""
    moments = kill_moments()
    procs = []
    for i, (point, count, name) in enumerate(moments):
        out = tmp_path / f"m{i}"
        procs.append((out, name, blur("evolve", SMOKE, "--out", out, "--quiet", *set_args(QUICK),
                                      env={"BLUR_FAILPOINTS": f"{point}:{count}:{name}"})))
    expected_code = {"SIGKILL": -signal.SIGKILL, "SIGINT": 130, "SIGTERM": 143}
    for (out, name, proc), moment in zip(procs, moments):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == expected_code[name], (moment, err)
        if name != "SIGKILL":
            assert "blur resume" in err, (moment, err)
            continue
        point, count, _ = moment
        if point == "append:metrics.jsonl":  # killed half-way through a row: a torn last line
            text = (out / "metrics.jsonl").read_text()
            assert text.count("\n") == count - 1 and not text.endswith("\n"), (moment, text)
        if point.startswith("write:"):  # killed inside an atomic write: its temporary is left behind
            assert list(out.glob(".*.tmp")), moment
        if point == "write:checkpoint.ckpt" and count == 1:
            assert not (out / "checkpoint.ckpt").exists(), moment
    for (out, _, _), moment in zip(procs, moments):  # resumed here, one after the other (see resume_here)
        code, err = resume_here(out)
        assert code == 0, (moment, err)
        if moment == ("write:checkpoint.ckpt", 1, "SIGKILL"):  # killed before its first checkpoint
            assert "starting it over" in err, err
        same_run(quick_reference, out)  # torn lines and stale temporaries dropped, the run ended identically
        assert not list(out.glob(".*.tmp")), moment


# ------------------------------------------------------------------------------------ disk full

@pytest.fixture
def small_tmpfs(tmp_path):
    yield mount_tmpfs(tmp_path / "small", "size=4m")
    subprocess.run(["umount", "-l", str(tmp_path / "small")], check=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:  # ENOSPC: the file system is full
            pass
    return filler


# (a mid-run read-only remount cannot be made here: the kernel refuses it while the run holds files open for
# writing, and root is not stopped by permissions; both errors take the same path as ENOSPC below)
@pytest.mark.parametrize("fault", ["disk full"])
def test_a_failing_disk_stops_cleanly_and_resumes_identically(fault, quick_reference, small_tmpfs):
    out = small_tmpfs / "run"
    proc = evolve_signalled_at(out, 3, QUICK, signal="SIGSTOP")
    wait_stopped(proc)
    if fault == "disk full":
        filler = fill(small_tmpfs)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    reason = "No space left on device" if fault == "disk full" else "Read-only file system"
    assert len(err.strip().splitlines()) == 1 and reason in err and str(out) in err, err
    assert load_checkpoint(out).counters["generation"] >= 3  # the previous checkpoint is intact and loads
    assert not list(out.glob(".*.tmp"))
    if fault == "disk full":
        filler.unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    code, err = resume_here(out)
    assert code == 0, err
    same_run(quick_reference, out)


# ------------------------------------------------------------------------------------ hostile checkpoints

class Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _rewrite_checkpoint(run_dir, state_bytes=None, key=None, counters=None, run_id=None):
    checkpoint = load_checkpoint(run_dir)
    config = load_config(run_dir / "config.yaml")
    save_checkpoint(run_dir, counters or checkpoint.counters, checkpoint.strategy_state if state_bytes is None
                    else state_bytes, checkpoint.best_vector, run_id=run_id or checkpoint.run_id,
                    config=config_identity(config), key=key)


def test_a_malicious_pickle_in_a_run_directory_is_never_executed(finished_run, tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    header = {"format": "pycma-pickle", "strategy": "pycma", "num_dims": 20}
    evil = pack_state(header, pickle.dumps(Evil(sentinel)))
    real_key = rundir.load_run_key(rundir.read_run_id(finished_run))
    for key, needle in [(None, "refusing to load pickled pycma state"), (b"k" * 32, "signature does not verify")]:
        _rewrite_checkpoint(finished_run, evil, key=key)
        before = snapshot(finished_run)
        code, _, err = cli(["resume", finished_run], capsys)
        assert_one_line_error(code, err, needle)
        assert not sentinel.exists() and snapshot(finished_run) == before
    # signed with the run's own key but altered afterwards: the checksum catches it
    _rewrite_checkpoint(finished_run, evil, key=real_key)
    raw = bytearray((finished_run / "checkpoint.ckpt").read_bytes())
    raw[-1] ^= 1
    (finished_run / "checkpoint.ckpt").write_bytes(bytes(raw))
    code, _, err = cli(["resume", finished_run], capsys)
    assert_one_line_error(code, err, "checksum mismatch")
    assert not sentinel.exists()


def test_a_run_directory_from_elsewhere_does_not_resume(finished_run, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("BLUR_KEY_DIR", str(tmp_path / "other-machine-keys"))
    code, _, err = cli(["resume", finished_run], capsys)
    assert_one_line_error(code, err, "no signing key for this run")


def test_checkpoint_integrity_run_identity_and_config(finished_run, quick_reference, tmp_path, capsys):
    assert json.loads((finished_run / "provenance.json").read_text())["evaluator"]["split_over"] == 1  # the default
    checkpoint = finished_run / "checkpoint.ckpt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[: len(good) // 2])
    before = snapshot(finished_run)
    code, _, err = cli(["resume", finished_run], capsys)
    assert_one_line_error(code, err, "unreadable checkpoint")
    assert snapshot(finished_run) == before
    checkpoint.write_bytes(good)
    other = tmp_path / "other"
    code, _, err = cli(["evolve", SMOKE, "--out", other, "--quiet", *set_args(QUICK)], capsys)
    assert code == 0, err
    shutil.copy(other / "checkpoint.ckpt", checkpoint)
    code, _, err = cli(["resume", finished_run], capsys)
    assert_one_line_error(code, err, "belongs to another run")
    checkpoint.write_bytes(good)
    config = finished_run / "config.yaml"
    text = config.read_text()
    config.write_text(text.replace("population_size: 6", "population_size: 12"))
    before = snapshot(finished_run)
    code, _, err = cli(["resume", finished_run], capsys)
    assert_one_line_error(code, err, "strategy.population_size differ")
    assert snapshot(finished_run) == before
    config.write_text(text.replace("generations: 8", "generations: 9"))  # a stop criterion may change
    code, out, err = cli(["resume", finished_run, "--quiet"], capsys)
    assert code == 0 and "resuming at generation 8" in out, err
    assert [row["generation"] for row in metric_rows(finished_run)] == list(range(9))


def test_out_of_range_counters_and_corrupt_metrics_lose_nothing(finished_run, capsys):
    key = rundir.load_run_key(rundir.read_run_id(finished_run))
    counters = load_checkpoint(finished_run).counters
    metrics = finished_run / "metrics.jsonl"
    rows = metrics.read_text()
    for bad in ({"generation": -1}, {"generation": 10**30}, {"evaluations": "many"}, {"best_generation": 99}):
        _rewrite_checkpoint(finished_run, key=key, counters={**counters, **bad})  # a correct checksum and signature
        before = snapshot(finished_run)
        code, _, err = cli(["resume", finished_run], capsys)
        assert_one_line_error(code, err, f"counter {next(iter(bad))}")
        assert snapshot(finished_run) == before and metrics.read_text() == rows
    _rewrite_checkpoint(finished_run, key=key, counters={**counters, "generation": 5, "best_generation": None})
    lines = rows.splitlines(keepends=True)
    metrics.write_text("".join(lines[:2]) + "garbage\n" + "".join(lines[2:]))
    before = snapshot(finished_run)
    code, _, err = cli(["resume", finished_run], capsys)
    assert_one_line_error(code, err, "line 3 is not a metrics row")
    assert snapshot(finished_run) == before
    metrics.write_text("".join(lines[:4]) + "".join(lines[1:3]))  # duplicated generations
    code, _, err = cli(["resume", finished_run], capsys)
    assert_one_line_error(code, err, "do not match the checkpoint")


def test_run_files_never_follow_symlinks_out_of_the_run(finished_run, tmp_path, capsys):
    outside = tmp_path / "outside.jsonl"
    metrics = finished_run / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(outside)
    code, _, err = cli(["resume", finished_run], capsys)
    assert_one_line_error(code, err, "is a symlink")
    assert not outside.exists()


# ------------------------------------------------------------------------------------ horizon

def test_es_and_gradient_loops_share_one_horizon_that_never_cuts_below_the_base():
    import dataclasses

    from evolution.outer_loop import OuterLoopConfig
    from evolution.outer_loop import num_steps_at as meta_steps_at
    from evolution.run import num_steps_at
    from workers.horizon import horizon

    base = load_config(SMOKE)
    for every, increment, cap in [(0, 5, None), (1, 2, 7), (3, 1, None), (2, 4, 4)]:
        curriculum = dataclasses.replace(base.run.curriculum, every=every, increment=increment, max_steps=cap)
        config = dataclasses.replace(base, run=dataclasses.replace(base.run, curriculum=curriculum))
        outer = OuterLoopConfig(curriculum_every=every, curriculum_increment=increment, curriculum_max_steps=cap)
        for index in range(12):
            steps = num_steps_at(config, index)
            assert steps == meta_steps_at(config.episode, outer, index) >= config.episode.num_steps
            expected = 4 + (increment * (index // every) if every else 0)
            assert steps == (min(expected, cap) if every and cap else expected)
    assert horizon(10, 5, every=1, increment=1, max_steps=3) == 10  # a cap below the base is not a cut


def test_sigterm_with_the_ray_evaluator_checkpoints_and_resumes(tmp_path):
    """ray.init installs its own SIGTERM handler (exit without a checkpoint); the run puts its own back."""
    out = tmp_path / "ray-run"
    overrides = ["run.generations=4", *LIGHT_REPORT]
    proc = blur("evolve", SMOKE, "--out", out, "--quiet", "--workers", 1, *set_args(overrides),
                env={"BLUR_FAILPOINTS": "generation:2:SIGTERM"})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143 and "checkpointed at generation 2" in err and "blur resume" in err, err
    # the checkpoint is what matters here: it resumes on the in-process evaluator (where evaluation runs may
    # change on resume), which spares the test a second Ray cluster
    config = out / "config.yaml"
    assert "  kind: ray\n" in config.read_text()
    config.write_text(config.read_text().replace("  kind: ray\n", "  kind: local\n"))
    code, err = resume_here(out)
    assert code == 0, err
    assert [row["generation"] for row in metric_rows(out)] == [0, 1, 2, 3]
