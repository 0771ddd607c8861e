"""Evolution strategies behind one ask/tell contract (see `base.Strategy`).

``make_strategy(name, num_dims, population_size, options)`` builds any name in `STRATEGIES`:
pycma CMA-ES with IPOP/BIPOP restarts and noise handling (`PycmaStrategy`), and evosax's
CMA-ES, Sep-CMA-ES, OpenES, PGPE, SNES, xNES, PersistentES and NoiseReuseES (`EvosaxStrategy`,
whose pure ``init_fn / ask_fn / tell_fn`` also run inside ``jax.lax.scan``).
"""

from .base import STRATEGIES, Strategy, make_strategy
from .evosax import EvosaxState, EvosaxStrategy
from .pycma import PycmaState, PycmaStrategy

__all__ = [
    "STRATEGIES",
    "EvosaxState",
    "EvosaxStrategy",
    "PycmaState",
    "PycmaStrategy",
    "Strategy",
    "make_strategy",
]
