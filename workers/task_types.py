"""Array containers shared by task families, the evaluation engine and the baselines."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Task(NamedTuple):
    """One episode's data. A batch of tasks has one extra leading axis ``K`` on every field.

    support_x: [T, B, n_in] float32, the T inner-step mini-batches.
    support_y: [T, B] int32 labels in ``0..n_way-1``.
    query_x:   [Q, n_in] float32, held-out examples of the same task.
    query_y:   [Q] int32.
    """

    support_x: jax.Array
    support_y: jax.Array
    query_x: jax.Array
    query_y: jax.Array
