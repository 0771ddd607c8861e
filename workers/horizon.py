"""The unroll-length curriculum, shared by the ES run loop and the gradient outer loops.

One definition, so that `blur evolve`, `blur compare` and the Python API give the same horizon for the same
curriculum settings at the same outer step (a generation of ES, a meta-step of a gradient loop).
"""

from __future__ import annotations


def horizon(base: int, index: int, every: int = 0, increment: int = 0, max_steps: int | None = None) -> int:
    """Inner steps T at outer step ``index``: ``base + increment * (index // every)`` (``every = 0``: no
    curriculum), capped at ``max_steps``. The curriculum never cuts below ``base``: a cap below the base
    leaves T at the base (the config layer refuses such a cap with a message)."""
    steps = base
    if every > 0:
        steps += increment * (index // every)
        if max_steps is not None:
            steps = min(steps, max(max_steps, base))
    return steps
