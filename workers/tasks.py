"""Task families with explicit meta-train / meta-validation / meta-test splits (DESIGN §3).

``make_family(config, split)`` builds a :class:`TaskFamily` whose ``sample(key, num_tasks, num_steps)`` is a
pure, jitted function returning a :class:`~workers.task_types.Task` batch. Task ``i`` depends only on
``fold_in(key, i)`` and ``num_steps``, so any task can be recomputed alone (resume, Ray retries).

Per task: ``n_way`` classes drawn from the split's classes (random subset in random order, which is the label
permutation), ``num_steps`` support mini-batches (label uniform, then example uniform in that class's support
pool) and ``num_query`` query examples (balanced labels, drawn without replacement from the query pools while
a class has enough), optionally mapped by a random per-task projection ``x @ P``, ``P ~ N(0, 1/n_in)``.

Meta-augmentation (Rajendran et al. 2020; options ``augment_*``): on top of the label permutation, every task
of the meta-train split (every split with ``augment_splits: all``) may transform its inputs with one draw
from its own key, the same for its support and query examples: a small shift (``augment_shift`` pixels,
zero-filled, 2-D for square images, 1-D otherwise), a permutation of the input dimensions, random sign flips
of them, then Gaussian noise per example (``augment_noise`` std), then the projection. The transforms act on
inputs only: a task's classes and examples stay those of its split. :func:`augmentation` returns a task's draw.

Splits never leak by default:

* image / signal datasets (digits, fashion_mnist, mnist, idx, mnist1d): the first 70% of the classes are
  meta-train, the rest are shared by validation and test. Validation reads the dataset's train file, test its
  test file; when both use the same file for a class (digits has no test file), that class's examples are
  cut into disjoint halves. Every class's examples are split again into disjoint support and query pools.
  Normalization statistics come from the meta-train split only.
* toy2d: train functions xor/and/two_moons, held-out functions for validation and test; every split draws
  function instances from its own disjoint range of integer seeds.
* teacher_student: disjoint teacher-seed ranges per split.

Overlapping class or seed lists are an error unless ``allow_overlap=True`` (examples stay disjoint then).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from workers import datasets
from workers.task_types import Task

__all__ = ["FAMILIES", "SPLITS", "Augmentation", "FamilyInfo", "TaskConfig", "TaskFamily", "make_family"]

SPLITS = ("train", "validation", "test")
_BASE_SEED = 0x5EED  # root of the integer-seeded function/teacher instances


class FamilyInfo(NamedTuple):
    description: str
    options: tuple[str, ...]  # the TaskConfig fields this family reads (besides the common ones)
    default_n_way: int
    needs_data_dir: bool = False


_AUGMENT_OPTIONS = ("augment_shift", "augment_permute", "augment_sign_flip", "augment_noise", "augment_splits")
_IMAGE_OPTIONS = _AUGMENT_OPTIONS + ("resize", "resize_method", "crop", "normalize", "projection_dim", "train_classes",
                  "validation_classes", "test_classes", "validation_source", "test_source", "query_fraction",
                  "split_seed", "allow_overlap")
FAMILIES: dict[str, FamilyInfo] = {
    "digits": FamilyInfo("scikit-learn 8x8 digits (1797 images, 10 classes, bundled)", _IMAGE_OPTIONS, 3),
    "fashion_mnist": FamilyInfo("Fashion-MNIST 28x28 (apt-get install dataset-fashion-mnist)",
                                _IMAGE_OPTIONS + ("data_dir",), 3),
    "mnist": FamilyInfo("MNIST 28x28 IDX files from --data-dir / $BLUR_MNIST_DIR",
                        _IMAGE_OPTIONS + ("data_dir",), 3, needs_data_dir=True),
    "idx": FamilyInfo("any IDX image set (e.g. EMNIST with idx_prefix) from --data-dir",
                      _IMAGE_OPTIONS + ("data_dir", "idx_prefix"), 3, needs_data_dir=True),
    "mnist1d": FamilyInfo("MNIST-1D, 40-sample signals generated locally and cached",
                          _IMAGE_OPTIONS + ("cache_dir",), 3),
    "toy2d": FamilyInfo("2-D toy functions of the BLUR paper: " + ", ".join(datasets.TOY_FUNCTIONS),
                        ("train_functions", "heldout_functions", "functions", "seed_ranges", "projection_dim",
                         "allow_overlap") + _AUGMENT_OPTIONS[1:], 2),
    "teacher_student": FamilyInfo("Gaussian inputs labelled by a random teacher MLP (argmax of n_way outputs)",
                                  ("teacher_input_dim", "teacher_hidden", "seed_ranges", "projection_dim",
                                   "allow_overlap") + _AUGMENT_OPTIONS[1:], 3),
}


@dataclass(frozen=True)
class TaskConfig:
    """Static description of a task family. Lists are stored as tuples so the config is hashable."""

    family: str = "digits"
    n_way: int | None = None  # None: the family's default (2 for toy2d, 3 otherwise)
    batch_size: int = 16
    num_query: int = 64
    # input transforms, applied at load time in this order: resize -> center crop -> flatten -> normalize
    resize: int | None = None
    resize_method: str = "area"  # "area" | "bilinear"
    crop: int | None = None
    normalize: str = "standardize"  # "none" | "standardize" (scalar) | "per_feature"
    projection_dim: int | None = None  # random per-task linear projection to this many inputs
    # meta-augmentation: per-task input transforms drawn from the task key (see the module docstring)
    augment_shift: int = 0  # largest shift in pixels (image/signal families), each direction
    augment_permute: bool = False  # a random permutation of the input dimensions
    augment_sign_flip: bool = False  # a random sign per input dimension
    augment_noise: float = 0.0  # std of Gaussian noise added to every example
    augment_splits: str = "train"  # "train" (meta-training tasks only) | "all"
    # class splits (None: first 70% of the classes train, the rest validation and test)
    train_classes: tuple[int, ...] | None = None
    validation_classes: tuple[int, ...] | None = None
    test_classes: tuple[int, ...] | None = None
    validation_source: str = "train"  # which dataset file: "train" | "test"
    test_source: str | None = None  # None: "test" if the dataset has a test file, else "train"
    query_fraction: float = 0.3  # share of each class's examples in the query pool
    split_seed: int = 0
    allow_overlap: bool = False
    data_dir: str | None = None
    cache_dir: str | None = None
    idx_prefix: str = ""
    # toy2d
    train_functions: tuple[str, ...] = ("xor", "and", "two_moons")
    heldout_functions: tuple[str, ...] | None = None  # None: every toy function not in train_functions
    functions: tuple[str, ...] | None = None  # if set, every split uses these (still disjoint seeds)
    # integer seed ranges [start, stop) per split for toy2d function instances and teachers
    seed_ranges: tuple[tuple[int, int], ...] = ((0, 1_000_000), (1_000_000, 1_100_000), (1_100_000, 1_200_000))
    # teacher_student
    teacher_input_dim: int = 16
    teacher_hidden: tuple[int, ...] = (32,)

    def __post_init__(self):
        for name in ("train_classes", "validation_classes", "test_classes", "train_functions",
                     "heldout_functions", "functions", "teacher_hidden"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "seed_ranges", tuple(tuple(int(v) for v in r) for r in self.seed_ranges))
        if self.family not in FAMILIES:
            raise ValueError(f"unknown task family {self.family!r}; choose from {', '.join(FAMILIES)}")
        for name in ("batch_size", "num_query", "n_way", "resize", "crop", "projection_dim",
                     "teacher_input_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.augment_shift, bool) or not isinstance(self.augment_shift, (int, np.integer)) \
                or self.augment_shift < 0:
            raise ValueError(f"augment_shift must be a non-negative integer, got {self.augment_shift!r}")
        if not (np.isfinite(self.augment_noise) and self.augment_noise >= 0):
            raise ValueError(f"augment_noise must be a finite number >= 0, got {self.augment_noise!r}")
        if self.augment_splits not in ("train", "all"):
            raise ValueError(f"augment_splits must be 'train' or 'all', got {self.augment_splits!r}")
        if self.augment_shift and self.family in ("toy2d", "teacher_student"):
            raise ValueError(f"augment_shift needs image or signal inputs; {self.family} has neither")
        if self.resize_method not in ("area", "bilinear"):
            raise ValueError(f"resize_method must be 'area' or 'bilinear', got {self.resize_method!r}")
        if self.normalize not in ("none", "standardize", "per_feature"):
            raise ValueError(f"normalize must be 'none', 'standardize' or 'per_feature', got {self.normalize!r}")
        if not 0.0 < self.query_fraction < 1.0:
            raise ValueError(f"query_fraction must be in (0, 1), got {self.query_fraction}")
        if len(self.seed_ranges) != 3 or any(not 0 <= lo < hi < 2**31 for lo, hi in self.seed_ranges):
            raise ValueError(f"seed_ranges must be three [start, stop) ranges in [0, 2^31), got {self.seed_ranges}")
        for name in ("train_functions", "heldout_functions", "functions"):
            unknown = set(getattr(self, name) or ()) - set(datasets.TOY_FUNCTIONS)
            if unknown:
                raise ValueError(f"{name}: unknown toy functions {sorted(unknown)}; "
                                 f"choose from {', '.join(datasets.TOY_FUNCTIONS)}")

    @property
    def resolved_n_way(self) -> int:
        return self.n_way if self.n_way is not None else FAMILIES[self.family].default_n_way


# --------------------------------------------------------------------------------------- sampling

class PoolData(NamedTuple):
    """Per-class example pools of one split, zero-padded to the largest class."""

    support_x: jax.Array  # [C, max_support, D]
    support_count: jax.Array  # [C] int32
    query_x: jax.Array  # [C, max_query, D]
    query_count: jax.Array  # [C] int32


class SeedData(NamedTuple):
    """Synthetic families: which generators a split may use and its seed range."""

    function_ids: jax.Array  # [F] int32 indices into the generator list (one entry for teacher-student)
    seed_range: jax.Array  # [2] int32, [start, stop)


@dataclass(frozen=True)
class _SamplerSpec:
    """Everything static about sampling (a jit static argument)."""

    kind: str  # "pool" | "toy2d" | "teacher"
    n_way: int
    batch_size: int
    num_query: int
    input_dim: int
    projection_dim: int | None
    teacher_hidden: tuple[int, ...] = ()
    # meta-augmentation of this split (all off: the task is exactly the unaugmented one)
    shift: int = 0
    permute: bool = False
    sign_flip: bool = False
    noise: float = 0.0
    image_side: int | None = None  # inputs are side x side images (2-D shifts); None: 1-D signals

    @property
    def augmented(self) -> bool:
        return bool(self.shift or self.permute or self.sign_flip or self.noise)


def _sample_pool_task(spec: _SamplerSpec, data: PoolData, key, num_steps: int):
    num_split_classes, max_query = data.support_x.shape[0], data.query_x.shape[1]
    # one buffer of uniforms for the whole task (see datasets.uniforms), cut into its uses
    sizes = (num_split_classes, 2 * num_steps * spec.batch_size, spec.n_way * max_query, spec.num_query)
    class_u, support_u, query_u, order_u = jnp.split(datasets.uniforms(key, (sum(sizes),)),
                                                     np.cumsum(sizes)[:-1].tolist())
    # random subset in random order: label j <-> split class chosen[j] (this is the label permutation)
    chosen = jnp.argsort(class_u)[:spec.n_way]
    # support: label uniform, then an example uniform in that class's support pool
    label_u, example_u = support_u.reshape(2, num_steps, spec.batch_size)
    support_y = jnp.minimum((label_u * spec.n_way).astype(jnp.int32), spec.n_way - 1)
    support_class = chosen[support_y]
    count = data.support_count[support_class]
    index = jnp.minimum((example_u * count).astype(jnp.int32), count - 1)
    support_x = data.support_x[support_class, index]
    # query: balanced labels; each class walks a random permutation of its pool (wrapping if too small)
    query_y = jnp.arange(spec.num_query) % spec.n_way
    rank = jnp.arange(spec.num_query) // spec.n_way
    query_count = data.query_count[chosen]
    valid = jnp.arange(max_query)[None, :] < query_count[:, None]
    scores = jnp.where(valid, query_u.reshape(spec.n_way, max_query), 2.0)  # padded slots sort last
    permutation = jnp.argsort(scores, axis=1)
    index = permutation[query_y, rank % query_count[query_y]]
    query_x = data.query_x[chosen[query_y], index]
    order = jnp.argsort(order_u)  # shuffle the query order
    return support_x, support_y, query_x[order], query_y[order]


def _sample_synthetic_task(spec: _SamplerSpec, data: SeedData, key, num_steps: int):
    instance_key, point_key = jax.random.split(key)
    bits = jax.random.bits(instance_key, (2 + spec.n_way,), jnp.uint32)
    fn = data.function_ids[bits[0] % data.function_ids.shape[0]]
    lo, hi = data.seed_range[0], data.seed_range[1]
    seed = lo + (bits[1] % (hi - lo).astype(jnp.uint32)).astype(jnp.int32)
    relabel = jnp.argsort(bits[2:])  # random label permutation
    # the instance (function parameters, teacher weights) depends on the integer seed only
    task_key = jax.random.fold_in(jax.random.PRNGKey(_BASE_SEED), seed)
    point_key = jax.random.fold_in(point_key, seed)  # splits never share input points either
    num_support = num_steps * spec.batch_size
    num_points = num_support + spec.num_query  # one draw, split into support and query afterwards
    if spec.kind == "toy2d":
        params, points = datasets.toy_draws(task_key, point_key, num_points)
        x, y = jax.lax.switch(fn, list(datasets.TOY_BODIES.values()), params, points)
    else:
        x, y = datasets.teacher_student(task_key, point_key, num_points, spec.input_dim, spec.teacher_hidden,
                                        spec.n_way)
    y = relabel[y.astype(jnp.int32)]
    return (x[:num_support].reshape(num_steps, spec.batch_size, -1), y[:num_support].reshape(num_steps, -1),
            x[num_support:], y[num_support:])


_AUGMENT_SALT = 0xA06


class Augmentation(NamedTuple):
    """One task's input transform: ``x -> shift(x)[..., permutation] * signs`` (then noise, projection)."""

    shift: jax.Array  # [2] int32 (rows, columns) for images, [1] for signals
    permutation: jax.Array  # [D] int32
    signs: jax.Array  # [D] float32


