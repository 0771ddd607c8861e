"""Experiment configs: YAML (``safe_load``) into typed, frozen dataclasses.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key (``task.n_way``).
``overrides`` (``--set a.b=value``) are parsed as YAML scalars/lists and type-checked the same way.

Values are range-checked too (:data:`BOUNDS`: every number finite, signs, integer caps, cross-field rules),
and the YAML reader refuses documents that are too large or expand too far through aliases ("billion
laughs"). Numbers in exponent form without a dot (``1e6``), which YAML 1.1 reads as strings, are floats.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genome.errors import MissingExtra, UserError, require_extra
from genome.spec import OFFICIAL_DEFAULTS, NetworkSpec, SpecError
from workers.engine import EpisodeConfig
from workers.tasks import TaskConfig


class ConfigError(UserError):
    """A config file, key or value is invalid; the message names the key."""


def _network_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(NetworkSpec)
    return [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(NetworkSpec)
            if f.name != "layer_sizes"]


# The network section mirrors NetworkSpec, with hidden widths instead of the full layer sizes (input and
# output widths come from the task family).
NetworkConfig = dataclasses.make_dataclass(
    "NetworkConfig",
    [("hidden_sizes", tuple[int, ...], field(default=(32,)))] + _network_fields(),
    frozen=True,
)
NetworkConfig.__doc__ = "Network section: ``hidden_sizes`` plus every NetworkSpec field except layer_sizes."


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "pycma"
    population_size: int = 16
    sigma: float = 0.5
    init: str = "random"  # "random" | "backprop" | "neutral" | path to a genome file
    init_seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:  # options is a dict; configs are compared by value
        return hash((self.name, self.population_size, self.sigma, self.init, self.init_seed))


@dataclass(frozen=True)
class CurriculumConfig:
    every: int = 0  # generations between increments; 0 disables
    increment: int = 5  # inner steps added each time
    max_steps: int | None = None
    # or: inner steps consumed between increments (the budget's unit: `blur compare` gives every method the
    # same horizon at the same budget point with it); 0 disables
    every_inner_steps: int = 0


@dataclass(frozen=True)
class SettingConfig:
    """One entry of ``settings:`` (meta-training) or ``report.settings:`` (held-out): overrides of the task
    section, the hidden widths and the horizon (see :mod:`evolution.settings`)."""

    name: str | None = None  # default: family-Nway-widths-T
    weight: float = 1.0
    task: dict[str, Any] = field(default_factory=dict)  # keys of the task section
    hidden_sizes: tuple[int, ...] | None = None  # default: network.hidden_sizes
    num_steps: int | None = None  # default: episode.num_steps

    def __hash__(self) -> int:
        return hash((self.name, self.weight, repr(sorted(self.task.items())), self.hidden_sizes, self.num_steps))


@dataclass(frozen=True)
class RunConfig:
    generations: int = 20
    tasks_per_generation: int = 8
    validation_every: int = 5
    validation_tasks: int = 32
    checkpoint_every: int = 1
    max_evaluations: int | None = None
    max_wall_time: float | None = None  # seconds
    target_fitness: float | None = None  # stop when the generation's best aggregated fitness reaches it
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    # with a settings list: how many settings each generation evaluates (None: all of them) and how the
    # settings' fitness is combined (chance | rank | none, see evolution.settings)
    settings_per_generation: int | None = None
    setting_normalization: str = "chance"


@dataclass(frozen=True)
class EvaluatorConfig:
    kind: str = "local"  # "local" (in-process) | "ray"
    # what computes the episodes, in process or in each Ray worker: "jax" (the engine, CPU or GPU) | "torch"
    # (torch's CPU GEMM, float32 or episode.precision: bfloat16; the plain rule only)
    backend: str = "jax"
    torch_compile: bool = True  # backend torch: run the step through torch.compile (false: eager)
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    ray_address: str | None = None  # None: start a local Ray; "auto": an existing cluster
    max_retries: int = 3
    # the in-process JAX engine splits each population over this many devices of JAX's default backend,
    # side by side (on the CPU: host devices, each on its own thread). Each device's share scores exactly as
    # it would alone, which equals the whole population's numbers to float rounding (XLA may sum a smaller
    # batch in another order; identical arrays at the paper's shapes). "auto": on the CPU one device per core
    # this process may use, on a GPU machine every local GPU; the torch backend and Ray workers use one (1).
    devices: int | str = 1
    # refuse to start when the estimated peak memory of one evaluation exceeds this many GiB
    # (None: 90% of the memory available when the run starts)
    max_memory_gb: float | None = None


@dataclass(frozen=True)
class ReportConfig:
    test_tasks: int = 32
    baselines: tuple[str, ...] = ("sgd", "momentum", "adam")
    learning_rates: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    tuning_tasks: int = 16  # validation tasks used to pick each baseline's learning rate
    backprop_genome: bool = True
    # the generalization report: held-out settings (overrides of the task section, widths) and horizons
    # (inner steps; empty: the run's own horizon). Empty settings and a single-setting run: the run's task.
    settings: tuple[SettingConfig, ...] = ()
    horizons: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrackingConfig:
    tensorboard: bool = False  # event files under RUN/tensorboard
    mlflow: bool = False  # an MLflow run per blur run
    mlflow_uri: str | None = None  # None: a file store under RUN/mlruns
    experiment: str = "blur-evolve"  # the MLflow experiment


@dataclass(frozen=True)
class Config:
    seed: int = 0
    network: NetworkConfig = field(default_factory=NetworkConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    episode: EpisodeConfig = field(default_factory=lambda: EpisodeConfig(num_steps=10))
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    run: RunConfig = field(default_factory=RunConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # meta-training across settings (empty: the task, network and episode sections are the one setting)
    settings: tuple[SettingConfig, ...] = ()

    def network_spec(self, num_inputs: int, num_outputs: int, hidden_sizes: tuple[int, ...] | None = None) -> NetworkSpec:
        values = dataclasses.asdict(self.network)
        default_hidden = values.pop("hidden_sizes")
        hidden = default_hidden if hidden_sizes is None else hidden_sizes
        return NetworkSpec(layer_sizes=(num_inputs, *hidden, num_outputs), **values)


# --------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples / dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value} is out of range for a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        return value
    if tp is str or typing.get_origin(tp) is typing.Literal:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        allowed = typing.get_args(tp)
        if allowed and value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: Any, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in names:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(names))})")
    values = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError, SpecError) as error:
        raise ConfigError(f"{prefix or 'config'}: {error}") from None


MAX_SEED = 2**63 - 1
MAX_STEPS = 100_000  # inner steps of one episode
MAX_WIDTH = 1 << 20
MAX_STATES = 64
MAX_BATCH = 1 << 16
MAX_TASKS = 1 << 16
MAX_POPULATION = 1 << 20

# key -> (lowest, highest, lowest excluded). Integers and floats alike; None means unbounded on that side.
# Every float is also finite (checked on loading). Keys ending in [] apply to every item of a list.
BOUNDS: dict[str, tuple[float | None, float | None, bool]] = {
    "seed": (0, MAX_SEED, False),
    "network.hidden_sizes[]": (1, MAX_WIDTH, False),
    "network.num_states": (1, MAX_STATES, False),
    "network.saturation_epsilon": (0, None, False),
    "network.synapse_init_std": (0, None, False),
    "network.norm_epsilon": (0, None, False),
    "task.n_way": (1, 100_000, False),
    "task.batch_size": (1, MAX_BATCH, False),
    "task.num_query": (1, 1 << 20, False),
    "task.resize": (1, 1 << 14, False),
    "task.crop": (1, 1 << 14, False),
    "task.projection_dim": (1, MAX_WIDTH, False),
    "task.split_seed": (0, 2**32 - 1, False),
    "task.augment_shift": (0, 1 << 14, False),
    "task.augment_noise": (0, 1e6, False),
    "episode.num_steps": (1, MAX_STEPS, False),
    "episode.quantile": (0, 1, False),
    "episode.max_loss": (0, None, True),
    "strategy.population_size": (2, MAX_POPULATION, False),
    "strategy.sigma": (0, None, True),
    "strategy.init_seed": (0, MAX_SEED, False),
    "run.generations": (1, 10**9, False),
    "run.tasks_per_generation": (1, MAX_TASKS, False),
    "run.validation_every": (0, None, False),
    "run.validation_tasks": (1, MAX_TASKS, False),
    "run.checkpoint_every": (1, None, False),
    "run.max_evaluations": (1, None, False),
    "run.max_wall_time": (0, None, True),
    "run.curriculum.every": (0, None, False),
    "run.curriculum.increment": (0, MAX_STEPS, False),
    "run.curriculum.max_steps": (1, MAX_STEPS, False),
    "run.curriculum.every_inner_steps": (0, None, False),
    "evaluator.workers": (1, 4096, False),
    "evaluator.cpus_per_worker": (0, 4096, True),
    "evaluator.gpus_per_worker": (0, 64, False),
    "evaluator.max_retries": (0, 1000, False),
    "evaluator.max_memory_gb": (0, None, True),
    "report.test_tasks": (1, MAX_TASKS, False),
    "report.tuning_tasks": (1, MAX_TASKS, False),
    "report.learning_rates[]": (0, 1e6, True),
    "report.horizons[]": (1, MAX_STEPS, False),
    "run.settings_per_generation": (1, 4096, False),
}


def build_task(values: dict, where: str) -> TaskConfig:
    """A task section from plain values, type- and range-checked like ``task:`` (errors name ``where.key``)."""
    task = _build(TaskConfig, values, where)
    for key, (lo, hi, lo_open) in BOUNDS.items():
        if key.startswith("task.") and getattr(task, key[5:]) is not None:
            check_range(f"{where}.{key[5:]}", getattr(task, key[5:]), lo, hi, lo_open)
    return task


def resolve_settings(config: Config, which: str = "settings") -> list:
    """The resolved :class:`evolution.settings.Setting` list of ``config.settings`` (``which="settings"``;
    empty -> the one setting of the task/network/episode sections) or of ``config.report.settings``
    (``which="report"``; may be empty). Errors name the setting: ``settings[1].task.n_way: ...``."""
    from evolution.settings import Setting, default_name, valid_name

    entries = config.settings if which == "settings" else config.report.settings
    prefix = "settings" if which == "settings" else "report.settings"
    if which == "settings" and not entries:
        return [Setting(default_name(config.task, config.network.hidden_sizes, config.episode.num_steps), 1.0,
                        config.task, tuple(config.network.hidden_sizes), config.episode.num_steps)]
    base = {f.name: getattr(config.task, f.name) for f in dataclasses.fields(TaskConfig)}
    resolved, names = [], set()
    for i, entry in enumerate(entries):
        where = f"{prefix}[{i}]"
        task = build_task({**base, **entry.task}, f"{where}.task")
        hidden = tuple(entry.hidden_sizes) if entry.hidden_sizes is not None else tuple(config.network.hidden_sizes)
        for j, width in enumerate(hidden):
            check_range(f"{where}.hidden_sizes[{j}]", width, 1, MAX_WIDTH)
        num_steps = entry.num_steps if entry.num_steps is not None else config.episode.num_steps
        check_range(f"{where}.num_steps", num_steps, 1, MAX_STEPS)
        if not (math.isfinite(entry.weight) and entry.weight > 0):
            raise ConfigError(f"{where}.weight: must be a positive finite number, got {entry.weight}")
        name = entry.name or default_name(task, hidden, num_steps)
        if not valid_name(name):
            raise ConfigError(f"{where}.name: {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used by another setting; give each a distinct name")
        names.add(name)
        resolved.append(Setting(name, float(entry.weight), task, hidden, int(num_steps)))
    return resolved


def _range_text(lo, hi, lo_open) -> str:
    left = "(" if lo_open else "["
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def check_range(key: str, value: float | int, lo=None, hi=None, lo_open: bool = False) -> None:
    """Raise a ConfigError naming ``key`` and the accepted range when ``value`` lies outside it."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        kind = "an integer" if isinstance(value, int) else "a number"
        raise ConfigError(f"{key}: must be {kind} in {_range_text(lo, hi, lo_open)}, got {value}")


