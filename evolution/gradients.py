"""Gradient-based outer loops (DESIGN §5): one meta-loss and its meta-gradient estimators.

The meta-loss is a function of the **flat genome vector** (the ES-scaled parameterization of
:mod:`genome.params` that the strategies see), so evolution and gradient descent search the same space and
an optax optimizer on the vector sees well-scaled coordinates (``η̃`` lives on a ``sinh`` scale)::

    meta_loss(v) = mean over tasks k of CE_query(k, synapses after T inner rule steps of unravel(v))

It is built from the same inner-loop core as ES fitness (:mod:`workers.unroll`: ``unroll`` and the
cross-entropy of ``query_outputs``), so it equals the mean raw ``cross_entropy`` of
:func:`workers.engine.episode` (same initial synapses, same support batches, same ``skip_last_update``); the
tests pin the two together.

Estimators share one pure, jitted interface::

    state = init_state(spec, synapse_keys, estimator)                   # fresh synapses, step 0
    est = estimate(spec, vector, tasks, state, key, horizon, estimator)  # -> Estimate(loss, grad, state, ...)

(``state`` is the shared :class:`workers.unroll.UnrollState`) and ``done(state, horizon)`` says when the current unroll is finished (the outer loop then samples new
tasks). The estimators (``EstimatorConfig.name``):

* ``full``: ``jax.grad`` through the whole ``lax.scan`` unroll; memory grows with T. ``remat`` trades
  compute for memory: ``step`` (``jax.checkpoint`` of every step: one synapse state stored per step) or
  ``sqrt`` (checkpointed segments of ~√T steps: O(√T) states stored).
* ``truncated``: windows of ``truncation`` steps; the synapse state is carried across meta-steps and
  treated as a constant at the window start; the loss is the query CE at the window end. With
  ``truncation = T`` this is ``full``.
* ``pes``: Persistent Evolution Strategies (Vicol et al. 2021), antithetic pairs with perturbations
  accumulated across the truncations of an unroll. The estimate of window w is unbiased for the gradient
  (of the Gaussian-smoothed loss) of the query CE after the first ``t_w`` inner steps, as a function of
  the genome used in *all* of those steps — in particular, the last window's estimate is unbiased for
  the meta-loss itself.
* ``evograd``: the EvoGrad-style hypergradient (Bohdal et al. 2021) adapted to a learning rule; see
  :func:`evograd_objective`. First order and online: memory is constant in T.
* ``bmg``: bootstrapped meta-gradients (Flennerhag et al. 2022): the matching loss between the learner after
  the window (differentiable) and a target the current rule advances L more steps (no graph); see
  :func:`bmg_objective`. With ``bmg_matching: query_loss`` (no target) it is the truncated / full estimator.
  The optimistic variant (Flennerhag et al. 2023) is the same estimate under the outer optimizer
  ``optimistic`` (:mod:`evolution.outer_loop`).

Online estimators (truncated, PES, EvoGrad) take one meta-step per window, so the outer loop descends
the sum of the window-end losses, whose last term is the meta-loss at T (the short-horizon bias of
truncated and one-step methods comes from ignoring how earlier steps shape later losses).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

import genome as G
from evolution.evograd import softmax_merge
from workers.task_types import Task
from workers.unroll import (Horizon, UnrollState, finish_unroll, init_unroll, num_updates, query_loss, query_scores,
                            unroll)

ESTIMATORS = ("full", "truncated", "pes", "evograd", "bmg")
REMAT_MODES = ("none", "step", "sqrt")
EVOGRAD_ADVANCE = ("rule", "merged")
BMG_MATCHING = ("kl", "squared", "query_loss")


@dataclass(frozen=True)
class EstimatorConfig:
    """Static estimator settings (a ``jit`` static argument).

    name: ``full`` | ``truncated`` | ``pes`` | ``evograd``.
    truncation: inner steps per meta-step for the online estimators (truncated, PES, EvoGrad).
    remat: rematerialization of backprop through the unroll (full, truncated): none | step | sqrt.
    pes_sigma: std of the PES perturbations, in flat-vector units.
    pes_pairs: antithetic pairs per estimate.
    evograd_candidates: K candidate next states (EvoGrad default 2).
    evograd_temperature: τ of the softmax over candidate train losses (EvoGrad default 0.05).
    evograd_noise: std of Gaussian noise added to the synapses of each candidate before its rule step.
    evograd_advance: how the network moves on: ``rule`` (one plain rule step on support batch t, exactly
      the inner loop that is meta-tested) or ``merged`` (the softmax-merged candidate state).
    bmg_bootstrap: L, the rule steps that build the bootstrapped target from the learner after the window.
    bmg_matching: μ between target and learner: ``kl`` (KL(target ‖ learner) of the query predictions),
      ``squared`` (½‖Δ‖² of the synapses) or ``query_loss`` (no target: the window-end query loss).
    bmg_target_lr: α of a last target step ``S̃ ← S̃ − α ∇_S L_query(S̃)`` (0: rule steps only).
    """

    name: str = "full"
    truncation: int = 10
    remat: str = "none"
    pes_sigma: float = 0.01
    pes_pairs: int = 8
    evograd_candidates: int = 2
    evograd_temperature: float = 0.05
    evograd_noise: float = 0.0
    evograd_advance: str = "rule"
    bmg_bootstrap: int = 5
    bmg_matching: str = "kl"
    bmg_target_lr: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            ("name", self.name in ESTIMATORS, f"must be one of {', '.join(ESTIMATORS)}"),
            ("remat", self.remat in REMAT_MODES, f"must be one of {', '.join(REMAT_MODES)}"),
            ("evograd_advance", self.evograd_advance in EVOGRAD_ADVANCE, "must be 'rule' or 'merged'"),
            ("truncation", self.truncation >= 1, "must be >= 1"),
            ("pes_sigma", self.pes_sigma > 0, "must be > 0"),
            ("pes_pairs", self.pes_pairs >= 1, "must be >= 1"),
            ("evograd_candidates", self.evograd_candidates >= 1, "must be >= 1"),
            ("evograd_temperature", self.evograd_temperature > 0, "must be > 0"),
            ("evograd_noise", self.evograd_noise >= 0, "must be >= 0"),
            ("bmg_bootstrap", self.bmg_bootstrap >= 0, "must be >= 0"),
            ("bmg_matching", self.bmg_matching in BMG_MATCHING, f"must be one of {', '.join(BMG_MATCHING)}"),
            ("bmg_target_lr", self.bmg_target_lr >= 0, "must be >= 0"),
            # L = 0 with no target gradient step makes the target the learner itself: a zero meta-gradient
            ("bmg_bootstrap", self.bmg_bootstrap >= 1 or self.bmg_target_lr > 0 or self.bmg_matching == "query_loss",
             "must be >= 1 unless bmg_target_lr > 0 or bmg_matching is query_loss (the target would be the learner "
             "itself)"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"estimator.{name} {message}, got {getattr(self, name)!r}")


class Estimate(NamedTuple):
    loss: jax.Array  # the estimator's own objective (meta-loss, window-end loss, or merged validation loss)
    grad: jax.Array  # [D] meta-gradient estimate with respect to the flat genome vector
    state: UnrollState
    inner_steps: jax.Array  # rule steps computed (all networks, candidates and perturbations included)


# ------------------------------------------------------------------------------------------ the unroll


def meta_loss(spec: G.NetworkSpec, vector: jax.Array, tasks: Task, synapse_keys: jax.Array,
              horizon: Horizon, remat: str = "none") -> jax.Array:
    """THE meta-loss: query cross-entropy after the episode's inner steps, averaged over the task batch.

    ``vector``: flat genome ``[D]``; ``tasks``: batch with leading axis K; ``synapse_keys [K]``. Computed in
    ``vector.dtype`` (float64 under ``jax.enable_x64`` for finite differences). Equals the mean of
    ``engine.episode(...).cross_entropy``.
    """
    synapses = init_unroll(spec, synapse_keys, dtype=vector.dtype, batch_size=tasks.support_x.shape[2]).synapses
    return window_loss(spec, vector, tasks, synapses, 0, num_updates(horizon), None, remat, horizon)[0]


def window_loss(spec: G.NetworkSpec, vector: jax.Array, tasks: Task, synapses: G.Synapses, start, length: int,
                stop=None, remat: str = "none", horizon: Horizon | None = None) -> tuple[jax.Array, G.Synapses]:
    """Mean query loss over the task batch after ``length`` rule steps from ``synapses`` (per task ``[K, ...]``)
    starting at support batch ``start`` (steps ``>= stop`` masked, see :func:`unroll`).

    Returns (loss, end synapses). With fresh synapses, ``start = 0`` and ``length = T`` it is the meta-loss;
    with ``stop = t`` it is the loss after the first t steps (the quantity PES is unbiased for). With
    ``horizon``, a window that reaches the unroll's end is scored after :func:`workers.unroll.finish_unroll`
    (the published last forward-only step), as ES fitness is.
    """
    genome = G.unravel(spec, vector)

    def one(task, syn):
        syn = unroll(spec, genome, syn, task, start, length, stop, remat)
        scored = syn
        if horizon is not None and G.has_forward_only_effects(spec) and horizon.skip_last_update:
            at_end = start + length >= num_updates(horizon)  # only the unroll's last window is finished
            scored = jax.lax.cond(at_end, lambda s: finish_unroll(spec, genome, s, task, horizon), lambda s: s, syn)
        return query_loss(spec, genome, scored, task), syn

    losses, end = jax.vmap(one)(tasks, synapses)
    return jnp.mean(losses), end


# ------------------------------------------------------------------------------------------ estimators


def init_state(spec: G.NetworkSpec, synapse_keys: jax.Array, estimator: EstimatorConfig,
               dtype=jnp.float32, batch_size: int | None = None) -> UnrollState:
    """The state at the start of an unroll: fresh synapses per task (shared by all PES perturbations)."""
    pairs = estimator.pes_pairs if estimator.name == "pes" else 0
    return init_unroll(spec, synapse_keys, 2 * pairs, dtype, perturbations=pairs, batch_size=batch_size)


def done(state: UnrollState, horizon: Horizon) -> bool:
    """Whether the current unroll has consumed all its inner steps (then sample new tasks)."""
    return int(state.step) >= num_updates(horizon)


def _full(spec, vector, tasks, state, key, horizon, estimator):
    steps = num_updates(horizon)
    (loss, end), grad = jax.value_and_grad(window_loss, argnums=1, has_aux=True)(
        spec, vector, tasks, state.synapses, 0, steps, None, estimator.remat, horizon)
    new_state = UnrollState(end, jnp.asarray(steps, jnp.int32), state.perturbation)
    return Estimate(loss, grad, new_state, jnp.asarray(steps * _num_tasks(tasks)))


def _truncated(spec, vector, tasks, state, key, horizon, estimator):
    steps, window = num_updates(horizon), min(estimator.truncation, num_updates(horizon))
    (loss, end), grad = jax.value_and_grad(window_loss, argnums=1, has_aux=True)(
        spec, vector, tasks, state.synapses, state.step, window, steps, estimator.remat, horizon)
    new_step = jnp.minimum(state.step + window, steps)
    return Estimate(loss, grad, UnrollState(end, new_step, state.perturbation),
                    (new_step - state.step) * _num_tasks(tasks))


def _pes(spec, vector, tasks, state, key, horizon, estimator):
    steps, window = num_updates(horizon), min(estimator.truncation, num_updates(horizon))
    pairs, sigma = estimator.pes_pairs, estimator.pes_sigma
    noise = sigma * jax.random.normal(key, (pairs, vector.shape[0]), vector.dtype)
    accumulated = state.perturbation + noise  # PES: perturbations accumulate across truncations
    thetas = jnp.concatenate([vector[None] + noise, vector[None] - noise])  # antithetic pairs
    run_window = functools.partial(window_loss, spec, start=state.step, length=window, stop=steps, remat="none",
                                   horizon=horizon)
    losses, end = jax.vmap(lambda theta, syn: run_window(theta, tasks, syn))(thetas, state.synapses)
    difference = losses[:pairs] - losses[pairs:]
    grad = jnp.einsum("p,pd->d", difference, accumulated) / (2.0 * pairs * sigma**2)
    new_step = jnp.minimum(state.step + window, steps)
    return Estimate(jnp.mean(losses), grad, UnrollState(end, new_step, accumulated),
                    (new_step - state.step) * _num_tasks(tasks) * 2 * pairs)


def evograd_objective(spec: G.NetworkSpec, vector: jax.Array, synapses: G.Synapses, task: Task, t, key: jax.Array,
                      estimator: EstimatorConfig):
    """EvoGrad-style first-order objective of one task at inner step ``t`` (synapses are constants).

    K candidates ``S_k = step(θ, S_t + noise_k, support[(t + k) mod T])``; train losses ``ℓ_k`` = CE of each
    candidate on support batch ``(t + K) mod T`` (a batch no candidate learned from); weights
    ``w = softmax(-ℓ/τ)``; merged state ``S* = Σ_k w_k S_k``; objective = query CE of ``S*``. Its gradient
    reaches the genome through the candidates' rule steps, the weights and the read-out.
    Returns (objective, (merged synapses, weights)).
    """
    genome = G.unravel(spec, vector)
    num_batches = task.support_x.shape[0]
    num_candidates = estimator.evograd_candidates

    def candidate(k, noise_key):
        index = (t + k) % num_batches
        x = jax.lax.dynamic_index_in_dim(task.support_x, index, keepdims=False)
        y = jax.lax.dynamic_index_in_dim(task.support_y, index, keepdims=False)
        start = synapses
        if estimator.evograd_noise > 0:
            leaves, treedef = jax.tree.flatten(synapses)
            noise_keys = jax.random.split(noise_key, len(leaves))
            noise_std = estimator.evograd_noise
            start = jax.tree.unflatten(treedef, [
                a + noise_std * jax.random.normal(nk, a.shape, a.dtype) for a, nk in zip(leaves, noise_keys)
            ])
        return G.step(spec, genome, start, x, y, index)

    candidates = jax.vmap(candidate)(jnp.arange(num_candidates), jax.random.split(key, num_candidates))
    train_index = (t + num_candidates) % num_batches
    x = jax.lax.dynamic_index_in_dim(task.support_x, train_index, keepdims=False)
    y = jax.lax.dynamic_index_in_dim(task.support_y, train_index, keepdims=False)
    train_losses = jax.vmap(lambda syn: query_scores(G.predict(spec, genome, syn, x), y)[1])(candidates)
    merged, weights = softmax_merge(candidates, train_losses, estimator.evograd_temperature)
    return query_loss(spec, genome, merged, task), (merged, weights)


def _evograd(spec, vector, tasks, state, key, horizon, estimator):
    steps, window = num_updates(horizon), min(estimator.truncation, num_updates(horizon))
    num_tasks = _num_tasks(tasks)
    objective = jax.value_and_grad(evograd_objective, argnums=1, has_aux=True)

    def one_task(task, syn, t, task_key):
        (value, (merged, _)), grad = objective(spec, vector, syn, task, t, task_key, estimator)
        if estimator.evograd_advance == "merged":
            nxt = merged
        else:
            x = jax.lax.dynamic_index_in_dim(task.support_x, t, keepdims=False)
            y = jax.lax.dynamic_index_in_dim(task.support_y, t, keepdims=False)
            nxt = G.step(spec, G.unravel(spec, vector), syn, x, y, t)
        return value, grad, jax.lax.stop_gradient(nxt)

    def body(carry, i):
        syn, total_loss, total_grad = carry
        t = state.step + i
        active = t < steps
        task_keys = jax.random.split(jax.random.fold_in(key, i), num_tasks)
        values, grads, nxt = jax.vmap(one_task, (0, 0, None, 0))(tasks, syn, t, task_keys)
        syn = jax.tree.map(lambda n, o: jnp.where(active, n, o), nxt, syn)
        total_loss = total_loss + jnp.where(active, jnp.mean(values), 0.0)
        total_grad = total_grad + jnp.where(active, jnp.mean(grads, axis=0), 0.0)
        return (syn, total_loss, total_grad), None

    zero = jnp.zeros((), vector.dtype)
    (end, total_loss, total_grad), _ = jax.lax.scan(
        body, (state.synapses, zero, jnp.zeros_like(vector)), jnp.arange(window))
    new_step = jnp.minimum(state.step + window, steps)
    count = jnp.maximum(new_step - state.step, 1).astype(vector.dtype)
    per_step = estimator.evograd_candidates + (1 if estimator.evograd_advance == "rule" else 0)
    return Estimate(total_loss / count, total_grad / count, UnrollState(end, new_step, state.perturbation),
                    (new_step - state.step) * num_tasks * per_step)


def bmg_objective(spec: G.NetworkSpec, vector: jax.Array, tasks: Task, synapses: G.Synapses, start, length: int,
                  stop, horizon: Horizon, estimator: EstimatorConfig,
                  targets=None) -> tuple[jax.Array, tuple[G.Synapses, object]]:
    """Bootstrapped meta-gradient objective (Flennerhag et al. 2022), mean over the task batch.

    The learner ``S(v)``: ``length`` differentiable rule steps from ``synapses`` (support batches
    ``start, ...``, masked at ``stop``). The target ``S̃ = stopgrad(B_L(S(v)))``: L = ``bmg_bootstrap``
    further steps of the current rule on support batches ``start + length + i`` (mod T), then optionally a
    gradient step on the query loss (``bmg_target_lr``). Objective ``μ(S̃, S(v))``. The target enters as a
    constant: its query log-probabilities (``kl``) or its synapses (``squared``); ``targets`` given (per task):
    those instead — the objective as a function of ``v`` with the target held fixed, whose gradient the
    estimator is. Returns (objective, (S(v), targets)).
    """
    genome = G.unravel(spec, vector)
    num_batches = horizon.num_steps
    target_genome = jax.lax.stop_gradient(genome)

    def build_target(task, learner):

        def bootstrap(s, i):
            index = (start + length + i) % num_batches
            x = jax.lax.dynamic_index_in_dim(task.support_x, index, keepdims=False)
            y = jax.lax.dynamic_index_in_dim(task.support_y, index, keepdims=False)
            return G.step(spec, target_genome, s, x, y, index), None

        target = jax.lax.scan(bootstrap, jax.lax.stop_gradient(learner), jnp.arange(estimator.bmg_bootstrap))[0]
        if estimator.bmg_target_lr > 0:
            grad = jax.grad(lambda s: query_loss(spec, target_genome, s, task))(target)
            target = jax.tree.map(lambda s, g: s - estimator.bmg_target_lr * g, target, grad)
        return jax.lax.stop_gradient(target)

    def one(task, syn, given):
        learner = unroll(spec, genome, syn, task, start, length, stop)
        if estimator.bmg_matching == "query_loss":
            return query_loss(spec, genome, learner, task), (learner, learner)
        if given is None:
            target = build_target(task, learner)
            if estimator.bmg_matching == "kl":  # function space: the target's query predictions
                target = jax.lax.stop_gradient(
                    jax.nn.log_softmax(G.query_logits(spec, target_genome, target, task.query_x), axis=-1))
        else:
            target = given
        if estimator.bmg_matching == "squared":
            value = 0.5 * sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(learner)))
        else:  # kl: KL(target predictions ‖ learner predictions) on the query inputs, mean over examples
            learner_log = jax.nn.log_softmax(G.query_logits(spec, genome, learner, task.query_x), axis=-1)
            value = jnp.mean(jnp.sum(jnp.exp(target) * (target - learner_log), axis=-1))
        return value, (learner, target)

    if targets is None:
        values, aux = jax.vmap(lambda task, syn: one(task, syn, None))(tasks, synapses)
    else:
        values, aux = jax.vmap(one)(tasks, synapses, targets)
    return jnp.mean(values), aux


def _bmg(spec, vector, tasks, state, key, horizon, estimator):
    steps, window = num_updates(horizon), min(estimator.truncation, num_updates(horizon))
    (loss, (end, _)), grad = jax.value_and_grad(bmg_objective, argnums=1, has_aux=True)(
        spec, vector, tasks, state.synapses, state.step, window, steps, horizon, estimator)
    new_step = jnp.minimum(state.step + window, steps)
    bootstrap = 0 if estimator.bmg_matching == "query_loss" else estimator.bmg_bootstrap
    return Estimate(loss, grad, UnrollState(end, new_step, state.perturbation),
                    (new_step - state.step + bootstrap) * _num_tasks(tasks))


# name -> estimator; every estimator has the signature (spec, vector, tasks, state, key, horizon, estimator)
ESTIMATOR_FUNCTIONS = {"full": _full, "truncated": _truncated, "pes": _pes, "evograd": _evograd, "bmg": _bmg}
assert tuple(ESTIMATOR_FUNCTIONS) == ESTIMATORS


def _num_tasks(tasks: Task) -> int:
    return tasks.query_y.shape[0]


@functools.partial(jax.jit, static_argnames=("spec", "horizon", "estimator"))
def estimate(spec: G.NetworkSpec, vector: jax.Array, tasks: Task, state: UnrollState, key: jax.Array,
             horizon: Horizon, estimator: EstimatorConfig) -> Estimate:
    """One meta-gradient estimate of ``estimator`` at ``vector`` on the current unroll (jitted).

    ``tasks``: the unroll's task batch (leading axis K, T = ``horizon.num_steps`` support batches);
    ``state``: from :func:`init_state` or the previous estimate; ``key``: fresh randomness (PES noise,
    EvoGrad candidate noise); ignored by ``full`` and ``truncated``.
    """
    if tasks.support_x.shape[1] < horizon.num_steps:
        raise ValueError(f"tasks have {tasks.support_x.shape[1]} support batches, the episode needs {horizon.num_steps}")
    return ESTIMATOR_FUNCTIONS[estimator.name](spec, vector, tasks, state, key, horizon, estimator)


# ------------------------------------------------------------------------------------------ memory


def memory_from_stats(stats) -> dict[str, int]:
    """Bytes from XLA's ``CompiledMemoryStats``: ``temp`` is the scratch memory a computation needs beyond
    its inputs and outputs (what grows with T when backpropagating through an unroll); ``peak`` =
    arguments + outputs + temp − aliased. -1 everywhere when the backend does not report."""
    if stats is None:
        return {"temp": -1, "argument": -1, "output": -1, "peak": -1}
    temp, argument, output = stats.temp_size_in_bytes, stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias = getattr(stats, "alias_size_in_bytes", 0)
    return {"temp": int(temp), "argument": int(argument), "output": int(output),
            "peak": int(argument + output + temp - alias)}


def compiled_memory(jitted_fn, *args, compiler_options: dict | None = None, **kwargs) -> dict[str, int]:
    """:func:`memory_from_stats` of ``jitted_fn`` compiled for ``(*args, **kwargs)`` (compiles, never runs).

    ``compiler_options`` go to XLA, e.g. ``{"xla_backend_optimization_level": 0}`` for a faster compile:
    the backend (LLVM) optimization level does not change XLA's buffer assignment, so the numbers are the
    same.
    """
    lowered = jitted_fn.lower(*args, **kwargs)
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    return memory_from_stats(compiled.memory_analysis())


def estimator_memory(spec: G.NetworkSpec, vector: jax.Array, tasks: Task, synapse_keys: jax.Array,
                     horizon: Horizon, estimator: EstimatorConfig,
                     compiler_options: dict | None = None) -> dict[str, int]:
    """:func:`compiled_memory` of :func:`estimate` for this (spec, tasks shape, episode, estimator)."""
    state = init_state(spec, synapse_keys, estimator, vector.dtype, tasks.support_x.shape[2])
    return compiled_memory(estimate, spec, vector, tasks, state, jax.random.key(0), horizon=horizon,
                           estimator=estimator, compiler_options=compiler_options)
