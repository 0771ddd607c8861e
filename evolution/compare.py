"""``blur compare``: evolution strategies vs gradient-based outer loops on equal budgets (DESIGN §5).

Every method starts from the same initial genome (``strategy.init``), meta-trains on the same task family
(train split) and is measured on the same held-out tasks (test split) whenever it has consumed another
``budget / num_points`` inner steps, until the shared inner-step budget (and optional wall-clock limit) is
spent. Each method runs once per seed. The final genomes are then scored next to tuned SGD, SGD+momentum,
Adam and the tuned backprop genome with :func:`workers.report.compare_on_heldout`, at T and at every
``horizon_multiples`` multiple of T (default ``[1, 4]``; learning rates re-tuned per horizon).

The YAML file is an ordinary experiment config (network, task, episode, strategy, run, report) plus a
``compare:`` section, parsed here::

    compare:
      seeds: [0, 1]
      inner_step_budget: 200000
      num_points: 10
      methods:
        - {name: CMA-ES, kind: es}                       # strategy section defaults
        - {name: OpenES, kind: es, strategy: open_es, population_size: 32, sigma: 0.1}
        - {name: backprop, kind: gradient, estimator: full, learning_rate: 5.0e-4}
        - {name: PES, kind: gradient, estimator: pes, options: {truncation: 5, pes_pairs: 4}}

Outputs in ``out_dir``: ``report.md`` (tables, plots, a factual summary), ``results.csv`` (one row per
method: final held-out accuracy over seeds, budget, memory), ``curves.csv`` (held-out accuracy along every
run), ``accuracy_vs_inner_steps.png``, ``accuracy_vs_wall_clock.png``, ``memory.png``,
``final_accuracy.png``, ``compare.json`` and the ES run directories under ``runs/``.

Accounting. Inner steps are rule steps computed (ES: population × tasks × T per generation; gradient
methods: see :mod:`evolution.outer_loop`). Wall clock excludes the held-out measurements and compilation
(ES runs start after one untimed warm-up generation; gradient runs subtract their measured compile time;
a curriculum's new unroll lengths compile inside the timed part for ES). Memory is XLA's
compiled ``temp`` bytes of the method's jitted step (ES: the population evaluation; gradients: the
estimator) at T and at ``memory_multiplier``·T.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import genome as G
from evolution import gradients as GR
from evolution import learned_init as LI
from evolution import outer_loop as OL
from evolution import warpgrad as WG
from evolution.config import (MAX_POPULATION, MAX_SEED, MAX_STEPS, MAX_TASKS, Config, ConfigError, apply_override,
                               check_bounds, check_strategy_options, config_from_dict, config_to_dict, read_yaml_file)
from workers import baselines as BL
from workers.report import Progress, _summary, compare_on_heldout, report_tasks, report_units
from evolution.run import Run, initial_vector, local_evaluator, network_spec
from workers import engine
from workers.evaluator import synapse_keys
from workers.horizon import horizon
from workers.tasks import make_family

METHOD_KINDS = ("es", "gradient", "learned_init")
LEARNED_INIT_ESTIMATORS = LI.ALGORITHMS + ("warpgrad",)
_HELDOUT, _GRADIENT, _FINAL, _LEARNED_INIT = 11, 12, 13, 14  # fold_in salts
_FAST_COMPILE = {"xla_backend_optimization_level": 0}  # memory analysis only: same buffers, faster compile


@dataclass(frozen=True)
class MethodConfig:
    """One outer loop of the comparison.

    kind ``es``: ``strategy`` / ``population_size`` / ``sigma`` / ``options`` override the config's
    strategy section. kind ``gradient``: ``estimator`` (full | truncated | pes | evograd | bmg) with ``options``
    (:class:`evolution.gradients.EstimatorConfig` fields, e.g. truncation, remat, pes_sigma, bmg_bootstrap),
    ``outer_optimizer`` (adam | optimistic), its ``learning_rate`` and ``clip_norm``, ``tasks_per_step`` (default: ``run.tasks_per_generation``) and an
    unroll curriculum in meta-steps. kind ``learned_init``: ``estimator`` imaml | cml meta-learns the
    initialization of the plain MLP that SGD trains (:mod:`evolution.learned_init`; ``options``: lam,
    inner_lr, cg_steps, cg_damping, lam_damping, beta, symmetric, activation), Adam at ``learning_rate``;
    ``estimator: warpgrad`` meta-learns warp layers that precondition that SGD, and (simplified Leap) its
    initialization (:mod:`evolution.warpgrad`; ``options``: inner_lr, replay_batch, epochs, learn_init,
    leap_norm, activation).
    """

    name: str
    kind: str
    strategy: str | None = None
    population_size: int | None = None
    sigma: float | None = None
    estimator: str = "full"
    options: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 5e-4
    clip_norm: float = 10.0
    tasks_per_step: int | None = None
    curriculum_every: int = 0
    curriculum_increment: int = 5
    curriculum_max_steps: int | None = None
    outer_optimizer: str = "adam"


@dataclass(frozen=True)
class CompareConfig:
    methods: tuple[MethodConfig, ...]
    seeds: tuple[int, ...] = (0,)
    inner_step_budget: int = 100_000
    max_wall_time: float | None = None  # seconds per (method, seed)
    num_points: int = 10  # held-out measurements along each run
    heldout_tasks: int = 32
    memory_multiplier: int = 4
    baselines: bool = True
    horizon_multiples: tuple[int, ...] = (1, 4)  # the final rows are scored at these multiples of T


# ---------------------------------------------------------------------------------------------- config


def _check(value: Any, types: tuple, key: str) -> Any:
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{key}: expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{key}: expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
    return float(value) if float in types and int in types and not isinstance(value, bool) else value


_FIELD_TYPES = {
    "name": (str,), "kind": (str,), "strategy": (str, type(None)), "population_size": (int, type(None)),
    "sigma": (float, int, type(None)), "estimator": (str,), "options": (dict,), "learning_rate": (float, int),
    "clip_norm": (float, int), "tasks_per_step": (int, type(None)), "curriculum_every": (int,),
    "curriculum_increment": (int,), "curriculum_max_steps": (int, type(None)), "outer_optimizer": (str,),
    "seeds": (list,), "inner_step_budget": (int,), "max_wall_time": (float, int, type(None)), "num_points": (int,),
    "heldout_tasks": (int,), "memory_multiplier": (int,), "baselines": (bool,), "methods": (list,),
    "horizon_multiples": (list,),
}


_METHOD_BOUNDS = {
    "population_size": (2, MAX_POPULATION, False), "sigma": (0, None, True), "learning_rate": (0, 1e3, True),
    "clip_norm": (0, None, True), "tasks_per_step": (1, MAX_TASKS, False), "curriculum_every": (0, None, False),
    "curriculum_increment": (0, MAX_STEPS, False), "curriculum_max_steps": (1, MAX_STEPS, False),
}
_COMPARE_BOUNDS = {
    "seeds[]": (0, MAX_SEED, False), "inner_step_budget": (1, 10**13, False), "max_wall_time": (0, None, True),
    "num_points": (1, 10_000, False), "heldout_tasks": (1, MAX_TASKS, False), "memory_multiplier": (1, 64, False),
}


def _method(data: Any, index: int) -> MethodConfig:
    where = f"compare.methods[{index}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    names = {f.name for f in dataclasses.fields(MethodConfig)}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(names))})")
        _check(value, _FIELD_TYPES[key], f"{where}.{key}")
    if "name" not in data or "kind" not in data:
        raise ConfigError(f"{where}: needs a name and a kind ({' | '.join(METHOD_KINDS)})")
    if data["kind"] not in METHOD_KINDS:
        raise ConfigError(f"{where}.kind: must be one of {', '.join(METHOD_KINDS)}; got {data['kind']!r}")
    method = MethodConfig(**{k: (float(v) if k in ("sigma", "learning_rate", "clip_norm") and v is not None else v)
                             for k, v in data.items()})
    try:
        check_bounds(method, _METHOD_BOUNDS)
        check_strategy_options(method.strategy or "", method.options, "options")  # strings: see below
    except ConfigError as error:
        raise ConfigError(f"{where}.{error}") from None
    if method.outer_optimizer not in OL.OUTER_OPTIMIZERS:
        raise ConfigError(f"{where}.outer_optimizer: must be one of {', '.join(OL.OUTER_OPTIMIZERS)}; "
                          f"got {method.outer_optimizer!r}")
    if method.kind == "gradient":
        try:
            estimator_config(method)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: {error}") from None
    if method.kind == "learned_init":
        if method.estimator not in LEARNED_INIT_ESTIMATORS:
            raise ConfigError(f"{where}.estimator: a learned_init method is one of "
                              f"{', '.join(LEARNED_INIT_ESTIMATORS)}; got {method.estimator!r}")
        if "algorithm" in method.options:
            raise ConfigError(f"{where}.options.algorithm: the algorithm is the method's estimator")
        try:
            if method.estimator == "warpgrad":
                WG.check_options(method.options)
            else:
                LI.check_learned_init({**method.options, "algorithm": method.estimator})
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}.{error}") from None
    return method


def parse_compare(data: Any) -> CompareConfig:
    """The ``compare:`` section as a :class:`CompareConfig`; every problem is a ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError("compare: expected a mapping with at least 'methods'")
    names = {f.name for f in dataclasses.fields(CompareConfig)}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"compare.{key}: unknown key (allowed: {', '.join(sorted(names))})")
        _check(value, _FIELD_TYPES[key], f"compare.{key}")
    if not data.get("methods"):
        raise ConfigError("compare.methods: list at least one method")
    methods = tuple(_method(m, i) for i, m in enumerate(data["methods"]))
    labels = [m.name for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError("compare.methods: method names must be unique")
    values = {k: v for k, v in data.items() if k != "methods"}
    if "seeds" in values:
        if not values["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) for s in values["seeds"]):
            raise ConfigError("compare.seeds: expected a non-empty list of integers")
        values["seeds"] = tuple(values["seeds"])
    if "horizon_multiples" in values:
        multiples = values["horizon_multiples"]
        if (not multiples or not all(isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= 64 for m in multiples)
                or len(set(multiples)) != len(multiples)):
            raise ConfigError(f"compare.horizon_multiples: expected distinct integers in 1..64, got {multiples!r}")
        values["horizon_multiples"] = tuple(sorted(set(multiples) | {1}))  # T itself is always scored
    config = CompareConfig(methods=methods, **values)
    try:
        check_bounds(config, _COMPARE_BOUNDS)
    except ConfigError as error:
        raise ConfigError(f"compare.{error}") from None
    for key, ok in (("inner_step_budget", config.inner_step_budget >= 1), ("num_points", config.num_points >= 1),
                    ("heldout_tasks", config.heldout_tasks >= 1), ("memory_multiplier", config.memory_multiplier >= 1)):
        if not ok:
            raise ConfigError(f"compare.{key}: must be >= 1")
    return config


def load_compare_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, CompareConfig]:
    """Load the experiment config and its ``compare:`` section; ``--set compare.x=...`` works too."""
    path = Path(path)
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides:
        apply_override(data, assignment)
    if "compare" not in data:
        raise ConfigError(f"{path}: no 'compare:' section")
    compare = parse_compare(data.pop("compare"))
    config = config_from_dict(data)
    if config.run.curriculum.every:
        raise ConfigError("run.curriculum.every: blur compare counts the curriculum in inner steps so that every "
                          "method has the same horizon at the same budget point; use run.curriculum.every_inner_steps")
    for index, method in enumerate(compare.methods):
        if method.kind == "learned_init" and method.estimator == "warpgrad":
            points = (method.tasks_per_step or config.run.tasks_per_generation) * config.episode.num_steps
            if method.options.get("replay_batch", 1) > points:
                raise ConfigError(f"compare.methods[{index}].options.replay_batch: at most the {points} points a "
                                  f"meta-step stores (tasks per step x episode.num_steps), got "
                                  f"{method.options['replay_batch']}")
        if method.curriculum_every:
            raise ConfigError(f"compare.methods[{index}].curriculum_every: use run.curriculum.every_inner_steps, "
                              "shared by every method")
    return config, compare


def estimator_config(method: MethodConfig) -> GR.EstimatorConfig:
    return GR.EstimatorConfig(name=method.estimator, **method.options)


# ---------------------------------------------------------------------------------------------- running


class HeldOut:
    """Fixed held-out tasks (test split) shared by every method; ``measure(vector) -> (accuracy, loss)``."""

    def __init__(self, config: Config, spec: G.NetworkSpec, num_tasks: int):
        key = jax.random.fold_in(jax.random.key(config.seed), _HELDOUT)
        num_steps = config.episode.num_steps
        self.spec = spec
        self.tasks = make_family(config.task, "test").sample(key, num_tasks, num_steps)
        self.keys = synapse_keys(key, num_tasks)
        self.scoring, self.horizon = config.episode.scoring, config.episode.horizon(num_steps)

    def measure(self, vector) -> tuple[float, float]:
        result = engine.evaluate(self.spec, jnp.asarray(vector, jnp.float32)[None], self.tasks, self.keys,
                                 self.scoring, self.horizon)
        loss = np.asarray(result.cross_entropy[0])
        return float(np.mean(result.accuracy[0])), float(np.mean(np.where(np.isfinite(loss), loss, np.nan)))


def _checkpoints(compare: CompareConfig) -> int:
    return max(1, compare.inner_step_budget // compare.num_points)


def run_es(config: Config, compare: CompareConfig, method: MethodConfig, seed: int, spec: G.NetworkSpec,
           heldout: HeldOut, run_dir: Path) -> dict[str, Any]:
    """One evolution run (the ``blur evolve`` loop, validation off) until the inner-step budget is spent."""
    strategy = dataclasses.replace(
        config.strategy, **{k: v for k, v in (("name", method.strategy), ("population_size", method.population_size),
                                              ("sigma", method.sigma)) if v is not None},
        options={**config.strategy.options, **method.options})
    run_config = dataclasses.replace(config.run, generations=10**9, max_evaluations=None, validation_every=0,
                                     checkpoint_every=10**9, max_wall_time=compare.max_wall_time, target_fitness=None)
    es_config = dataclasses.replace(config, seed=seed, strategy=strategy, run=run_config)
    _warm_up_es(es_config, run_dir.parent / f"_warmup-{run_dir.name}")
    run = Run.create(es_config, run_dir, local_evaluator)
    every = _checkpoints(compare)
    accuracy, loss = heldout.measure(run.strategy.mean(run.strategy_state))
    curve = [{"inner_steps": 0, "wall_time": 0.0, "accuracy": accuracy, "loss": loss}]
    while run.state.inner_steps < compare.inner_step_budget and run.stop_reason() is None:
        before = run.state.inner_steps
        row = run.step()
        if run.state.inner_steps // every > before // every or run.state.inner_steps >= compare.inner_step_budget:
            accuracy, loss = heldout.measure(run.strategy.mean(run.strategy_state))
            curve.append({"inner_steps": run.state.inner_steps, "wall_time": run.state.elapsed,
                          "accuracy": accuracy, "loss": loss, "num_steps": row["num_steps"], "step_start": before})
    run.state.stop_reason = run.state.stop_reason or "inner_step_budget"
    run.checkpoint()
    run.close()
    population = es_config.strategy.population_size
    memory = {steps: _es_memory(es_config, spec, population, steps)
              for steps in (config.episode.num_steps, compare.memory_multiplier * config.episode.num_steps)}
    return {"vector": np.asarray(run.strategy.mean(run.strategy_state), np.float32), "curve": curve,
            "inner_steps": run.state.inner_steps, "wall_time": run.state.elapsed, "compile_time": None,
            "memory": memory}


def check_compare_resources(config: Config, compare: CompareConfig) -> None:
    """The resource guard for every method before anything runs: ES methods as ``blur evolve`` (population ×
    tasks episodes side by side); gradient methods keep each of the T inner steps' episode state for the
    backward pass, estimated as T × tasks_per_step episodes (at the memory multiplier's longest horizon)."""
    from evolution.resources import check_memory, estimate
    from evolution.run import network_spec

    spec = network_spec(config)
    steps = config.episode.num_steps
    for index, method in enumerate(compare.methods):
        if method.kind == "learned_init":  # an MLP per task: far below the rule's episodes
            continue
        if method.kind == "es":  # pycma evaluates string options: refused once the strategy name is known
            check_strategy_options(method.strategy or config.strategy.name,
                                   {**config.strategy.options, **method.options}, f"compare.methods[{index}].options")
            population, tasks = method.population_size or config.strategy.population_size, config.run.tasks_per_generation
        else:
            longest = max(steps, method.curriculum_max_steps or steps)
            population, tasks = longest, method.tasks_per_step or config.run.tasks_per_generation
        est = estimate(spec.layer_sizes, spec.num_states, config.task.batch_size, config.task.num_query, steps,
                       population, tasks, G.num_dims(spec))
        check_memory(est, config.evaluator.max_memory_gb, f"resources of method {method.name!r}",
                     "population_size, tasks_per_step, network.hidden_sizes, task.batch_size or episode.num_steps")


def _warm_up_es(config: Config, scratch: Path) -> None:
    """One untimed generation in a scratch directory, so that the timed run does not pay for compilation."""
    warmup = Run.create(config, scratch, local_evaluator)
    warmup.step()
    warmup.close()
    shutil.rmtree(scratch, ignore_errors=True)


def _es_memory(config: Config, spec: G.NetworkSpec, population: int, num_steps: int) -> int:
    num_tasks = config.run.tasks_per_generation
    key = jax.random.key(0)
    tasks = make_family(config.task, "train").sample(key, num_tasks, num_steps)
    vectors = jnp.zeros((population, G.num_dims(spec)), jnp.float32)
    evaluate = jax.jit(engine.evaluate, static_argnums=(0, 4, 5))  # the same computation as the engine's jit
    return GR.compiled_memory(evaluate, spec, vectors, tasks, synapse_keys(key, num_tasks), config.episode.scoring,
                              config.episode.horizon(num_steps), compiler_options=_FAST_COMPILE)["temp"]


def _shared_curriculum(config: Config) -> dict[str, Any]:
    """``run.curriculum.every_inner_steps`` for the gradient loops: the same horizon function of the inner-step
    budget as the ES run loop, so every method has the same horizon at the same budget point."""
    curriculum = config.run.curriculum
    if not curriculum.every_inner_steps:
        return {}
    return {"curriculum_every_inner_steps": curriculum.every_inner_steps,
            "curriculum_increment": curriculum.increment, "curriculum_max_steps": curriculum.max_steps}


def run_gradient(config: Config, compare: CompareConfig, method: MethodConfig, seed: int, spec: G.NetworkSpec,
                 heldout: HeldOut, initial: np.ndarray) -> dict[str, Any]:
    """One gradient-based outer loop until the inner-step budget is spent."""
    estimator = estimator_config(method)
    tasks_per_step = method.tasks_per_step or config.run.tasks_per_generation
    curriculum = {"curriculum_every": method.curriculum_every, "curriculum_increment": method.curriculum_increment,
                  "curriculum_max_steps": method.curriculum_max_steps} | _shared_curriculum(config)
    outer = OL.OuterLoopConfig(
        estimator, learning_rate=method.learning_rate, clip_norm=method.clip_norm, num_meta_steps=10**9,
        tasks_per_step=tasks_per_step, max_inner_steps=compare.inner_step_budget,
        max_wall_time=compare.max_wall_time, validate_every_inner_steps=_checkpoints(compare),
        outer_optimizer=method.outer_optimizer, **curriculum)
    family = make_family(config.task, "train")
    accuracy, loss = heldout.measure(initial)
    curve = [{"inner_steps": 0, "wall_time": 0.0, "accuracy": accuracy, "loss": loss}]

    def validate(vector):
        accuracy, loss = heldout.measure(vector)
        return {"heldout_accuracy": accuracy, "heldout_loss": loss}

    key = jax.random.fold_in(jax.random.key(seed), _GRADIENT)
    result = OL.run_outer_loop(key, spec, initial, family.sample, config.episode, outer, validate_fn=validate)
    curve += [{"inner_steps": row["inner_steps"], "wall_time": row["wall_time"], "accuracy": row["heldout_accuracy"],
               "loss": row["heldout_loss"], "num_steps": row["num_steps"], "step_start": row["start_inner_steps"]}
              for row in result.history if "heldout_accuracy" in row]
    memory = {steps: m["temp"] for steps, m in result.budget.memory.items()}  # what the loop compiled
    for steps in (config.episode.num_steps, compare.memory_multiplier * config.episode.num_steps):
        if steps in memory:
            continue
        tasks = family.sample(jax.random.key(0), tasks_per_step, steps)
        memory[steps] = GR.estimator_memory(spec, jnp.asarray(initial, jnp.float32), tasks,
                                            synapse_keys(jax.random.key(0), tasks_per_step),
                                            config.episode.horizon(steps), estimator,
                                            compiler_options=_FAST_COMPILE)["temp"]
    compile_time = result.budget.compile_time
    for point in curve[1:]:  # wall clock without compilation (ES runs are warmed up instead)
        point["wall_time"] = max(point["wall_time"] - compile_time, 0.0)
    return {"vector": result.vector, "curve": curve, "inner_steps": result.budget.inner_steps,
            "wall_time": max(result.budget.wall_time - compile_time, 0.0), "compile_time": compile_time,
            "memory": memory,
            "skipped": result.budget.skipped}


def _baseline_activation(spec: G.NetworkSpec) -> str:
    return spec.forward_activation if spec.forward_activation in BL.ACTIVATIONS else "sigmoid"


def learned_init_method(method: MethodConfig, spec: G.NetworkSpec):
    """The method's :class:`LI.LearnedInit` (imaml, cml) or :class:`WG.WarpGradOptions` (warpgrad); the MLP's
    activation defaults to the SGD baselines' one."""
    if method.estimator == "warpgrad":
        return WG.check_options({"activation": _baseline_activation(spec), **method.options})
    options = {"activation": _baseline_activation(spec), **method.options, "algorithm": method.estimator}
    return LI.check_learned_init(options)


def _sgd_from(weights, tasks, learning_rate: float, layer_sizes, activation: str, skip_last_update: bool,
              warps=None):
    """SGD from the initialization ``weights`` on every task (the baselines' trainer, same steps); with
    ``warps``, warped SGD through those warp layers (WarpGrad's learner)."""
    num_tasks, num_steps = tasks.query_y.shape[0], tasks.support_x.shape[1]
    if warps is not None:
        return _warped_sgd(list(weights), list(warps), tasks, jnp.asarray(learning_rate, jnp.float32),
                           BL.updates_per_episode(num_steps, skip_last_update), activation)
    init = [jnp.broadcast_to(w, (num_tasks,) + w.shape) for w in weights]
    return BL.run_baseline("sgd", learning_rate, layer_sizes, tasks, jax.random.key(0), activation=activation,
                           skip_last_update=skip_last_update, init_weights=init)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _warped_sgd(init, warps, tasks, learning_rate, num_updates, activation):
    return WG.warped_sgd(init, warps, tasks, learning_rate, num_updates, activation)


def _learned_init_learner(method: MethodConfig, spec: G.NetworkSpec, key: jax.Array):
    """(options, initial state, step(state, tasks, key) -> (state, loss, finite), the state's (init, warps),
    inner steps per task of a T-step meta-step) of a learned-initialization method."""
    import optax

    options = learned_init_method(method, spec)
    theta = BL.init_mlp(key, spec.layer_sizes)  # Glorot, as the SGD baselines start
    optimizer = optax.chain(optax.clip_by_global_norm(method.clip_norm), optax.adam(method.learning_rate))
    if method.estimator == "warpgrad":
        warps = WG.identity_warps(spec.layer_sizes)  # warped SGD = SGD at the start
        state = WG.MetaState(theta, warps, optimizer.init(theta), optimizer.init(warps))

        def step(state, tasks, step_key):
            return WG.meta_step(options, optimizer, state, tasks, step_key)

        return (options, state, step, lambda state: (state.init, state.warps),
                lambda steps: WG.inner_steps_per_task(options, steps))

    def li_step(state, tasks, step_key):
        theta, opt_state = state
        gradient, loss = LI.meta_gradient(options, theta, tasks)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(gradient)])) & jnp.isfinite(loss)
        updates, new_state = optimizer.update(gradient, opt_state, theta)
        return (optax.apply_updates(theta, updates), new_state), loss, finite

    return (options, (theta, optimizer.init(theta)), li_step, lambda state: (state[0], None),
            lambda steps: LI.inner_steps_per_task(options, steps))


