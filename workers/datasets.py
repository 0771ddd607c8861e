"""Real datasets and synthetic generators behind the task families (DESIGN §3).

Loaders return NumPy arrays: images ``x`` float32 ``[N, ...]`` in ``[0, 1]`` and labels ``y`` int32 ``[N]``.
Nothing here touches the network: Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``,
MNIST and other IDX sets from a user directory, MNIST-1D is generated locally and cached. A missing
dataset is a one-line :class:`DatasetError`, never a silent fallback.

Synthetic generators (toy 2-D functions of the BLUR paper §4.1, teacher-student) are pure JAX so the
task sampler can call them inside ``jit``: ``fn(task_key, key, num_points) -> (x, y)`` where ``task_key``
fixes the random function instance (rotation, offset, radii, teacher weights, ...) and ``key`` draws points.
"""

from __future__ import annotations

import functools
import gzip
import io
import hashlib
import importlib.metadata
import json
import os
import random
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from genome.errors import UserError
from genome.io import atomic_write_bytes

__all__ = [
    "DatasetError",
    "FASHION_MNIST_DEFAULT_DIR",
    "IdxDataset",
    "TOY_BODIES",
    "TOY_FUNCTIONS",
    "center_crop",
    "init_teacher",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_mnist",
    "load_mnist1d",
    "normals_from",
    "read_idx",
    "resize",
    "standardize",
    "teacher_student",
    "toy_draws",
    "uniforms",
]

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "BLUR_FASHION_MNIST_DIR"
MNIST_ENV = "BLUR_MNIST_DIR"
CACHE_ENV = "BLUR_CACHE_DIR"

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_PARTS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


class DatasetError(UserError):
    """A dataset is missing, truncated or malformed. The message is one line naming the file."""


class IdxDataset(NamedTuple):
    """A dataset with its own train and test files."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# ----------------------------------------------------------------------------------------------- IDX

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzip, detected from the content) into a native-endian array.

    Validates the magic number (two zero bytes, a type code, the number of dimensions), the header and that
    the data has exactly ``prod(dims) * itemsize`` bytes. Raises :class:`DatasetError` otherwise.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read IDX file ({error.strerror or error})") from None
    if not path.is_file():
        raise DatasetError(f"{path}: not a regular file")
    return _read_idx_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size).copy()


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    del mtime_ns, size  # cache keys only: a rewritten file is read again
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({error})") from None
    if len(raw) < 4:
        raise DatasetError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, type_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
                           "(expected 0x0000, a type code in 08/09/0B/0C/0D/0E and ndim >= 1)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise DatasetError(f"{path}: truncated IDX data: dims {dims} need {expected} bytes, found {found}")
    if found > expected:
        raise DatasetError(f"{path}: {found - expected} unexpected trailing bytes after IDX data {dims}")
    array = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    array = array.reshape(dims).astype(dtype.newbyteorder("="))
    array.flags.writeable = False
    return array


def _find_idx_files(data_dir: Path, prefix: str) -> tuple[dict[str, Path], list[Path]]:
    found, tried = {}, []
    for part in _IDX_PARTS:
        candidates = [data_dir / f"{prefix}{part}.gz", data_dir / f"{prefix}{part}"]
        tried += candidates
        match = next((c for c in candidates if c.is_file()), None)
        if match is not None:
            found[part] = match
    return found, tried


def load_idx_dataset(data_dir: str | os.PathLike, name: str = "idx", prefix: str = "",
                     how_to_get: str | None = None) -> IdxDataset:
    """Load ``{prefix}{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``data_dir``.

    ``prefix`` selects e.g. EMNIST's ``emnist-balanced-`` files. Integer images are scaled to ``[0, 1]``.
    """
    data_dir = Path(data_dir).expanduser()
    found, tried = _find_idx_files(data_dir, prefix)
    if len(found) < len(_IDX_PARTS):
        hint = how_to_get or "put the IDX files there or pass --data-dir DIR"
        missing = [str(p) for p in tried if p.name.removesuffix(".gz") not in found]
        raise DatasetError(f"{name} not found: tried {', '.join(missing)}; {hint}")
    arrays = {part: read_idx(path) for part, path in found.items()}
    result = []
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        image_path, label_path = found[f"{split}-images-idx3-ubyte"], found[f"{split}-labels-idx1-ubyte"]
        if images.ndim < 2:
            raise DatasetError(f"{image_path}: expected images with ndim >= 2, got shape {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DatasetError(f"{label_path}: {labels.shape} labels do not match {images.shape[0]} images "
                               f"in {image_path}")
        if np.issubdtype(images.dtype, np.integer):
            images = images.astype(np.float32) / np.float32(np.iinfo(images.dtype).max)
        result += [images.astype(np.float32), labels.astype(np.int32)]
    return IdxDataset(*result)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> IdxDataset:
    """Fashion-MNIST from ``data_dir``, else ``$BLUR_FASHION_MNIST_DIR``, else the Debian package's dir."""
    data_dir = data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR
    hint = (f"install it with `apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DEFAULT_DIR}), "
            f"or pass --data-dir DIR / set {FASHION_MNIST_ENV}")
    return load_idx_dataset(data_dir, "fashion-mnist", how_to_get=hint)


def load_mnist(data_dir: str | os.PathLike | None = None) -> IdxDataset:
    """MNIST IDX files from ``data_dir`` or ``$BLUR_MNIST_DIR`` (never downloaded)."""
    hint = f"download the four MNIST IDX files yourself and pass --data-dir DIR or set {MNIST_ENV}"
    data_dir = data_dir or os.environ.get(MNIST_ENV)
    if not data_dir:
        raise DatasetError(f"mnist needs a directory: no --data-dir given and {MNIST_ENV} is not set; {hint}")
    return load_idx_dataset(data_dir, "mnist", how_to_get=hint)


# ----------------------------------------------------------------------------------- other datasets

def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 examples): ``x`` float32 ``[N, 8, 8]`` in ``[0, 1]``."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)  # pixel values are 0..16
    return x, bunch.target.astype(np.int32)


