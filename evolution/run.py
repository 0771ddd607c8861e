"""The generation loop (DESIGN §5): ask, evaluate one common task batch, tell, log, validate, checkpoint.

Every random choice of generation ``g`` comes from ``fold_in(root_key, g)``, and the checkpoint holds the
strategy state and counters, so a run resumed from any checkpoint repeats exactly what the uninterrupted
run would have done (same populations, fitness, metrics and best genome).
"""

from __future__ import annotations

import dataclasses
import json
import os
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
from evolution import rundir
from evolution.checkpoint import (CheckpointError, MetricsLog, atomic_write_text, config_differences,
                                  config_identity, load_checkpoint, save_checkpoint, verify)
from evolution.config import TRUNCATION_AWARE, Config, ConfigError, dump_config, load_config, strategy_options
from evolution.resources import check_run_config
from evolution.signals import critical
from genome.io import failpoint
from evolution.strategies import make_strategy
from evolution.tracking import check_tracking
from workers.engine import aggregate_fitness
from workers.evaluator import Evaluator, LocalEvaluator
from workers.horizon import horizon
from workers.tasks import make_family

# fold_in salts of the root key
_GENERATION, _VALIDATION, _TEST, _TUNING, _SELECTION = 1, 2, 3, 4, 5
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


def num_steps_at(config: Config, generation: int, inner_steps: int = 0) -> int:
    """Unroll length of ``generation`` under the curriculum (:func:`workers.horizon.horizon`), indexed by
    generations (``every``) or by the inner steps consumed before it (``every_inner_steps``)."""
    curriculum = config.run.curriculum
    if curriculum.every_inner_steps:
        return horizon(config.episode.num_steps, inner_steps, curriculum.every_inner_steps, curriculum.increment,
                       curriculum.max_steps)
    return horizon(config.episode.num_steps, generation, curriculum.every, curriculum.increment,
                   curriculum.max_steps)


def task_family(task_config, split: str, where: str = "task"):
    """``make_family`` with its value errors (n_way > classes available, bad splits) as ConfigErrors."""
    try:
        return make_family(task_config, split)
    except (ValueError, TypeError) as error:
        from workers.datasets import DatasetError

        if isinstance(error, DatasetError):
            raise
        raise ConfigError(f"{where}: {str(error).splitlines()[0]}") from None


def network_spec(config: Config) -> G.NetworkSpec:
    """The network of the run's (first) setting, whose spec best.genome is saved with; every setting and
    held-out report setting is built (data loaded, splits checked) on the way."""
    return setting_specs(config)[0][1]


def _setting_spec(config: Config, setting, where: str) -> G.NetworkSpec:
    family = task_family(setting.task, "train", where)
    for split in ("validation", "test"):
        task_family(setting.task, split, where)
    try:
        return config.network_spec(family.num_inputs, family.num_classes, setting.hidden_sizes)
    except G.SpecError as error:
        raise ConfigError(f"network: {error}") from None


def setting_specs(config: Config) -> list[tuple[Any, G.NetworkSpec]]:
    """``(Setting, spec)`` of every meta-training setting (one for a config without a settings list). The
    held-out ``report.settings`` are built too and checked not to test on what the settings meta-train on
    (same dataset's classes, same toy functions) unless their task sets ``allow_overlap``."""
    from evolution.config import resolve_settings
    from evolution.settings import heldout_overlap

    settings = resolve_settings(config)
    where = "task" if not config.settings else "settings[{}].task"
    pairs = [(s, _setting_spec(config, s, where.format(i))) for i, s in enumerate(settings)]
    families = {}
    for setting in settings:
        families[setting.task, "train"] = make_family(setting.task, "train")
    for i, heldout in enumerate(resolve_settings(config, "report")):
        _setting_spec(config, heldout, f"report.settings[{i}].task")
        families[heldout.task, "test"] = make_family(heldout.task, "test")
        reason = None if heldout.task.allow_overlap else heldout_overlap(settings, heldout, families)
        if reason:
            raise ConfigError(f"report.settings[{i}] ({heldout.name}): {reason}; set task.allow_overlap: true in "
                              "that setting if that is intended")
    return pairs