def run_learned_init(config: Config, compare: CompareConfig, method: MethodConfig, seed: int, spec: G.NetworkSpec,
                     heldout: HeldOut) -> dict[str, Any]:
    """iMAML / CML / WarpGrad: Adam on the learner's meta-parameters (the MLP initialization θ; WarpGrad also
    its warp layers) with the method's meta-update, ``tasks_per_step`` train tasks per meta-step, until the
    inner-step budget is spent (a non-finite meta-gradient stops it as diverged). Held-out curve points: SGD
    (warped for WarpGrad) from θ at the method's inner learning rate on the shared held-out tasks."""
    layer_sizes = spec.layer_sizes
    num_steps = config.episode.num_steps
    tasks_per_step = method.tasks_per_step or config.run.tasks_per_generation
    key = jax.random.fold_in(jax.random.key(seed), _LEARNED_INIT)
    init_key, key = jax.random.split(key)
    options, state, step, weights_of, steps_per_task = _learned_init_learner(method, spec, init_key)
    step = jax.jit(step)
    family = make_family(config.task, "train")
    replay_key = jax.random.fold_in(key, 1 << 20)

    def measure(state):
        weights, warps = weights_of(state)
        result = _sgd_from(weights, heldout.tasks, options.inner_lr, layer_sizes, options.activation,
                           config.episode.skip_last_update, warps)
        loss = np.asarray(result["loss"])
        return float(np.mean(result["accuracy"])), float(np.mean(np.where(np.isfinite(loss), loss, np.nan)))

    start = time.perf_counter()
    sample = family.sample(jax.random.fold_in(key, 0), tasks_per_step, num_steps)
    compiled = step.lower(state, sample, replay_key).compile()
    compile_time = time.perf_counter() - start
    accuracy, loss = measure(state)
    curve = [{"inner_steps": 0, "wall_time": 0.0, "accuracy": accuracy, "loss": loss}]
    every, inner_steps, wall, meta_step, diverged = _checkpoints(compare), 0, 0.0, 0, False
    curriculum = config.run.curriculum
    while inner_steps < compare.inner_step_budget and (compare.max_wall_time is None or wall < compare.max_wall_time):
        tick = time.perf_counter()
        # the shared horizon function of the budget (run.curriculum.every_inner_steps), as every other method
        steps_now = (horizon(num_steps, inner_steps, curriculum.every_inner_steps, curriculum.increment,
                             curriculum.max_steps) if curriculum.every_inner_steps else num_steps)
        tasks = family.sample(jax.random.fold_in(key, meta_step), tasks_per_step, steps_now)
        run_step = compiled if steps_now == num_steps else step  # a new horizon compiles in the timed part
        new_state, _, finite = run_step(state, tasks, jax.random.fold_in(replay_key, meta_step))
        finite = bool(finite)
        wall += time.perf_counter() - tick
        per_step = tasks_per_step * steps_per_task(steps_now)
        before, inner_steps, meta_step = inner_steps, inner_steps + per_step, meta_step + 1
        if not finite:
            diverged = True
            break
        state = new_state
        if inner_steps // every > before // every or inner_steps >= compare.inner_step_budget:
            accuracy, loss = measure(state)
            curve.append({"inner_steps": inner_steps, "wall_time": wall, "accuracy": accuracy, "loss": loss,
                          "num_steps": steps_now, "step_start": before})
    memory = {}
    for steps in (num_steps, compare.memory_multiplier * num_steps):
        tasks = family.sample(jax.random.key(0), tasks_per_step, steps)
        memory[steps] = GR.compiled_memory(step, state, tasks, replay_key, compiler_options=_FAST_COMPILE)["temp"]
    weights, warps = weights_of(state)
    outcome = {"weights": [np.asarray(w) for w in weights], "curve": curve, "inner_steps": inner_steps,
               "wall_time": wall, "compile_time": compile_time, "memory": memory, "diverged": diverged,
               "meta_steps": meta_step, "inner_learning_rate": options.inner_lr, "activation": options.activation}
    if warps is not None:
        outcome["warps"] = [np.asarray(w) for w in warps]
    return outcome