def _lookup(config: Any, key: str) -> Any:
    value = config
    for part in key.removesuffix("[]").split("."):
        value = getattr(value, part)
    return value


def check_bounds(config: Any, bounds: dict[str, tuple] = BOUNDS) -> None:
    for key, (lo, hi, lo_open) in bounds.items():
        value = _lookup(config, key)
        if value is None:
            continue
        if key.endswith("[]"):
            for i, item in enumerate(value):
                check_range(f"{key[:-2]}[{i}]", item, lo, hi, lo_open)
        else:
            check_range(key, value, lo, hi, lo_open)


ANTITHETIC_STRATEGIES = ("open_es", "pgpe", "persistent_es", "noise_reuse_es")
# strategies that carry each candidate's inner state across generations (partial unrolls)
TRUNCATION_AWARE = ("persistent_es", "noise_reuse_es")


def strategy_options(config: Config) -> dict[str, Any]:
    """The strategy's options as a run builds it: a truncation-aware strategy's ``unroll_length`` is the
    episode's ``num_steps`` (one whole unroll), and its ``truncation_length`` defaults to 10 (at most T)."""
    options = dict(config.strategy.options)
    if config.strategy.name in TRUNCATION_AWARE:
        options.setdefault("unroll_length", config.episode.num_steps)
        options.setdefault("truncation_length", min(10, config.episode.num_steps))
    return options


