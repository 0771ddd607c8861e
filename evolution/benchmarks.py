"""``blur bench`` sections that run the evolution driver: the paper run's seconds per generation (``paper_run``)
and the fp32-vs-bf16 comparison of runs' genomes (``blur bench --precision``). They live above
:mod:`workers.bench` because they build real :class:`evolution.run.Run` objects and read run directories."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

import genome as G
from workers import engine as E
from workers.bench import FULL_GEMM_SIZE, QUICK_GEMM_SIZE, _gemm_rates, _json_default, _number
from workers.bench import run_bench as run_workers_bench

PAPER_CONFIG = "paper_cmaes"
PAPER_TIMED_GENERATIONS, QUICK_PAPER_TIMED_GENERATIONS = 3, 1
QUICK_PAPER_POPULATION = 16


def generation_flops(spec: G.NetworkSpec, batch_size: int, num_steps: int, num_query: int, population: int,
                     tasks: int) -> int:
    """Canonical FLOPs of one generation: P·K episodes of T inner steps (:func:`engine.canonical_flops`) and
    their query pass (the forward product of every layer for all k states, ``2·Q·(n+1)·m·k``)."""
    query = sum(2 * num_query * (n_in + 1) * n_out * spec.num_states
                for n_in, n_out in zip(spec.layer_sizes[:-1], spec.layer_sizes[1:]))
    return population * tasks * (num_steps * E.canonical_flops(spec, batch_size) + query)


def _time_run(config, generations: int, log: Callable[[str], None], label: str) -> dict[str, Any]:
    """Generations of a real :class:`evolution.run.Run` of ``config`` (validation off) in a scratch run
    directory: the first compiles and is not timed; the rest are, split into task sampling, episodes and the
    driver (ask, tell, bookkeeping)."""
    import tempfile

    from evolution.run import Run, local_evaluator

    with tempfile.TemporaryDirectory(prefix="blur-bench-") as scratch:
        saved = os.environ.get("BLUR_KEY_DIR")
        os.environ["BLUR_KEY_DIR"] = os.path.join(scratch, "keys")  # the scratch run's key goes with it
        try:
            run = Run.create(config, Path(scratch) / "run", local_evaluator)
            try:
                log(f"paper run ({label}): warm-up generation (compiles)")
                start = time.perf_counter()
                run.step()
                warmup = time.perf_counter() - start
                rows = []
                for index in range(generations):
                    log(f"paper run ({label}): generation {index + 1}/{generations}")
                    before = run.evaluator.sample_seconds
                    row = run.step()
                    rows.append((row["generation_time"], row["eval_time"], run.evaluator.sample_seconds - before))
                describe = run.evaluator.describe()
            finally:
                run.close()
        finally:
            if saved is None:
                os.environ.pop("BLUR_KEY_DIR", None)
            else:
                os.environ["BLUR_KEY_DIR"] = saved
    seconds = statistics.median(r[0] for r in rows)
    sample = statistics.median(r[2] for r in rows)
    episodes = statistics.median(r[1] - r[2] for r in rows)
    return {"seconds_per_generation": seconds, "sampling_seconds": sample, "episode_seconds": episodes,
            "driver_seconds": statistics.median(r[0] - r[1] for r in rows), "warmup_seconds": warmup,
            "samples_seconds_per_generation": [r[0] for r in rows], "evaluator": describe}


def _child_run(path: str, overrides: list[str], generations: int, label: str) -> dict[str, Any]:
    from evolution.config import load_config

    def log(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    return _time_run(load_config(path, overrides), generations, log, label)


def _time_run_in_child(path: str, overrides: list[str], generations: int, label: str) -> dict[str, Any]:
    """:func:`_time_run` in a fresh (spawned) process, as ``blur evolve`` runs: one backend per process, so
    the thread pools of an engine measured before (XLA's, oneDNN's OpenMP) do not compete with it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child_run, (path, overrides, generations, label))


