"""iMAML and contrastive meta-learning against the closed-form implicit gradient of a quadratic problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolution import learned_init as LI

D, LAM = 6, 2.0


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def problem(seed=0):
    """L_tr(φ) = ½(φ−a)ᵀA(φ−a), L_out(φ) = ½(φ−b)ᵀB(φ−b): the proximal argmin and the implicit gradient in
    closed form, φ* = (A+λI)⁻¹(Aa+λθ), g = λ(A+λI)⁻¹B(φ*−b)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(D, D))
    a_mat = m @ m.T / D + 0.1 * np.eye(D)
    n = rng.normal(size=(D, D))
    b_mat = n @ n.T / D + 0.1 * np.eye(D)
    a, b, theta = rng.normal(size=D), rng.normal(size=D), rng.normal(size=D)
    phi_star = np.linalg.solve(a_mat + LAM * np.eye(D), a_mat @ a + LAM * theta)
    exact = LAM * np.linalg.solve(a_mat + LAM * np.eye(D), b_mat @ (phi_star - b))
    A, B = jnp.asarray(a_mat), jnp.asarray(b_mat)
    loss_tr = lambda p: 0.5 * (p["x"] - a) @ A @ (p["x"] - a)  # noqa: E731 - a pytree of parameters
    loss_out = lambda p: 0.5 * (p["x"] - b) @ B @ (p["x"] - b)  # noqa: E731
    return loss_tr, loss_out, {"x": jnp.asarray(theta)}, phi_star, exact


CONFIG = LI.InnerConfig(lam=LAM, steps=400, lr=0.2)


def relative(estimate, exact):
    return float(np.linalg.norm(np.asarray(estimate["x"]) - exact) / np.linalg.norm(exact))


def test_the_inner_solve_reaches_the_proximal_argmin():
    loss_tr, _, theta, phi_star, _ = problem()
    np.testing.assert_allclose(LI.inner_solve(loss_tr, theta, CONFIG)["x"], phi_star, rtol=1e-10)


def test_imaml_cg_meta_gradient_is_the_implicit_gradient_and_improves_with_cg_steps():
    loss_tr, loss_out, theta, _, exact = problem()
    errors = [relative(LI.imaml_gradient(loss_tr, loss_out, theta, CONFIG, cg_steps=n)[0], exact)
              for n in range(1, D + 1)]
    assert errors[-1] < 1e-4, errors  # D CG steps solve a D-dimensional SPD system
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2  # one step is not enough: the test can tell
    damped = LI.imaml_gradient(loss_tr, loss_out, theta, CONFIG, cg_steps=D, cg_damping=1.0, lam_damping=10.0)[0]
    assert relative(damped, exact) > 0.05  # the official code's damping solves a different system
    with pytest.raises(ValueError, match="cg_steps"):
        LI.imaml_gradient(loss_tr, loss_out, theta, CONFIG, cg_steps=0)


def test_cml_approaches_the_implicit_gradient_as_beta_shrinks_and_the_symmetric_form_is_more_accurate():
    loss_tr, loss_out, theta, _, exact = problem(1)
    betas = (0.3, 0.1, 0.03, 0.01)
    one_sided = [relative(LI.cml_gradient(loss_tr, loss_out, theta, CONFIG, beta)[0], exact) for beta in betas]
    symmetric = [relative(LI.cml_gradient(loss_tr, loss_out, theta, CONFIG, beta, symmetric=True)[0], exact)
                 for beta in betas]
    assert all(later < earlier for earlier, later in zip(one_sided, one_sided[1:])), one_sided
    assert all(s < o for s, o in zip(symmetric, one_sided)), (symmetric, one_sided)
    assert one_sided[-1] < 0.05 and symmetric[-1] < 1e-3
    with pytest.raises(ValueError, match="beta"):
        LI.cml_gradient(loss_tr, loss_out, theta, CONFIG, 0.0)


# ------------------------------------------------------------- the compare methods on the MLP initialization

def _repeated_task(num_steps: int):
    """A task whose support batches are all the same batch: SGD on it is gradient descent on one energy."""
    from workers.task_types import Task

    key = jax.random.key(3)
    x = jax.random.normal(key, (6, 4))
    y = jnp.array([0, 1, 0, 1, 1, 0])
    qx = jax.random.normal(jax.random.fold_in(key, 1), (5, 4))
    qy = jnp.array([1, 0, 1, 0, 1])
    return Task(jnp.broadcast_to(x, (num_steps, 6, 4)), jnp.broadcast_to(y, (num_steps, 6)), qx, qy)


def _exact_implicit(theta, task, lam, phi):
    from jax.flatten_util import ravel_pytree

    from workers.baselines import mlp_loss

    x, y = task.support_x[0], task.support_y[0]
    flat, unravel = ravel_pytree(phi)
    hessian = jax.hessian(lambda f: mlp_loss(unravel(f), x, y))(flat)
    outer = ravel_pytree(jax.grad(lambda p: mlp_loss(p, task.query_x, task.query_y))(phi))[0]
    return jnp.linalg.solve(jnp.eye(flat.size) + hessian / lam, outer)


def test_learned_init_meta_gradients_match_the_implicit_gradient_of_the_sgd_solution():
    from jax.flatten_util import ravel_pytree

    from workers.baselines import init_mlp, mlp_loss

    jax.config.update("jax_enable_x64", True)
    try:
        theta = jax.tree.map(lambda w: w.astype(jnp.float64), init_mlp(jax.random.key(0), (4, 3, 2)))
        task = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, _repeated_task(400))
        imaml = LI.check_learned_init({"algorithm": "imaml", "lam": 2.0, "inner_lr": 0.1, "cg_steps": 40})
        phi = LI.sgd_solve(lambda p, t: mlp_loss(p, task.support_x[t], task.support_y[t]), theta, 2.0, 0.1, 400)
        exact = _exact_implicit(theta, task, 2.0, phi)
        got = ravel_pytree(LI.task_meta_gradient(imaml, theta, task)[0])[0]
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-9)
        for symmetric, beta, tolerance in ((False, 1e-3, 1e-2), (True, 1e-2, 1e-3)):
            cml = LI.check_learned_init({"algorithm": "cml", "lam": 2.0, "inner_lr": 0.1, "beta": beta,
                                         "symmetric": symmetric})
            estimate = ravel_pytree(LI.task_meta_gradient(cml, theta, task)[0])[0]
            error = float(jnp.linalg.norm(estimate - exact) / jnp.linalg.norm(exact))
            assert error < tolerance, (symmetric, error)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert LI.inner_steps_per_task(imaml, 10) == 10 + 2 * 40
    assert LI.inner_steps_per_task(cml, 10) == 30


def test_cg_stops_at_negative_curvature_instead_of_overflowing():
    matrix = jnp.diag(jnp.array([2.0, 1.0, -0.5]))  # indefinite, as I + H/λ of a non-convex loss can be
    rhs = jnp.array([1.0, 1.0, 1.0])
    x = LI.conjugate_gradient(lambda v: matrix @ v, rhs, 10)
    assert bool(jnp.all(jnp.isfinite(x)))
    spd = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    np.testing.assert_allclose(LI.conjugate_gradient(lambda v: spd @ v, jnp.array([1.0, -1.0]), 2),
                               jnp.linalg.solve(spd, jnp.array([1.0, -1.0])), rtol=1e-5)