def check_strategy_options(name: str, options: dict, key: str = "strategy.options") -> None:
    """Options are typed values: finite numbers, bools, lists and mappings of them. Strings are refused for
    pycma, which evaluates string-valued options as Python expressions (an option must never run code)."""

    def walk(value, where):
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, int):
            if abs(value) > MAX_SEED:
                raise ConfigError(f"{where}: integer {value} is out of range")
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: must be a finite number, got {value}")
            return
        if isinstance(value, str):
            if name == "pycma":
                raise ConfigError(f"{where}: must be a number, bool or list, not the string {value[:40]!r} "
                                  "(pycma would evaluate it as a Python expression)")
            return
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
            return
        if isinstance(value, dict):
            for k, item in value.items():
                walk(item, f"{where}.{k}")
            return
        raise ConfigError(f"{where}: unsupported value of type {type(value).__name__}")

    for option, value in options.items():
        walk(value, f"{key}.{option}")


def _first_line(error: BaseException) -> str:
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__


def _validate(config: Config) -> None:
    check_bounds(config)
    if not config.report.learning_rates:
        raise ConfigError("report.learning_rates: must list at least one learning rate")
    curriculum = config.run.curriculum
    if curriculum.every and curriculum.every_inner_steps:
        raise ConfigError("run.curriculum.every_inner_steps: set either every (generations) or every_inner_steps, "
                          "not both")
    if curriculum.every_inner_steps and curriculum.max_steps is None:
        raise ConfigError("run.curriculum.max_steps: required with every_inner_steps (the horizon must be bounded)")
    if curriculum.max_steps is not None and curriculum.max_steps < config.episode.num_steps:
        raise ConfigError(f"run.curriculum.max_steps: must be >= episode.num_steps ({config.episode.num_steps}), "
                          f"got {curriculum.max_steps}")
    if config.evaluator.kind not in ("local", "ray"):
        raise ConfigError("evaluator.kind: must be 'local' or 'ray'")
    if config.evaluator.kind == "ray":
        try:
            require_extra("ray", "ray", "evaluator.kind: ray")
        except MissingExtra as error:
            raise ConfigError(str(error)) from None
    _validate_backend(config)
    _validate_devices(config)
    if config.evaluator.kind == "local" and config.evaluator.backend == "jax":
        # JAX fixes its host devices when its backend starts, and checking an evosax strategy's options below
        # starts it: ask for evaluator.devices' host devices first (a no-op once JAX has started). Every Config
        # passes here (load_config, config_from_dict) before a run builds its evaluator.
        from workers.evaluator import request_devices

        request_devices(config.evaluator.devices)
    _validate_settings(config)
    unknown = set(config.report.baselines) - {"sgd", "momentum", "adam"}
    if unknown:
        raise ConfigError(f"report.baselines: unknown baseline(s) {sorted(unknown)}; use sgd, momentum, adam")
    from evolution.strategies import STRATEGIES, make_strategy

    strategy = config.strategy
    if strategy.name not in STRATEGIES:
        raise ConfigError(f"strategy.name: unknown strategy {strategy.name!r}; choose from {', '.join(STRATEGIES)}")
    if strategy.name in ANTITHETIC_STRATEGIES and strategy.population_size % 2:
        raise ConfigError(f"strategy.population_size: {strategy.name} samples antithetic pairs, so the population "
                          f"must be even; got {strategy.population_size}")
    check_strategy_options(strategy.name, strategy.options)
    if strategy.name in TRUNCATION_AWARE:
        options = strategy.options
        if options.get("unroll_length", config.episode.num_steps) != config.episode.num_steps:
            raise ConfigError(f"strategy.options.unroll_length: a whole unroll is episode.num_steps "
                              f"({config.episode.num_steps}) inner steps; leave it out or set it equal")
        rules = [("evaluator.kind", config.evaluator.kind == "local", "must be 'local' (each candidate's inner "
                  "state stays in this process)"),
                 ("run.curriculum.every", config.run.curriculum.every == 0, "must be 0 (the unroll length is fixed)"),
                 ("run.curriculum.every_inner_steps", config.run.curriculum.every_inner_steps == 0,
                  "must be 0 (the unroll length is fixed)"),
                 ("episode.skip_last_update", not config.episode.skip_last_update, "must be false")]
        for key, ok, message in rules:
            if not ok:
                raise ConfigError(f"{key}: {message} for the truncation-aware strategy {strategy.name}")
    try:
        spec = config.network_spec(2, 2)
    except SpecError as error:
        raise ConfigError(f"network: {error}") from None
    from genome.params import num_dims

    try:
        make_strategy(strategy.name, num_dims(spec), strategy.population_size, strategy_options(config))
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"strategy.options: {_first_line(error)}") from None