def _augmentation(spec: _SamplerSpec, key) -> Augmentation:
    shift_key, permute_key, sign_key = jax.random.split(key, 3)
    dims = spec.input_dim
    axes = 2 if spec.image_side else 1
    shift = (jax.random.randint(shift_key, (axes,), -spec.shift, spec.shift + 1) if spec.shift
             else jnp.zeros((axes,), jnp.int32))
    permutation = jax.random.permutation(permute_key, dims) if spec.permute else jnp.arange(dims)
    signs = (jnp.where(jax.random.bernoulli(sign_key, 0.5, (dims,)), 1.0, -1.0) if spec.sign_flip
             else jnp.ones((dims,)))
    return Augmentation(shift.astype(jnp.int32), permutation.astype(jnp.int32), signs.astype(jnp.float32))


def _shifted(spec: _SamplerSpec, x, shift):
    """``x [..., D]`` moved by ``shift`` pixels (zero fill): 2-D for side x side images, 1-D otherwise."""
    if spec.image_side:
        side = spec.image_side
        rows, cols = jnp.arange(side) - shift[0], jnp.arange(side) - shift[1]
        valid = ((rows >= 0) & (rows < side))[:, None] & ((cols >= 0) & (cols < side))[None, :]
        index = (jnp.clip(rows, 0, side - 1)[:, None] * side + jnp.clip(cols, 0, side - 1)[None, :]).reshape(-1)
        return x[..., index] * _lead(x, valid.reshape(-1))
    positions = jnp.arange(x.shape[-1]) - shift[0]
    valid = (positions >= 0) & (positions < x.shape[-1])
    return x[..., jnp.clip(positions, 0, x.shape[-1] - 1)] * _lead(x, valid)


