"""The search: configs, the generation loop (`Run`), strategies (pycma, evosax), gradient-based outer loops,
comparisons, held-out reports, checkpoints and run directories, and the ``blur`` CLI.

Names are re-exported lazily (PEP 562), so ``import evolution`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Config": "evolution.config", "ConfigError": "evolution.config", "load_config": "evolution.config",
    "config_from_dict": "evolution.config", "dump_config": "evolution.config",
    "Run": "evolution.run", "local_evaluator": "evolution.run", "num_steps_at": "evolution.run",
    "STRATEGIES": "evolution.strategies", "Strategy": "evolution.strategies", "make_strategy": "evolution.strategies",
    "CheckpointError": "evolution.checkpoint", "load_checkpoint": "evolution.checkpoint",
    "compare_on_heldout": "workers.report",
    "estimate": "evolution.resources", "check_run_config": "evolution.resources",
    "main": "evolution.cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evolution' has no attribute {name!r}")
