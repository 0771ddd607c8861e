"""Genome files: safetensors arrays plus JSON metadata in the safetensors header. Nothing is unpickled.

Header metadata (all strings, as safetensors requires):
``format`` = ``blur-evolve-genome``, ``file_format_version``, ``parameterization_version`` (see
:mod:`genome.params`), ``spec`` (JSON of the NetworkSpec), ``metadata`` (JSON, free-form: fitness,
provenance, ...). Arrays: one per :class:`Genome` field, named after the field.

File format versions: 1 (no ``file_format_version`` entry) had no ``forward_*`` genome fields; 2 adds them
(the published code's forward-pass synapse genome). Version-1 files still load, the missing fields at
their neutral values (a version-1 spec cannot enable ``forward_synapse_update``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from genome.errors import UserError
from genome.params import FORWARD_SYNAPSE_FIELDS, PARAMETERIZATION_VERSION, Genome, neutral_genome
from genome.spec import NetworkSpec

FORMAT_NAME = "blur-evolve-genome"
FILE_FORMAT_VERSION = 2
_ADDED_IN_VERSION_2 = frozenset(FORWARD_SYNAPSE_FIELDS)


class GenomeFileError(UserError):
    """A genome file is missing, unreadable, foreign or of an unsupported version."""


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if hasattr(value, "tolist"):
        return np.asarray(value).tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serializable")


_FAILPOINT_HITS: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Fault injection for tests: ``BLUR_FAILPOINTS="write:checkpoint.ckpt:3:SIGKILL,report:1:SIGTERM"``
    sends the named signal to this process the 3rd time the point ``write:checkpoint.ckpt`` is passed (and
    so on). Points: ``write:<file>`` (inside an atomic write, after the data and before the rename),
    ``append:<file>`` (half-way through a metrics line), ``generation`` (after each generation), ``report``
    (the start of the held-out report). Unset (the normal case), a point costs one dictionary lookup."""
    spec = os.environ.get("BLUR_FAILPOINTS")
    if not spec:
        return
    import signal

    _FAILPOINT_HITS[name] = hits = _FAILPOINT_HITS.get(name, 0) + 1
    for entry in spec.split(","):
        point, _, rest = entry.strip().rpartition(":")
        where, _, count = point.rpartition(":")
        if where == name and count.isdigit() and int(count) == hits:
            os.kill(os.getpid(), getattr(signal, rest))


class WriteError(OSError):
    """A file could not be written (disk full, read-only, permissions); the message names the path."""


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_DEFAULT_MODE = _default_mode()  # what open() would create under this process's umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically: temporary file in the same directory, fsync, rename.
    ``mode``: the file's permissions (default: what ``open`` would give under the umask).

    A process killed at any moment leaves either the old file or the new one, never a torn one; a failed
    write (ENOSPC, EROFS, EACCES) leaves the old file and raises :class:`WriteError` naming ``path``. The
    rename replaces a symlink at ``path`` itself, never the file it points to.
    """
    path = Path(path)
    mode = _DEFAULT_MODE if mode is None else mode
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, mode)  # mkstemp creates 0600; run files get the same permissions as any other
    except OSError as error:
        raise WriteError(error.errno, f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        failpoint(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise WriteError(error.errno, f"cannot write {path}: {error.strerror}") from None
        raise
    return path


def save(path: str | os.PathLike, spec: NetworkSpec, genome: Genome, metadata: dict | None = None) -> Path:
    """Write ``genome`` atomically (temporary file in the same directory, then rename)."""
    from safetensors.numpy import save as save_bytes

    path = Path(path)
    tensors = {name: np.array(value, order="C") for name, value in genome._asdict().items()}
    header = {
        "format": FORMAT_NAME,
        "file_format_version": str(FILE_FORMAT_VERSION),
        "parameterization_version": str(PARAMETERIZATION_VERSION),
        "spec": json.dumps(spec.to_dict(), sort_keys=True),
        "metadata": json.dumps(metadata or {}, sort_keys=True, default=_json_default),
    }
    data = save_bytes(tensors, metadata=header)
    atomic_write_bytes(path, data)
    return path


def load(path: str | os.PathLike) -> tuple[NetworkSpec, Genome, dict]:
    """Read a genome file; any problem is a one-line :class:`GenomeFileError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_bytes

    path = Path(path)
    if not path.is_file():
        raise GenomeFileError(f"genome file not found: {path}")
    raw = path.read_bytes()
    try:
        tensors = load_bytes(raw)
        header = _read_header_metadata(raw)
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GenomeFileError(f"{path}: not a readable genome file (truncated or foreign): {reason}") from None
    if header.get("format") != FORMAT_NAME:
        raise GenomeFileError(f"{path}: not a blur-evolve genome file (format={header.get('format')!r})")
    file_version = header.get("file_format_version", "1")
    if file_version not in {str(v) for v in range(1, FILE_FORMAT_VERSION + 1)}:
        raise GenomeFileError(f"{path}: genome file format version {file_version} is not supported "
                              f"(this blur-evolve reads versions 1 to {FILE_FORMAT_VERSION})")
    version = header.get("parameterization_version")
    if version != str(PARAMETERIZATION_VERSION):
        raise GenomeFileError(
            f"{path}: genome parameterization version {version} is not supported "
            f"(this blur-evolve reads version {PARAMETERIZATION_VERSION})"
        )
    try:
        spec = NetworkSpec.from_dict(json.loads(header["spec"]))
        metadata = json.loads(header.get("metadata", "{}"))
    except (KeyError, TypeError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GenomeFileError(f"{path}: invalid spec or metadata in header: {reason}") from None
    expected = neutral_genome(spec)
    fields = {}
    for name, neutral in expected._asdict().items():
        if name not in tensors and file_version == "1" and name in _ADDED_IN_VERSION_2:
            fields[name] = neutral
            continue
        if name not in tensors:
            raise GenomeFileError(f"{path}: genome field {name!r} is missing")
        value = tensors[name]
        if value.shape != neutral.shape or value.dtype not in (np.float32, np.float64):
            raise GenomeFileError(
                f"{path}: genome field {name!r} has shape {value.shape} and dtype {value.dtype}, "
                f"expected shape {neutral.shape} float32/float64"
            )
        if not np.all(np.isfinite(value)):
            raise GenomeFileError(f"{path}: genome field {name!r} holds NaN or infinite values")
        fields[name] = jnp.asarray(value)
    return spec, Genome(**fields), metadata


def _read_header_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors header (the arrays were already validated)."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size].decode("utf-8"))
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("header __metadata__ is not an object")
    return metadata