def _lead(x, v):
    """``v [D]`` shaped to broadcast against ``x [..., D]`` (explicit ranks)."""
    return v.astype(x.dtype).reshape((1,) * (x.ndim - 1) + v.shape)


def _augment(spec: _SamplerSpec, key, support_x, query_x):
    transform_key, support_key, query_key = jax.random.split(key, 3)
    draw = _augmentation(spec, transform_key)

    def apply(x, noise_key):
        if spec.shift:
            x = _shifted(spec, x, draw.shift)
        x = x[..., draw.permutation] * _lead(x, draw.signs)
        if spec.noise:
            x = x + spec.noise * datasets.normals_from(datasets.uniforms(noise_key, x.shape))
        return x

    return apply(support_x, support_key), apply(query_x, query_key)


def _sample_task(spec: _SamplerSpec, data, key, num_steps: int) -> Task:
    task_key, projection_key = jax.random.split(key) if spec.projection_dim is not None else (key, None)
    sample_fn = _sample_pool_task if spec.kind == "pool" else _sample_synthetic_task
    support_x, support_y, query_x, query_y = sample_fn(spec, data, task_key, num_steps)
    if spec.augmented:  # its own key: unaugmented tasks are bit-identical to those of a config without it
        support_x, query_x = _augment(spec, jax.random.fold_in(key, _AUGMENT_SALT), support_x, query_x)
    if spec.projection_dim is not None:
        # random per-task linear map of the inputs, P ~ N(0, 1/n_in) keeps the input scale
        projection = datasets.normals_from(datasets.uniforms(projection_key, (spec.input_dim, spec.projection_dim)))
        projection = projection / jnp.sqrt(spec.input_dim)
        support_x, query_x = support_x @ projection, query_x @ projection
    return Task(support_x.astype(jnp.float32), support_y.astype(jnp.int32),
                query_x.astype(jnp.float32), query_y.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "num_tasks", "num_steps"))