def check_resources(config: Config):
    """:func:`evolution.resources.check_run_config` for every setting; returns the largest estimate."""
    pairs = setting_specs(config)
    if not config.settings:
        return check_run_config(config, pairs[0][1])
    estimates = [check_run_config(dataclasses.replace(config, task=s.task), spec, s.num_steps) for s, spec in pairs]
    return max(estimates, key=lambda e: e.peak_bytes)


def check_strategy(config: Config, spec: G.NetworkSpec, mean: np.ndarray):
    """Build the strategy and run one init/ask/tell on throwaway fitness, so that option values pycma or
    evosax reject surface now as a ConfigError, not at generation 0 of a run."""
    try:
        strategy = make_strategy(config.strategy.name, G.num_dims(spec), config.strategy.population_size,
                                 strategy_options(config))
        key = jax.random.key(0)
        state = strategy.init(key, mean, config.strategy.sigma)
        population, state = strategy.ask(key, state)
        fitness = np.random.default_rng(0).standard_normal(len(population))
        strategy.tell(key, population, fitness, state)
    except (ValueError, TypeError, KeyError, ArithmeticError, AssertionError, np.linalg.LinAlgError) as error:
        from evolution.config import _first_line

        raise ConfigError(f"strategy.options: rejected by {config.strategy.name}: {_first_line(error)}") from None
    return strategy


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

    source_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=source_dir).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=5, cwd=source_dir).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    cpu = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    except OSError:
        pass
    return {
        "git_commit": commit,
        "git_dirty": dirty,  # uncommitted changes to tracked files when the run started
        # what else fixes the numbers: XLA's CPU kernels depend on the CPU and the thread count, and its
        # flags can change fusion and GEMM blocking (results differ at the 1e-7 level across machines)
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "jax_platforms": os.environ.get("JAX_PLATFORMS"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {n: version(n) for n in ("blur-evolve", "jax", "jaxlib", "numpy", "evosax", "cma", "ray", "optax",
                                             "flax", "scikit-learn", "torch")},
        "devices": [str(d) for d in jax.devices()],
        "seed": config.seed,
        "evaluator": evaluator.describe(),
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
    unroll_generation: int | None = None  # truncation-aware strategies: generation the current unroll began

    def counters(self) -> dict[str, Any]:
        return {"generation": self.generation, "evaluations": self.evaluations, "inner_steps": self.inner_steps,
                "elapsed": self.elapsed, "best_score": self.best_score, "best_generation": self.best_generation,
                "stop_reason": self.stop_reason, "failures": self.failures,
                "unroll_generation": self.unroll_generation}


class Run:
    """One evolution run in ``run_dir``. ``Run.create`` starts one; ``Run.resume`` continues one."""

    def __init__(self, config: Config, run_dir: Path, evaluator: Evaluator, spec: G.NetworkSpec):
        self.config, self.run_dir, self.evaluator, self.spec = config, Path(run_dir), evaluator, spec
        from evolution.config import resolve_settings

        self.settings = resolve_settings(config) if config.settings else None  # None: the one-setting run
        self.strategy = make_strategy(config.strategy.name, G.num_dims(spec), config.strategy.population_size,
                                      strategy_options(config))
        # truncation-aware strategies: every candidate's synapses [P, K, ...] carried across generations
        self.truncated = config.strategy.name in TRUNCATION_AWARE
        self.window = int(strategy_options(config)["truncation_length"]) if self.truncated else 0
        self.inner: G.Synapses | None = None
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.state = RunState()
        self.strategy_state = None
        self._checkpoint_seconds = 0.0
        self.lock: rundir.RunLock | None = None
        self.run_id, self.key = "", None
        self.estimate = None  # resources.Estimate of the run's largest evaluation call (set by create/resume)
        self._step_done = False
        self.checkpointed_generation: int | None = None  # generation of the checkpoint on disk
        self.tracker = None  # evolution.tracking.Tracker when config.tracking enables a backend
        self._untracked: list[dict[str, Any]] = []  # metrics rows waiting for their checkpoint

    # ------------------------------------------------------------------------------------------ setup
    @classmethod
    def create(cls, config: Config, run_dir: Path, evaluator_fn: Callable[[Config, G.NetworkSpec], Evaluator],
               lock: rundir.RunLock | None = None, source: str | None = None):
        """Check everything (config, data, resources, strategy options, ``--out``), then lock ``run_dir`` and
        write the run's files. Nothing is written before every check has passed."""
        run_dir = Path(run_dir)
        if lock is None:
            rundir.check_new_run_dir(run_dir)
        spec = network_spec(config)
        estimate = check_resources(config)
        mean = initial_vector(config, spec)
        check_strategy(config, spec, mean)
        check_tracking(config)
        lock = lock or rundir.create_run_dir(run_dir)
        try:
            run = cls(config, run_dir, evaluator_fn(config, spec), spec)
            run.lock, run.estimate = lock, estimate
            atomic_write_text(run_dir / "config.yaml", dump_config(config))
            run.run_id = rundir.new_run_id()
            run.key = rundir.create_run_key(run.run_id)
            rundir.write_run_info(run_dir, run.run_id)
            atomic_write_text(run_dir / "provenance.json",
                              json.dumps({**provenance(config, run.evaluator), "config_source": source}, indent=2))
            init_key = jax.random.fold_in(root_key(config), 0)
            run.strategy_state = run.strategy.init(init_key, mean, config.strategy.sigma)
            run.checkpoint()
            run._start_tracking()
        except BaseException:
            lock.release()
            raise
        return run

    @classmethod
    def resume(cls, run_dir: Path, evaluator_fn: Callable[[Config, G.NetworkSpec], Evaluator]):
        """Lock ``run_dir`` and continue it from its checkpoint. The checkpoint is verified (checksum, run id,
        config identity, and for pickled strategy state the run's signature) and its counters and the metrics
        log are checked before anything in the directory changes. A run killed before its first checkpoint
        starts over from its config.yaml."""
        run_dir = Path(run_dir)
        lock = rundir.open_run_dir(run_dir)
        if lock.previous_holder and lock.previous_holder != os.getpid():
            print(f"{run_dir}: took over the lock left by process {lock.previous_holder}, which is gone",
                  file=sys.stderr)
        try:
            config = load_config(run_dir / "config.yaml")
            if not (run_dir / "checkpoint.ckpt").exists() and not (run_dir / "checkpoint.ckpt").is_symlink():
                if MetricsLog(run_dir / "metrics.jsonl").read():
                    raise CheckpointError(f"{run_dir}: metrics.jsonl has rows but there is no checkpoint")
                for name in ("metrics.jsonl", "provenance.json", "best.genome", rundir.RUN_INFO_NAME):
                    (run_dir / name).unlink(missing_ok=True)
                print(f"{run_dir}: killed before its first checkpoint; starting it over", file=sys.stderr)
                return cls.create(config, run_dir, evaluator_fn, lock=lock)
            checkpoint = load_checkpoint(run_dir)
            run_id = rundir.read_run_id(run_dir)
            if run_id is None or checkpoint.run_id != run_id:
                raise CheckpointError(f"{run_dir / 'checkpoint.ckpt'}: belongs to another run "
                                      f"(run id {checkpoint.run_id!r}, this directory's is {run_id!r})")
            if checkpoint.config is not None:
                changed = config_differences(checkpoint.config, config_identity(config))
                if changed:
                    raise CheckpointError(f"{run_dir / 'config.yaml'}: {', '.join(changed[:4])} differ from the "
                                          "config the checkpoint was written under; only run.generations, "
                                          "max_evaluations, max_wall_time, target_fitness, checkpoint_every, "
                                          "evaluator.* (but evaluator.backend) and report.* may change before "
                                          "resuming")
            spec = network_spec(config)
            estimate = check_resources(config)
            check_tracking(config)
            strategy = make_strategy(config.strategy.name, G.num_dims(spec), config.strategy.population_size,
                                     strategy_options(config))
            key = rundir.load_run_key(run_id)
            if getattr(strategy, "state_is_pickle", False) and not verify(key, checkpoint.checksum,
                                                                                  checkpoint.signature):
                reason = "no signing key for this run in " + str(rundir.key_dir()) if key is None else (
                    "its signature does not verify")
                raise CheckpointError(f"{run_dir / 'checkpoint.ckpt'}: refusing to load pickled {strategy.name} "
                                      f"state ({reason}); only runs created by this user on this machine resume")
            state = _checked_counters(checkpoint, config, spec)
            metrics = MetricsLog(run_dir / "metrics.jsonl")
            kept_rows = metrics.check(state.generation)
            try:
                strategy_state = strategy.state_from_bytes(checkpoint.strategy_state)
            except ValueError as error:
                raise CheckpointError(f"{run_dir / 'checkpoint.ckpt'}: {error}") from None
            run = cls(config, run_dir, evaluator_fn(config, spec), spec)
            run.lock, run.run_id, run.key, run.estimate = lock, run_id, key, estimate
            run.strategy_state = strategy_state
            run.state = state
            run.inner = run._inner_from_arrays(checkpoint.extra)
            run.checkpointed_generation = state.generation
            metrics.truncate_to(state.generation, kept_rows)
            run._start_tracking()
            if run.tracker is not None:
                run.tracker.log_rows(metrics.read())  # continue the same tracking runs up to the checkpoint
        except BaseException:
            lock.release()
            raise
        return run

    def _start_tracking(self) -> None:
        if self.config.tracking.tensorboard or self.config.tracking.mlflow:
            from evolution.tracking import Tracker

            self.tracker = Tracker(self.config, self.run_dir)

    def close(self) -> None:
        """Close the evaluator and the tracking backends and release the run directory's lock."""
        try:
            if self.tracker is not None:
                self.tracker.close()
            self.evaluator.close()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def checkpoint(self) -> None:
        start = time.perf_counter()
        with critical():
            self._save_checkpoint()
            self.checkpointed_generation = self.state.generation
        self._checkpoint_seconds = time.perf_counter() - start
        if self.tracker is not None and self._untracked:  # only generations whose checkpoint is on disk
            self.tracker.log_rows(self._untracked)
        self._untracked = []

    def _save_checkpoint(self) -> None:
        extra = {}
        if self.inner is not None:
            extra = {f"inner_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(self.inner))}
        save_checkpoint(self.run_dir, self.state.counters(), self.strategy.state_to_bytes(self.strategy_state),
                        self.state.best_vector, run_id=self.run_id, config=config_identity(self.config),
                        key=self.key, extra=extra)

    def _inner_template(self):
        from workers.engine import init_window_synapses
        from workers.evaluator import synapse_keys

        keys = synapse_keys(jax.random.key(0), self.config.run.tasks_per_generation)
        return jax.eval_shape(lambda k: init_window_synapses(self.spec, k, self.config.strategy.population_size,
                                                             self.config.task.batch_size), keys)

    def _inner_from_arrays(self, extra: dict[str, np.ndarray]) -> G.Synapses | None:
        """The carried synapses of a truncation-aware run from checkpoint arrays (shapes checked)."""
        if not extra:
            if self.truncated and self.state.unroll_generation is not None:
                raise CheckpointError("checkpoint.ckpt: the inner state of the unroll in progress is missing")
            return None
        if not self.truncated:
            raise CheckpointError("checkpoint.ckpt: holds inner state, but the strategy is not truncation-aware")
        template = self._inner_template()
        leaves, treedef = jax.tree.flatten(template)
        arrays = [extra.get(f"inner_{i}") for i in range(len(leaves))]
        if len(extra) != len(leaves) or any(a is None or a.shape != t.shape or a.dtype != t.dtype
                                             for a, t in zip(arrays, leaves)):
            raise CheckpointError("checkpoint.ckpt: the inner state does not fit the network and population")
        return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays])

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
        num_steps = num_steps_at(config, generation, state.inner_steps)
        ask_key, task_key, tell_key = generation_keys(config, generation)
        unroll_start = None
        if self.truncated:  # the partial unroll of each candidate continues its own inner state
            unroll_start = self.strategy.unroll_start(self.strategy_state)
            if unroll_start == 0:
                state.unroll_generation, self.inner = generation, None
            task_key = generation_keys(config, state.unroll_generation)[1]  # one task batch per unroll
        population, self.strategy_state = self.strategy.ask(ask_key, self.strategy_state)
        eval_start = time.perf_counter()
        per_setting = None
        if self.settings is not None:
            result, fitness, per_setting = self._evaluate_settings(population, task_key)
        elif self.truncated:
            result, self.inner = self.evaluator.evaluate_window(
                population, self.inner, "train", task_key, config.run.tasks_per_generation, num_steps, unroll_start,
                self.window)
        else:
            result = self.evaluator.evaluate(population, "train", task_key, config.run.tasks_per_generation,
                                             num_steps)
        eval_time = time.perf_counter() - eval_start
        if per_setting is None:
            fitness = np.asarray(aggregate_fitness(np.asarray(result.fitness, np.float64), config.episode.scoring))
        self.strategy_state = self.strategy.tell(tell_key, population, fitness, self.strategy_state)
        num_episodes = result.fitness.size
        state.evaluations += len(population)
        if per_setting is not None:
            state.inner_steps += sum(r.fitness.size * self.settings[i].num_steps for i, r in per_setting.items())
        else:
            state.inner_steps += num_episodes * (self.window if self.truncated else num_steps)
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
        if unroll_start is not None:
            row["unroll_start"] = unroll_start
        if per_setting is not None:
            row["settings"] = [self.settings[i].name for i in per_setting]
            for i, r in per_setting.items():
                name = self.settings[i].name
                row[f"train_accuracy/{name}"] = float(np.mean(r.accuracy[best_index]))
                row[f"mean_train_accuracy/{name}"] = float(np.mean(r.accuracy))
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
        row.update(self.evaluator.pop_metrics())
        with critical():
            self.metrics.append(row)
            self._untracked.append(row)
            self._step_done = True  # the row is on disk: the state now stands for generation + 1
        if state.generation % config.run.checkpoint_every == 0 or self.stop_reason():
            self.checkpoint()
        return row

    def _evaluate_settings(self, population, task_key):
        """One common task batch per chosen setting (``fold_in(task_key, s)``), each reduced over its tasks,
        combined over the settings (:func:`evolution.settings.combine`). Returns (the results side by side
        as one Evaluation over all tasks, the combined fitness [P], {setting: Evaluation})."""
        from evolution import settings as S
        from workers.evaluator import Evaluation

        config = self.config
        chosen = S.choose(np.asarray(jax.random.key_data(jax.random.fold_in(task_key, len(self.settings)))).tobytes(),
                          len(self.settings), config.run.settings_per_generation)
        per_setting = {s: self.evaluator.evaluate(population, "train", jax.random.fold_in(task_key, s),
                                                  config.run.tasks_per_generation, self.settings[s].num_steps,
                                                  setting=s) for s in chosen}
        fitness = self._combine(per_setting, config.run.setting_normalization)
        side_by_side = Evaluation(*(np.concatenate([r[f] for r in per_setting.values()], axis=1)
                                    for f in range(len(Evaluation._fields))))
        return side_by_side, fitness, per_setting

    def _combine(self, per_setting: dict, normalization: str) -> np.ndarray:
        from evolution import settings as S

        scoring = self.config.episode.scoring
        rows = [np.asarray(aggregate_fitness(np.asarray(r.fitness, np.float64), scoring)) for r in per_setting.values()]
        chosen = [self.settings[s] for s in per_setting]
        return S.combine(np.stack(rows), [s.weight for s in chosen], normalization,
                         [S.chance_fitness(scoring.fitness, s.task.resolved_n_way) for s in chosen])

    def _validate(self, candidate: np.ndarray, num_steps: int, generation: int) -> dict[str, Any]:
        """Score the distribution mean and the generation's best candidate on fixed held-out tasks."""
        mean = np.asarray(self.strategy.mean(self.strategy_state))
        vectors = np.stack([mean, candidate])
        if self.settings is not None:
            return self._validate_settings(vectors, generation)
        result = self.evaluator.evaluate(vectors, "validation", split_key(self.config, _VALIDATION),
                                         self.config.run.validation_tasks, num_steps)
        scores = np.asarray(aggregate_fitness(np.asarray(result.fitness, np.float64), self.config.episode.scoring))
        pick = int(np.argmin(scores))
        self._offer_best(vectors[pick], float(scores[pick]), generation)
        return {"val_fitness": float(scores[pick]), "val_accuracy": float(np.mean(result.accuracy[pick])),
                "val_mean_accuracy": float(np.mean(result.accuracy[0])), "val_source": ("mean", "best")[pick]}

    def _validate_settings(self, vectors: np.ndarray, generation: int) -> dict[str, Any]:
        """Validation of a multi-setting run: every setting's validation tasks (fixed keys per setting),
        combined by chance-normalized weighted mean (raw with normalization none); accuracy weighted alike."""
        config = self.config
        key = split_key(config, _VALIDATION)
        per_setting = {s: self.evaluator.evaluate(vectors, "validation", jax.random.fold_in(key, s),
                                                  config.run.validation_tasks, setting.num_steps, setting=s)
                       for s, setting in enumerate(self.settings)}
        normalization = "none" if config.run.setting_normalization == "none" else "chance"
        scores = self._combine(per_setting, normalization)
        pick = int(np.argmin(scores))
        self._offer_best(vectors[pick], float(scores[pick]), generation)
        weights = np.asarray([s.weight for s in self.settings])
        accuracy = np.asarray([[np.mean(r.accuracy[p]) for r in per_setting.values()] for p in (0, 1)])
        row = {"val_fitness": float(scores[pick]), "val_accuracy": float(accuracy[pick] @ weights / weights.sum()),
               "val_mean_accuracy": float(accuracy[0] @ weights / weights.sum()), "val_source": ("mean", "best")[pick]}
        row.update({f"val_accuracy/{s.name}": float(accuracy[pick][i]) for i, s in enumerate(self.settings)})
        return row

    def _offer_best(self, vector: np.ndarray, score: float, generation: int) -> None:
        state = self.state
        if state.best_score is None or score < state.best_score:
            state.best_score, state.best_generation = score, generation
            state.best_vector = np.asarray(vector, np.float32)
            with critical():
                G.save(self.run_dir / "best.genome", self.spec, G.unravel(self.spec, jnp.asarray(state.best_vector)),
                       {"score": score, "generation": generation, "score_kind": "validation fitness"
                        if self.config.run.validation_every > 0 else "train fitness",
                        "config": str(self.run_dir / "config.yaml")})

    def run(self, on_generation: Callable[[dict[str, Any]], None] | None = None) -> str:
        """Run generations until a stop criterion; returns the stop reason."""
        while (reason := self.stop_reason()) is None:
            saved = (self.strategy_state, dataclasses.replace(self.state, failures=list(self.state.failures)),
                     self.inner)
            self._step_done = False
            try:
                row = self.step()
                if on_generation is not None:
                    on_generation(row)
                failpoint("generation")
            except BaseException as error:
                # every Ray worker lost, a signal, a failed write: keep the last complete generation on disk
                if not self._step_done:
                    self.strategy_state, self.state, self.inner = saved
                try:
                    self.checkpoint()
                except OSError:
                    if not isinstance(error, OSError):
                        raise
                    # the write failed again (disk full): the previous checkpoint is intact and consistent
                    # with metrics.jsonl (rows after it are recomputed on resume)
                raise
        self.state.stop_reason = reason
        self.checkpoint()
        return reason

    def selection_check(self, num_tasks: int) -> dict[str, Any]:
        """How much the validation score that chose ``best.genome`` overstates it: the best genome's accuracy
        at selection (the validation row of its generation), on ``num_tasks`` fresh validation tasks and on
        ``num_tasks`` test tasks of every meta-training setting (weighted like validation). The fresh tasks
        come from their own key, never used by the run."""
        settings = self.settings or [None]
        vector = self.state.best_vector
        if vector is None:
            vector = np.asarray(self.strategy.mean(self.strategy_state), np.float32)
        rows = [r for r in self.metrics.read() if r.get("generation") == self.state.best_generation]
        at_selection = rows[0].get("val_accuracy") if rows else None
        out: dict[str, Any] = {"num_tasks": num_tasks, "best_generation": self.state.best_generation,
                               "validation_accuracy_at_selection": at_selection, "settings": {}}
        totals = {"validation": 0.0, "test": 0.0}
        weights = 0.0
        for s, setting in enumerate(settings):
            name = setting.name if setting is not None else "task"
            num_steps = setting.num_steps if setting is not None else num_steps_at(self.config, self.state.generation)
            weight = setting.weight if setting is not None else 1.0
            entry = {}
            for split in ("validation", "test"):
                key = jax.random.fold_in(jax.random.fold_in(split_key(self.config, _SELECTION), s),
                                         ("validation", "test").index(split))
                result = self.evaluator.evaluate(vector[None], split, key, num_tasks, num_steps, setting=s)
                entry[f"{split}_accuracy"] = float(np.mean(result.accuracy))
                totals[split] += weight * entry[f"{split}_accuracy"]
            out["settings"][name] = entry
            weights += weight
        out["validation_accuracy"] = totals["validation"] / weights
        out["test_accuracy"] = totals["test"] / weights
        out["selection_minus_test"] = None if at_selection is None else at_selection - out["test_accuracy"]
        return out

    def best_genome(self) -> G.Genome:
        vector = self.state.best_vector
        if vector is None:
            vector = np.asarray(self.strategy.mean(self.strategy_state), np.float32)
        return G.unravel(self.spec, jnp.asarray(vector))


def _checked_counters(checkpoint, config: Config, spec: G.NetworkSpec) -> RunState:
    """The checkpoint's counters as a RunState, every value type- and range-checked (CheckpointError)."""
    counters, where = checkpoint.counters, "checkpoint.ckpt"
    ints = ("generation", "evaluations", "inner_steps")
    expected = set(ints) | {"elapsed", "best_score", "best_generation", "stop_reason", "failures",
                            "unroll_generation"}
    if set(counters) != expected:
        raise CheckpointError(f"{where}: counters {sorted(set(counters) ^ expected)} missing or unexpected")
    for name in ints:
        value = counters[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
            raise CheckpointError(f"{where}: counter {name} = {value!r} is out of range")
    elapsed = counters["elapsed"]
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not (0 <= elapsed < float("inf")):
        raise CheckpointError(f"{where}: counter elapsed = {elapsed!r} is out of range")
    best_generation, best_score = counters["best_generation"], counters["best_score"]
    if best_generation is not None and (isinstance(best_generation, bool) or not isinstance(best_generation, int)
                                        or not 0 <= best_generation < max(counters["generation"], 1)):
        raise CheckpointError(f"{where}: counter best_generation = {best_generation!r} is out of range")
    if best_score is not None and (isinstance(best_score, bool) or not isinstance(best_score, (int, float))):
        raise CheckpointError(f"{where}: counter best_score = {best_score!r} is not a number")
    if counters["stop_reason"] not in (None, "generations", "max_evaluations", "max_wall_time", "target_fitness",
                                       "strategy", "inner_step_budget"):
        raise CheckpointError(f"{where}: unknown stop_reason {counters['stop_reason']!r}")
    unroll = counters["unroll_generation"]
    if unroll is not None and (isinstance(unroll, bool) or not isinstance(unroll, int)
                               or not 0 <= unroll < max(counters["generation"], 1)):
        raise CheckpointError(f"{where}: counter unroll_generation = {unroll!r} is out of range")
    if not isinstance(counters["failures"], list):
        raise CheckpointError(f"{where}: failures is not a list")
    best = checkpoint.best_vector
    if best is not None and (best.shape != (G.num_dims(spec),) or not np.all(np.isfinite(best))):
        raise CheckpointError(f"{where}: best_vector has shape {best.shape}, expected ({G.num_dims(spec)},) "
                              "of finite values")
    return RunState(**counters, best_vector=best)


def evaluator_settings(config: Config) -> tuple:
    """The (spec, task config) pairs an evaluator serves for a multi-setting run (empty otherwise)."""
    if not config.settings:
        return ()
    return tuple((spec, setting.task) for setting, spec in setting_specs(config))


def local_evaluator(config: Config, spec: G.NetworkSpec) -> Evaluator:
    return LocalEvaluator(spec, config.task, config.episode, config.evaluator.backend,
                          config.evaluator.torch_compile, evaluator_settings(config), config.evaluator.devices)
