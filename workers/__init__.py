"""Where genomes are scored: the vectorized engine, task families, datasets, evaluators (in-process and Ray),
tuned baselines, the horizon curriculum and the benchmark.

Names are re-exported lazily (PEP 562), so ``import workers`` stays cheap and never imports Ray or torch;
``workers.ray`` and ``workers.bench`` are imported explicitly by what needs them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EpisodeConfig": "workers.engine", "EpisodeResult": "workers.engine", "evaluate": "workers.engine",
    "episode": "workers.engine", "aggregate_fitness": "workers.engine", "query_scores": "workers.engine",
    "canonical_flops": "workers.engine",
    "Scoring": "workers.unroll", "Horizon": "workers.unroll", "UnrollState": "workers.unroll",
    "init_unroll": "workers.unroll", "unroll": "workers.unroll", "score": "workers.unroll",
    "Evaluation": "workers.evaluator", "Evaluator": "workers.evaluator", "LocalEvaluator": "workers.evaluator",
    "synapse_keys": "workers.evaluator",
    "FAMILIES": "workers.tasks", "TaskConfig": "workers.tasks", "TaskFamily": "workers.tasks",
    "make_family": "workers.tasks",
    "Task": "workers.task_types",
    "DatasetError": "workers.datasets",
    "horizon": "workers.horizon",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