def _sample_batch(spec: _SamplerSpec, data, key, num_tasks: int, num_steps: int) -> Task:
    task_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_tasks))
    # lax.map, not vmap: every task runs the very same per-task program whatever num_tasks is (bit-identical
    # tasks alone or in a batch), and it compiles about twice as fast; sampling is cheap next to evaluation
    return jax.lax.map(lambda k: _sample_task(spec, data, k, num_steps), task_keys)


@functools.partial(jax.jit, static_argnames=("spec", "num_steps"))
def _sample_single(spec: _SamplerSpec, data, key, index, num_steps: int) -> Task:
    # the same lax.map program as _sample_batch, with one trip, so the task is bit-identical to its batch copy
    task_keys = jax.random.fold_in(key, index)[None]
    return jax.tree.map(lambda a: a[0], jax.lax.map(lambda k: _sample_task(spec, data, k, num_steps), task_keys))


@dataclass(frozen=True, eq=False)
class TaskFamily:
    """One split of a task family: its data as JAX arrays and a pure ``sample``.

    ``classes`` are the original class ids the split may use (``range(n_way)`` for synthetic families);
    ``functions`` and ``seed_range`` describe synthetic splits. ``support_ids``/``query_ids`` ([C, max]
    NumPy, -1 padded) are the examples' indices in the ``source`` file, for provenance and leak checks.
    """

    config: TaskConfig
    split: str
    num_inputs: int
    num_classes: int
    classes: tuple[int, ...]
    data: Any
    sampler: _SamplerSpec
    source: str | None = None
    support_ids: np.ndarray | None = None
    query_ids: np.ndarray | None = None
    functions: tuple[str, ...] = ()
    seed_range: tuple[int, int] | None = None
    normalization: tuple[np.ndarray, np.ndarray] | None = None

    def sample(self, key: jax.Array, num_tasks: int, num_steps: int) -> Task:
        """``num_tasks`` tasks with ``num_steps`` support batches; task i is a function of fold_in(key, i)."""
        return _sample_batch(self.sampler, self.data, key, num_tasks=int(num_tasks), num_steps=int(num_steps))

    def augmentation(self, key: jax.Array, index: int) -> Augmentation | None:
        """The input transform of task ``index`` of ``sample(key, ...)`` (None when this split has none)."""
        if not self.sampler.augmented:
            return None
        task_key = jax.random.fold_in(key, index)
        transform_key = jax.random.split(jax.random.fold_in(task_key, _AUGMENT_SALT), 3)[0]
        return _augmentation(self.sampler, transform_key)

    def sample_one(self, key: jax.Array, index, num_steps: int) -> Task:
        """Task ``index`` of ``sample(key, ...)`` alone, without the leading axis (``index`` may be traced)."""
        return _sample_single(self.sampler, self.data, key, jnp.asarray(index, jnp.int32), num_steps=int(num_steps))


