"""Helpers shared by the run-level tests: the ``blur`` CLI as a subprocess and metrics without timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from evolution.run import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# long enough that a kill lands mid-run: each generation evaluates 8 x 12 episodes of 6 steps
KILL_OVERRIDES = ["run.generations=24", "run.tasks_per_generation=12", "strategy.population_size=8",
                  "run.validation_every=3"]
# a held-out report of the evolved rule and SGD at one learning rate, for the runs whose test is not about the report
LIGHT_REPORT = ["report.learning_rates=[0.1]", "report.baselines=[sgd]", "report.backprop_genome=false"]
# the CLI's reference run (the `uninterrupted` fixture) and its kill -9 / resume test: KILL_OVERRIDES with
# each population split over two host devices, so one pair of runs checks both the resume and the split (kills and
# resumes on one device are test_reliability's ten seeded signals)
SPLIT_KILL_OVERRIDES = KILL_OVERRIDES + ["evaluator.devices=2"]


def blur(*args, env=None, **kwargs) -> subprocess.Popen:
    """``blur ARGS`` as a subprocess (text pipes). It inherits the environment that conftest.py sets up, so it
    uses the suite's XLA flags and persistent compilation cache (it loads the executables another process
    compiled: same executables, same numbers)."""
    return subprocess.Popen([sys.executable, "-m", "evolution.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **kwargs)


def blur_here(*args) -> tuple[int, str]:
    """``blur ARGS`` in this process: (exit code, stderr). For the runs and resumes whose test is about what a run
    directory holds, not about the process: this process's imports and compiled executables serve all of them (a
    subprocess pays both again, ~10 s of CPU). Same XLA flags and persistent cache as a subprocess, hence the
    same numbers (the tests compare runs made here with runs a killed subprocess began)."""
    import contextlib
    import io

    from evolution.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(arg) for arg in args])
    return code, err.getvalue()


# A script body for ``python -c``: ``blur ARGV`` for each ARGV of the JSON list ``sys.argv[1]``, one after the other
# in that interpreter; ``results`` holds [exit code, stderr] for each.
MAIN_FOR_EACH_ARGV = """
import contextlib, io, json, sys
from evolution.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    results.append([code, err.getvalue()])
"""


def resume_here(out: Path) -> tuple[int, str]:
    """``blur resume OUT --quiet`` in this process (see `blur_here`)."""
    return blur_here("resume", out, "--quiet")


def evolve_here(out: Path, overrides, config: Path = SMOKE) -> Path:
    """``blur evolve CONFIG --out OUT --quiet --set ...`` to completion in this process (see `blur_here`)."""
    code, err = blur_here("evolve", config, "--out", out, "--quiet", *set_args(overrides))
    assert code == 0, (out, err)
    return out


def evolve_signalled_at(out: Path, rows: int, overrides=(), config: Path = SMOKE,
                        signal: str = "SIGKILL") -> subprocess.Popen:
    """Start ``blur evolve CONFIG --out OUT --quiet --set ...`` in a subprocess that sends itself ``signal`` once it
    has written ``rows`` rows of metrics.jsonl (the ``generation:ROWS:SIGNAL`` failpoint)."""
    return blur("evolve", config, "--out", out, "--quiet", *set_args(overrides),
                env={"BLUR_FAILPOINTS": f"generation:{rows}:{signal}"})


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def set_args(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def kill_after_rows(proc: subprocess.Popen, out: Path, rows: int, timeout: float = 300) -> None:
    """SIGKILL the run ``proc`` writes to ``out`` once its metrics.jsonl has ``rows`` lines (asserting that it
    was still running)."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def same_genome(a: Path, b: Path) -> None:
    """The best genomes of runs ``a`` and ``b`` are bit-identical (spec, generation, score, arrays)."""
    import numpy as np

    import genome as G

    spec_a, genome_a, meta_a = G.load(a / "best.genome")
    spec_b, genome_b, meta_b = G.load(b / "best.genome")
    assert spec_a == spec_b and meta_a["generation"] == meta_b["generation"] and meta_a["score"] == meta_b["score"]
    for x, y in zip(genome_a, genome_b):
        np.testing.assert_array_equal(x, y)


def mount_tmpfs(path: Path, options: str) -> Path:
    """A tmpfs at ``path`` (the tests run as root, as CI does: a failure here is a failure, not a skip)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"mount -t tmpfs failed (the disk tests need root): {proc.stderr.strip()}"
    return path
