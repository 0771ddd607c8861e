"""Meta-training across settings: a run's ``settings:`` list and how its fitness matrix is reduced.

A *setting* is a task family (dataset, N-way, resize, augmentation: overrides of the ``task:`` section) × a
network shape (``hidden_sizes``) × a horizon (``num_steps``), with a positive ``weight``. One genome serves
every setting: the genome is shared by all layers and widths, so only per-layer genomes tie it to a depth.

Each generation evaluates the population on one common task batch per setting (the batch of setting ``s``
comes from ``fold_in(task_key, s)``), reduces each setting's ``[P, K]`` fitness over tasks with the
episode's aggregator, and combines the settings' ``[S, P]`` matrix with :func:`combine`:

* ``chance`` (default): each setting's fitness divided by its chance level (cross-entropy ``log n``,
  error rate ``1 - 1/n``), then the weighted mean. Settings with more classes have larger losses;
  dividing by chance puts "as good as guessing" at 1 everywhere while keeping the margins (an ES that
  uses fitness values, not only ranks, still sees how much better a genome is).
* ``rank``: per setting, ranks over the population scaled to [0, 1] (ties averaged), then the weighted
  mean: invariant to any monotone rescaling of a setting, but it drops the margins. Validation always
  uses ``chance`` (ranks of two candidates cannot be compared across generations).
* ``none``: the weighted mean of the raw values.

Fitness relative to a tuned-SGD score per setting is not offered: it would tune SGD on every setting before
the run (minutes per setting) to divide by a constant, which changes nothing for rank-based strategies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

NORMALIZATIONS = ("chance", "rank", "none")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Setting:
    """One resolved setting: everything an evaluator needs, as data."""

    name: str
    weight: float
    task: Any  # workers.tasks.TaskConfig
    hidden_sizes: tuple[int, ...]
    num_steps: int


def default_name(task, hidden_sizes: Sequence[int], num_steps: int) -> str:
    return f"{task.family}-{task.resolved_n_way}way-{'x'.join(str(h) for h in hidden_sizes)}-T{num_steps}"


def valid_name(name: str) -> bool:
    """Setting names appear in metric keys (``val_accuracy/NAME``): 1-64 letters, digits, '_', '.', '-'."""
    return bool(_NAME.match(name))


def chance_fitness(fitness: str, n_way: int) -> float:
    """The fitness of guessing uniformly among ``n_way`` classes (lower is better)."""
    return math.log(n_way) if fitness == "cross_entropy" else 1.0 - 1.0 / n_way


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks of ``values [P]`` scaled to [0, 1] (0: lowest), ties sharing their mean rank."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    rank = np.empty(len(values))
    rank[order] = np.arange(len(values))
    for value in np.unique(values):  # ties
        tied = values == value
        if tied.sum() > 1:
            rank[tied] = rank[tied].mean()
    return rank / max(len(values) - 1, 1)


def combine(per_setting: np.ndarray, weights: Sequence[float], normalization: str,
            chance: Sequence[float]) -> np.ndarray:
    """Reduce ``per_setting [S, P]`` (each row one setting's fitness, already aggregated over its tasks) to
    ``[P]``: normalize each row (``chance`` / ``rank`` / ``none``), then the ``weights``-weighted mean."""
    per_setting = np.asarray(per_setting, np.float64)
    if normalization == "chance":
        rows = per_setting / np.asarray(chance, np.float64)[:, None]
    elif normalization == "rank":
        rows = np.stack([ranks(row) for row in per_setting])
    elif normalization == "none":
        rows = per_setting
    else:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}; got {normalization!r}")
    w = np.asarray(weights, np.float64)
    return (w[:, None] * rows).sum(axis=0) / w.sum()


def choose(key_bytes: bytes, num_settings: int, count: int | None) -> list[int]:
    """The settings a generation evaluates: all, or ``count`` of them uniformly without replacement, drawn
    from ``key_bytes`` (the generation's task key), sorted."""
    if count is None or count >= num_settings:
        return list(range(num_settings))
    rng = np.random.default_rng(np.frombuffer(key_bytes, np.uint32))
    return sorted(int(i) for i in rng.choice(num_settings, size=count, replace=False))


def heldout_overlap(train_settings: Sequence[Setting], heldout: Setting, families: dict) -> str | None:
    """Why ``heldout``'s test split overlaps what the training settings meta-train on (same dataset and
    classes, or the same toy functions), or None. ``families[(task_config, split)]`` are built families."""
    test = families[(heldout.task, "test")]
    for setting in train_settings:
        if setting.task.family != heldout.task.family:
            continue
        train = families[(setting.task, "train")]
        if test.functions or train.functions:
            common = sorted(set(test.functions) & set(train.functions))
            if common:
                return f"its test functions {common} are meta-training functions of setting {setting.name!r}"
        elif test.seed_range is None:
            common = sorted(set(test.classes) & set(train.classes))
            if common:
                return f"its test classes {common} are meta-training classes of setting {setting.name!r}"
    return None