# ----------------------------------------------------------------------------------- construction

@functools.lru_cache(maxsize=16)
def make_family(config: TaskConfig, split: str) -> TaskFamily:
    """Build the ``split`` ("train" | "validation" | "test") of the family ``config`` describes.

    Families are immutable and cached per (config, split), so the driver, the evaluator and the final report
    share one copy of the loaded and transformed data. (Dataset locations taken from environment variables
    are read when a family is first built in a process.)"""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if config.family == "toy2d":
        return _make_toy_family(config, split)
    if config.family == "teacher_student":
        return _make_teacher_family(config, split)
    return _make_pool_family(config, split)


def _augment_fields(config: TaskConfig, split: str, image_side: int | None) -> dict[str, Any]:
    """The sampler's augmentation of ``split`` (none for held-out splits unless ``augment_splits: all``)."""
    if split != "train" and config.augment_splits != "all":
        return {}
    return {"shift": int(config.augment_shift), "permute": bool(config.augment_permute),
            "sign_flip": bool(config.augment_sign_flip), "noise": float(config.augment_noise),
            "image_side": image_side}


def _check_disjoint(named: dict[str, tuple], what: str, allow_overlap: bool) -> None:
    names = list(named)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            common = set(named[first]) & set(named[second])
            if common and not allow_overlap and "train" in (first, second):
                raise ValueError(f"{what} of splits {first!r} and {second!r} overlap ({sorted(common)}); "
                                 "set allow_overlap=True if that is intended")