def load_mnist1d(cache_dir: str | os.PathLike | None = None, num_samples: int = 5000,
                 seed: int = 42) -> IdxDataset:
    """MNIST-1D generated with the ``mnist1d`` package (never its download path), cached as ``.npz``.

    Returns ``x`` float32 ``[N, 40]``. The cache file name hashes the generation arguments; it is written
    atomically (temporary file + rename). The global NumPy/``random`` RNG states are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset  # local: imports matplotlib

    args = get_dataset_args(as_dict=True)
    args.update(num_samples=int(num_samples), seed=int(seed))
    args.pop("url", None)  # the download URL is never used
    provenance = {"args": args, "mnist1d": importlib.metadata.version("mnist1d")}
    digest = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blur-evolve")
    cache_path = cache_dir.expanduser() / f"mnist1d-{digest}.npz"
    if cache_path.is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as cached:
                return IdxDataset(*(cached[k] for k in IdxDataset._fields))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache: regenerate and replace it below
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(_ObjectView(args))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    result = IdxDataset(data["x"].astype(np.float32), data["y"].astype(np.int32),
                        data["x_test"].astype(np.float32), data["y_test"].astype(np.int32))
    buffer = io.BytesIO()
    np.savez(buffer, **result._asdict())
    atomic_write_bytes(cache_path, buffer.getvalue())
    return result


class _ObjectView:
    """Attribute access to a dict, as ``mnist1d.make_dataset`` expects."""

    def __init__(self, entries: dict):
        self.__dict__.update(entries)


# ------------------------------------------------------------------------------------------ transforms

def _area_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights: output pixel i averages input interval [i, i+1)·src/dst (exact box overlap)."""
    edges = np.arange(dst + 1) * (src / dst)
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _linear_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] bilinear weights with half-pixel centres (no antialiasing)."""
    coord = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0.0, src - 1)
    left = np.floor(coord).astype(int)
    right = np.minimum(left + 1, src - 1)
    frac = coord - left
    weights = np.zeros((dst, src))
    np.add.at(weights, (np.arange(dst), left), 1.0 - frac)
    np.add.at(weights, (np.arange(dst), right), frac)
    return weights


def resize(x: np.ndarray, size: int, method: str = "area") -> np.ndarray:
    """Resize every spatial axis of ``x [N, *spatial]`` to ``size`` (``area`` averaging or ``bilinear``)."""
    if method not in ("area", "bilinear"):
        raise ValueError(f"resize method must be 'area' or 'bilinear', got {method!r}")
    out = np.asarray(x, np.float32)
    for axis in range(1, out.ndim):
        src = out.shape[axis]
        if src == size:
            continue
        matrix = (_area_matrix if method == "area" else _linear_matrix)(src, size).astype(np.float32)
        # contract the spatial axis with the [dst, src] matrix and put the new axis back in place
        out = np.moveaxis(np.tensordot(out, matrix, axes=([axis], [1])), -1, axis)
    return out


def center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """Central ``size`` window of every spatial axis of ``x [N, *spatial]``."""
    index = [slice(None)]
    for extent in x.shape[1:]:
        if size > extent:
            raise ValueError(f"crop {size} is larger than the input extent {extent}")
        start = (extent - size) // 2
        index.append(slice(start, start + size))
    return x[tuple(index)]


def standardize(x: np.ndarray, mean: np.ndarray | float, std: np.ndarray | float) -> np.ndarray:
    """``(x - mean) / std`` in float32 (statistics come from the meta-train split)."""
    return ((np.asarray(x, np.float32) - mean) / std).astype(np.float32)


# ------------------------------------------------------------------------------------ random buffers
# Each jax.random call is a separate threefry block that XLA compiles on its own (~0.1 s on CPU). The
# generators therefore draw ONE uint32 buffer per key and derive uniforms/normals from it arithmetically.

def uniforms(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 uniforms strictly inside (0, 1) from one ``jax.random.bits`` draw (24-bit resolution)."""
    bits = jax.random.bits(key, shape, jnp.uint32)
    return ((bits >> 8).astype(jnp.float32) + 0.5) * (2.0 ** -24)


