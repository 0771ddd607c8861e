"""Genome files: safetensors arrays plus JSON metadata in the safetensors header. Nothing is unpickled.

Header metadata (all strings, as safetensors requires):
``format`` = ``blur-evolve-genome``, ``parameterization_version`` (see :mod:`genome.params`),
``spec`` (JSON of the NetworkSpec), ``metadata`` (JSON, free-form: fitness, provenance, ...).
Arrays: one per :class:`Genome` field, named after the field.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from genome.params import PARAMETERIZATION_VERSION, Genome, neutral_genome
from genome.spec import NetworkSpec

FORMAT_NAME = "blur-evolve-genome"


class GenomeFileError(ValueError):
    """A genome file is missing, unreadable, foreign or of an unsupported version."""


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if hasattr(value, "tolist"):
        return np.asarray(value).tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serializable")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temporary file in the same directory, fsync, rename.

    A process killed at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(path: str | os.PathLike, spec: NetworkSpec, genome: Genome, metadata: dict | None = None) -> Path:
    """Write ``genome`` atomically (temporary file in the same directory, then rename)."""
    from safetensors.numpy import save as save_bytes

    path = Path(path)
    tensors = {name: np.array(value, order="C") for name, value in genome._asdict().items()}
    header = {
        "format": FORMAT_NAME,
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
    version = header.get("parameterization_version")
    if version != str(PARAMETERIZATION_VERSION):
        raise GenomeFileError(
            f"{path}: genome parameterization version {version} is not supported "
            f"(this blur-evolve reads version {PARAMETERIZATION_VERSION})"
        )
    try:
        spec = NetworkSpec.from_dict(json.loads(header["spec"]))
        metadata = json.loads(header.get("metadata", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        raise GenomeFileError(f"{path}: invalid spec or metadata in header: {error}") from None
    expected = neutral_genome(spec)
    fields = {}
    for name, neutral in expected._asdict().items():
        if name not in tensors:
            raise GenomeFileError(f"{path}: genome field {name!r} is missing")
        value = tensors[name]
        if value.shape != neutral.shape or value.dtype not in (np.float32, np.float64):
            raise GenomeFileError(
                f"{path}: genome field {name!r} has shape {value.shape} and dtype {value.dtype}, "
                f"expected shape {neutral.shape} float32/float64"
            )
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
