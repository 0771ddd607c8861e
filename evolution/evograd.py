"""EvoGrad (Bohdal, Yang and Hospedales, NeurIPS 2021): first-order hypergradients from evolved candidates.

For meta-parameters ``λ`` that enter a training loss ``ℓ_train(θ, λ)`` (loss weights, regularizers, ...):

1. candidates ``θ_k = θ + ε_k``, ``ε_k ~ N(0, σ² I)``, k = 1..K (defaults K = 2, σ = 1e-3);
2. weights ``w = softmax(-ℓ_train(θ_k, λ) / τ)`` (τ = 0.05);
3. merged model ``θ* = Σ_k w_k θ_k``;
4. hypergradient ``∂ ℓ_val(θ*) / ∂λ``: λ reaches ``θ*`` only through the weights, so no second-order
   terms and no unrolled history are needed (memory independent of the training length).

To first order in σ its expectation is the one-step look-ahead hypergradient
``-α (∂²ℓ_train/∂λ∂θ)ᵀ ∇ℓ_val(θ)`` with ``α = σ²/(2τ)`` for K = 2 (a test pins this).

:func:`softmax_merge` is shared with the learning-rule variant in :mod:`evolution.gradients`, where the
candidates are next synapse states produced by the rule itself.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def softmax_merge(candidates: PyTree, losses: jax.Array, temperature: float) -> tuple[PyTree, jax.Array]:
    """``(Σ_k w_k c_k, w)`` with ``w = softmax(-losses / temperature)``; candidates have a leading K axis."""
    weights = jax.nn.softmax(-losses / temperature)
    merged = jax.tree.map(lambda c: jnp.tensordot(weights, c, axes=1), candidates)
    return merged, weights


def candidates(key: jax.Array, params: PyTree, num_candidates: int, sigma: float) -> PyTree:
    """``θ_k = θ + σ ε_k`` for k = 1..K, stacked on a leading axis."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [
        p[None] + sigma * jax.random.normal(k, (num_candidates,) + p.shape, p.dtype) for p, k in zip(leaves, keys)
    ])


def objective(key: jax.Array, params: PyTree, meta_params: PyTree, train_loss_fn: Callable, val_loss_fn: Callable,
              num_candidates: int = 2, sigma: float = 1e-3, temperature: float = 0.05) -> jax.Array:
    """EvoGrad's first-order objective ``ℓ_val(θ*(λ))``; its gradient in ``meta_params`` is the hypergradient.

    ``train_loss_fn(params, meta_params) -> scalar``; ``val_loss_fn(params) -> scalar``. ``params`` is a
    constant here (the model is trained separately, e.g. by SGD on the weighted training loss).
    """
    params = jax.lax.stop_gradient(params)
    models = candidates(key, params, num_candidates, sigma)
    losses = jax.vmap(train_loss_fn, (0, None))(models, meta_params)
    merged, _ = softmax_merge(models, losses, temperature)
    return val_loss_fn(merged)


def hypergradient(key: jax.Array, params: PyTree, meta_params: PyTree, train_loss_fn: Callable,
                  val_loss_fn: Callable, num_candidates: int = 2, sigma: float = 1e-3,
                  temperature: float = 0.05) -> tuple[jax.Array, PyTree]:
    """``(ℓ_val(θ*), ∂ℓ_val(θ*)/∂λ)``: one EvoGrad hypergradient (see the module docstring)."""
    return jax.value_and_grad(objective, argnums=2)(key, params, meta_params, train_loss_fn, val_loss_fn,
                                                     num_candidates, sigma, temperature)


class EvoGradState(NamedTuple):
    params: PyTree
    meta_params: PyTree
    opt_state: optax.OptState
    meta_opt_state: optax.OptState


def train(key: jax.Array, params: PyTree, meta_params: PyTree, train_loss_fn: Callable, val_loss_fn: Callable,
          num_steps: int, optimizer: optax.GradientTransformation, meta_optimizer: optax.GradientTransformation,
          num_candidates: int = 2, sigma: float = 1e-3, temperature: float = 0.05,
          batch_fn: Callable | None = None) -> tuple[EvoGradState, jax.Array]:
    """The EvoGrad training loop: each step one hypergradient update of λ, then one update of θ on
    ``ℓ_train(θ, λ)``. ``batch_fn(step) -> (train_args, val_args)`` optionally feeds mini-batches as extra
    arguments ``train_loss_fn(θ, λ, *train_args)``, ``val_loss_fn(θ, *val_args)``.

    Returns the final state and the validation losses of the merged models ``[num_steps]``.
    """
    batch_fn = batch_fn or (lambda step: ((), ()))

    def body(state: EvoGradState, step):
        train_args, val_args = batch_fn(step)
        train_fn = lambda p, m: train_loss_fn(p, m, *train_args)  # noqa: E731
        val_fn = lambda p: val_loss_fn(p, *val_args)  # noqa: E731
        val_loss, meta_grad = hypergradient(jax.random.fold_in(key, step), state.params, state.meta_params,
                                            train_fn, val_fn, num_candidates, sigma, temperature)
        updates, meta_opt_state = meta_optimizer.update(meta_grad, state.meta_opt_state, state.meta_params)
        meta_params = optax.apply_updates(state.meta_params, updates)
        grad = jax.grad(train_fn)(state.params, meta_params)
        updates, opt_state = optimizer.update(grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return EvoGradState(params, meta_params, opt_state, meta_opt_state), val_loss

    state = EvoGradState(params, meta_params, optimizer.init(params), meta_optimizer.init(meta_params))
    return jax.lax.scan(body, state, jnp.arange(num_steps))