def paper_run(quick: bool, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Seconds per generation of ``configs/paper_cmaes.yaml`` as ``blur evolve`` runs it (P = 80, T = 15, 2560
    query examples; validation excluded; each backend in its own fresh process) on every evaluator backend
    this machine runs, next to the time its
    canonical FLOP count predicts at the machine's fp32 GEMM rate (measured here). ``quick``: population 16,
    one timed generation, the torch backend eager."""
    from evolution.config import load_config, resolve_config_path
    from evolution.run import network_spec
    from genome.errors import UserError
    from workers import torch_engine

    overrides = ["run.validation_every=0"]
    if quick:
        overrides += [f"strategy.population_size={QUICK_PAPER_POPULATION}", "evaluator.torch_compile=false"]
    variants = [("jax_float32", ["evaluator.backend=jax"]), ("torch_float32", ["evaluator.backend=torch"])]
    if torch_engine.bf16_units(torch_engine.cpu_flags()):
        variants.append(("torch_bfloat16", ["evaluator.backend=torch", "episode.precision=bfloat16"]))
    generations = QUICK_PAPER_TIMED_GENERATIONS if quick else PAPER_TIMED_GENERATIONS
    try:
        path = resolve_config_path(PAPER_CONFIG)
        config = load_config(path, overrides)
        spec = network_spec(config)
        gemm_size = QUICK_GEMM_SIZE if quick else FULL_GEMM_SIZE
        before = _gemm_rates(gemm_size, repeats=5)
        backends = {name: _time_run_in_child(str(path), overrides + extra, generations, name)
                    for name, extra in variants}
        after = _gemm_rates(gemm_size, repeats=5)
        # the machine's rate: the better of the measurements before and after the runs (a busy moment only
        # lowers a measurement, and a low rate would flatter measured / predicted)
        gemm_jax, gemm_torch = max(before[0], after[0]), max(before[1], after[1])
    except (UserError, OSError) as error:
        return {"available": False, "reason": f"paper run unavailable: {str(error).splitlines()[0]}"}
    flops = generation_flops(spec, config.task.batch_size, config.episode.num_steps, config.task.num_query,
                             config.strategy.population_size, config.run.tasks_per_generation)
    predicted = flops / (gemm_jax * 1e9)
    default = backends["jax_float32"]["seconds_per_generation"]
    bf16 = backends.get("torch_bfloat16")
    return {
        "available": True, "config": str(path), "population": config.strategy.population_size,
        "tasks": config.run.tasks_per_generation, "num_steps": config.episode.num_steps,
        "num_query": config.task.num_query, "timed_generations": generations,
        "flops_per_generation": flops, "gemm_jax_gflops": gemm_jax, "gemm_torch_gflops": gemm_torch,
        "seconds_per_generation": default, "predicted_seconds_per_generation": predicted,
        "measured_vs_predicted": default / predicted,
        "backends": backends,
        "bf16_vs_fp32": default / bf16["seconds_per_generation"] if bf16 else None,
        "fastest": min(backends, key=lambda name: backends[name]["seconds_per_generation"]),
    }


def _mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error over tasks."""
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def precision_comparison(run_dirs: Sequence[str | os.PathLike], num_tasks: int = 128, seed: int = 0,
                         log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The best genome of each run, scored on the same ``num_tasks`` test tasks of its run's config (its
    horizon T, its query set) by the JAX engine (fp32) and the torch backend in fp32 and bf16: accuracy ± its
    standard error over tasks for each, and the **paired** per-task differences bf16 − fp32 (torch) and torch
    fp32 − JAX with their standard errors."""
    from evolution.config import load_config
    from evolution.run import network_spec
    from genome.errors import UserError
    from workers import torch_engine
    from workers.evaluator import synapse_keys
    from workers.tasks import make_family

    if not torch_engine.bf16_units(torch_engine.cpu_flags()):
        raise UserError("blur bench --precision: this CPU has no bf16 GEMM units (amx_bf16, avx512_bf16)")
    rows = {}
    for run_dir in map(Path, run_dirs):
        for name in ("config.yaml", "best.genome"):
            if not (run_dir / name).is_file():
                raise UserError(f"{run_dir / name}: not found (--precision takes run directories)")
        config = load_config(run_dir / "config.yaml")
        spec = network_spec(config)
        stored_spec, genome, meta = G.load(run_dir / "best.genome")
        if stored_spec != spec:
            raise UserError(f"{run_dir / 'best.genome'}: its network differs from {run_dir / 'config.yaml'}")
        torch_engine.check_support(spec)
        vector = np.asarray(G.ravel(spec, genome), np.float32)[None]
        steps = config.episode.num_steps
        key = jax.random.fold_in(jax.random.key(seed), 0x7E57)
        log(f"precision: {run_dir}: sampling {num_tasks} test tasks")
        tasks = make_family(config.task, "test").sample(key, num_tasks, steps)
        keys = synapse_keys(key, num_tasks)
        scoring, horizon = config.episode.scoring, config.episode.horizon(steps)
        log(f"precision: {run_dir}: JAX float32, torch float32, torch bfloat16")
        accuracy = {
            "jax_float32": np.asarray(E.evaluate(spec, vector, tasks, keys, scoring, horizon).accuracy)[0],
            "torch_float32": torch_engine.evaluate(spec, vector, tasks, keys, scoring, horizon, "float32",
                                                   True).accuracy[0],
            "torch_bfloat16": torch_engine.evaluate(spec, vector, tasks, keys, scoring, horizon, "bfloat16",
                                                    True).accuracy[0],
        }
        run_precision = getattr(config.episode, "precision", "float32")
        row: dict[str, Any] = {"evolved_in": f"{config.evaluator.backend} {run_precision}",
                               "generation": meta.get("generation"), "num_tasks": num_tasks, "num_steps": steps}
        for name, values in accuracy.items():
            row[name] = dict(zip(("accuracy", "standard_error"), _mean_and_error(values)))
        for name, (a, b) in {"bf16_minus_fp32": ("torch_bfloat16", "torch_float32"),
                             "torch_minus_jax_fp32": ("torch_float32", "jax_float32")}.items():
            mean, error = _mean_and_error(accuracy[a] - accuracy[b])
            row[name] = {"paired_difference": mean, "paired_standard_error": error,
                         "max_abs_task_difference": float(np.max(np.abs(accuracy[a] - accuracy[b])))}
        rows[str(run_dir)] = row
    return {"num_tasks": num_tasks, "seed": seed, "runs": rows}


def format_precision(result: dict[str, Any]) -> str:
    lines = [f"Held-out accuracy of each run's best genome, fp32 vs bf16, on the same {result['num_tasks']} test "
             "tasks (± standard error over tasks; differences paired per task)",
             f"{'run':<28}{'evolved in':>16}{'JAX fp32':>18}{'torch fp32':>18}{'torch bf16':>18}"
             f"{'bf16 - fp32':>20}"]
    for run, row in result["runs"].items():
        cells = [f"{row[n]['accuracy']:.4f} ± {row[n]['standard_error']:.4f}"
                 for n in ("jax_float32", "torch_float32", "torch_bfloat16")]
        diff = row["bf16_minus_fp32"]
        lines.append(f"{Path(run).name[:27]:<28}{row['evolved_in']:>16}" + "".join(c.rjust(18) for c in cells)
                     + f"{100 * diff['paired_difference']:+.2f} ± {100 * diff['paired_standard_error']:.2f} pt".rjust(20))
    return "\n".join(lines)


def _format_paper_run(paper: dict[str, Any]) -> list[str]:
    if not paper.get("available"):
        return ["", paper.get("reason", "paper run unavailable")]
    lines = ["", f"Paper run ({Path(paper['config']).name}: P={paper['population']}, K={paper['tasks']}, "
                 f"T={paper['num_steps']}, {paper['num_query']} query examples, validation excluded), "
                 f"median of {paper['timed_generations']} generation(s):",
             f"  predicted from {paper['flops_per_generation'] / 1e9:.0f} GFLOP at the fp32 GEMM rate "
             f"({paper['gemm_jax_gflops']:.0f} GFLOP/s): {paper['predicted_seconds_per_generation']:.2f} s"]
    for name, row in paper["backends"].items():
        split = row["evaluator"].get("split_over", 1)
        lines.append(f"  {name:<15} {row['seconds_per_generation']:6.2f} s per generation (sampling "
                     f"{row['sampling_seconds']:.2f}, episodes {row['episode_seconds']:.2f}, driver "
                     f"{row['driver_seconds']:.2f}; warm-up {row['warmup_seconds']:.1f} s"
                     + (f"; population split over {split} devices)" if split > 1 else ")"))
    lines.append(f"  default (jax float32) measured / predicted: {paper['measured_vs_predicted']:.2f}; "
                 f"bf16 / fp32: {_number(paper['bf16_vs_fp32'])}")
    return lines


def run_bench(quick: bool = False, as_json: bool = False, with_ray: bool = False,
              precision_runs: Sequence[str] = (), num_tasks: int = 128) -> int:
    """``blur bench``: :func:`workers.bench.run_bench` plus the paper run; with ``precision_runs`` only
    :func:`precision_comparison` of those run directories on ``num_tasks`` test tasks."""
    if precision_runs:
        import json

        def log(message: str) -> None:
            print(f"bench: {message}", file=sys.stderr, flush=True)

        result = precision_comparison(precision_runs, num_tasks, log=log)
        print(json.dumps(result, default=_json_default) if as_json else format_precision(result))
        return 0

    def extend(results: dict[str, Any], log: Callable[[str], None]) -> None:
        results["paper_run"] = paper_run(quick, log)

    return run_workers_bench(quick, as_json, with_ray, extend,
                             lambda results: _format_paper_run(results["paper_run"]) if "paper_run" in results else [])