def normals_from(u: jax.Array) -> jax.Array:
    """Standard normals by the inverse CDF, Φ⁻¹(u) = √2·erfinv(2u - 1), of uniforms in (0, 1)."""
    return jnp.sqrt(2.0) * jax.lax.erf_inv(2.0 * u - 1.0)


# ----------------------------------------------------------------------------- toy 2-D functions (§4.1)
# A toy function is a deterministic body (params [16], points [N, 5]) -> (x [N, 2], labels [N]); the
# uniforms come from the task key (the function instance: frame, radii, blob centres) and the point key.
# Columns of ``points``: 0-1 position (uniform-domain functions) or label/angle (generative ones),
# 2-3 Gaussian noise, 4 blob choice. The public TOY_FUNCTIONS wrap a body with the two draws.

NUM_TOY_PARAMS, NUM_TOY_POINT_COLUMNS = 16, 5


class _Frame(NamedTuple):
    rotation: jax.Array  # [2, 2]
    offset: jax.Array  # [2]
    scale: jax.Array  # []


def _frame(params: jax.Array) -> _Frame:
    """Random rotation θ ∈ [0, 2π), offset ∈ [-0.25, 0.25]², scale ∈ [0.8, 1.2] from params[0:4]."""
    theta = 2 * jnp.pi * params[0]
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rotation = jnp.stack([jnp.stack([cos, -sin]), jnp.stack([sin, cos])])
    return _Frame(rotation, 0.5 * params[1:3] - 0.25, 0.8 + 0.4 * params[3])


def _to_frame(frame: _Frame, x: jax.Array) -> jax.Array:
    """Canonical coordinates u = Rᵀ(x - c)/s, written for row vectors."""
    return (x - frame.offset[None, :]) @ frame.rotation / frame.scale


def _from_frame(frame: _Frame, u: jax.Array) -> jax.Array:
    """Inverse of :func:`_to_frame`: x = s·R·u + c."""
    return frame.scale * u @ frame.rotation.T + frame.offset[None, :]


def _uniform_domain(label_fn):
    """x ~ U[-1, 1]², label ``label_fn(params[4:], u)`` of the canonical coordinates u."""

    def body(params, points):
        x = 2.0 * points[:, 0:2] - 1.0
        return x, label_fn(params[4:], _to_frame(_frame(params), x))

    return body


def _triangle_labels(p, u):
    # equilateral triangle with circumradius r: inside iff u·n_k < r/2 (the inradius) for the 3 edge normals
    radius = 0.6 + 0.3 * p[0]
    angles = -jnp.pi / 2 + 2 * jnp.pi * jnp.arange(3) / 3
    normals = jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)  # [3, 2]
    return jnp.all(u @ normals.T < radius / 2, axis=1)


def _pie_slice_labels(p, u):
    width = jnp.pi / 4 + 0.75 * jnp.pi * p[0]  # the frame's rotation sets where the slice starts
    return jnp.mod(jnp.arctan2(u[:, 1], u[:, 0]), 2 * jnp.pi) < width


def _cross_labels(p, u):
    width = 0.15 + 0.2 * p[0]
    return (jnp.abs(u[:, 0]) < width) | (jnp.abs(u[:, 1]) < width)


def _two_moons(params, points):
    labels = points[:, 0] < 0.5
    t = jnp.pi * points[:, 1]
    upper = jnp.stack([jnp.cos(t), jnp.sin(t)], axis=1)
    lower = jnp.stack([1.0 - jnp.cos(t), 0.5 - jnp.sin(t)], axis=1)
    moons = jnp.where(labels[:, None], lower, upper) + 0.1 * normals_from(points[:, 2:4])
    u = (moons - jnp.asarray([[0.5, 0.25]])) / 1.25  # the moons span [-1, 2]x[-0.5, 1]: centre and shrink
    return _from_frame(_frame(params), u), labels


