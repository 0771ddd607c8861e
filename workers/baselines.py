"""Gradient baselines on exactly the engine's tasks: SGD, SGD+momentum and Adam via optax (DESIGN §3).

A plain MLP (hidden activation configurable, linear output) is trained from fresh weights on each task's
``T`` support batches, one optimizer step per batch on the mean softmax cross-entropy (``lax.scan``), then
scored on the query set. Weights are a list of ``[n_l + 1, n_{l+1}]`` matrices whose LAST ROW IS THE BIAS,
the layout of ``genome.synapses_from_weights``.

Scoring mirrors the evaluation engine: a task whose query logits or loss are non-finite is ``diverged`` and
counts as accuracy 0; curve points are the query accuracy after ``s`` updates.

:func:`sweep` runs a learning-rate grid per optimizer. With ``validation_tasks`` the rate is chosen on them
and the reported accuracy is measured on ``tasks`` (an unbiased estimate); without, the rate is chosen and
reported on the same tasks (optimistic; the result says ``selected_on="tasks"``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from workers.engine import query_scores
from workers.task_types import Task
from workers.unroll import curve_windows

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_LEARNING_RATES",
    "OPTIMIZERS",
    "init_mlp",
    "mlp_forward",
    "mlp_loss",
    "run_baseline",
    "sweep",
    "task_init_keys",
]

OPTIMIZERS = ("sgd", "momentum", "adam")
ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}
# half-decade log grid 1e-4 .. 10^1.5 (a sigmoid MLP trained for few steps often wants a large SGD rate)
DEFAULT_LEARNING_RATES = tuple(float(f"{10.0 ** e:.4g}") for e in np.arange(-4.0, 1.51, 0.5))


def init_mlp(key: jax.Array, layer_sizes: Sequence[int]) -> list[jax.Array]:
    """Glorot-uniform weights, ``W ~ U(±√(6/(n_in+n_out)))``, and a zero bias as the last row.

    All layers come from one uniform draw (one threefry block: much cheaper to compile than one per layer).
    """
    shapes = list(zip(layer_sizes[:-1], layer_sizes[1:]))
    u = jax.random.uniform(key, (sum(n_in * n_out for n_in, n_out in shapes),), jnp.float32, -1.0, 1.0)
    weights, start = [], 0
    for n_in, n_out in shapes:
        limit = np.float32(np.sqrt(6.0 / (n_in + n_out)))
        w = limit * u[start: start + n_in * n_out].reshape(n_in, n_out)
        start += n_in * n_out
        weights.append(jnp.concatenate([w, jnp.zeros((1, n_out), jnp.float32)], axis=0))
    return weights


def mlp_forward(weights: Sequence[jax.Array], x: jax.Array, activation: str = "sigmoid") -> jax.Array:
    """Logits of ``x [B, n_in]``: z = ā·W with ā = [a, 1] (bias = last row); linear output layer."""
    act = ACTIVATIONS[activation]
    h = x
    for layer, w in enumerate(weights):
        z = h @ w[:-1] + w[-1][None, :]
        h = act(z) if layer < len(weights) - 1 else z
    return h


def mlp_loss(weights: Sequence[jax.Array], x: jax.Array, y: jax.Array, activation: str = "sigmoid") -> jax.Array:
    """Mean softmax cross-entropy over the batch."""
    logits = mlp_forward(weights, x, activation)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def task_init_keys(key: jax.Array, num_tasks: int) -> jax.Array:
    """The per-task weight-init keys ``fold_in(key, i)`` that :func:`run_baseline` uses by default."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_tasks))


def _optimizer(name: str, learning_rate) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9)  # trace = g + 0.9·trace; W -= lr·trace
    return optax.adam(learning_rate)  # b1 0.9, b2 0.999, eps 1e-8, bias-corrected


def _query_scores(weights, task: Task, activation: str):
    logits = mlp_forward(weights, task.query_x, activation)
    accuracy, loss = query_scores(logits, task.query_y)  # the engine's scoring, so both are comparable
    diverged = ~(jnp.all(jnp.isfinite(logits)) & jnp.isfinite(loss))
    return jnp.where(diverged, 0.0, accuracy), loss, diverged


