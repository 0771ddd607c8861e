"""evosax strategies (CMA-ES, Sep-CMA-ES, OpenES, PGPE, SNES, xNES, PES, NRES) behind the contract.

Two faces over the same computation:

* the pure JAX functions `EvosaxStrategy.init_fn / ask_fn / tell_fn` take and return JAX values
  only, so a whole search can run inside ``jax.jit`` / ``jax.lax.scan`` / ``jax.vmap``;
* the NumPy-facing `init / ask / tell` of the `Strategy` contract call jitted versions of those
  same functions and convert at the edge.

The state is an `EvosaxState` pytree (the evosax algorithm state plus the initial step size),
serialized with ``flax.serialization.to_bytes`` and restored against a freshly initialized
template. Every leaf has a fixed dtype (no weak types), so a restored state hits the same compiled
functions and continues bit-identically.

Fitness is minimized (evosax's own convention). Fitness shaping is each algorithm's own:
CMA-ES, Sep-CMA-ES, SNES and xNES use their rank-based recombination / utility weights (fixed:
their updates assume them); OpenES and PGPE default to centered ranks; PersistentES and
NoiseReuseES default to raw fitness (their gradient estimators are unbiased only on raw losses).
The latter four accept ``fitness_shaping`` in {centered_rank, standardize, normalize, identity}.
A NaN fitness is replaced by the worst finite fitness of its population before shaping.

Truncation-aware strategies (``persistent_es``, ``noise_reuse_es``) need more from the caller
than a plain objective: each candidate owns an inner problem (e.g. a network being trained by the
rule) whose state is carried across generations. Every generation evaluates candidate ``i`` for
``truncation_length`` further inner steps from where its own inner state stopped, and reports the
loss of that partial unroll. When `EvosaxStrategy.unroll_start` returns 0 the inner problems must
be started afresh (this happens every ``unroll_length / truncation_length`` generations).
Candidates ``i`` and ``i + P/2`` are an antithetic pair. With ``truncation_length ==
unroll_length`` (a full unroll per generation) both reduce to antithetic ES.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import evosax.algorithms as ea
import jax
import jax.numpy as jnp
import numpy as np
import optax
from evosax.core import fitness_shaping as shaping
from evosax.core.optimizer import clipup, scale_by_clipup
from flax import serialization, struct

from .base import (
    check_options,
    default_population_size,
    pack_state,
    unpack_state,
)
from .names import EVOSAX_STRATEGIES

__all__ = ["EVOSAX_STRATEGIES", "EvosaxState", "EvosaxStrategy"]


_FITNESS_SHAPING: dict[str, Callable] = {
    "centered_rank": shaping.centered_rank_fitness_shaping_fn,
    "standardize": shaping.standardize_fitness_shaping_fn,
    "normalize": shaping.normalize_fitness_shaping_fn,
    "identity": shaping.identity_fitness_shaping_fn,
}
_OPTIMIZERS = ("sgd", "adam", "clipup")


class _FullCovarianceXNES(ea.xNES):
    """evosax xNES with the covariance update of Wierstra et al. 2014 (Algorithm 5).

    evosax 0.3.2 updates ``B * exp(eta_B / 2 * G_B)`` elementwise, which keeps B diagonal, and
    samples ``z @ B`` while updating the mean with ``B @ G_delta``. Here ``x = mean + sigma B z``
    and ``B <- B expm(eta_B / 2 * G_B)``, so xNES adapts a full covariance as published.
    """

    def _ask(self, key, state, params):
        z = jax.random.normal(key, (self.population_size, self.num_dims))
        population = state.mean + state.std * z @ state.B.T  # x = mu + sigma B z
        return population, state.replace(z=z)

    def _tell(self, key, population, fitness, state, params):
        # fitness holds the utilities u_i (sum zero, largest for the best candidate).
        grad_delta = jnp.dot(fitness, state.z)
        updates, opt_state = self.optimizer.update(
            -state.std * state.B @ grad_delta, state.opt_state, state.mean
        )
        mean = optax.apply_updates(state.mean, updates)  # mu += eta_mu sigma B G_delta
        eye = jnp.eye(self.num_dims, dtype=state.B.dtype)
        grad_m = jnp.einsum("i,ij,ik->jk", fitness, state.z, state.z) - jnp.sum(fitness) * eye
        grad_std = jnp.trace(grad_m) / self.num_dims  # G_sigma = tr(G_M) / d
        std = state.std * jnp.exp(0.5 * state.lr_std * grad_std)
        grad_b = grad_m - grad_std * eye  # G_B = G_M - G_sigma I
        B = state.B @ jax.scipy.linalg.expm(0.5 * params.lr_B * grad_b)
        return state.replace(mean=mean, std=std, opt_state=opt_state, B=B)


@dataclass(frozen=True)
class _AlgorithmSpec:
    """How one evosax algorithm is wired into the contract."""

    algorithm: type
    sigma_in: str  # "params": params.std_init; "schedule": std overridden after init/tell
    antithetic: bool  # evosax asserts an even population size
    optimizer: tuple[str, float] | None  # default (kind, learning_rate); None: no optimizer
    fitness_shaping: str | None  # default shaping name; None: the algorithm's fixed weights
    extra_options: tuple[str, ...] = ()


_SPECS: dict[str, _AlgorithmSpec] = {
    "cma_es": _AlgorithmSpec(ea.CMA_ES, "params", False, None, None, ("std_min", "std_max")),
    "sep_cma_es": _AlgorithmSpec(ea.Sep_CMA_ES, "params", False, None, None, ("std_min", "std_max")),
    "open_es": _AlgorithmSpec(
        ea.Open_ES, "schedule", True, ("sgd", 1e-3), "centered_rank", ("use_antithetic_sampling",)
    ),
    "pgpe": _AlgorithmSpec(
        ea.PGPE, "params", True, ("clipup", 0.01), "centered_rank", ("std_lr", "std_max_change")
    ),
    "snes": _AlgorithmSpec(ea.SNES, "params", False, ("sgd", 1.0), None, ("std_lr",)),
    "xnes": _AlgorithmSpec(_FullCovarianceXNES, "params", False, ("sgd", 1.0), None, ("std_lr",)),
    "persistent_es": _AlgorithmSpec(
        ea.PersistentES, "schedule", True, ("adam", 1e-3), "identity",
        ("unroll_length", "truncation_length"),
    ),
    "noise_reuse_es": _AlgorithmSpec(
        ea.NoiseReuseES, "schedule", True, ("adam", 1e-3), "identity",
        ("unroll_length", "truncation_length"),
    ),
}
assert set(_SPECS) == set(EVOSAX_STRATEGIES)


def _allowed_options(spec: _AlgorithmSpec) -> dict[str, None]:
    names = list(spec.extra_options)
    if spec.optimizer is not None:
        names += ["optimizer", "learning_rate", "learning_rate_decay", "learning_rate_limit"]
        names += ["momentum", "max_velocity"]
    if spec.fitness_shaping is not None:
        names.append("fitness_shaping")
    if spec.sigma_in == "schedule":
        names += ["sigma_decay", "sigma_limit"]
    return dict.fromkeys(names)


@struct.dataclass
class EvosaxState:
    """The evosax algorithm state plus the step size the search started with."""

    inner: Any
    sigma_init: jax.Array


@contextlib.contextmanager
def _evosax_conventions():
    """evosax's own conventions while tracing its code: implicit rank promotion ([D] against
    [P, D]) and optax's deprecation of ``global_norm`` (used by evosax's ClipUp)."""
    with jax.numpy_rank_promotion("allow"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "optax.global_norm is deprecated", DeprecationWarning)
        yield


def _strong(tree):
    """Drop weak types so that init/tell outputs and restored states share one jit signature."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), tree)