def _learned_init_rows(config: Config, spec: G.NetworkSpec, runs: dict, final_key: jax.Array, num_steps: int,
                       progress=None) -> dict[str, dict[str, Any]]:
    """Final held-out rows of the learned initializations at horizon ``num_steps``: SGD (warped for WarpGrad)
    from each θ with its learning rate tuned on the same validation tasks as the baselines
    (``report.learning_rates``, at the same horizon), scored on the same test tasks."""
    tasks, tuning, _, _ = report_tasks(config.task, num_steps, final_key, config.report.test_tasks,
                                       config.report.tuning_tasks)
    rows = {}
    for name, by_seed in runs.items():
        for seed, outcome in by_seed.items():
            if "weights" not in outcome:
                continue
            weights = [jnp.asarray(w) for w in outcome["weights"]]
            warps = [jnp.asarray(w) for w in outcome["warps"]] if "warps" in outcome else None
            activation, skip = outcome["activation"], config.episode.skip_last_update
            scores = {}
            for lr in config.report.learning_rates:
                result = _sgd_from(weights, tuning, lr, spec.layer_sizes, activation, skip, warps)
                loss = np.asarray(result["loss"], np.float64)
                scores[float(lr)] = (float(np.mean(result["accuracy"])),
                                     -float(np.mean(np.where(np.isfinite(loss), loss, np.inf))))
            best = max(scores, key=scores.get)
            result = _sgd_from(weights, tasks, best, spec.layer_sizes, activation, skip, warps)
            rows[f"{name} / seed {seed}"] = {"learning_rate": best, "sweep": {lr: v[0] for lr, v in scores.items()},
                                             "meta_diverged": outcome["diverged"],
                                             **_summary(result["accuracy"], result["loss"], None)}
            if progress is not None:
                progress(f"{name} / seed {seed}")
    return rows