def _validate_settings(config: Config) -> None:
    """The settings lists: each entry resolves (errors name it), one genome shape for all of them (per-layer
    genomes need one depth), and the features that assume one fixed task batch are refused with them."""
    from evolution.settings import NORMALIZATIONS

    if config.run.setting_normalization not in NORMALIZATIONS:
        raise ConfigError(f"run.setting_normalization: must be one of {', '.join(NORMALIZATIONS)}; got "
                          f"{config.run.setting_normalization!r}")
    settings = resolve_settings(config)
    heldout = resolve_settings(config, "report")
    if config.network.per_layer_genome:
        depth = len(settings[0].hidden_sizes)
        for prefix, entries in (("settings", settings), ("report.settings", heldout)):
            for i, setting in enumerate(entries):
                if len(setting.hidden_sizes) != depth:
                    raise ConfigError(
                        f"{prefix}[{i}] ({setting.name}): {len(setting.hidden_sizes)} hidden layers, but "
                        f"network.per_layer_genome ties the genome to {depth} (settings[0]); use one depth or "
                        "a shared genome")
    if not config.settings:
        if config.run.settings_per_generation is not None:
            raise ConfigError("run.settings_per_generation: needs a settings list")
        return
    if config.run.settings_per_generation is not None and config.run.settings_per_generation > len(settings):
        raise ConfigError(f"run.settings_per_generation: {config.run.settings_per_generation} is more than the "
                          f"{len(settings)} settings")
    rules = [("run.curriculum.every", config.run.curriculum.every == 0),
             ("run.curriculum.every_inner_steps", config.run.curriculum.every_inner_steps == 0),
             ("strategy.name", config.strategy.name not in TRUNCATION_AWARE)]
    for key, ok in rules:
        if not ok:
            raise ConfigError(f"{key}: not supported with a settings list (each setting has its own fixed horizon "
                              "and task batch); use one setting or turn it off")