def _positive(name: str, value: Any, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"option {name!r} must be a number, got {value!r}")
    value = float(value)
    if not (np.isfinite(value) and value > 0 and (upper is None or value <= upper)):
        bound = f"in (0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"option {name!r} must be {bound}, got {value!r}")
    return value


def _nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"option {name!r} must be a number, got {value!r}")
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"option {name!r} must be >= 0, got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"option {name!r} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class EvosaxStrategy:
    """An evosax distribution-based algorithm behind the `Strategy` contract.

    Build with `make_strategy` (or `EvosaxStrategy.create`). ``options`` per name:

    * all but cma_es/sep_cma_es: ``optimizer`` (sgd | adam | clipup), ``learning_rate``,
      ``learning_rate_decay`` (per generation, default 1) and ``learning_rate_limit`` (floor),
      ``momentum`` (sgd/clipup), ``max_velocity`` (clipup). Defaults are evosax's: open_es sgd
      1e-3, pgpe clipup 0.01 (max_velocity 0.02), snes/xnes sgd 1.0, persistent_es /
      noise_reuse_es adam 1e-3.
    * open_es, pgpe, persistent_es, noise_reuse_es: ``fitness_shaping``.
    * open_es, persistent_es, noise_reuse_es: ``sigma_decay`` (per generation, default 1) and
      ``sigma_limit`` (floor, default 0); open_es: ``use_antithetic_sampling`` (default True).
    * cma_es, sep_cma_es: ``std_min``, ``std_max``. pgpe: ``std_lr``, ``std_max_change``.
      snes, xnes: ``std_lr``.
    * persistent_es, noise_reuse_es: ``unroll_length`` (inner steps of a whole unroll, default
      100) and ``truncation_length`` (inner steps per generation, default 10).
    """

    name: str
    num_dims: int
    num_candidates: int
    options: tuple[tuple[str, Any], ...] = ()
    _algorithm: Any = field(init=False, repr=False, compare=False)
    _params: Any = field(init=False, repr=False, compare=False)
    _spec: _AlgorithmSpec = field(init=False, repr=False, compare=False)
    _sigma_decay: float = field(init=False, repr=False, compare=False)
    _sigma_limit: float = field(init=False, repr=False, compare=False)
    _jit_init: Callable = field(init=False, repr=False, compare=False)
    _jit_ask: Callable = field(init=False, repr=False, compare=False)
    _jit_tell: Callable = field(init=False, repr=False, compare=False)

    @classmethod
    def create(
        cls,
        name: str,
        num_dims: int,
        population_size: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> EvosaxStrategy:
        if name not in _SPECS:
            raise ValueError(f"unknown evosax strategy {name!r}; known: {', '.join(_SPECS)}")
        spec = _SPECS[name]
        if population_size is None:
            population_size = default_population_size(num_dims, even=spec.antithetic)
        return cls(name, num_dims, population_size, tuple(sorted(dict(options or {}).items())))

    def __post_init__(self):
        spec = _SPECS.get(self.name)
        if spec is None:
            raise ValueError(f"unknown evosax strategy {self.name!r}; known: {', '.join(_SPECS)}")
        options = dict(self.options)
        check_options(self.name, options, _allowed_options(spec))
        if spec.antithetic and self.num_candidates % 2:
            raise ValueError(
                f"population_size must be even for {self.name!r} (antithetic pairs), "
                f"got {self.num_candidates}"
            )
        kwargs: dict[str, Any] = {}
        if spec.optimizer is not None:
            kwargs["optimizer"] = _make_optimizer(spec.optimizer, options)
        if spec.fitness_shaping is not None:
            shaping_name = options.get("fitness_shaping", spec.fitness_shaping)
            if shaping_name not in _FITNESS_SHAPING:
                raise ValueError(
                    f"option 'fitness_shaping' must be one of {sorted(_FITNESS_SHAPING)}, "
                    f"got {shaping_name!r}"
                )
            kwargs["fitness_shaping_fn"] = _FITNESS_SHAPING[shaping_name]
        if "use_antithetic_sampling" in options:
            if not isinstance(options["use_antithetic_sampling"], bool):
                raise ValueError("option 'use_antithetic_sampling' must be a bool")
            kwargs["use_antithetic_sampling"] = options["use_antithetic_sampling"]
        solution = jnp.zeros((self.num_dims,))
        algorithm = spec.algorithm(self.num_candidates, solution, **kwargs)
        params = _make_params(self.name, algorithm.default_params, options)
        set_ = object.__setattr__
        set_(self, "_spec", spec)
        set_(self, "_algorithm", algorithm)
        set_(self, "_params", params)
        set_(self, "_sigma_decay", _positive("sigma_decay", options.get("sigma_decay", 1.0), 1.0))
        set_(self, "_sigma_limit", _nonnegative("sigma_limit", options.get("sigma_limit", 0.0)))
        set_(self, "_jit_init", jax.jit(self.init_fn))
        set_(self, "_jit_ask", jax.jit(self.ask_fn))
        set_(self, "_jit_tell", jax.jit(self.tell_fn))

    # ----------------------------------------------------------------- pure JAX functions
    def init_fn(self, key: jax.Array, mean: jax.Array, sigma: jax.Array | float) -> EvosaxState:
        """Pure: the initial state around ``mean`` [D] with step size ``sigma``."""
        dtype = jnp.result_type(float)
        mean = jnp.asarray(mean, dtype=dtype)
        sigma = jnp.asarray(sigma, dtype=dtype)
        params = self._params
        if self._spec.sigma_in == "params":
            params = params.replace(std_init=sigma)
        with _evosax_conventions():
            inner = self._algorithm.init(key, mean, params)
        if self._spec.sigma_in == "schedule":
            inner = inner.replace(std=sigma)
        if self.name == "xnes":
            # evosax initializes B = std_init * I, so samples would have scale std_init**2;
            # xNES factors A = sigma * B with det(B) = 1 (Wierstra et al. 2014, Alg. 5).
            inner = inner.replace(B=jnp.eye(self.num_dims, dtype=dtype))
        return _strong(EvosaxState(inner=inner, sigma_init=sigma))

    def ask_fn(self, key: jax.Array, state: EvosaxState) -> tuple[jax.Array, EvosaxState]:
        """Pure: the population [P, D] and the state to pass to `tell_fn`."""
        with _evosax_conventions():
            population, inner = self._algorithm.ask(key, state.inner, self._params)
        return population, _strong(state.replace(inner=inner))

    def tell_fn(
        self, key: jax.Array, population: jax.Array, fitness: jax.Array, state: EvosaxState
    ) -> EvosaxState:
        """Pure: update with the fitness [P] (minimized) of ``population`` [P, D]."""
        dtype = state.inner.mean.dtype
        population = jnp.asarray(population, dtype=dtype)
        fitness = jnp.asarray(fitness, dtype=dtype)
        nan = jnp.isnan(fitness)
        worst = jnp.max(jnp.where(nan, -jnp.inf, fitness))
        fitness = jnp.where(nan & ~jnp.all(nan), worst, fitness)
        with _evosax_conventions():
            inner, _ = self._algorithm.tell(key, population, fitness, state.inner, self._params)
        if self._spec.sigma_in == "schedule":
            std = state.sigma_init * self._sigma_decay ** inner.generation_counter.astype(dtype)
            inner = inner.replace(std=jnp.maximum(std, self._sigma_limit))
        return _strong(state.replace(inner=inner))

    # ----------------------------------------------------------------- Strategy contract
    def init(self, key, mean: np.ndarray, sigma: float) -> EvosaxState:
        mean = np.asarray(mean)
        if mean.shape != (self.num_dims,):
            raise ValueError(f"mean must have shape ({self.num_dims},), got {mean.shape}")
        sigma = _positive("sigma", sigma)
        return self._jit_init(key, mean, sigma)

    def ask(self, key, state: EvosaxState) -> tuple[np.ndarray, EvosaxState]:
        population, state = self._jit_ask(key, state)
        return np.array(population), state

    def tell(self, key, population, fitness, state: EvosaxState) -> EvosaxState:
        dtype = state.inner.mean.dtype
        population = np.asarray(population, dtype=dtype)
        fitness = np.asarray(fitness, dtype=dtype)
        if population.shape != (self.num_candidates, self.num_dims):
            raise ValueError(
                f"population must have shape ({self.num_candidates}, {self.num_dims}), "
                f"got {population.shape}"
            )
        if fitness.shape != (self.num_candidates,):
            raise ValueError(f"fitness must have shape ({self.num_candidates},), got {fitness.shape}")
        return self._jit_tell(key, population, fitness, state)

    def mean(self, state: EvosaxState) -> np.ndarray:
        return np.array(state.inner.mean)

    def population_size(self, state: EvosaxState | None = None) -> int:
        return self.num_candidates

    def stop(self, state: EvosaxState) -> dict[str, Any]:
        """evosax has no termination criteria; only a non-finite mean is reported."""
        if not np.all(np.isfinite(np.asarray(state.inner.mean))):
            return {"non_finite_mean": True}
        return {}

    def info(self, state: EvosaxState) -> dict[str, float]:
        inner = state.inner
        return {
            "sigma": float(np.mean(np.asarray(inner.std))),
            "generation": int(inner.generation_counter),
            "best_fitness": float(inner.best_fitness),
            "population_size": self.num_candidates,
        }

    def unroll_start(self, state: EvosaxState) -> int:
        """PES / NRES: inner step at which the next partial unroll starts (0: restart inner problems)."""
        if self._spec.sigma_in != "schedule" or not hasattr(state.inner, "inner_step_counter"):
            raise ValueError(f"strategy {self.name!r} is not truncation-aware")
        return int(state.inner.inner_step_counter)

    def _header(self) -> dict[str, Any]:
        return {
            "format": "evosax-flax",
            "strategy": self.name,
            "num_dims": self.num_dims,
            "population_size": self.num_candidates,
        }

    def state_to_bytes(self, state: EvosaxState) -> bytes:
        return pack_state(self._header(), serialization.to_bytes(state))

    def state_from_bytes(self, data: bytes) -> EvosaxState:
        payload = unpack_state(data, self._header())
        template = self._jit_init(jax.random.key(0), np.zeros(self.num_dims), 1.0)
        try:
            restored = serialization.from_bytes(template, payload)
        except Exception as err:  # msgpack / structure errors from flax
            raise ValueError(f"cannot restore {self.name!r} state: {err}") from None

        def cast(t, x):
            x = np.asarray(x)
            if x.shape != t.shape:
                raise ValueError(f"restored {self.name!r} state has a leaf of shape {x.shape}, "
                                 f"expected {t.shape}")
            return jnp.asarray(x, dtype=t.dtype)

        return jax.tree.map(cast, template, restored)


def _make_optimizer(default: tuple[str, float], options: Mapping[str, Any]):
    kind = options.get("optimizer", default[0])
    if kind not in _OPTIMIZERS:
        raise ValueError(f"option 'optimizer' must be one of {list(_OPTIMIZERS)}, got {kind!r}")
    default_lr = default[1] if kind == default[0] else {"sgd": 1e-3, "adam": 1e-3, "clipup": 0.01}[kind]
    learning_rate = _positive("learning_rate", options.get("learning_rate", default_lr))
    decay = _positive("learning_rate_decay", options.get("learning_rate_decay", 1.0), 1.0)
    limit = _nonnegative("learning_rate_limit", options.get("learning_rate_limit", 0.0))
    if "max_velocity" in options and kind != "clipup":
        raise ValueError("option 'max_velocity' applies only to optimizer 'clipup'")
    if "momentum" in options and kind == "adam":
        raise ValueError("option 'momentum' does not apply to optimizer 'adam'")
    schedule = learning_rate
    if decay != 1.0:
        def schedule(count):  # per-generation exponential decay with a floor
            return jnp.maximum(learning_rate * decay ** count.astype(jnp.result_type(float)), limit)

    if kind == "sgd":
        momentum = options.get("momentum")
        if momentum is not None:
            momentum = _positive("momentum", momentum, 1.0)
        return optax.sgd(schedule, momentum=momentum)
    if kind == "adam":
        return optax.adam(schedule)
    max_velocity = _positive("max_velocity", options.get("max_velocity", 2 * learning_rate))
    momentum = _positive("momentum", options.get("momentum", 0.9), 1.0)
    if decay == 1.0:
        return clipup(learning_rate=learning_rate, max_velocity=max_velocity, momentum=momentum)
    # evosax's clipup with a scheduled learning rate: the velocity bound decays with it.
    return optax.chain(
        optax.normalize_by_update_norm(eps=1e-8),
        scale_by_clipup(max_velocity_ratio=max_velocity / learning_rate, momentum=momentum),
        optax.scale_by_learning_rate(schedule),
    )


def _make_params(name: str, params, options: Mapping[str, Any]):
    """Apply the options that live in evosax's ``Params``."""
    if "std_min" in options:
        params = params.replace(std_min=_nonnegative("std_min", options["std_min"]))
    if "std_max" in options:
        params = params.replace(std_max=_positive("std_max", options["std_max"]))
    if "std_lr" in options:
        std_lr = _positive("std_lr", options["std_lr"])
        if name == "pgpe":
            params = params.replace(std_lr=std_lr)
        else:  # snes / xnes
            params = params.replace(lr_std_init=jnp.asarray(std_lr))
    if "std_max_change" in options:
        params = params.replace(std_max_change=_positive("std_max_change", options["std_max_change"], 1.0))
    if "unroll_length" in options or "truncation_length" in options:
        unroll = _positive_int("unroll_length", options.get("unroll_length", params.T))
        truncation = _positive_int("truncation_length", options.get("truncation_length", params.K))
        if unroll % truncation:
            raise ValueError(
                f"option 'unroll_length' ({unroll}) must be a multiple of "
                f"'truncation_length' ({truncation})"
            )
        params = params.replace(T=unroll, K=truncation)
    return params
