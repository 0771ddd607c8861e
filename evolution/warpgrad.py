"""WarpGrad (Flennerhag et al., ICLR 2020): meta-learned warp layers that precondition SGD on the task layers.

The learner is the baselines' MLP (:mod:`workers.baselines`) with a linear warp layer after each adaptable
hidden block (the official code's default: one warp layer per adaptable block, none after the final head)::

    h_0 = x,   a_l = act(h_{l-1} W_l + b_l),   h_l = a_l Ω_l + c_l   (l < L),   logits = h_{L-1} W_L + b_L.

Only the task layers θ = (W, b) adapt, by plain SGD, ``θ_{k+1} = θ_k − α ∇_θ L(θ_k; Ω; batch_k)``; backprop
through the warp layers' Jacobians preconditions that gradient. Warps start at the identity (Ω = I, c = 0), where
the warped step *is* the plain SGD step.

Meta-objective (Algorithm 2, offline replay, as ``warpgrad.updaters.warp_on_same_loss`` implements it): the
adaptation trajectories of a meta-batch are collected with Ω frozen; then every stored point ``(τ, θ_k)``,
shuffled, is replayed: two batches ``b1, b2`` of task τ's training data are drawn and

    ℓ(Ω; τ, k) = L( θ_k − α ∇_θ L(θ_k; Ω; b1);  Ω; b2 ),   θ_k held constant (trajectory-agnostic),

and each replayed minibatch of ``replay_batch`` points (official default 1) is one meta-optimizer step on Ω.
The initialization θ_0 is meta-learned as in the official ``warp_leap`` default by "simplified Leap": its
gradient is the mean over tasks of ``Σ_k (θ_k − θ_{k+1}) / ‖θ_k − θ_{k+1}‖`` over consecutive stored states.

Functions are pure and jittable. Task layers are lists of ``[n_in + 1, n_out]`` arrays (bias as the last row,
as :func:`workers.baselines.init_mlp`); warps are lists of ``[H + 1, H]`` arrays, one per hidden layer (bias as
the last row); :class:`MetaState` holds both with their optimizer states.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from workers.baselines import ACTIVATIONS
from workers.engine import query_scores


class WarpGradOptions(NamedTuple):
    """``inner_lr`` α; ``replay_batch`` points per warp update (official ``bsz`` = 1); ``epochs`` passes over
    the buffer (official 1); ``learn_init``: the simplified-Leap initialization update (official ``warp_leap``);
    ``leap_norm``: normalize each segment (official ``norm=True``)."""

    inner_lr: float = 0.1
    replay_batch: int = 1
    epochs: int = 1
    learn_init: bool = True
    leap_norm: bool = True
    activation: str = "sigmoid"


def identity_warps(layer_sizes: Sequence[int]) -> list[jax.Array]:
    """Ω = I, c = 0 after every hidden layer."""
    return [jnp.concatenate([jnp.eye(n, dtype=jnp.float32), jnp.zeros((1, n), jnp.float32)], axis=0)
            for n in layer_sizes[1:-1]]


def warped_forward(theta, warps, x, activation: str = "sigmoid"):
    """Logits of the warped MLP (module docstring); ``len(warps) == len(theta) - 1``."""
    act = ACTIVATIONS[activation]
    h = x
    for layer, w in enumerate(theta):
        z = h @ w[:-1] + w[-1][None, :]
        if layer < len(theta) - 1:
            h = act(z) @ warps[layer][:-1] + warps[layer][-1][None, :]
        else:
            h = z
    return h


def warped_loss(theta, warps, x, y, activation: str = "sigmoid"):
    """Mean softmax cross-entropy of the warped MLP."""
    logits = warped_forward(theta, warps, x, activation)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def warped_step(theta, warps, x, y, lr, activation: str = "sigmoid"):
    """One SGD step on the task layers through the warps: ``θ − α ∇_θ L(θ; Ω; x, y)``."""
    grads = jax.grad(warped_loss)(theta, warps, x, y, activation)
    return jax.tree.map(lambda p, g: p - lr * g, theta, grads)


def adapt(theta0, warps, support_x, support_y, lr, activation: str = "sigmoid", num_updates: int | None = None):
    """SGD through the warps, step k on support batch k: (θ after ``num_updates`` steps, the states θ_0..θ_{U-1}
    before each step, stacked on a leading axis)."""
    num_updates = support_x.shape[0] if num_updates is None else num_updates

    def body(theta, t):
        return warped_step(theta, warps, support_x[t], support_y[t], lr, activation), theta

    return jax.lax.scan(body, theta0, jnp.arange(num_updates))


def replay_loss(warps, theta_k, x1, y1, x2, y2, lr, activation: str = "sigmoid"):
    """The trajectory-agnostic objective at one stored point: ``L(θ_k − α∇_θ L(θ_k; Ω; b1); Ω; b2)``, θ_k constant."""
    theta_k = jax.lax.stop_gradient(theta_k)
    return warped_loss(warped_step(theta_k, warps, x1, y1, lr, activation), warps, x2, y2, activation)


def leap_gradient(states, norm: bool = True):
    """Simplified Leap: ``Σ_k (θ_k − θ_{k+1}) / ‖θ_k − θ_{k+1}‖`` over consecutive states (leading axis)."""
    deltas = jax.tree.map(lambda s: s[:-1] - s[1:], states)
    if norm:
        sq = sum(jnp.sum(d.reshape(d.shape[0], -1) ** 2, axis=1) for d in jax.tree.leaves(deltas))
        scale = 1.0 / jnp.maximum(jnp.sqrt(sq), 1e-9)
        deltas = jax.tree.map(lambda d: d * scale.reshape((-1,) + (1,) * (d.ndim - 1)), deltas)
    return jax.tree.map(lambda d: jnp.sum(d, axis=0), deltas)


def replay_points(key, num_tasks: int, num_steps: int, epochs: int):
    """Shuffled (task, step, batch 1, batch 2) indices of every stored point, ``epochs`` times: the two batches of
    a point are distinct support batches of its task when the task has more than one."""
    task = jnp.repeat(jnp.arange(num_tasks), num_steps)
    step = jnp.tile(jnp.arange(num_steps), num_tasks)
    rows = []
    for epoch in range(epochs):
        k_perm, k_b1, k_b2 = jax.random.split(jax.random.fold_in(key, epoch), 3)
        order = jax.random.permutation(k_perm, task.shape[0])
        b1 = jax.random.randint(k_b1, task.shape, 0, num_steps)
        offset = jax.random.randint(k_b2, task.shape, 1, max(num_steps, 2))
        b2 = (b1 + offset) % num_steps if num_steps > 1 else b1
        rows.append(jnp.stack([task[order], step[order], b1, b2], axis=1))
    return jnp.concatenate(rows, axis=0)


class MetaState(NamedTuple):
    init: list
    warps: list
    init_opt: object
    warp_opt: object


def meta_step(options: WarpGradOptions, optimizer: optax.GradientTransformation, state: MetaState, tasks, key):
    """One WarpGrad meta-step on a task batch (leading axis): adapt every task from ``state.init`` with the warps
    frozen, replay every stored point in ``replay_batch``-sized minibatches (one optimizer step each), then the
    simplified-Leap update of the initialization. Returns (new state, mean replay loss, all finite)."""
    num_tasks, num_steps = tasks.support_x.shape[:2]
    lr, act = options.inner_lr, options.activation
    _, states = jax.vmap(lambda x, y: adapt(state.init, state.warps, x, y, lr, act))(tasks.support_x, tasks.support_y)
    points = replay_points(key, num_tasks, num_steps, options.epochs)
    size = options.replay_batch
    usable = (points.shape[0] // size) * size  # a ragged last minibatch is dropped (never with size 1)
    batches = points[:usable].reshape(-1, size, 4)

    def point_loss(warps, row):
        t, k, b1, b2 = row[0], row[1], row[2], row[3]
        theta_k = jax.tree.map(lambda s: s[t, k], states)
        return replay_loss(warps, theta_k, tasks.support_x[t, b1], tasks.support_y[t, b1],
                           tasks.support_x[t, b2], tasks.support_y[t, b2], lr, act)

    def update(carry, rows):
        warps, opt_state, finite = carry
        loss, grads = jax.value_and_grad(lambda w: jnp.mean(jax.vmap(lambda r: point_loss(w, r))(rows)))(warps)
        ok = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, opt_state = optimizer.update(grads, opt_state, warps)
        return (optax.apply_updates(warps, updates), opt_state, finite & ok), loss

    (warps, warp_opt, finite), losses = jax.lax.scan(update, (state.warps, state.warp_opt, jnp.asarray(True)),
                                                      batches)
    init, init_opt = state.init, state.init_opt
    if options.learn_init:
        per_task = jax.vmap(lambda s: leap_gradient(s, options.leap_norm))(states)
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_task)
        updates, init_opt = optimizer.update(grads, init_opt, init)
        init = optax.apply_updates(init, updates)
    return MetaState(init, warps, init_opt, warp_opt), jnp.mean(losses), finite


def inner_steps_per_task(options: WarpGradOptions, num_steps: int) -> int:
    """Inner steps one task of a meta-step consumes, in units of one SGD gradient: T for the adaptation plus
    3 per replayed point (a gradient kept as a graph, the loss at the updated point, and the backward through
    both: the reference's ≈ 3 c_g) for T points per epoch."""
    return num_steps + 3 * num_steps * options.epochs


def warped_sgd(init, warps, tasks, lr, num_updates: int, activation: str = "sigmoid"):
    """Train every task of the batch (leading axis) from ``init`` by warped SGD for ``num_updates`` steps and
    score its query set with the engine's scoring: ``accuracy``, ``loss``, ``diverged`` per task, like
    :func:`workers.baselines.run_baseline`."""

    def one(support_x, support_y, query_x, query_y):
        theta, _ = adapt(init, warps, support_x, support_y, lr, activation, num_updates)
        logits = warped_forward(theta, warps, query_x, activation)
        accuracy, loss = query_scores(logits, query_y)
        diverged = ~(jnp.all(jnp.isfinite(logits)) & jnp.isfinite(loss))
        return {"accuracy": jnp.where(diverged, 0.0, accuracy), "loss": loss, "diverged": diverged}

    return jax.vmap(one)(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)


def check_options(options: dict) -> WarpGradOptions:
    """The method's options as :class:`WarpGradOptions`; ValueError naming the option otherwise."""
    fields = WarpGradOptions._fields
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"options.{unknown[0]}: unknown option (allowed: {', '.join(fields)})")
    method = WarpGradOptions(**options)
    value = method.inner_lr
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise ValueError(f"options.inner_lr: must be a positive finite number, got {value!r}")
    for name in ("replay_batch", "epochs"):
        value = getattr(method, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"options.{name}: must be an integer >= 1, got {value!r}")
    for name in ("learn_init", "leap_norm"):
        if not isinstance(getattr(method, name), bool):
            raise ValueError(f"options.{name}: must be true or false, got {getattr(method, name)!r}")
    if method.activation not in ACTIVATIONS:
        raise ValueError(f"options.activation: must be one of {', '.join(ACTIVATIONS)}; got {method.activation!r}")
    return method._replace(inner_lr=float(method.inner_lr))