def _seed_ranges(config: TaskConfig) -> dict[str, tuple[int, int]]:
    ranges = dict(zip(SPLITS, config.seed_ranges))
    expanded = {name: range(lo, hi) for name, (lo, hi) in ranges.items()}
    for i, first in enumerate(SPLITS):  # every pair, held-out pairs included: seeds are cheap
        for second in SPLITS[i + 1:]:
            a, b = expanded[first], expanded[second]
            if max(a.start, b.start) < min(a.stop, b.stop) and not config.allow_overlap:
                raise ValueError(f"seed_ranges of splits {first!r} and {second!r} overlap; "
                                 "set allow_overlap=True if that is intended")
    return ranges


def _make_toy_family(config: TaskConfig, split: str) -> TaskFamily:
    if config.resolved_n_way != 2:
        raise ValueError(f"toy2d tasks are binary: n_way must be 2, got {config.resolved_n_way}")
    names = list(datasets.TOY_FUNCTIONS)
    if config.functions is not None:
        per_split = dict.fromkeys(SPLITS, config.functions)
    else:
        heldout = config.heldout_functions or tuple(n for n in names if n not in config.train_functions)
        per_split = {"train": config.train_functions, "validation": heldout, "test": heldout}
        _check_disjoint(per_split, "toy functions", config.allow_overlap)
    if not per_split[split]:
        raise ValueError(f"toy2d split {split!r} has no functions")
    seed_range = _seed_ranges(config)[split]
    data = SeedData(jnp.asarray([names.index(n) for n in per_split[split]], jnp.int32),
                    jnp.asarray(seed_range, jnp.int32))
    spec = _SamplerSpec("toy2d", 2, config.batch_size, config.num_query, 2, config.projection_dim,
                        **_augment_fields(config, split, None))
    return TaskFamily(config, split, config.projection_dim or 2, 2, (0, 1), data, spec,
                      functions=tuple(per_split[split]), seed_range=seed_range)


