"""Learned-initialization meta-gradients: iMAML and contrastive meta-learning (issue 14's baselines).

Both meta-learn the *initialization* ``θ`` of a learner trained by gradient descent on each task (in
``blur compare`` terms: the plain MLP trained by SGD on the same tasks), with the proximal inner problem

    φ*(θ) = argmin_φ  L_in(φ, θ),   L_in(φ, θ) = L_tr(φ) + λ/2 ‖φ − θ‖²,

and the outer loss ``L_out(φ*(θ))`` (query loss). The implicit function theorem gives
``dφ*/dθ = (I + H/λ)⁻¹`` with ``H = ∇²L_tr(φ*)``, so the exact meta-gradient is

    g = (I + H/λ)⁻¹ ∇L_out(φ*).

* :func:`imaml_gradient` (Rajeswaran et al. 2019): ``g`` by ``n_cg`` conjugate-gradient steps on the SPD
  operator ``v ↦ v + H v / λ`` with Hessian-vector products (forward-over-reverse ``jax.jvp`` of
  ``jax.grad``). The official code's extra damping (``(1 + cg_damping) v + H v / (λ + lam_damping)``) is an
  option, off by default: it changes the operator, so the solution is no longer the implicit gradient
  (on a 5-D quadratic its cosine with the exact ``g`` was 0.93, see the project's outer-loop reference).
* :func:`cml_gradient` (Zucchet et al. 2022): the equilibrium-propagation estimate from a free and a
  β-nudged equilibrium, ``ĝ = (1/β)[∂_θ L_in(φ_β, θ) − ∂_θ L_in(φ_0, θ)] = (λ/β)(φ_0 − φ_β)``, or the
  symmetric ``(λ/2β)(φ_−β − φ_+β)``; both nudged phases start from the free state. No second derivatives,
  no backprop through the inner loop.

The inner solves are plain gradient descent on the energy (``steps`` steps of size ``lr``; the nudged phase
adds ``β·L_out``). Parameters are any pytree; the functions are pure and jittable with ``loss_tr``,
``loss_out`` static.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Loss = Callable[[object], jax.Array]


class InnerConfig(NamedTuple):
    """Proximal inner problem: ``lam`` (λ > 0), gradient-descent ``steps`` of size ``lr``."""

    lam: float = 2.0
    steps: int = 100
    lr: float = 0.1


def _tree_dot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _axpy(alpha, x, y):
    return jax.tree.map(lambda u, v: alpha * u + v, x, y)


def energy(loss_tr: Loss, phi, theta, lam: float) -> jax.Array:
    """``L_in(φ, θ) = L_tr(φ) + λ/2 ‖φ − θ‖²``."""
    prox = sum(jnp.sum((p - t) ** 2) for p, t in zip(jax.tree.leaves(phi), jax.tree.leaves(theta)))
    return loss_tr(phi) + 0.5 * lam * prox


def inner_solve(loss_tr: Loss, theta, config: InnerConfig, start=None, nudge: Loss | None = None,
                beta: float = 0.0):
    """``config.steps`` gradient-descent steps on ``L_in(·, θ) + β·nudge`` from ``start`` (default θ)."""

    def objective(phi):
        value = energy(loss_tr, phi, theta, config.lam)
        return value if nudge is None else value + beta * nudge(phi)

    grad = jax.grad(objective)

    def body(phi, _):
        return jax.tree.map(lambda p, g: p - config.lr * g, phi, grad(phi)), None

    return jax.lax.scan(body, theta if start is None else start, None, length=config.steps)[0]


def conjugate_gradient(operator: Callable, rhs, steps: int):
    """``steps`` CG iterations for ``operator(x) = rhs`` from x = 0.

    For an SPD operator this is plain CG. ``I + H/λ`` of a non-convex loss can have directions of
    non-positive curvature (``pᵀAp ≤ 0``); CG would divide by ~0 there and overflow, so the iterate stops at
    the first such direction and is returned as it stands (truncated CG, as in Steihaug's method)."""
    x = jax.tree.map(jnp.zeros_like, rhs)
    r = rhs
    p = rhs
    rs = _tree_dot(r, r)

    def body(carry, _):
        x, r, p, rs, stopped = carry
        ap = operator(p)
        curvature = _tree_dot(p, ap)
        stopped = stopped | ~(curvature > 0) | ~(rs > 0)
        alpha = jnp.where(stopped, 0.0, rs / jnp.where(stopped, 1.0, curvature))
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rs_new = _tree_dot(r, r)
        p = _axpy(jnp.where(stopped, 0.0, rs_new / jnp.where(rs > 0, rs, 1.0)), p, r)
        return (x, r, p, jnp.where(stopped, rs, rs_new), stopped), None

    return jax.lax.scan(body, (x, r, p, rs, jnp.asarray(False)), None, length=steps)[0][0]


def imaml_gradient(loss_tr: Loss, loss_out: Loss, theta, config: InnerConfig, cg_steps: int = 5,
                   cg_damping: float = 0.0, lam_damping: float = 0.0, phi=None):
    """iMAML meta-gradient at ``θ``: CG solve of ``(I + H/λ) g = ∇L_out(φ*)`` (see the module docstring).

    ``phi``: the inner solution if already computed (default: :func:`inner_solve`). Returns (g, φ*)."""
    if cg_steps < 1:
        raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
    phi = inner_solve(loss_tr, theta, config) if phi is None else phi
    grad_tr = jax.grad(loss_tr)

    def hvp(v):
        return jax.jvp(grad_tr, (phi,), (v,))[1]

    scale = 1.0 / (config.lam + lam_damping)

    def operator(v):
        return _axpy(scale, hvp(v), jax.tree.map(lambda u: (1.0 + cg_damping) * u, v))

    return conjugate_gradient(operator, jax.grad(loss_out)(phi), cg_steps), phi


def cml_gradient(loss_tr: Loss, loss_out: Loss, theta, config: InnerConfig, beta: float,
                 nudged_steps: int | None = None, symmetric: bool = False, phi=None):
    """Contrastive meta-learning estimate of the meta-gradient at ``θ`` (see the module docstring).

    Free phase: :func:`inner_solve` (or ``phi``); nudged phase(s): ``nudged_steps`` (default
    ``config.steps``) steps on ``L_in + β·L_out`` from the free state. Returns (ĝ, φ_free)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    free = inner_solve(loss_tr, theta, config) if phi is None else phi
    nudged_config = config._replace(steps=config.steps if nudged_steps is None else nudged_steps)
    plus = inner_solve(loss_tr, theta, nudged_config, start=free, nudge=loss_out, beta=beta)
    if symmetric:
        minus = inner_solve(loss_tr, theta, nudged_config, start=free, nudge=loss_out, beta=-beta)
        return jax.tree.map(lambda m, p: config.lam * (m - p) / (2.0 * beta), minus, plus), free
    return jax.tree.map(lambda f, p: config.lam * (f - p) / beta, free, plus), free


# ------------------------------------------------------------------- the learned-initialization baselines
# ``blur compare`` kind ``learned_init``: θ is the initialization of the plain MLP (workers.baselines) that SGD
# trains on each task, one support batch per step, for the same T inner steps as every other method.


class LearnedInit(NamedTuple):
    """One learned-initialization method: ``algorithm`` imaml | cml and its hyperparameters (defaults: the
    official iMAML README command, inner_lr 0.1, λ 2, 5 CG steps; CML β 0.1)."""

    algorithm: str = "imaml"
    lam: float = 2.0
    inner_lr: float = 0.1
    cg_steps: int = 5
    cg_damping: float = 0.0
    lam_damping: float = 0.0
    beta: float = 0.1
    symmetric: bool = False
    activation: str = "sigmoid"


ALGORITHMS = ("imaml", "cml")


def check_learned_init(options: dict) -> LearnedInit:
    """The method's options as a :class:`LearnedInit`; ValueError naming the option otherwise."""
    fields = LearnedInit._fields
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"options.{unknown[0]}: unknown option (allowed: {', '.join(fields)})")
    method = LearnedInit(**options)
    if method.algorithm not in ALGORITHMS:
        raise ValueError(f"options.algorithm: must be one of {', '.join(ALGORITHMS)}; got {method.algorithm!r}")
    for name in ("lam", "inner_lr", "beta"):
        value = getattr(method, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
            raise ValueError(f"options.{name}: must be a positive finite number, got {value!r}")
    for name in ("cg_damping", "lam_damping"):
        value = getattr(method, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < float("inf")):
            raise ValueError(f"options.{name}: must be a finite number >= 0, got {value!r}")
    if isinstance(method.cg_steps, bool) or not isinstance(method.cg_steps, int) or method.cg_steps < 1:
        raise ValueError(f"options.cg_steps: must be an integer >= 1, got {method.cg_steps!r}")
    if not isinstance(method.symmetric, bool):
        raise ValueError(f"options.symmetric: must be true or false, got {method.symmetric!r}")
    from workers.baselines import ACTIVATIONS

    if method.activation not in ACTIVATIONS:
        raise ValueError(f"options.activation: must be one of {', '.join(ACTIVATIONS)}; got {method.activation!r}")
    return method._replace(lam=float(method.lam), inner_lr=float(method.inner_lr), beta=float(method.beta),
                           cg_damping=float(method.cg_damping), lam_damping=float(method.lam_damping))


def inner_steps_per_task(method: LearnedInit, num_steps: int) -> int:
    """Inner steps one task of a meta-step consumes, in units of one SGD step's gradient (the reference's
    cost table): iMAML T + 2·n_CG (each Hessian-vector product costs about two gradients); CML T free plus
    T per nudged phase (two when symmetric)."""
    if method.algorithm == "imaml":
        return num_steps + 2 * method.cg_steps
    return num_steps * (2 + int(method.symmetric))


def sgd_solve(batch_loss: Callable, theta, lam: float, lr: float, num_steps: int, start=None,
              nudge: Loss | None = None, beta: float = 0.0):
    """``num_steps`` SGD steps on ``batch_loss(φ, t) + λ/2‖φ − θ‖² (+ β·nudge(φ))``, step t on support batch t,
    from ``start`` (default θ): the proximal inner problem solved the way SGD trains the MLP."""

    def objective(phi, t):
        value = batch_loss(phi, t) + 0.5 * lam * sum(jnp.sum((p - q) ** 2) for p, q in
                                                     zip(jax.tree.leaves(phi), jax.tree.leaves(theta)))
        return value if nudge is None else value + beta * nudge(phi)

    grad = jax.grad(objective)

    def body(phi, t):
        return jax.tree.map(lambda p, g: p - lr * g, phi, grad(phi, t)), None

    return jax.lax.scan(body, theta if start is None else start, jnp.arange(num_steps))[0]


def task_meta_gradient(method: LearnedInit, theta, task):
    """(meta-gradient, query loss at the inner solution) of one task: iMAML's CG solve with the Hessian of the
    whole support loss at φ_T, or CML's contrast of the free and β-nudged solutions (same batches again)."""
    from workers.baselines import mlp_loss

    num_steps, batch = task.support_x.shape[0], task.support_x.shape[1]
    x_all = task.support_x.reshape(num_steps * batch, -1)
    y_all = task.support_y.reshape(-1)

    def batch_loss(phi, t):
        return mlp_loss(phi, task.support_x[t], task.support_y[t], method.activation)

    def loss_tr(phi):
        return mlp_loss(phi, x_all, y_all, method.activation)

    def loss_out(phi):
        return mlp_loss(phi, task.query_x, task.query_y, method.activation)

    free = sgd_solve(batch_loss, theta, method.lam, method.inner_lr, num_steps)
    if method.algorithm == "imaml":
        config = InnerConfig(method.lam, num_steps, method.inner_lr)
        gradient, _ = imaml_gradient(loss_tr, loss_out, theta, config, method.cg_steps, method.cg_damping,
                                     method.lam_damping, phi=free)
    else:
        def nudged(sign):
            return sgd_solve(batch_loss, theta, method.lam, method.inner_lr, num_steps, start=free, nudge=loss_out,
                             beta=sign * method.beta)

        plus = nudged(1.0)
        if method.symmetric:
            minus = nudged(-1.0)
            gradient = jax.tree.map(lambda m, p: method.lam * (m - p) / (2 * method.beta), minus, plus)
        else:
            gradient = jax.tree.map(lambda f, p: method.lam * (f - p) / method.beta, free, plus)
    return gradient, loss_out(free)


def meta_gradient(method: LearnedInit, theta, tasks):
    """Mean over the task batch (leading axis) of :func:`task_meta_gradient`: (gradient, mean query loss)."""
    gradients, losses = jax.vmap(lambda task: task_meta_gradient(method, theta, task))(tasks)
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), gradients), jnp.mean(losses)