def run_comparison(config: Config, out_dir: str | Path, compare: CompareConfig, progress=None) -> dict[str, Any]:
    """Run every (method, seed), then score the final genomes and the tuned baselines; write the outputs.

    ``config``: the experiment config; ``compare``: its ``compare:`` section (see
    :func:`load_compare_config`); ``progress(line)`` is called after every run. Returns the summary.
    """
    out_dir = Path(out_dir)
    if (out_dir / "runs").exists():
        raise ConfigError(f"--out {out_dir}: a comparison already exists there")
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = network_spec(config)
    initial = np.asarray(initial_vector(config, spec), np.float32)
    heldout = HeldOut(config, spec, compare.heldout_tasks)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for method in compare.methods:
        runs[method.name] = {}
        for seed in compare.seeds:
            start = time.perf_counter()
            if method.kind == "es":
                run_dir = out_dir / "runs" / f"{_slug(method.name)}-seed{seed}"
                outcome = run_es(config, compare, method, seed, spec, heldout, run_dir)
            elif method.kind == "learned_init":
                outcome = run_learned_init(config, compare, method, seed, spec, heldout)
            else:
                outcome = run_gradient(config, compare, method, seed, spec, heldout, initial)
            runs[method.name][seed] = outcome
            if progress is not None:
                progress(f"{method.name} seed {seed}: held-out accuracy {outcome['curve'][-1]['accuracy']:.3f} "
                         f"after {outcome['inner_steps']} inner steps ({time.perf_counter() - start:.1f} s)")
    genomes = {f"{name} / seed {seed}": G.unravel(spec, jnp.asarray(outcome["vector"]))
               for name, by_seed in runs.items() for seed, outcome in by_seed.items() if "vector" in outcome}
    baseline_names = config.report.baselines if compare.baselines else ()
    include_backprop = compare.baselines and config.report.backprop_genome
    final_key = jax.random.fold_in(jax.random.key(config.seed), _FINAL)
    finals = {}
    for multiple in compare.horizon_multiples:  # every row at T and at the longer horizons, tuned per horizon
        steps = multiple * config.episode.num_steps
        scored = compare_on_heldout(
            spec, genomes, config.task, steps, final_key, num_test_tasks=config.report.test_tasks,
            num_tuning_tasks=config.report.tuning_tasks, learning_rates=config.report.learning_rates,
            baseline_names=baseline_names, include_backprop_genome=include_backprop,
            skip_last_update=config.episode.skip_last_update,
            progress=Progress(f"final held-out comparison at T = {steps}",
                              report_units(len(genomes), config.report.learning_rates, baseline_names,
                                           include_backprop)))
        learned = _learned_init_rows(config, spec, runs, final_key, steps)
        scored["methods"] = {**{k: v for k, v in scored["methods"].items() if " / seed " in k}, **learned,
                             **{k: v for k, v in scored["methods"].items() if " / seed " not in k}}
        finals[steps] = scored
    final = finals[config.episode.num_steps]
    final["horizons"] = {steps: scored["methods"] for steps, scored in finals.items()
                         if steps != config.episode.num_steps}
    summary = _summarize(compare, runs, final)
    _write_outputs(out_dir, config, compare, runs, final, summary, initial)
    return summary


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower() or "method"