def _train_task(optimizer_name, learning_rate, activation, curve_steps, num_updates, task, weights):
    optimizer = _optimizer(optimizer_name, learning_rate)
    state = optimizer.init(weights)

    def step(carry, t):
        weights, state = carry
        x = jax.lax.dynamic_index_in_dim(task.support_x, t, keepdims=False)
        y = jax.lax.dynamic_index_in_dim(task.support_y, t, keepdims=False)
        loss, grads = jax.value_and_grad(mlp_loss)(weights, x, y, activation)
        updates, state = optimizer.update(grads, state, weights)
        return (optax.apply_updates(weights, updates), state), loss

    # the steps up to the last curve point run as a loop over the points, as in the engine (curve_windows)
    carry, losses, done = (weights, state), [], 0
    targets, order, width = curve_windows(curve_steps, num_updates)
    if targets:
        starts = [0, *targets[:-1]]

        def segment(outer, target):
            carry, start = outer

            def masked_step(carry, offset):
                new, loss = step(carry, start + offset)
                return jax.tree.map(lambda n, o: jnp.where(start + offset < target, n, o), new, carry), loss

            carry, segment_losses = jax.lax.scan(masked_step, carry, jnp.arange(width))
            return (carry, target), (segment_losses, _query_scores(carry[0], task, activation))

        (carry, _), (window_losses, at_points) = jax.lax.scan(segment, (carry, jnp.int32(0)),
                                                              jnp.asarray(targets, jnp.int32))
        kept = [i * width + j for i, (a, b) in enumerate(zip(starts, targets)) for j in range(b - a)]
        losses.append(window_losses.reshape(-1)[jnp.asarray(kept, jnp.int32)])
        done = targets[-1]
    carry, tail_losses = jax.lax.scan(step, carry, jnp.arange(done, num_updates))
    losses.append(tail_losses)
    accuracy, loss, diverged = _query_scores(carry[0], task, activation)
    result = {"accuracy": accuracy, "loss": loss, "diverged": diverged, "train_loss": jnp.concatenate(losses)}
    if curve_steps:
        result["curve_accuracy"] = at_points[0][jnp.asarray(order)]
        result["curve_loss"] = at_points[1][jnp.asarray(order)]
    return result


@functools.partial(jax.jit, static_argnums=1)
def _init_batch(init_keys, layer_sizes):
    # compiled apart from training: shared by every optimizer, rate and curve setting of the same shapes
    return jax.vmap(lambda k: init_mlp(k, layer_sizes))(init_keys)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _run(optimizer_name, learning_rate, activation, curve_steps, num_updates, tasks, weights):
    train = functools.partial(_train_task, optimizer_name, learning_rate, activation, curve_steps, num_updates)
    return jax.vmap(train)(tasks, weights)