def _validate_backend(config: Config) -> None:
    """``evaluator.backend`` and ``episode.precision``: what the chosen backend can run (the CPU's bf16 units
    are checked where the evaluator starts, :class:`workers.evaluator.LocalEvaluator`)."""
    backend, precision = config.evaluator.backend, config.episode.precision
    if backend not in ("jax", "torch"):
        raise ConfigError(f"evaluator.backend: must be 'jax' or 'torch', got {backend!r}")
    if backend == "jax":
        if precision != "float32":
            raise ConfigError(f"episode.precision: {precision} runs on evaluator.backend: torch (the JAX engine "
                              "evaluates in float32: its CPU backend has no fast bf16 GEMM)")
        return
    try:
        require_extra("torch", "torch", "evaluator.backend: torch")
    except MissingExtra as error:
        raise ConfigError(str(error)) from None
    from workers.torch_engine import check_support

    if config.strategy.name in TRUNCATION_AWARE:
        raise ConfigError(f"evaluator.backend: torch does not run the truncated windows of {config.strategy.name}; "
                          "use evaluator.backend: jax")
    if config.evaluator.gpus_per_worker > 0:
        raise ConfigError("evaluator.gpus_per_worker: the torch backend runs on CPU; use evaluator.backend: jax "
                          "for GPU workers")
    try:
        check_support(config.network_spec(2, 2))
    except (ValueError, SpecError) as error:
        raise ConfigError(f"network: {_first_line(error)}") from None