def _summarize(compare: CompareConfig, runs, final) -> dict[str, Any]:
    methods = {}
    for method in compare.methods:
        by_seed = runs[method.name]
        accuracy = [final["methods"][f"{method.name} / seed {s}"]["accuracy"] for s in compare.seeds]
        loss = [final["methods"][f"{method.name} / seed {s}"]["cross_entropy"] for s in compare.seeds]
        memory = next(iter(by_seed.values()))["memory"]
        steps = sorted(memory)
        methods[method.name] = {
            "kind": method.kind,
            "detail": method.estimator if method.kind != "es" else (method.strategy or "config strategy"),
            "final_accuracy_mean": float(np.mean(accuracy)),
            "final_accuracy_std": float(np.std(accuracy)),
            "final_accuracy_seeds": [float(a) for a in accuracy],
            "final_loss_mean": float(np.nanmean([np.nan if v is None else v for v in loss])),
            "inner_steps": float(np.mean([o["inner_steps"] for o in by_seed.values()])),
            "wall_time": float(np.mean([o["wall_time"] for o in by_seed.values()])),
            "memory_short": memory[steps[0]],
            "memory_long": memory[steps[-1]],
            "auc": float(np.mean([_area(o["curve"]) for o in by_seed.values()])),
            "diverged_seeds": [s for s, o in by_seed.items() if o.get("diverged")],
            "longer_horizons": {steps: _seed_stats([rows[f"{method.name} / seed {s}"]["accuracy"]
                                                    for s in compare.seeds])
                                for steps, rows in final.get("horizons", {}).items()},
        }
    baselines = {name: row for name, row in final["methods"].items() if " / seed " not in name}
    longer = {steps: {name: row for name, row in rows.items() if " / seed " not in name}
              for steps, rows in final.get("horizons", {}).items()}
    memory_steps = sorted(next(iter(next(iter(runs.values())).values()))["memory"])
    return {"methods": methods, "baselines": baselines, "num_steps": final["num_steps"], "memory_steps": memory_steps,
            "longer_horizons": sorted(longer), "baselines_longer": longer}


