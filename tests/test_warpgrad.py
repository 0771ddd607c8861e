"""WarpGrad: identity warps give plain SGD; the replay objective's gradient matches finite differences; a
meta-step equals a hand-written replay with one optimizer step per point; simplified Leap matches NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evolution import warpgrad as WG
from workers import baselines as BL
from workers.tasks import TaskConfig, make_family

SIZES = (5, 4, 3, 3)  # two hidden layers: two warp layers


def random_batch(seed, n=6):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, SIZES[0]))), jnp.asarray(rng.integers(0, SIZES[-1], size=n))


def random_warps(seed, scale=0.3, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return [w + scale * jnp.asarray(rng.normal(size=w.shape), w.dtype) for w in WG.identity_warps(sizes)]


def test_identity_warps_give_exactly_the_sgd_baseline():
    """With Ω = I, c = 0 the warped forward pass, its gradient and whole SGD trainings equal the plain MLP's."""
    family = make_family(TaskConfig(family="digits", n_way=3, batch_size=8, num_query=12), "test")
    tasks = family.sample(jax.random.key(3), 4, 6)
    sizes = (64, 7, 3)
    init = BL.init_mlp(jax.random.key(1), sizes)
    warps = WG.identity_warps(sizes)
    x, y = tasks.support_x[0, 0], tasks.support_y[0, 0]
    np.testing.assert_array_equal(WG.warped_forward(init, warps, x), BL.mlp_forward(init, x))
    for g_warped, g_plain in zip(jax.grad(WG.warped_loss)(init, warps, x, y), jax.grad(BL.mlp_loss)(init, x, y)):
        np.testing.assert_allclose(g_warped, g_plain, rtol=0, atol=1e-7)
    warped = WG.warped_sgd(init, warps, tasks, 0.5, 6)
    plain = BL.run_baseline("sgd", 0.5, sizes, tasks, jax.random.key(0),
                            init_weights=[jnp.broadcast_to(w, (4,) + w.shape) for w in init])
    np.testing.assert_allclose(warped["accuracy"], plain["accuracy"], atol=1e-6)
    np.testing.assert_allclose(warped["loss"], plain["loss"], rtol=1e-5)
    # and warps that are not the identity do change the trajectory (the check above can fail)
    other = WG.warped_sgd(init, random_warps(0, 0.5, sizes), tasks, 0.5, 6)
    assert not np.allclose(other["loss"], plain["loss"], rtol=1e-3)


def test_the_replay_objectives_warp_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        theta = [w.astype(jnp.float64) for w in BL.init_mlp(jax.random.key(0), SIZES)]
        warps = [w.astype(jnp.float64) for w in random_warps(1)]
        (x1, y1), (x2, y2) = random_batch(2), random_batch(3)
        loss = lambda w: WG.replay_loss(w, theta, x1, y1, x2, y2, 0.7)  # noqa: E731
        grads = jax.grad(loss)(warps)
        rng = np.random.default_rng(4)
        for _ in range(4):
            direction = [jnp.asarray(rng.normal(size=w.shape)) for w in warps]
            eps = 1e-5
            plus = loss([w + eps * d for w, d in zip(warps, direction)])
            minus = loss([w - eps * d for w, d in zip(warps, direction)])
            numeric = float((plus - minus) / (2 * eps))
            analytic = float(sum(jnp.vdot(g, d) for g, d in zip(grads, direction)))
            assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (numeric, analytic)
        # θ_k is a constant of the objective: no gradient flows into it
        theta_grads = jax.grad(lambda t: WG.replay_loss(warps, t, x1, y1, x2, y2, 0.7))(theta)
        assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in theta_grads)


def test_a_meta_step_is_the_replay_of_every_stored_point_one_optimizer_step_each():
    """meta_step == adapt each task with Ω frozen, then for each shuffled point (official replay batch 1) one Adam
    step on ∇Ω ℓ(Ω; τ, k), then the simplified-Leap step on the initialization — written out by hand."""
    family = make_family(TaskConfig(family="digits", n_way=3, batch_size=8, num_query=12), "train")
    tasks = family.sample(jax.random.key(5), 2, 3)
    sizes = (64, 6, 3)
    init = BL.init_mlp(jax.random.key(2), sizes)
    warps = WG.identity_warps(sizes)
    options = WG.WarpGradOptions(inner_lr=0.3)
    optimizer = optax.adam(0.01)
    state = WG.MetaState(init, warps, optimizer.init(init), optimizer.init(warps))
    key = jax.random.key(9)
    new, _, finite = jax.jit(lambda s, t, k: WG.meta_step(options, optimizer, s, t, k))(state, tasks, key)
    assert bool(finite)

    stored = {}
    for t in range(2):
        theta = init
        for k in range(3):
            stored[t, k] = theta
            theta = WG.warped_step(theta, warps, tasks.support_x[t, k], tasks.support_y[t, k], 0.3)
    points = np.asarray(WG.replay_points(key, 2, 3, 1))
    assert sorted(map(tuple, points[:, :2])) == sorted(stored)  # every stored point once
    assert np.all(points[:, 2] != points[:, 3])  # two distinct batches of the task
    w, opt = warps, optimizer.init(warps)
    for t, k, b1, b2 in points:
        g = jax.grad(WG.replay_loss)(w, stored[t, k], tasks.support_x[t, b1], tasks.support_y[t, b1],
                                     tasks.support_x[t, b2], tasks.support_y[t, b2], 0.3)
        updates, opt = optimizer.update(g, opt, w)
        w = optax.apply_updates(w, updates)
    for got, want in zip(new.warps, w):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(new.warps[0], warps[0])  # the warps did move
    leap = []
    for layer in range(len(init)):
        total = 0.0
        for t in range(2):
            segments = [np.asarray(stored[t, k][layer]) - np.asarray(stored[t, k + 1][layer]) for k in range(2)]
            norms = [np.sqrt(sum(np.sum((np.asarray(stored[t, k][m]) - np.asarray(stored[t, k + 1][m])) ** 2)
                                 for m in range(len(init)))) for k in range(2)]
            total = total + sum(s / n for s, n in zip(segments, norms))
        leap.append(total / 2)
    updates, _ = optimizer.update([jnp.asarray(g, jnp.float32) for g in leap], optimizer.init(init), init)
    for got, want in zip(new.init, optax.apply_updates(init, updates)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, needle", [({"replay_batch": 0}, "options.replay_batch"),
                                             ({"epochs": 1.5}, "options.epochs"),
                                             ({"inner_lr": 0}, "options.inner_lr"),
                                             ({"learn_init": "yes"}, "options.learn_init"),
                                             ({"activation": "gelu"}, "options.activation"),
                                             ({"bsz": 1}, "options.bsz: unknown option")])
def test_bad_options_name_the_option(options, needle):
    with pytest.raises(ValueError, match=needle):
        WG.check_options(options)
