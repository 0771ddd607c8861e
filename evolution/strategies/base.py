"""The strategy contract: one ask/tell interface over pycma and evosax.

A strategy object is immutable configuration (dimension, population size, options). Everything
that changes during a run lives in an explicit state value that `init`, `ask` and `tell` take and
return; the input state is never modified. All stochastic functions take a JAX PRNG key first and
are pure functions of ``(key, state, arguments)``, so a run resumed from
``state_from_bytes(state_to_bytes(state))`` produces bit-identical populations to one that never
stopped, provided the caller derives per-generation keys deterministically (``fold_in``).

Fitness is always MINIMIZED. Populations are NumPy arrays ``[P, D]``; ``P`` may change between
generations (pycma's IPOP/BIPOP restarts, noise-handling re-evaluations), so ask
`population_size(state)` for the number of rows the next `ask` will return.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "STRATEGIES",
    "Strategy",
    "make_strategy",
    "pack_state",
    "unpack_state",
]

StrategyState = Any  # each adapter defines its own state type

# Name -> one-line description. The adapter that builds each name is chosen in `make_strategy`.
PYCMA_STRATEGIES: dict[str, str] = {
    "pycma": (
        "CMA-ES from pycma (cma.CMAEvolutionStrategy); pycma options pass through; "
        "IPOP (restarts=n) and BIPOP (restarts=n, bipop=True) restarts; noise_handler option"
    ),
}
EVOSAX_STRATEGIES: dict[str, str] = {
    "cma_es": "evosax CMA_ES: full-covariance CMA-ES in JAX (usable inside lax.scan)",
    "sep_cma_es": "evosax Sep_CMA_ES: diagonal-covariance CMA-ES, linear cost in dimension",
    "open_es": "evosax Open_ES: OpenAI-ES, antithetic Gaussian gradient estimate + optax optimizer",
    "pgpe": "evosax PGPE: symmetric sampling with per-coordinate std adaptation, ClipUp",
    "snes": "evosax SNES: separable natural evolution strategy",
    "xnes": "evosax xNES: exponential natural evolution strategy (full covariance)",
    "persistent_es": (
        "evosax PersistentES: unbiased ES for truncated unrolls; needs per-candidate inner state "
        "carried across generations (see unroll_start)"
    ),
    "noise_reuse_es": (
        "evosax NoiseReuseES: reuses each candidate's perturbation over a whole unroll; needs "
        "per-candidate inner state carried across generations (see unroll_start)"
    ),
}
STRATEGIES: dict[str, str] = {**PYCMA_STRATEGIES, **EVOSAX_STRATEGIES}

_STATE_MAGIC = b"BLURSTRAT1\n"


@runtime_checkable
class Strategy(Protocol):
    """What every strategy adapter provides. Minimization everywhere."""

    name: str
    num_dims: int

    def init(self, key, mean: np.ndarray, sigma: float) -> StrategyState:
        """Start a search around ``mean`` [D] with initial step size ``sigma``."""
        ...

    def ask(self, key, state: StrategyState) -> tuple[np.ndarray, StrategyState]:
        """Sample ``population_size(state)`` candidates: ``([P, D] array, new state)``."""
        ...

    def tell(
        self, key, population: np.ndarray, fitness: np.ndarray, state: StrategyState
    ) -> StrategyState:
        """Update with the fitness [P] (lower is better) of the population returned by `ask`."""
        ...

    def mean(self, state: StrategyState) -> np.ndarray:
        """The distribution mean (the incumbent centre) [D]."""
        ...

    def population_size(self, state: StrategyState) -> int:
        """Number of rows the next `ask` returns."""
        ...

    def stop(self, state: StrategyState) -> dict[str, Any]:
        """Terminal stop conditions met (empty while the search should go on)."""
        ...

    def info(self, state: StrategyState) -> dict[str, float]:
        """Scalar diagnostics for logging (step size, generation, restarts, ...)."""
        ...

    def state_to_bytes(self, state: StrategyState) -> bytes: ...

    def state_from_bytes(self, data: bytes) -> StrategyState: ...


def make_strategy(
    name: str,
    num_dims: int,
    population_size: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> Strategy:
    """Build the strategy registered as ``name`` (see `STRATEGIES`).

    ``population_size=None`` takes the strategy's default (``4 + floor(3 ln D)``, rounded up to
    even for antithetic samplers). ``options`` are strategy-specific; an unknown name or option
    raises ValueError naming it.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    if not isinstance(num_dims, (int, np.integer)) or isinstance(num_dims, bool) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    if population_size is not None and (
        not isinstance(population_size, (int, np.integer))
        or isinstance(population_size, bool)
        or population_size < 2
    ):
        raise ValueError(f"population_size must be an integer >= 2, got {population_size!r}")
    options = dict(options or {})
    for key in options:
        if not isinstance(key, str):
            raise ValueError(f"option names must be strings, got {key!r}")
    population_size = None if population_size is None else int(population_size)
    # Imported here: the adapters import this module for the contract and helpers.
    if name in PYCMA_STRATEGIES:
        from .pycma import PycmaStrategy

        return PycmaStrategy.create(int(num_dims), population_size, options)
    from .evosax import EvosaxStrategy

    return EvosaxStrategy.create(name, int(num_dims), population_size, options)


def default_population_size(num_dims: int, even: bool = False) -> int:
    """CMA-ES's default ``4 + floor(3 ln D)`` (Hansen 2016, eq. 48), optionally rounded up to even."""
    size = 4 + int(3 * np.log(num_dims))
    return size + (size % 2) if even else size


def pack_state(header: Mapping[str, Any], payload: bytes) -> bytes:
    """Prefix a serialized state with a small JSON header identifying the strategy."""
    head = json.dumps(dict(header), sort_keys=True).encode()
    return _STATE_MAGIC + len(head).to_bytes(4, "little") + head + payload


def unpack_state(data: bytes, expected: Mapping[str, Any]) -> bytes:
    """Check the header written by `pack_state` against ``expected``; return the payload.

    Raises ValueError when the data is not a strategy state or belongs to another configuration,
    before anything in the payload is decoded.
    """
    data = bytes(data)
    if not data.startswith(_STATE_MAGIC) or len(data) < len(_STATE_MAGIC) + 4:
        raise ValueError("not a serialized strategy state (bad magic)")
    start = len(_STATE_MAGIC)
    head_len = int.from_bytes(data[start : start + 4], "little")
    head_bytes = data[start + 4 : start + 4 + head_len]
    if len(head_bytes) != head_len:
        raise ValueError("truncated strategy state header")
    try:
        header = json.loads(head_bytes)
    except ValueError as err:
        raise ValueError(f"corrupt strategy state header: {err}") from None
    for key, value in expected.items():
        if header.get(key) != value:
            raise ValueError(
                f"strategy state mismatch for {key!r}: stored {header.get(key)!r}, expected {value!r}"
            )
    return data[start + 4 + head_len :]


def check_options(
    name: str, options: Mapping[str, Any], allowed: Mapping[str, Any], known: str | None = None
) -> None:
    """Raise ValueError naming the first option of ``options`` not in ``allowed``."""
    for key in options:
        if key not in allowed:
            known = known or ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"unknown option {key!r} for strategy {name!r}; known: {known}")