def _seed_stats(values) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def _area(curve: list[dict]) -> float:
    """Mean held-out accuracy over the inner-step budget (trapezoid area / budget): learning speed."""
    x = np.array([p["inner_steps"] for p in curve], float)
    y = np.array([p["accuracy"] for p in curve], float)
    if len(x) < 2 or x[-1] <= 0:
        return float(y[-1])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / x[-1])


# ---------------------------------------------------------------------------------------------- outputs


def _write_outputs(out_dir: Path, config: Config, compare: CompareConfig, runs, final, summary, initial) -> None:
    short, long = summary["memory_steps"][0], summary["memory_steps"][-1]
    longer = summary["longer_horizons"]
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "kind", "detail", "final_accuracy_mean", "final_accuracy_std", "seeds",
                         "final_cross_entropy", "accuracy_auc", "inner_steps", "wall_time_s",
                         f"temp_bytes_T{short}", f"temp_bytes_T{long}"]
                        + [f"accuracy_T{steps}_{stat}" for steps in longer for stat in ("mean", "std")])
        for name, row in summary["methods"].items():
            writer.writerow([name, row["kind"], row["detail"], f"{row['final_accuracy_mean']:.4f}",
                             f"{row['final_accuracy_std']:.4f}", len(compare.seeds), f"{row['final_loss_mean']:.4f}",
                             f"{row['auc']:.4f}", int(row["inner_steps"]), f"{row['wall_time']:.2f}",
                             row["memory_short"], row["memory_long"]]
                            + [f"{row['longer_horizons'][steps][stat]:.4f}" for steps in longer
                               for stat in ("mean", "std")])
        for name, row in summary["baselines"].items():  # baselines: std = standard error over tasks
            writer.writerow([name, "baseline", f"lr={row['learning_rate']}", f"{row['accuracy']:.4f}",
                             f"{row['accuracy_stderr']:.4f}", "", "" if row["cross_entropy"] is None else
                             f"{row['cross_entropy']:.4f}", "", "", "", "", ""]
                            + [f"{summary['baselines_longer'][steps][name][key]:.4f}" for steps in longer
                               for key in ("accuracy", "accuracy_stderr")])
    with open(out_dir / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "seed", "inner_steps", "wall_time_s", "heldout_accuracy", "heldout_cross_entropy",
                         "num_steps", "step_start_inner_steps"])
        for name, by_seed in runs.items():
            for seed, outcome in by_seed.items():
                for point in outcome["curve"]:  # num_steps: the horizon of the step that ended at this point
                    writer.writerow([name, seed, point["inner_steps"], f"{point['wall_time']:.3f}",
                                     f"{point['accuracy']:.4f}", f"{point['loss']:.4f}", point.get("num_steps", ""),
                                     point.get("step_start", "")])
    plots = _plot(out_dir, compare, runs, summary, chance=1.0 / config.task.resolved_n_way)
    (out_dir / "compare.json").write_text(json.dumps({
        "config": config_to_dict(config), "compare": _plain(compare), "summary": summary,
        "final": {k: v for k, v in final.items()}, "initial_vector": [float(v) for v in initial],
    }, indent=2, default=_json_default))
    (out_dir / "report.md").write_text(_markdown(config, compare, summary, plots))


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _plot(out_dir: Path, compare: CompareConfig, runs, summary, chance: float | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, fig in comparison_figures(out_dir.name, runs, summary, chance).items():
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def comparison_figures(title: str, runs, summary, chance: float | None = None) -> dict[str, Any]:
    """The comparison's figures by file name: held-out accuracy vs inner steps and vs wall clock (one line
    per method and seed, tuned baselines and chance as horizontal lines; the wall-clock axis is logarithmic so
    short runs are not squashed), compiled memory at T and at the longest horizon, and final accuracy (error
    bars say what they are: std over seeds for the outer loops, standard error over tasks for the baselines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    for axis, label, filename in (("inner_steps", "inner steps consumed", "accuracy_vs_inner_steps.png"),
                                  ("wall_time", "wall clock (s, excluding compilation and held-out measurement)",
                                   "accuracy_vs_wall_clock.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for index, (name, by_seed) in enumerate(runs.items()):
            color = f"C{index % 10}"
            for seed_index, outcome in enumerate(by_seed.values()):
                xs = [p[axis] for p in outcome["curve"]]
                ys = [p["accuracy"] for p in outcome["curve"]]
                ax.plot(xs, ys, color=color, alpha=0.9 if seed_index == 0 else 0.45,
                        label=name if seed_index == 0 else None, marker="o", markersize=2.5)
        for index, (name, row) in enumerate(summary["baselines"].items()):
            ax.axhline(row["accuracy"], color="0.3", linestyle=("--", ":", "-.", (0, (1, 3)))[index % 4],
                       linewidth=1, label=f"{name} (tuned, final)")
        if chance is not None:
            ax.axhline(chance, color="0.6", linewidth=1, linestyle=(0, (4, 4)), label=f"chance ({chance:.2f})")
        if axis == "wall_time":
            positive = [p[axis] for by_seed in runs.values() for o in by_seed.values() for p in o["curve"]
                        if p[axis] > 0]
            if positive:
                ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (mean over the held-out tasks)")
        ax.set_title(f"{title}: held-out accuracy vs {label.split(' (')[0]} (each line one seed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        figures[filename] = fig
    names = list(summary["methods"])
    short, long = summary["memory_steps"][0], summary["memory_steps"][-1]
    fig, ax = plt.subplots(figsize=(7, 4))
    positions = np.arange(len(names))
    ax.bar(positions - 0.2, [summary["methods"][n]["memory_short"] / 1024 for n in names], 0.4, label=f"T = {short}")
    ax.bar(positions + 0.2, [summary["methods"][n]["memory_long"] / 1024 for n in names], 0.4, label=f"T = {long}")
    ax.set_xticks(positions, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("compiled temp memory (KiB, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{title}: working memory of one outer step", fontsize=9)
    ax.legend()
    fig.tight_layout()
    figures["memory.png"] = fig
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = names + list(summary["baselines"])
    means = [summary["methods"][n]["final_accuracy_mean"] for n in names] + [
        summary["baselines"][n]["accuracy"] for n in summary["baselines"]]
    errors = [summary["methods"][n]["final_accuracy_std"] for n in names] + [
        summary["baselines"][n]["accuracy_stderr"] for n in summary["baselines"]]
    positions = np.arange(len(labels))
    ax.bar(positions[:len(names)], means[:len(names)], yerr=errors[:len(names)], color="C0", capsize=3,
           label="outer loops: mean ± std over seeds")
    ax.bar(positions[len(names):], means[len(names):], yerr=errors[len(names):], color="0.6", capsize=3,
           label="tuned baselines: mean ± standard error over tasks")
    if chance is not None:
        ax.axhline(chance, color="0.3", linewidth=1, linestyle=(0, (4, 4)), label=f"chance ({chance:.2f})")
    ax.set_xticks(positions, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("final held-out accuracy")
    ax.set_title(f"{title}: final held-out accuracy", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    figures["final_accuracy.png"] = fig
    return figures


def _markdown(config: Config, compare: CompareConfig, summary, plots: list[str]) -> str:
    methods, baselines = summary["methods"], summary["baselines"]
    short, long = summary["memory_steps"][0], summary["memory_steps"][-1]
    longer = summary["longer_horizons"]
    extra_head = "".join(f" held-out at T = {steps} |" for steps in longer)
    lines = [
        "# blur compare",
        "",
        f"Task family `{config.task.family}` ({config.task.resolved_n_way}-way, batch {config.task.batch_size}), "
        f"network {list(config.network.hidden_sizes)} hidden, k = {config.network.num_states}, T = "
        f"{config.episode.num_steps} inner steps. Budget per run: {compare.inner_step_budget} inner steps"
        + (f" or {compare.max_wall_time} s" if compare.max_wall_time else "") + f"; seeds {list(compare.seeds)}. "
        f"Final scores on {config.report.test_tasks} held-out test tasks; curves on {compare.heldout_tasks} others.",
        "",
        "| method | kind | final held-out accuracy (mean ± std over seeds) | cross-entropy | accuracy AUC "
        f"| inner steps | wall clock (s) | temp memory T={short} | T={long} |{extra_head}",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(longer),
    ]
    for name, row in methods.items():
        diverged = f" (meta-gradient diverged, seeds {row['diverged_seeds']})" if row.get("diverged_seeds") else ""
        lines.append(f"| {name} | {row['kind']} ({row['detail']}) | {row['final_accuracy_mean']:.3f} ± "
                     f"{row['final_accuracy_std']:.3f}{diverged} | {row['final_loss_mean']:.3f} | {row['auc']:.3f} | "
                     f"{int(row['inner_steps'])} | {row['wall_time']:.1f} | {_bytes(row['memory_short'])} | "
                     f"{_bytes(row['memory_long'])} |"
                     + "".join(f" {row['longer_horizons'][steps]['mean']:.3f} ± {row['longer_horizons'][steps]['std']:.3f} |"
                               for steps in longer))
    for name, row in baselines.items():
        ce = "diverged" if row["cross_entropy"] is None else f"{row['cross_entropy']:.3f}"
        lines.append(f"| {name} | tuned baseline (lr {row['learning_rate']}) | {row['accuracy']:.3f} ± "
                     f"{row['accuracy_stderr']:.3f} (stderr over tasks) | {ce} | | | | | |"
                     + "".join(f" {summary['baselines_longer'][steps][name]['accuracy']:.3f} ± "
                               f"{summary['baselines_longer'][steps][name]['accuracy_stderr']:.3f} "
                               f"(lr {summary['baselines_longer'][steps][name]['learning_rate']}) |" for steps in longer))
    best = max(methods, key=lambda n: methods[n]["final_accuracy_mean"])
    fastest = max(methods, key=lambda n: methods[n]["auc"])
    lines += [
        "",
        "Accuracy AUC = mean held-out accuracy along the run (area under the accuracy-vs-inner-steps curve "
        "divided by the budget): higher means a good rule was found with less compute."
        + (f" The columns at T = {', '.join(str(s) for s in longer)} run the same final rules (and the baselines, "
           "learning rates re-tuned at that horizon on the validation tasks) for longer than they were "
           "meta-trained for." if longer else ""),
        "",
        "## Summary (generated; read with the spread over seeds in mind)",
        "",
        f"* Best final held-out accuracy: **{best}** ({methods[best]['final_accuracy_mean']:.3f}).",
        f"* Best accuracy per unit of inner-step compute (AUC): **{fastest}** ({methods[fastest]['auc']:.3f}).",
    ]
    if baselines:
        top = max(baselines, key=lambda n: baselines[n]["accuracy"])
        lines.append(f"* Best tuned baseline: {top} ({baselines[top]['accuracy']:.3f}).")
    growing = [n for n, r in methods.items() if r["memory_long"] > 1.5 * max(r["memory_short"], 1)]
    lines.append(f"* Compiled memory grows with T for: {', '.join(growing) if growing else 'none'}; "
                 "the others are flat in T.")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _bytes(value: int) -> str:
    return "n/a" if value is None or value < 0 else f"{value / 1024:.1f} KiB"


def main_compare(config_path: str, out_dir: str | None, overrides: Sequence[str] = ()) -> int:
    """``blur compare CONFIG [--out DIR] [--set k=v ...]``; ConfigError propagates (exit 2 in the CLI)."""
    config, compare = load_compare_config(config_path, overrides)
    check_compare_resources(config, compare)
    if out_dir is None:
        out_dir = Path("runs") / f"compare-{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    from evolution.rundir import check_new_run_dir

    check_new_run_dir(Path(out_dir))  # a new or empty directory: nothing of the user's is overwritten
    summary = run_comparison(config, out_dir, compare, progress=lambda line: print(line, flush=True))
    print(f"report: {Path(out_dir) / 'report.md'}")
    for name, row in summary["methods"].items():
        longer = "".join(f"   at T = {steps}: {stats['mean']:.3f} ± {stats['std']:.3f}"
                         for steps, stats in row["longer_horizons"].items())
        print(f"  {name:<24} {row['final_accuracy_mean']:.3f} ± {row['final_accuracy_std']:.3f}{longer}")
    return 0


__all__ = ["CompareConfig", "MethodConfig", "load_compare_config", "main_compare", "parse_compare", "run_comparison"]
