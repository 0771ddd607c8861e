"""Evolution strategies behind one ask/tell contract (see `base.Strategy`).

``make_strategy(name, num_dims, population_size, options)`` builds any name in `STRATEGIES`:
pycma CMA-ES with IPOP/BIPOP restarts and noise handling (`PycmaStrategy`), and evosax's
CMA-ES, Sep-CMA-ES, OpenES, PGPE, SNES, xNES, PersistentES and NoiseReuseES (`EvosaxStrategy`,
whose pure ``init_fn / ask_fn / tell_fn`` also run inside ``jax.lax.scan``). The registry lives here;
each adapter owns its table of names; `base` holds only the contract and helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import Strategy
from .names import EVOSAX_STRATEGIES, PYCMA_STRATEGIES

STRATEGIES: dict[str, str] = {**PYCMA_STRATEGIES, **EVOSAX_STRATEGIES}

__all__ = [
    "EVOSAX_STRATEGIES",
    "PYCMA_STRATEGIES",
    "STRATEGIES",
    "EvosaxState",
    "EvosaxStrategy",
    "PycmaState",
    "PycmaStrategy",
    "Strategy",
    "make_strategy",
]


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
    if name in PYCMA_STRATEGIES:
        from .pycma import PycmaStrategy

        return PycmaStrategy.create(int(num_dims), population_size, options)
    from .evosax import EvosaxStrategy

    return EvosaxStrategy.create(name, int(num_dims), population_size, options)


_ADAPTERS = {"EvosaxState": "evosax", "EvosaxStrategy": "evosax", "PycmaState": "pycma", "PycmaStrategy": "pycma"}


def __getattr__(name: str) -> Any:
    """The adapters' classes, imported on first use (each adapter imports its backend library)."""
    if name in _ADAPTERS:
        import importlib

        return getattr(importlib.import_module(f".{_ADAPTERS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