def _validate_devices(config: Config) -> None:
    """``evaluator.devices``: a count of at least 1 or ``auto``; more than one only for the in-process JAX engine."""
    devices = config.evaluator.devices
    if devices == "auto":
        return
    if isinstance(devices, str) or not 1 <= devices <= 4096:
        raise ConfigError(f"evaluator.devices: must be an integer in [1, 4096] or 'auto', got {devices!r}")
    if devices > 1 and config.evaluator.kind != "local":
        raise ConfigError("evaluator.devices: splits the in-process evaluator; Ray runs one device per worker "
                          "(use evaluator.workers), so set evaluator.devices: 1 or auto")
    if devices > 1 and config.evaluator.backend != "jax":
        raise ConfigError("evaluator.devices: the torch backend runs on one device; set evaluator.devices: 1 or auto")


# ------------------------------------------------------------------------------------------------ YAML

MAX_YAML_BYTES = 1 << 20  # a config file
MAX_OVERRIDE_BYTES = 1 << 16  # one --set value
MAX_YAML_NODES = 100_000  # nodes of the document after alias expansion


def _float_resolver_pattern() -> re.Pattern:
    # YAML 1.1 needs a dot in exponent floats; accept 1e6, -2E-3, 5e+2 as a person writes them.
    return re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+[eE][-+]?[0-9]+$")


