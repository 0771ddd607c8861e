"""Atomic files of a run directory: checkpoints, JSON/YAML files and the metrics log.

A checkpoint is one safetensors file (``checkpoint.ckpt``): the strategy state as a uint8 array, the best
genome vector, and in the header the run counters, the run id, the run's config identity (the config keys
that fix the search trajectory, see :func:`config_identity`), a SHA-256 checksum over all of it and, when
the run has a signing key (:mod:`evolution.rundir`), an HMAC-SHA256 signature of that checksum. It is
written to a temporary file in the same directory, fsynced, then renamed over the previous one, so a
process killed at any moment leaves either the old or the new checkpoint, never a torn one.

pycma's strategy state is a pickle (pycma's own format). ``blur resume`` unpickles it only when the
signature verifies with the run's key from the user's key store; a checkpoint that is unsigned, altered or
from a run directory made elsewhere is refused before a byte of it is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from genome.errors import UserError
from genome.io import WriteError, atomic_write_bytes, failpoint

CHECKPOINT_NAME = "checkpoint.ckpt"
CHECKPOINT_FORMAT = "blur-evolve-checkpoint-2"
# config keys a user may change before `blur resume` (stop criteria, checkpoint cadence, where evaluation
# runs, the final report); every other key fixes the trajectory and must match the checkpoint
RESUME_EDITABLE = ("run.generations", "run.max_evaluations", "run.max_wall_time", "run.target_fitness",
                   "run.checkpoint_every", "evaluator", "report", "tracking")
#: keys under RESUME_EDITABLE that still belong to the identity: they change the numbers a run computes
RESUME_FIXED = ("evaluator.backend",)


class CheckpointError(UserError):
    """A run directory has no usable checkpoint."""


class Checkpoint(NamedTuple):
    counters: dict[str, Any]
    strategy_state: bytes
    best_vector: np.ndarray | None
    run_id: str
    config: dict[str, Any] | None  # the config identity it was written under
    checksum: str
    signature: str | None
    extra: dict[str, np.ndarray]  # further arrays (the inner state of truncation-aware strategies)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def config_identity(config) -> dict[str, Any]:
    """The flattened config minus :data:`RESUME_EDITABLE`: what a checkpoint must be resumed under."""
    from evolution.config import config_to_dict

    flat: dict[str, Any] = {}

    def walk(value, prefix):
        if isinstance(value, dict) and not prefix.endswith("options"):
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = value

    walk(config_to_dict(config) if dataclasses.is_dataclass(config) else config, "")
    return {k: v for k, v in sorted(flat.items())
            if k in RESUME_FIXED or not any(k == e or k.startswith(e + ".") for e in RESUME_EDITABLE)}


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ. A key the stored identity lacks (a setting added by a later release) counts
    only if its current value is not that setting's default: a run checkpointed by an earlier release
    resumes under the options it was written with."""
    from evolution.config import Config

    defaults = config_identity(Config())
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731
    keys = sorted(set(stored) | set(current))
    return [k for k in keys
            if not (same(stored.get(k), current.get(k)) or (k not in stored and k in defaults
                                                              and same(current.get(k), defaults[k])))]


