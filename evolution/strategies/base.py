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
    "Strategy",
    "check_options",
    "default_population_size",
    "pack_state",
    "unpack_state",
]

StrategyState = Any  # each adapter defines its own state type

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
