"""Atomic files of a run directory: checkpoints, JSON/YAML files and the metrics log.

A checkpoint is one safetensors file (``checkpoint.ckpt``): the strategy state as a uint8 array, the best
genome vector, and the run counters as JSON in the header. It is written to a temporary file in the same
directory, fsynced, then renamed over the previous one, so a process killed at any moment leaves either the
old or the new checkpoint, never a torn one. The strategy state of pycma is a pickle (pycma's own format);
it is only ever read back from the run's own directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from genome.io import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.ckpt"
CHECKPOINT_FORMAT = "blur-evolve-checkpoint-1"


class CheckpointError(ValueError):
    """A run directory has no usable checkpoint."""


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(run_dir: Path, counters: dict[str, Any], strategy_state: bytes,
                    best_vector: np.ndarray | None) -> Path:
    from safetensors.numpy import save as save_bytes

    arrays = {"strategy_state": np.frombuffer(strategy_state, dtype=np.uint8).copy()}
    if best_vector is not None:
        arrays["best_vector"] = np.asarray(best_vector, np.float32)
    header = {"format": CHECKPOINT_FORMAT, "counters": json.dumps(counters, sort_keys=True)}
    return atomic_write_bytes(Path(run_dir) / CHECKPOINT_NAME, save_bytes(arrays, metadata=header))


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], bytes, np.ndarray | None]:
    from safetensors import SafetensorError, safe_open

    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint ({CHECKPOINT_NAME}) to resume from")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
        if header.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a blur-evolve checkpoint")
        counters = json.loads(header["counters"])
    except (SafetensorError, KeyError, ValueError, OSError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(error).splitlines()[0]})") from None
    return counters, arrays["strategy_state"].tobytes(), arrays.get("best_vector")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per generation, appended and fsynced line by line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill: drop it and everything after
                break
        return rows

    def truncate_to(self, num_generations: int) -> None:
        """Keep the rows of generations ``< num_generations`` (rows after the checkpoint are recomputed)."""
        rows = [row for row in self.read() if row["generation"] < num_generations]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