def _circles(params, points):
    outer, factor = 0.6 + 0.3 * params[4], 0.3 + 0.3 * params[5]
    labels = points[:, 0] < 0.5  # 1 = inner circle
    phi = 2 * jnp.pi * points[:, 1]
    radius = jnp.where(labels, factor * outer, outer)
    u = radius[:, None] * jnp.stack([jnp.cos(phi), jnp.sin(phi)], axis=1) + 0.05 * normals_from(points[:, 2:4])
    return _from_frame(_frame(params), u), labels


def _blobs(params, points, num_blobs=5):
    centers = 1.6 * params[:2 * num_blobs].reshape(num_blobs, 2) - 0.8
    std = 0.08 + 0.12 * params[2 * num_blobs]
    # a random permutation of (0, 1, 0, 1, 0): both labels are always present
    order = jnp.argsort(params[2 * num_blobs + 1: 3 * num_blobs + 1])
    blob_labels = (jnp.arange(num_blobs) % 2)[order]
    blob = jnp.minimum((points[:, 4] * num_blobs).astype(jnp.int32), num_blobs - 1)
    return centers[blob] + std * normals_from(points[:, 2:4]), blob_labels[blob]


def _typed(body):
    """Same output types for every body (lax.switch needs them): x float32, labels int32."""
    return lambda params, points: tuple(a.astype(t) for a, t in zip(body(params, points), (jnp.float32, jnp.int32)))


TOY_BODIES = {name: _typed(body) for name, body in {
    "xor": _uniform_domain(lambda p, u: u[:, 0] * u[:, 1] > 0),
    "and": _uniform_domain(lambda p, u: (u[:, 0] > 0) & (u[:, 1] > 0)),
    "or": _uniform_domain(lambda p, u: (u[:, 0] > 0) | (u[:, 1] > 0)),
    "two_moons": _two_moons,
    "circles": _circles,
    "pie_slice": _uniform_domain(_pie_slice_labels),
    "blobs": _blobs,
    "cross": _uniform_domain(_cross_labels),
    "triangle": _uniform_domain(_triangle_labels),
}.items()}


def toy_draws(task_key: jax.Array, key: jax.Array, num_points: int) -> tuple[jax.Array, jax.Array]:
    """The uniforms every toy body consumes: params [16] from ``task_key``, points [N, 5] from ``key``."""
    return uniforms(task_key, (NUM_TOY_PARAMS,)), uniforms(key, (num_points, NUM_TOY_POINT_COLUMNS))


def _toy_function(body):
    def sample(task_key: jax.Array, key: jax.Array, num_points: int) -> tuple[jax.Array, jax.Array]:
        return body(*toy_draws(task_key, key, num_points))

    return sample


TOY_FUNCTIONS = {name: _toy_function(body) for name, body in TOY_BODIES.items()}


# ------------------------------------------------------------------------------------ teacher-student

def init_teacher(key: jax.Array, layer_sizes: tuple[int, ...]) -> list[tuple[jax.Array, jax.Array]]:
    """Random teacher MLP: W ~ N(0, 1/fan_in), hidden biases ~ N(0, 0.5²), output bias 0 (one draw)."""
    shapes = list(zip(layer_sizes[:-1], layer_sizes[1:]))
    z = normals_from(uniforms(key, (sum(i * o + o for i, o in shapes),)))
    params, start = [], 0
    for layer, (fan_in, fan_out) in enumerate(shapes):
        weight = z[start: start + fan_in * fan_out].reshape(fan_in, fan_out) / jnp.sqrt(fan_in)
        start += fan_in * fan_out
        hidden = layer < len(shapes) - 1
        bias = 0.5 * z[start: start + fan_out] if hidden else jnp.zeros((fan_out,))
        start += fan_out
        params.append((weight, bias))
    return params


def teacher_student(task_key: jax.Array, key: jax.Array, num_points: int, input_dim: int,
                    hidden: tuple[int, ...], num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Gaussian inputs ``[N, input_dim]`` labelled by the argmax of a tanh teacher drawn from ``task_key``."""
    params = init_teacher(task_key, (input_dim, *hidden, num_classes))
    x = normals_from(uniforms(key, (num_points, input_dim)))
    h = x
    for layer, (weight, bias) in enumerate(params):
        h = h @ weight + bias[None, :]
        if layer < len(params) - 1:
            h = jnp.tanh(h)
    return x, jnp.argmax(h, axis=-1).astype(jnp.int32)