def _make_teacher_family(config: TaskConfig, split: str) -> TaskFamily:
    n_way, input_dim = config.resolved_n_way, config.teacher_input_dim
    seed_range = _seed_ranges(config)[split]
    data = SeedData(jnp.zeros((1,), jnp.int32), jnp.asarray(seed_range, jnp.int32))
    spec = _SamplerSpec("teacher", n_way, config.batch_size, config.num_query, input_dim, config.projection_dim,
                        config.teacher_hidden, **_augment_fields(config, split, None))
    return TaskFamily(config, split, config.projection_dim or input_dim, n_way, tuple(range(n_way)), data, spec,
                      seed_range=seed_range)


def _load_sources(config: TaskConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The dataset's files as {"train": (x, y)[, "test": (x, y)]}."""
    if config.family == "digits":
        return {"train": datasets.load_digits()}
    if config.family == "fashion_mnist":
        loaded = datasets.load_fashion_mnist(config.data_dir)
    elif config.family == "mnist":
        loaded = datasets.load_mnist(config.data_dir)
    elif config.family == "idx":
        if not config.data_dir:
            raise datasets.DatasetError("the idx family needs data_dir (--data-dir DIR) holding "
                                        f"{config.idx_prefix}train-images-idx3-ubyte[.gz] and friends")
        loaded = datasets.load_idx_dataset(config.data_dir, "idx", prefix=config.idx_prefix)
    else:
        loaded = datasets.load_mnist1d(config.cache_dir)
    return {"train": (loaded.x_train, loaded.y_train), "test": (loaded.x_test, loaded.y_test)}


def _transform(config: TaskConfig, x: np.ndarray) -> np.ndarray:
    if config.resize is not None:
        x = datasets.resize(x, config.resize, config.resize_method)
    if config.crop is not None:
        x = datasets.center_crop(x, config.crop)
    return np.asarray(x, np.float32).reshape(x.shape[0], -1)


def _class_splits(config: TaskConfig, all_classes: np.ndarray, sources) -> dict[str, tuple[tuple[int, ...], str]]:
    num_train = int(round(0.7 * len(all_classes)))
    default_train = tuple(int(c) for c in all_classes[:num_train])
    default_heldout = tuple(int(c) for c in all_classes[num_train:])
    classes = {"train": config.train_classes or default_train,
               "validation": config.validation_classes or default_heldout,
               "test": config.test_classes or default_heldout}
    _check_disjoint(classes, "classes", config.allow_overlap)
    test_source = config.test_source or ("test" if "test" in sources else "train")
    result = {}
    for name, source in zip(SPLITS, ("train", config.validation_source, test_source)):
        if source not in sources:
            raise ValueError(f"{config.family} has no {source!r} file (available: {', '.join(sources)})")
        unknown = set(classes[name]) - set(int(c) for c in all_classes)
        if unknown:
            raise ValueError(f"{name} classes {sorted(unknown)} do not occur in {config.family}")
        if len(classes[name]) < config.resolved_n_way:
            raise ValueError(f"{name} split has {len(classes[name])} classes, fewer than n_way="
                             f"{config.resolved_n_way}")
        result[name] = (tuple(classes[name]), source)
    return result


def _split_indices(config: TaskConfig, sources, splits) -> dict[str, dict[int, np.ndarray]]:
    """Example indices per split and class: a (file, class) used by several splits is cut into disjoint parts."""
    users: dict[tuple[str, int], list[str]] = {}
    for name in SPLITS:
        classes, source = splits[name]
        for c in classes:
            users.setdefault((source, c), []).append(name)
    result = {name: {} for name in SPLITS}
    for (source, c), names in users.items():
        labels = sources[source][1]
        rng = np.random.default_rng([config.split_seed, ("train", "test").index(source), c])
        indices = rng.permutation(np.flatnonzero(labels == c))
        for name, part in zip(names, np.array_split(indices, len(names))):
            if len(part) < 2:
                raise ValueError(f"class {c} of the {source} file has too few examples for split {name!r}")
            result[name][c] = part
    return result


def _pad(parts: list[np.ndarray], fill) -> np.ndarray:
    width = max(len(p) for p in parts)
    out = np.full((len(parts), width) + parts[0].shape[1:], fill, dtype=parts[0].dtype)
    for row, part in enumerate(parts):
        out[row, :len(part)] = part
    return out


def _make_pool_family(config: TaskConfig, split: str) -> TaskFamily:
    sources = _load_sources(config)
    all_classes = np.unique(np.concatenate([y for _, y in sources.values()]))
    splits = _class_splits(config, all_classes, sources)
    indices = _split_indices(config, sources, splits)
    # normalization statistics from the meta-train split only
    mean, std = np.float32(0.0), np.float32(1.0)
    if config.normalize != "none":
        train_source = sources[splits["train"][1]][0]
        train_x = _transform(config, train_source[np.concatenate(list(indices["train"].values()))])
        per_feature = config.normalize == "per_feature"
        mean, std = train_x.mean(axis=0 if per_feature else None), train_x.std(axis=0 if per_feature else None)
        std = np.maximum(std, 1e-2 * std.mean() + 1e-8)  # constant border pixels would divide by ~0
    classes, source = splits[split]
    x_all = sources[source][0]
    support_ids, query_ids = [], []
    for c in classes:
        part = indices[split][c]
        num_query = max(1, int(round(config.query_fraction * len(part))))
        query_ids.append(part[:num_query])
        support_ids.append(part[num_query:])
    support_ids, query_ids = _pad(support_ids, -1), _pad(query_ids, -1)

    def pool(ids: np.ndarray) -> np.ndarray:
        flat = datasets.standardize(_transform(config, x_all[np.maximum(ids.reshape(-1), 0)]), mean, std)
        return np.where((ids.reshape(-1) >= 0)[:, None], flat, 0.0).reshape(ids.shape + (-1,))

    data = PoolData(jnp.asarray(pool(support_ids)), jnp.asarray((support_ids >= 0).sum(1), jnp.int32),
                    jnp.asarray(pool(query_ids)), jnp.asarray((query_ids >= 0).sum(1), jnp.int32))
    input_dim = data.support_x.shape[-1]
    n_way = config.resolved_n_way
    side = int(round(np.sqrt(input_dim)))
    image_side = side if config.family != "mnist1d" and side * side == input_dim else None
    spec = _SamplerSpec("pool", n_way, config.batch_size, config.num_query, input_dim, config.projection_dim,
                        **_augment_fields(config, split, image_side))
    return TaskFamily(config, split, config.projection_dim or input_dim, n_way, classes, data, spec,
                      source=source, support_ids=support_ids, query_ids=query_ids,
                      normalization=(np.asarray(mean, np.float32), np.asarray(std, np.float32)))