class _ConfigLoader(yaml.SafeLoader):
    """safe_load plus exponent floats and a cap on the expanded size of the document (aliases)."""

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node)
        return node


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _float_resolver_pattern(), list("-+0123456789."))


def _check_expanded_size(root) -> None:
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node) -> int:
        ident = id(node)
        if ident in sizes:
            return sizes[ident]
        if ident in active:
            raise ConfigError("YAML: recursive alias")
        active.add(ident)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(ident)
        if total > MAX_YAML_NODES:
            raise ConfigError(f"YAML: the document expands to more than {MAX_YAML_NODES} values through "
                              "aliases/anchors; write the values out")
        sizes[ident] = total
        return total

    if root is not None:
        size(root)


def parse_yaml(text: str, what: str, limit: int = MAX_YAML_BYTES) -> Any:
    """Parse YAML text with the guards above; every problem is a one-line ConfigError naming ``what``."""
    if len(text.encode("utf-8", "surrogatepass")) > limit:
        raise ConfigError(f"{what}: larger than {limit} bytes")
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{what}: invalid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply") from None


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b=value`` (value parsed as YAML) to the raw config mapping ``data`` in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    try:
        value = parse_yaml(raw, f"--set {path}", MAX_OVERRIDE_BYTES) if raw.strip() else ""
    except ConfigError as error:
        raise ConfigError(f"--set {path}: cannot parse value {raw[:40]!r} ({str(error).split(': ', 1)[-1]})") from None
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {key} is not a section")
    node[keys[-1]] = value


PRESETS = ("official",)


def _apply_preset(data: dict) -> dict:
    """``network.preset: official``: the published code's defaults (``genome.spec.OFFICIAL_DEFAULTS``) under
    the section's own keys, and ``episode.skip_last_update: true`` unless the episode sets it."""
    network = data.get("network")
    if not isinstance(network, dict) or "preset" not in network:
        return data
    network = dict(network)
    preset = network.pop("preset")
    if preset not in PRESETS:
        raise ConfigError(f"network.preset: must be one of {', '.join(PRESETS)}; got {preset!r}")
    data = dict(data, network={**OFFICIAL_DEFAULTS, **network})
    episode = data.get("episode")
    if episode is None or isinstance(episode, dict):
        data["episode"] = {"skip_last_update": True, **(episode or {})}
    return data


def config_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> Config:
    data = dict(data or {})
    for assignment in overrides:
        apply_override(data, assignment)
    data = _apply_preset(data)
    config = _build(Config, data, "")
    _validate(config)
    return config


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Load and validate a YAML config file; every problem is a one-line ConfigError."""
    data = read_yaml_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return config_from_dict(data, overrides)


def shipped_config_dirs() -> list[Path]:
    """Where the configs that ship with blur-evolve live: the source tree's ``configs/`` (also an editable
    install) and ``<prefix>/share/blur-evolve/configs`` (a wheel install, see pyproject's data-files)."""
    import sys

    return [Path(__file__).resolve().parents[1] / "configs", Path(sys.prefix) / "share" / "blur-evolve" / "configs"]


def shipped_configs() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in shipped_config_dirs():
        for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else ():
            found.setdefault(path.stem, path)
    return found


def resolve_config_path(name: str | Path) -> Path:
    """``name`` as a path if it exists, else a shipped config of that name (``digits``, ``digits.yaml``)."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    shipped = shipped_configs().get(path.name.removesuffix(".yaml"))
    if shipped is None:
        raise ConfigError(f"config file not found: {name} (shipped configs: {', '.join(shipped_configs()) or 'none'})")
    return shipped


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file through :func:`parse_yaml` (size checked before reading it whole)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES} bytes")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    return parse_yaml(text, str(path))


def config_to_dict(config: Config) -> dict:
    """Plain YAML-ready mapping (tuples as lists) of a config; ``config_from_dict`` inverts it."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
