"""The generation loop (DESIGN §5): ask, evaluate one common task batch, tell, log, validate, checkpoint.

Every random choice of generation ``g`` comes from ``fold_in(root_key, g)``, and the checkpoint holds the
strategy state and counters, so a run resumed from any checkpoint repeats exactly what the uninterrupted
run would have done (same populations, fitness, metrics and best genome).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import genome as G
from evolution.checkpoint import MetricsLog, atomic_write_text, load_checkpoint, save_checkpoint
from evolution.config import Config, ConfigError, dump_config, load_config
from evolution.strategies import make_strategy
from workers.engine import aggregate_fitness
from workers.evaluator import Evaluator, LocalEvaluator
from workers.tasks import make_family

# fold_in salts of the root key
_GENERATION, _VALIDATION, _TEST, _TUNING = 1, 2, 3, 4
# metrics that measure time (they differ between otherwise identical runs; the Ray ones come from workers/ray.py)
TIMING_KEYS = ("wall_time", "eval_time", "validation_time", "driver_time", "checkpoint_time", "generation_time",
               "ray_eval_time", "ray_dispatch_time", "ray_overhead_time", "ray_worker_episodes_per_s")


def root_key(config: Config) -> jax.Array:
    return jax.random.key(config.seed)


def generation_keys(config: Config, generation: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    key = jax.random.fold_in(jax.random.fold_in(root_key(config), _GENERATION), generation)
    ask_key, task_key, tell_key = jax.random.split(key, 3)
    return ask_key, task_key, tell_key


def split_key(config: Config, salt: int) -> jax.Array:
    return jax.random.fold_in(root_key(config), salt)


def num_steps_at(config: Config, generation: int) -> int:
    """Unroll length of ``generation`` under the curriculum (+increment every ``every`` generations)."""
    steps = config.episode.num_steps
    curriculum = config.run.curriculum
    if curriculum.every > 0:
        steps += curriculum.increment * (generation // curriculum.every)
        if curriculum.max_steps is not None:
            steps = min(steps, curriculum.max_steps)
    return steps


def network_spec(config: Config) -> G.NetworkSpec:
    family = make_family(config.task, "train")
    return config.network_spec(family.num_inputs, family.num_classes)


def initial_vector(config: Config, spec: G.NetworkSpec) -> np.ndarray:
    init = config.strategy.init
    if init == "random":
        genome = G.random_genome(spec, jax.random.key(config.strategy.init_seed))
    elif init == "neutral":
        genome = G.neutral_genome(spec)
    elif init == "backprop":
        bp_spec, genome = G.backprop_genome(spec.layer_sizes, 0.5, loss="cross_entropy")
        if bp_spec != spec:
            raise ConfigError("strategy.init: 'backprop' needs the network section of the backprop genome "
                              "(num_states 2, sigmoid_backprop / linear_backprop, symmetric, ...)")
    else:
        try:
            file_spec, genome, _ = G.load(init)
        except G.GenomeFileError as error:
            raise ConfigError(f"strategy.init: {error}") from None
        if file_spec != spec:
            raise ConfigError(f"strategy.init: genome file {init} has spec {file_spec.layer_sizes} / k="
                              f"{file_spec.num_states}, which differs from the configured network")
    return np.asarray(G.ravel(spec, genome), np.float64)


def provenance(config: Config, evaluator: Evaluator) -> dict[str, Any]:
    def version(name):
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "git_commit": commit,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {n: version(n) for n in ("blur-evolve", "jax", "jaxlib", "numpy", "evosax", "cma", "ray", "optax")},
        "devices": [str(d) for d in jax.devices()],
        "seed": config.seed,
        "evaluator": getattr(evaluator, "describe", lambda: {"kind": "local"})(),
    }


@dataclass
class RunState:
    """Counters of a run (saved in every checkpoint)."""

    generation: int = 0  # next generation to run
    evaluations: int = 0
    inner_steps: int = 0
    elapsed: float = 0.0
    best_score: float | None = None  # validation fitness (or train fitness without validation) of best
    best_generation: int | None = None
    best_vector: np.ndarray | None = None
    stop_reason: str | None = None
    failures: list = field(default_factory=list)

    def counters(self) -> dict[str, Any]:
        return {"generation": self.generation, "evaluations": self.evaluations, "inner_steps": self.inner_steps,
                "elapsed": self.elapsed, "best_score": self.best_score, "best_generation": self.best_generation,
                "stop_reason": self.stop_reason, "failures": self.failures}


class Run:
    """One evolution run in ``run_dir``. ``Run.create`` starts one; ``Run.resume`` continues one."""

    def __init__(self, config: Config, run_dir: Path, evaluator: Evaluator, spec: G.NetworkSpec):
        self.config, self.run_dir, self.evaluator, self.spec = config, Path(run_dir), evaluator, spec
        self.strategy = make_strategy(config.strategy.name, G.num_dims(spec), config.strategy.population_size,
                                      config.strategy.options)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.state = RunState()
        self.strategy_state = None
        self._checkpoint_seconds = 0.0

    # ------------------------------------------------------------------------------------------ setup
    @classmethod
    def create(cls, config: Config, run_dir: Path, evaluator_fn: Callable[[Config, G.NetworkSpec], Evaluator]):
        run_dir = Path(run_dir)
        if (run_dir / "checkpoint.ckpt").exists() or (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"--out {run_dir}: a run already exists there (use `blur resume {run_dir}`)")
        spec = network_spec(config)
        mean = initial_vector(config, spec)
        run = cls(config, run_dir, evaluator_fn(config, spec), spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(config))
        atomic_write_text(run_dir / "provenance.json", json.dumps(provenance(config, run.evaluator), indent=2))
        init_key = jax.random.fold_in(root_key(config), 0)
        run.strategy_state = run.strategy.init(init_key, mean, config.strategy.sigma)
        run.checkpoint()
        return run

    @classmethod
    def resume(cls, run_dir: Path, evaluator_fn: Callable[[Config, G.NetworkSpec], Evaluator]):
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ConfigError(f"run directory not found: {run_dir}")
        config = load_config(run_dir / "config.yaml")
        counters, strategy_bytes, best_vector = load_checkpoint(run_dir)
        spec = network_spec(config)
        run = cls(config, run_dir, evaluator_fn(config, spec), spec)
        run.strategy_state = run.strategy.state_from_bytes(strategy_bytes)
        run.state = RunState(**counters, best_vector=best_vector)
        run.metrics.truncate_to(run.state.generation)
        return run

    def checkpoint(self) -> None:
        start = time.perf_counter()
        self._save_checkpoint()
        self._checkpoint_seconds = time.perf_counter() - start

    def _save_checkpoint(self) -> None:
        save_checkpoint(self.run_dir, self.state.counters(), self.strategy.state_to_bytes(self.strategy_state),
                        self.state.best_vector)

    # ------------------------------------------------------------------------------------------ loop
    def stop_reason(self) -> str | None:
        """Why the run should stop now (generations, evaluations, wall clock, target, strategy), or None."""
        run, state = self.config.run, self.state
        if state.generation >= run.generations:
            return "generations"
        if run.max_evaluations is not None and state.evaluations >= run.max_evaluations:
            return "max_evaluations"
        if run.max_wall_time is not None and state.elapsed >= run.max_wall_time:
            return "max_wall_time"
        return state.stop_reason if state.stop_reason in ("target_fitness", "strategy") else None

    def step(self) -> dict[str, Any]:
        """Run one generation; returns its metrics row."""
        config, state = self.config, self.state
        start = time.perf_counter()
        generation = state.generation
        num_steps = num_steps_at(config, generation)
        ask_key, task_key, tell_key = generation_keys(config, generation)
        population, self.strategy_state = self.strategy.ask(ask_key, self.strategy_state)
        eval_start = time.perf_counter()
        result = self.evaluator.evaluate(population, "train", task_key, config.run.tasks_per_generation, num_steps)
        eval_time = time.perf_counter() - eval_start
        fitness = np.asarray(aggregate_fitness(np.asarray(result.fitness, np.float64), config.episode))
        self.strategy_state = self.strategy.tell(tell_key, population, fitness, self.strategy_state)
        num_episodes = result.fitness.size
        state.evaluations += len(population)
        state.inner_steps += num_episodes * num_steps
        best_index = int(np.argmin(fitness))
        row = {
            "generation": generation,
            "num_steps": num_steps,
            "population_size": len(population),
            "best_fitness": float(fitness[best_index]),
            "mean_fitness": float(np.mean(fitness)),
            "median_fitness": float(np.median(fitness)),
            "best_train_accuracy": float(np.mean(result.accuracy[best_index])),
            "mean_train_accuracy": float(np.mean(result.accuracy)),
            "diverged": int(np.sum(result.diverged)),
            "evaluations": state.evaluations,
            "inner_steps": state.inner_steps,
        }
        row.update({f"strategy_{k}": v for k, v in self.strategy.info(self.strategy_state).items()})
        if config.run.target_fitness is not None and row["best_fitness"] <= config.run.target_fitness:
            state.stop_reason = "target_fitness"
        if self.strategy.stop(self.strategy_state):
            state.stop_reason = "strategy"
        state.generation += 1
        last = self.stop_reason() is not None
        validation_start = time.perf_counter()
        if config.run.validation_every > 0 and (state.generation % config.run.validation_every == 0 or last):
            row.update(self._validate(population[best_index], num_steps, generation))
        elif config.run.validation_every == 0:
            self._offer_best(population[best_index], row["best_fitness"], generation)
        validation_time = time.perf_counter() - validation_start
        generation_time = time.perf_counter() - start
        state.elapsed += generation_time
        row.update({
            "best_score": state.best_score,
            "best_generation": state.best_generation,
            "wall_time": state.elapsed,
            "generation_time": generation_time,
            "eval_time": eval_time,
            "validation_time": validation_time,
            "driver_time": generation_time - eval_time - validation_time,
            "checkpoint_time": self._checkpoint_seconds,  # the previous checkpoint write (this one follows)
        })
        extra = getattr(self.evaluator, "last_metrics", None)
        if extra:
            row.update(extra)
        self.metrics.append(row)
        if state.generation % config.run.checkpoint_every == 0 or self.stop_reason():
            self.checkpoint()
        return row

    def _validate(self, candidate: np.ndarray, num_steps: int, generation: int) -> dict[str, Any]:
        """Score the distribution mean and the generation's best candidate on fixed held-out tasks."""
        mean = np.asarray(self.strategy.mean(self.strategy_state))
        vectors = np.stack([mean, candidate])
        result = self.evaluator.evaluate(vectors, "validation", split_key(self.config, _VALIDATION),
                                         self.config.run.validation_tasks, num_steps)
        scores = np.asarray(aggregate_fitness(np.asarray(result.fitness, np.float64), self.config.episode))
        pick = int(np.argmin(scores))
        self._offer_best(vectors[pick], float(scores[pick]), generation)
        return {"val_fitness": float(scores[pick]), "val_accuracy": float(np.mean(result.accuracy[pick])),
                "val_mean_accuracy": float(np.mean(result.accuracy[0])), "val_source": ("mean", "best")[pick]}

    def _offer_best(self, vector: np.ndarray, score: float, generation: int) -> None:
        state = self.state
        if state.best_score is None or score < state.best_score:
            state.best_score, state.best_generation = score, generation
            state.best_vector = np.asarray(vector, np.float32)
            G.save(self.run_dir / "best.genome", self.spec, G.unravel(self.spec, jnp.asarray(state.best_vector)),
                   {"score": score, "generation": generation, "score_kind": "validation fitness"
                    if self.config.run.validation_every > 0 else "train fitness",
                    "config": str(self.run_dir / "config.yaml")})

    def run(self, on_generation: Callable[[dict[str, Any]], None] | None = None) -> str:
        """Run generations until a stop criterion; returns the stop reason."""
        while (reason := self.stop_reason()) is None:
            saved = (self.strategy_state, dataclasses.replace(self.state, failures=list(self.state.failures)))
            try:
                row = self.step()
            except Exception:
                # e.g. every Ray worker lost: keep the last complete generation on disk, then report
                self.strategy_state, self.state = saved
                self.checkpoint()
                raise
            if on_generation is not None:
                on_generation(row)
        self.state.stop_reason = reason
        self.checkpoint()
        return reason

    def best_genome(self) -> G.Genome:
        vector = self.state.best_vector
        if vector is None:
            vector = np.asarray(self.strategy.mean(self.strategy_state), np.float32)
        return G.unravel(self.spec, jnp.asarray(vector))


def local_evaluator(config: Config, spec: G.NetworkSpec) -> Evaluator:
    return LocalEvaluator(spec, config.task, config.episode)
