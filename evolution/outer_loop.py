"""The gradient-based outer loop (DESIGN §5): any meta-gradient estimator + optax, with budget accounting.

Defaults follow the BLUR paper: Adam with learning rate 5e-4 after clipping the meta-gradient to global
norm 10, optionally with an unroll curriculum (T grows by ``curriculum_increment`` every
``curriculum_every`` meta-steps). The loop samples a task batch whenever an unroll starts (every meta-step
for full backprop, every ``T / truncation`` meta-steps for the online estimators) and accounts for:

* ``inner_steps``: rule steps computed by the estimator (every network, candidate and perturbation);
* ``wall_time``: seconds spent sampling and estimating and updating (compilation included, validation
  excluded), with ``compile_time`` reported separately;
* memory: XLA's compiled ``memory_analysis`` of the estimator for each unroll length it compiled
  (``temp`` and ``peak`` bytes, see :func:`evolution.gradients.compiled_memory`), and the device's
  ``peak_bytes_in_use`` where the backend reports it (GPUs).

A meta-step whose loss or gradient is not finite is skipped (counted in ``skipped``) and the unroll is
restarted on new tasks, so a diverging genome never poisons the optimizer state.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import genome as G
from evolution import gradients as GR
from workers.engine import EpisodeConfig
from workers.evaluator import synapse_keys
from workers.horizon import horizon
from workers.task_types import Task

SampleFn = Callable[[jax.Array, int, int], Task]  # (key, num_tasks, num_steps) -> task batch
OUTER_OPTIMIZERS = ("adam", "optimistic")


@dataclass(frozen=True)
class OuterLoopConfig:
    """Settings of one gradient-based outer loop.

    estimator: which meta-gradient and its options.
    learning_rate, clip_norm: Adam step size and global-norm clipping of the meta-gradient (paper: 5e-4, 10).
    num_meta_steps: optimizer updates at most.
    tasks_per_step: task batch size K of every unroll.
    max_inner_steps, max_wall_time: budget limits (None: unlimited); checked after every meta-step.
    curriculum_every, curriculum_increment, curriculum_max_steps: unroll curriculum (every=0: off);
      ``curriculum_every_inner_steps`` counts inner steps consumed instead of meta-steps (the same function
      of the budget as the ES run loop's ``run.curriculum.every_inner_steps``).
    validate_every: meta-steps between calls of ``validate_fn`` (0: only at the end).
    validate_every_inner_steps: also call it whenever the inner steps consumed cross a multiple of this.
    """

    estimator: GR.EstimatorConfig = field(default_factory=GR.EstimatorConfig)
    learning_rate: float = 5e-4
    clip_norm: float = 10.0
    num_meta_steps: int = 100
    tasks_per_step: int = 8
    max_inner_steps: int | None = None
    max_wall_time: float | None = None
    curriculum_every: int = 0
    curriculum_increment: int = 5
    curriculum_max_steps: int | None = None
    curriculum_every_inner_steps: int = 0  # instead of meta-steps: inner steps consumed between increments
    validate_every: int = 0
    validate_every_inner_steps: int = 0
    outer_optimizer: str = "adam"  # "adam" | "optimistic" (optimistic gradient descent, see optimizer())

    def __post_init__(self) -> None:
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer loop outer_optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}, "
                             f"got {self.outer_optimizer!r}")
        checks = [
            ("learning_rate", self.learning_rate > 0), ("clip_norm", self.clip_norm > 0),
            ("num_meta_steps", self.num_meta_steps >= 1), ("tasks_per_step", self.tasks_per_step >= 1),
            ("curriculum_every", self.curriculum_every >= 0), ("curriculum_increment", self.curriculum_increment >= 0),
            ("validate_every", self.validate_every >= 0),
            ("validate_every_inner_steps", self.validate_every_inner_steps >= 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"outer loop {name} has an impossible value: {getattr(self, name)!r}")


def optimizer(config: OuterLoopConfig) -> optax.GradientTransformation:
    """Clip by global norm, then Adam (the paper's outer optimizer) or optimistic gradient descent.

    ``optimistic`` (optimistic meta-gradients, Flennerhag et al. 2023: acceleration needs optimism, a
    prediction of the next meta-gradient): optax's optimistic gradient descent,
    ``v_{t+1} = v_t − η(2 g_t − g_{t−1})`` (alpha = beta = 1; the first step has g_{−1} = g_0), i.e. a step
    along the current estimate plus the look-ahead ``g_t − g_{t−1}`` as the predicted change; with the
    ``bmg`` estimator the bootstrapped target supplies the look-ahead inside each ``g_t``."""
    if config.outer_optimizer == "optimistic":
        return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                           optax.optimistic_gradient_descent(config.learning_rate, alpha=1.0, beta=1.0))
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adam(config.learning_rate))


def num_steps_at(episode: EpisodeConfig, config: OuterLoopConfig, meta_step: int, inner_steps: int = 0) -> int:
    """Unroll length T at ``meta_step`` (after ``inner_steps`` consumed) under the curriculum
    (:func:`workers.horizon.horizon`)."""
    if config.curriculum_every_inner_steps:
        return horizon(episode.num_steps, inner_steps, config.curriculum_every_inner_steps,
                       config.curriculum_increment, config.curriculum_max_steps)
    return horizon(episode.num_steps, meta_step, config.curriculum_every, config.curriculum_increment,
                   config.curriculum_max_steps)


@dataclass
class Budget:
    """What an outer loop has consumed so far."""

    meta_steps: int = 0
    inner_steps: int = 0
    wall_time: float = 0.0
    compile_time: float = 0.0
    skipped: int = 0
    memory: dict[int, dict[str, int]] = field(default_factory=dict)  # unroll length T -> compiled memory
    device_peak_bytes: int | None = None
    stop_reason: str | None = None

    @property
    def peak_temp_bytes(self) -> int:
        return max((m["temp"] for m in self.memory.values()), default=0)

    @property
    def peak_bytes(self) -> int:
        return max((m["peak"] for m in self.memory.values()), default=0)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["memory"] = {str(k): v for k, v in self.memory.items()}
        out["peak_temp_bytes"], out["peak_bytes"] = self.peak_temp_bytes, self.peak_bytes
        return out


class OuterLoopResult(NamedTuple):
    vector: np.ndarray  # final flat genome
    history: list[dict[str, Any]]  # one row per meta-step (validation results merged in where run)
    budget: Budget


def _device_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def run_outer_loop(key: jax.Array, spec: G.NetworkSpec, vector, sample_fn: SampleFn, episode: EpisodeConfig,
                   config: OuterLoopConfig, validate_fn: Callable[[np.ndarray], dict] | None = None,
                   callback: Callable[[dict], None] | None = None) -> OuterLoopResult:
    """Meta-train the flat genome ``vector`` with ``config.estimator`` and optax.

    ``sample_fn(key, num_tasks, num_steps)`` samples meta-training tasks (e.g. ``family.sample``); the
    initial synapses of task i come from :func:`workers.evaluator.synapse_keys`, as in evolution.
    ``validate_fn(vector) -> dict`` (e.g. held-out accuracy) runs every ``validate_every`` meta-steps and at
    the end, outside the wall-clock budget. Every random draw is a ``fold_in`` of ``key``.
    """
    task_root, noise_root = jax.random.split(key)
    vector = jnp.asarray(vector, jnp.float32)
    opt = optimizer(config)
    opt_state = opt.init(vector)
    budget, history = Budget(), []
    compiled: dict[tuple, Any] = {}
    tasks = state = None
    unroll_index, current_steps = 0, None
    start = time.perf_counter()

    def validate(row: dict) -> None:
        nonlocal start
        if validate_fn is not None:
            paused = time.perf_counter()
            row.update(validate_fn(np.asarray(vector)))
            start += time.perf_counter() - paused  # validation is outside the budget

    while True:
        step = budget.meta_steps
        num_steps = num_steps_at(episode, config, step, budget.inner_steps)
        step_horizon = episode.horizon(num_steps)
        if state is None or num_steps != current_steps or GR.done(state, step_horizon):
            task_key = jax.random.fold_in(task_root, unroll_index)
            tasks = sample_fn(task_key, config.tasks_per_step, num_steps)
            state = GR.init_state(spec, synapse_keys(task_key, config.tasks_per_step), config.estimator,
                                  batch_size=tasks.support_x.shape[2])
            unroll_index, current_steps = unroll_index + 1, num_steps
        cache_key = (num_steps, jax.tree.map(lambda a: (a.shape, a.dtype), tasks))
        noise_key = jax.random.fold_in(noise_root, step)
        if cache_key not in compiled:
            compile_start = time.perf_counter()
            lowered = GR.estimate.lower(spec, vector, tasks, state, noise_key, horizon=step_horizon,
                                        estimator=config.estimator)
            compiled[cache_key] = lowered.compile()
            budget.compile_time += time.perf_counter() - compile_start
            stats = compiled[cache_key].memory_analysis()
            budget.memory[num_steps] = GR.memory_from_stats(stats)
        est = compiled[cache_key](vector, tasks, state, noise_key)
        loss, grad = float(est.loss), est.grad
        finite = bool(np.isfinite(loss) and jnp.all(jnp.isfinite(grad)))
        if finite:
            updates, opt_state = opt.update(grad, opt_state, vector)
            vector = optax.apply_updates(vector, updates)
            state = est.state
        else:
            budget.skipped += 1
            state = None  # restart the unroll on new tasks
        budget.meta_steps += 1
        previous_inner_steps = budget.inner_steps
        budget.inner_steps += int(est.inner_steps)
        budget.wall_time = time.perf_counter() - start
        row = {"meta_step": step, "num_steps": num_steps, "start_inner_steps": previous_inner_steps, "loss": loss, "grad_norm": float(jnp.linalg.norm(grad)),
               "finite": finite, "inner_steps": budget.inner_steps, "wall_time": budget.wall_time}
        budget.stop_reason = _stop_reason(config, budget)
        every = config.validate_every_inner_steps
        if (budget.stop_reason is not None
                or (config.validate_every and budget.meta_steps % config.validate_every == 0)
                or (every and budget.inner_steps // every > previous_inner_steps // every)):
            validate(row)
        history.append(row)
        if callback is not None:
            callback(row)
        if budget.stop_reason is not None:
            break
    budget.device_peak_bytes = _device_peak_bytes()
    return OuterLoopResult(np.asarray(vector), history, budget)


def _stop_reason(config: OuterLoopConfig, budget: Budget) -> str | None:
    if budget.meta_steps >= config.num_meta_steps:
        return "num_meta_steps"
    if config.max_inner_steps is not None and budget.inner_steps >= config.max_inner_steps:
        return "max_inner_steps"
    if config.max_wall_time is not None and budget.wall_time >= config.max_wall_time:
        return "max_wall_time"
    return None
