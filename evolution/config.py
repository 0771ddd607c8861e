"""Experiment configs: YAML (``safe_load``) into typed, frozen dataclasses.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key (``task.n_way``).
``overrides`` (``--set a.b=value``) are parsed as YAML scalars/lists and type-checked the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genome.spec import NetworkSpec, SpecError
from workers.engine import EpisodeConfig
from workers.tasks import TaskConfig


class ConfigError(ValueError):
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


@dataclass(frozen=True)
class EvaluatorConfig:
    kind: str = "local"  # "local" (in-process) | "ray"
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    ray_address: str | None = None  # None: start a local Ray; "auto": an existing cluster
    max_retries: int = 3


@dataclass(frozen=True)
class ReportConfig:
    test_tasks: int = 32
    baselines: tuple[str, ...] = ("sgd", "momentum", "adam")
    learning_rates: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    tuning_tasks: int = 16  # validation tasks used to pick each baseline's learning rate
    backprop_genome: bool = True


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

    def network_spec(self, num_inputs: int, num_outputs: int) -> NetworkSpec:
        values = dataclasses.asdict(self.network)
        hidden = values.pop("hidden_sizes")
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
        return float(value)
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


def _validate(config: Config) -> None:
    checks = [
        ("strategy.population_size", config.strategy.population_size >= 2, "must be >= 2"),
        ("strategy.sigma", config.strategy.sigma > 0, "must be > 0"),
        ("run.generations", config.run.generations >= 1, "must be >= 1"),
        ("run.tasks_per_generation", config.run.tasks_per_generation >= 1, "must be >= 1"),
        ("run.validation_every", config.run.validation_every >= 0, "must be >= 0"),
        ("run.validation_tasks", config.run.validation_tasks >= 1, "must be >= 1"),
        ("run.checkpoint_every", config.run.checkpoint_every >= 1, "must be >= 1"),
        ("run.curriculum.every", config.run.curriculum.every >= 0, "must be >= 0"),
        ("run.curriculum.increment", config.run.curriculum.increment >= 0, "must be >= 0"),
        ("evaluator.kind", config.evaluator.kind in ("local", "ray"), "must be 'local' or 'ray'"),
        ("evaluator.workers", config.evaluator.workers >= 1, "must be >= 1"),
        ("evaluator.gpus_per_worker", config.evaluator.gpus_per_worker >= 0, "must be >= 0"),
        ("evaluator.cpus_per_worker", config.evaluator.cpus_per_worker > 0, "must be > 0"),
        ("report.test_tasks", config.report.test_tasks >= 1, "must be >= 1"),
        ("network.hidden_sizes", all(n >= 1 for n in config.network.hidden_sizes), "widths must be >= 1"),
    ]
    for key, ok, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    unknown = set(config.report.baselines) - {"sgd", "momentum", "adam"}
    if unknown:
        raise ConfigError(f"report.baselines: unknown baseline(s) {sorted(unknown)}; use sgd, momentum, adam")
    from evolution.strategies import STRATEGIES

    if config.strategy.name not in STRATEGIES:
        raise ConfigError(f"strategy.name: unknown strategy {config.strategy.name!r}; choose from {', '.join(STRATEGIES)}")
    try:
        config.network_spec(2, 2)
    except SpecError as error:
        raise ConfigError(f"network: {error}") from None


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b=value`` (value parsed as YAML) to the raw config mapping ``data`` in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {path}: cannot parse value {raw!r}") from None
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {key} is not a section")
    node[keys[-1]] = value


def config_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> Config:
    data = dict(data or {})
    for assignment in overrides:
        apply_override(data, assignment)
    config = _build(Config, data, "")
    _validate(config)
    return config


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Load and validate a YAML config file; every problem is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return config_from_dict(data, overrides)


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