def _checksum(meta: dict[str, str], arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def sign(key: bytes, digest: str) -> str:
    """HMAC-SHA256 of a checkpoint checksum with a run's key."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def verify(key: bytes | None, digest: str, signature: str | None) -> bool:
    """Whether ``signature`` is the run key's signature of ``digest`` (constant-time comparison)."""
    return key is not None and signature is not None and hmac.compare_digest(sign(key, digest), signature)


def save_checkpoint(run_dir: Path, counters: dict[str, Any], strategy_state: bytes,
                    best_vector: np.ndarray | None, *, run_id: str = "", config: dict[str, Any] | None = None,
                    key: bytes | None = None, extra: dict[str, np.ndarray] | None = None) -> Path:
    from safetensors.numpy import save as save_bytes

    arrays = {"strategy_state": np.frombuffer(strategy_state, dtype=np.uint8).copy()}
    if best_vector is not None:
        arrays["best_vector"] = np.asarray(best_vector, np.float32)
    for name, array in (extra or {}).items():
        arrays[f"extra/{name}"] = np.ascontiguousarray(array)
    meta = {"format": CHECKPOINT_FORMAT, "counters": json.dumps(counters, sort_keys=True), "run_id": run_id,
            "config": json.dumps(config, sort_keys=True)}
    checksum = _checksum(meta, arrays)
    header = {**meta, "checksum": checksum}
    if key is not None:
        header["signature"] = sign(key, checksum)
    return atomic_write_bytes(Path(run_dir) / CHECKPOINT_NAME, save_bytes(arrays, metadata=header))


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read and integrity-check ``RUN/checkpoint.ckpt`` (format, checksum); nothing is unpickled here."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_bytes

    path = Path(run_dir) / CHECKPOINT_NAME
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint ({CHECKPOINT_NAME}) to resume from")
    try:
        raw = path.read_bytes()
        arrays = load_bytes(raw)
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8: 8 + size].decode("utf-8")).get("__metadata__") or {}
        if not isinstance(header, dict):
            raise ValueError("header metadata is not an object")
        if header.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a blur-evolve checkpoint of this version "
                                  f"(format {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
        meta = {name: header[name] for name in ("format", "counters", "run_id", "config")}
        if _checksum(meta, arrays) != header.get("checksum"):
            raise CheckpointError(f"{path}: checksum mismatch (the checkpoint is corrupt or was altered)")
        counters = json.loads(header["counters"])
        config = json.loads(header["config"])
        if not isinstance(counters, dict) or not (config is None or isinstance(config, dict)):
            raise ValueError("counters/config are not objects")
        if "strategy_state" not in arrays or arrays["strategy_state"].dtype != np.uint8:
            raise ValueError("no strategy_state array")
    except (SafetensorError, KeyError, ValueError, TypeError, OSError, UnicodeDecodeError) as error:
        if isinstance(error, CheckpointError):
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from None
    extra = {name[len("extra/"):]: array for name, array in arrays.items() if name.startswith("extra/")}
    return Checkpoint(counters, arrays["strategy_state"].tobytes(), arrays.get("best_vector"), header["run_id"],
                      config, header["checksum"], header.get("signature"), extra)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per generation, appended and fsynced line by line.

    A last line torn by a crash (no newline, or not JSON) is dropped on resume; a bad line anywhere else is
    an error that leaves the file as it is. Appends never follow a symlink.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{self.path}: unreadable ({error})") from None
        lines = text.split("\n")
        complete, torn = lines[:-1], lines[-1]  # torn: text after the last newline (a write cut short)
        rows = []
        for number, line in enumerate(complete, 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("generation"), int):
                    raise ValueError
            except ValueError:
                if number == len(complete) and not torn:  # the last line itself is torn
                    break
                raise CheckpointError(f"{self.path}: line {number} is not a metrics row; repair or remove it "
                                      "(the file was left unchanged)") from None
            rows.append(row)
        return rows

    def check(self, num_generations: int) -> list[dict[str, Any]]:
        """The rows of generations ``< num_generations``, checked to be exactly 0..num_generations-1."""
        rows = [row for row in self.read() if row["generation"] < num_generations]
        if [row["generation"] for row in rows] != list(range(num_generations)):
            have = [row["generation"] for row in rows][:12]
            raise CheckpointError(f"{self.path}: rows of generations {have}... do not match the checkpoint "
                                  f"(generations 0..{num_generations - 1}); the file was left unchanged")
        return rows

    def truncate_to(self, num_generations: int, rows: list[dict[str, Any]] | None = None) -> None:
        """Keep the rows of generations ``< num_generations`` (rows after the checkpoint are recomputed);
        ``rows``: what :meth:`check` returned for the same count, so the file is not read twice."""
        rows = self.check(num_generations) if rows is None else rows
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise WriteError(error.errno, f"cannot write {self.path}: {error.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                half = len(view) // 2
                while len(view) > half:
                    view = view[os.write(fd, view[: len(view) - half]):]
                failpoint(f"append:{self.path.name}")
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as error:
                try:
                    os.ftruncate(fd, size)  # no partial line left behind
                except OSError:
                    pass
                raise WriteError(error.errno, f"cannot write {self.path}: {error.strerror}") from None
        finally:
            os.close(fd)
