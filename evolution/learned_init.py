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
    """``steps`` CG iterations for ``operator(x) = rhs`` (operator SPD), from x = 0."""
    x = jax.tree.map(jnp.zeros_like, rhs)
    r = rhs
    p = rhs
    rs = _tree_dot(r, r)

    def body(carry, _):
        x, r, p, rs = carry
        ap = operator(p)
        alpha = rs / jnp.maximum(_tree_dot(p, ap), 1e-30)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rs_new = _tree_dot(r, r)
        p = _axpy(rs_new / jnp.maximum(rs, 1e-30), p, r)
        return (x, r, p, rs_new), None

    return jax.lax.scan(body, (x, r, p, rs), None, length=steps)[0][0]


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