def run_baseline(optimizer_name: str, learning_rate: float, layer_sizes: Sequence[int], tasks: Task,
                 key: jax.Array, curve_steps: Sequence[int] = (), activation: str = "sigmoid",
                 skip_last_update: bool = False, init_keys: jax.Array | None = None,
                 init_weights: Sequence[jax.Array] | None = None) -> dict[str, jax.Array]:
    """Train a fresh MLP per task (vmapped over the task batch's leading axis K) and score its query set.

    Returns arrays with leading axis K: ``accuracy``, ``loss`` (query cross-entropy, raw), ``diverged``,
    ``train_loss [K, U]`` (each support batch's loss before its update) and, with ``curve_steps``,
    ``curve_accuracy``/``curve_loss [K, S]`` after each listed number of updates (0..U). U = T, or T - 1
    with ``skip_last_update`` (the engine's paper variant). Task k starts from ``init_mlp(init_keys[k])``,
    by default ``init_keys = task_init_keys(key, K)``, unless ``init_weights`` (a list of ``[K, n_l + 1,
    n_{l+1}]`` arrays, last row bias) gives the starting weights. Compiled once per (optimizer, shapes, options);
    the learning rate is traced, so a sweep does not recompile.
    """
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer_name!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    layer_sizes = tuple(int(n) for n in layer_sizes)
    num_tasks, num_steps, _, num_inputs = tasks.support_x.shape
    if num_inputs != layer_sizes[0]:
        raise ValueError(f"layer_sizes[0]={layer_sizes[0]} does not match the tasks' {num_inputs} inputs")
    num_updates = updates_per_episode(num_steps, skip_last_update)
    curve_steps = tuple(int(s) for s in curve_steps)
    if any(not 0 <= s <= num_updates for s in curve_steps):
        raise ValueError(f"curve_steps must lie in 0..{num_updates}, got {curve_steps}")
    if init_weights is not None:
        weights = [jnp.asarray(w, jnp.float32) for w in init_weights]
        expected = [(num_tasks, n + 1, m) for n, m in zip(layer_sizes[:-1], layer_sizes[1:])]
        if [tuple(w.shape) for w in weights] != expected:
            raise ValueError(f"init_weights must have shapes {expected}, got {[tuple(w.shape) for w in weights]}")
    else:
        if init_keys is None:
            init_keys = task_init_keys(key, num_tasks)
        weights = _init_batch(init_keys, layer_sizes)
    return _run(optimizer_name, jnp.asarray(learning_rate, jnp.float32), activation, curve_steps, num_updates,
                tasks, weights)


def updates_per_episode(num_steps: int, skip_last_update: bool) -> int:
    """The updates a T-step training makes: T, or T - 1 with ``skip_last_update`` (the engine's paper variant)."""
    return num_steps - 1 if skip_last_update and num_steps > 0 else num_steps


def _mean_scores(result) -> tuple[float, float]:
    loss = np.asarray(result["loss"], np.float64)
    return float(np.mean(result["accuracy"])), float(np.mean(np.where(np.isfinite(loss), loss, np.inf)))


def sweep(tasks: Task, layer_sizes: Sequence[int], key: jax.Array,
          learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES, optimizers: Sequence[str] = OPTIMIZERS,
          validation_tasks: Task | None = None, activation: str = "sigmoid",
          skip_last_update: bool = False, progress=None) -> dict[str, dict]:
    """Learning-rate sweep per optimizer; the best rate has the highest mean query accuracy (ties: lower loss).

    Returns ``{optimizer: {"best_lr", "best_accuracy", "best_loss", "sweep": {lr: mean accuracy on the
    selection tasks}, "selected_on": "validation" | "tasks"}}``; ``best_accuracy``/``best_loss`` are
    measured on ``tasks`` with ``init_keys = task_init_keys(key, K)``. The selection runs on
    ``validation_tasks`` use the independent key ``fold_in(key, 1)``. ``progress(label)`` is called after each
    training run (``len(optimizers) × (len(learning_rates) + 1)`` calls with validation tasks).
    """
    run = functools.partial(run_baseline, layer_sizes=layer_sizes, activation=activation,
                            skip_last_update=skip_last_update)
    selection_tasks = tasks if validation_tasks is None else validation_tasks
    selection_key = key if validation_tasks is None else jax.random.fold_in(key, 1)
    results = {}
    tick = progress or (lambda label: None)
    for name in optimizers:
        scores = {}
        for lr in learning_rates:
            scores[float(lr)] = _mean_scores(run(name, lr, tasks=selection_tasks, key=selection_key))
            tick(f"{name} lr {lr:g}")
        best_lr = max(scores, key=lambda lr: (scores[lr][0], -scores[lr][1]))
        if validation_tasks is None:
            best_accuracy, best_loss = scores[best_lr]
        else:
            best_accuracy, best_loss = _mean_scores(run(name, best_lr, tasks=tasks, key=key))
            tick(f"{name} at lr {best_lr:g}")
        results[name] = {"best_lr": best_lr, "best_accuracy": best_accuracy, "best_loss": best_loss,
                         "sweep": {lr: accuracy for lr, (accuracy, _) in scores.items()},
                         "selected_on": "tasks" if validation_tasks is None else "validation"}
    return results
