"""``blur inspect`` (genome files and run directories) and ``blur evaluate`` (held-out learning curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

import genome as G

MATRIX_NAMES = {"forward_transform": "ν forward", "backward_transform": "µ backward",
                "pre_transform": "ν̃ pre-synaptic", "post_transform": "µ̃ post-synaptic"}


def backprop_distance(spec: G.NetworkSpec, genome: G.Genome) -> float | None:
    """Frobenius distance of the four k×k transforms to those of the backprop genome (k = 2 only)."""
    if spec.num_states != 2:
        return None
    _, reference = G.backprop_genome(spec.layer_sizes, 0.1)
    return float(np.sqrt(sum(np.sum((np.asarray(getattr(genome, n)) - np.asarray(getattr(reference, n))) ** 2)
                             for n in MATRIX_NAMES)))


def genome_summary(spec: G.NetworkSpec, genome: G.Genome, metadata: dict) -> dict[str, Any]:
    return {
        "spec": spec.to_dict(),
        "genome": {name: np.asarray(value).tolist() for name, value in genome._asdict().items()},
        "num_dims": G.num_dims(spec),
        "options": spec.non_default_options(),
        "official_preset": _official_differences(spec) == {},
        "distance_to_backprop_genome": backprop_distance(spec, genome),
        "metadata": metadata,
    }


def _official_differences(spec: G.NetworkSpec) -> dict[str, Any]:
    """The fields of ``spec`` that differ from :meth:`NetworkSpec.official` of its shape."""
    official = G.NetworkSpec.official(spec.layer_sizes, spec.num_states)
    return {k: v for k, v in spec.to_dict().items() if v != official.to_dict()[k]}


def _rule_lines(spec: G.NetworkSpec, genome: G.Genome) -> list[str]:
    """The transforms and rates of one (layer pair's) genome."""
    lines = []
    for name, label in MATRIX_NAMES.items():
        matrix = np.asarray(getattr(genome, name))
        lines.append(f"{label} [{name}] (row = source state, column = destination state):")
        lines += ["   " + "  ".join(f"{v:+8.4f}" for v in row) for row in matrix]
    lines.append(f"f (neuron keep) {float(genome.neuron_keep):+.4g}   η (neuron update) {float(genome.neuron_update):+.4g}"
                 f"   f̃ (synapse keep) {float(genome.synapse_keep):+.4g}   η̃ (synapse update) {float(genome.synapse_update):+.4g}")
    if spec.activation_norm:
        lines.append(f"norm scale {np.asarray(genome.norm_scale).round(4).tolist()}  "
                     f"shift {np.asarray(genome.norm_shift).round(4).tolist()}")
    if spec.oja:
        lines.append(f"Oja multiplier {float(genome.oja):+.4g}")
    if spec.saturation:
        lines.append(f"saturation {float(genome.saturation):+.4g}")
    if spec.forward_synapse_update:
        for name in ("forward_pre_transform", "forward_post_transform"):
            lines.append(f"{name} (forward-pass Hebbian update):")
            lines += ["   " + "  ".join(f"{v:+8.4f}" for v in row) for row in np.asarray(getattr(genome, name))]
        lines.append(f"forward f̃ {float(genome.forward_synapse_keep):+.4g}   "
                     f"forward η̃ {float(genome.forward_synapse_update):+.4g}")
    return lines


def format_genome(spec: G.NetworkSpec, genome: G.Genome, metadata: dict) -> str:
    lines = [f"network {spec.layer_sizes}, k={spec.num_states} states, genome dims {G.num_dims(spec)}"]
    flags = {k: v for k, v in spec.to_dict().items() if k not in ("layer_sizes", "num_states")}
    lines.append("spec: " + ", ".join(f"{k}={v}" for k, v in flags.items()))
    options = spec.non_default_options()
    lines.append("options in use: " + (", ".join(f"{k}={v}" for k, v in options.items()) or "none (all defaults)"))
    differences = _official_differences(spec)
    lines.append("published-code defaults (network.preset: official): " + (
        "yes" if not differences else "no; differs in " + ", ".join(sorted(differences))))
    for layer in range(spec.num_layers if spec.per_layer_genome else 1):
        if spec.per_layer_genome:
            lines.append(f"--- genome of layer pair {layer} ({spec.layer_sizes[layer]} -> {spec.layer_sizes[layer + 1]})")
        lines += _rule_lines(spec, G.layer_genome(spec, genome, layer))
    distance = backprop_distance(spec, genome)
    if distance is not None:
        lines.append(f"distance of the transforms to the backprop genome: {distance:.4f}")
    if metadata:
        lines.append("metadata: " + json.dumps(metadata, sort_keys=True))
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def genome_figure(spec: G.NetworkSpec, genome: G.Genome, title: str = "genome"):
    """The four k×k transforms as heatmaps (state ticks 0..k-1, values in the cells for k ≤ 6), the backprop
    genome's transforms beside them where it exists (k = 2), and every scalar of the genome in the title."""
    plt = _pyplot()
    k = spec.num_states
    rows = [("evolved", genome)]
    if k == 2 and not spec.per_layer_genome:
        rows.append(("backprop genome", G.backprop_genome(spec.layer_sizes, 0.1)[1]))
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 3.3 * len(rows)), squeeze=False)
    for (row_name, g), row_axes in zip(rows, axes):
        for ax, (name, label) in zip(row_axes, MATRIX_NAMES.items()):
            matrix = np.asarray(getattr(g, name))
            if spec.per_layer_genome:  # the layer pairs side by side
                matrix = np.concatenate(list(matrix), axis=1)
            limit = max(float(np.abs(matrix).max()), 1e-6)
            image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"{label} ({row_name})")
            ax.set_xlabel("destination state")
            ax.set_ylabel("source state")
            ax.set_xticks(range(matrix.shape[1]), [str(c % k) for c in range(matrix.shape[1])])
            ax.set_yticks(range(k), [str(d) for d in range(k)])
            if k <= 6:
                for (d, c), value in np.ndenumerate(matrix):
                    ax.text(c, d, f"{value:.2f}", ha="center", va="center", fontsize=8)
            fig.colorbar(image, ax=ax, fraction=0.046)
    def scalars(g):
        values = [("f", g.neuron_keep), ("η", g.neuron_update), ("f̃", g.synapse_keep), ("η̃", g.synapse_update)]
        if spec.oja and spec.oja_use_multiplier:
            values.append(("Oja", g.oja))
        if spec.saturation:
            values.append(("saturation", g.saturation))
        return ", ".join(f"{n}={', '.join(f'{v:.3g}' for v in np.ravel(np.asarray(x)))}" for n, x in values)
    layers = "; layer pairs side by side" if spec.per_layer_genome else ""
    fig.suptitle(f"{title}: k={spec.num_states}{layers}; {scalars(genome)}")
    fig.tight_layout()
    return fig


def plot_genome(spec: G.NetworkSpec, genome: G.Genome, path: Path, title: str = "genome") -> Path:
    return _save(genome_figure(spec, genome, title), path)


def fitness_figure(runs: dict[str, list[dict]], fitness: str = "fitness", title: str | None = None):
    """Fitness histories of one or more runs on one axes: per run the generation's best (train) and mean
    fitness, and the validation fitness where measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rows in runs.items():
        prefix = f"{name}: " if len(runs) > 1 else ""
        generations = [r["generation"] for r in rows]
        (line,) = ax.plot(generations, [r["best_fitness"] for r in rows], label=f"{prefix}best candidate (train tasks)")
        if len(runs) == 1:
            ax.plot(generations, [r["mean_fitness"] for r in rows], label="population mean (train tasks)")
        val = [(r["generation"], r["val_fitness"]) for r in rows if "val_fitness" in r]
        if val:
            ax.plot(*zip(*val), "o--", color=line.get_color() if len(runs) > 1 else None,
                    label=f"{prefix}validation (held-out tasks)")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"{fitness.replace('_', ' ')} (lower is better)")
    ax.set_title(title or f"{fitness.replace('_', ' ')} per generation" + (f" — {next(iter(runs))}" if len(runs) == 1 else
                                                                       f" — {len(runs)} runs"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_fitness(rows: list[dict], path: Path, name: str = "run", fitness: str = "fitness") -> Path:
    return _save(fitness_figure({name: rows}, fitness), path)


def inspect_runs(paths: list[Path], as_json: bool = False, plot: str | None = None) -> int:
    """``blur inspect RUN RUN ...``: the runs' held-out reports side by side and, with ``plot``, their
    fitness histories in one plot."""
    from evolution.checkpoint import MetricsLog
    from evolution.config import ConfigError, load_config

    if len(paths) == 1:
        return inspect_path(paths[0], as_json, plot)
    runs = {}
    for path in paths:
        if not (path.is_dir() and (path / "config.yaml").is_file()):
            raise ConfigError(f"{path}: not a run directory (several paths must all be run directories)")
        report_path = path / "report.json"
        runs[path.name] = {"status": run_status(path), "rows": MetricsLog(path / "metrics.jsonl").read(),
                           "report": json.loads(report_path.read_text()) if report_path.is_file() else None,
                           "fitness": load_config(path / "config.yaml").episode.fitness}
    if as_json:
        print(json.dumps([{"run_dir": info["status"]["run_dir"], **info["status"], "report": info["report"]}
                          for info in runs.values()], indent=2))
    else:
        methods = list(dict.fromkeys(m for info in runs.values() for m in (info["report"] or {}).get("methods", {})))
        names = list(runs)
        print("held-out accuracy (mean ± standard error over the report's test tasks):")
        print(f"{'method':<20}" + "".join(f"  {name[:22]:>22}" for name in names))
        for method in methods:
            cells = []
            for name in names:
                row = ((runs[name]["report"] or {}).get("methods") or {}).get(method)
                cells.append("-" if not row or row.get("accuracy") is None
                             else f"{row['accuracy']:.3f} ± {row.get('accuracy_stderr', 0.0):.3f}")
            print(f"{method:<20}" + "".join(f"  {cell:>22}" for cell in cells))
    if plot:
        metrics = {info["fitness"] for info in runs.values()}
        fitness = metrics.pop() if len(metrics) == 1 else "fitness"
        figure = fitness_figure({name: info["rows"] for name, info in runs.items()}, fitness)
        written = _save(figure, Path(f"{plot}_fitness.png"))
        if not as_json:
            print(f"plot: {written}")
    return 0


def inspect_path(path: Path, as_json: bool = False, plot: str | None = None) -> int:
    from evolution.checkpoint import MetricsLog, load_checkpoint
    from evolution.config import ConfigError, load_config

    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{path}: not a run directory (no config.yaml)")
        config = load_config(path / "config.yaml")
        counters = load_checkpoint(path)[0] if (path / "checkpoint.ckpt").exists() else {}
        rows = MetricsLog(path / "metrics.jsonl").read()
        best = G.load(path / "best.genome") if (path / "best.genome").exists() else None
        report = json.loads((path / "report.json").read_text()) if (path / "report.json").exists() else None
        if as_json:
            out = {"run_dir": str(path), "config_generations": config.run.generations, "counters": counters,
                   "metrics": rows, "best_genome": genome_summary(*best) if best else None, "report": report}
            print(json.dumps(out, indent=2))
        else:
            print(f"run {path}: {config.strategy.name} on {config.task.family}, "
                  f"generation {counters.get('generation', 0)}/{config.run.generations}, "
                  f"{counters.get('evaluations', 0)} evaluations, stop reason {counters.get('stop_reason')}")
            print(f"{'gen':>5} {'T':>4} {'best':>9} {'mean':>9} {'val_acc':>8} {'diverged':>8}")
            stride = max(1, len(rows) // 20)
            for row in rows[::stride] + ([rows[-1]] if rows and (len(rows) - 1) % stride else []):
                val = f"{row['val_accuracy']:.3f}" if "val_accuracy" in row else "-"
                print(f"{row['generation']:>5} {row['num_steps']:>4} {row['best_fitness']:>9.4f} "
                      f"{row['mean_fitness']:>9.4f} {val:>8} {row['diverged']:>8}")
            if best:
                print("\nbest genome:")
                print(format_genome(*best))
            if report:
                from workers.report import format_table

                print()
                print(format_table(report))
        if plot:
            written = [plot_fitness(rows, Path(f"{plot}_fitness.png"), path.name, config.episode.fitness)] if rows else []
            if best:
                written.append(plot_genome(best[0], best[1], Path(f"{plot}_genome.png"), f"best genome of {path.name}"))
            if not as_json:
                print("plots: " + ", ".join(map(str, written)))
        return 0
    spec, genome, metadata = G.load(path)
    if as_json:
        print(json.dumps(genome_summary(spec, genome, metadata), indent=2))
    else:
        print(format_genome(spec, genome, metadata))
    if plot:
        written = plot_genome(spec, genome, Path(plot if plot.endswith(".png") else f"{plot}_genome.png"), path.name)
        if not as_json:
            print(f"plot: {written}")
    return 0


def _curve(ax, steps, row: dict[str, Any], label: str, banded: bool, markersize: float) -> None:
    """One method's mean learning curve (``row["curve"]``) and, if ``banded``, its band of ± one standard
    error over tasks (``row["curve_stderr"]``)."""
    mean = np.asarray(row["curve"], dtype=float)
    ax.plot(steps, mean, marker="o", markersize=markersize, label=label)
    if banded:
        error = np.asarray(row["curve_stderr"], dtype=float)
        ax.fill_between(steps, mean - error, mean + error, alpha=0.2)


def curves_figure(report: dict[str, Any], curve_steps: list[int], title: str):
    """Learning curves of a held-out report: mean query accuracy over the report's tasks after each number of
    inner steps (every ~5% of the horizon) with a band of ± one standard error over tasks where the report
    has it (reports written before it stored ``curve_stderr`` plot the mean only, and the label says so), and
    the chance line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    banded = all(row.get("curve_stderr") for row in report["methods"].values())
    for method, row in report["methods"].items():
        _curve(ax, curve_steps, row, method, banded, markersize=3)
    n_way = report.get("n_way")
    if n_way:
        ax.axhline(1.0 / n_way, color="0.5", linewidth=1, linestyle=(0, (4, 4)), label=f"chance (1/{n_way})")
    ax.set_xlabel("inner steps")
    spread = "mean ± s.e." if banded else "mean"
    ax.set_ylabel(f"query accuracy ({spread} over {report.get('num_tasks', '?')} held-out tasks)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _evaluate_overrides(assignments: Sequence[str]) -> tuple[dict[str, Any], tuple[int, ...] | None]:
    """``--set`` of ``blur evaluate``: ``task.KEY=VALUE`` (any task key) and ``network.hidden_sizes=[...]``."""
    from evolution.config import ConfigError, apply_override

    data: dict[str, Any] = {}
    for assignment in assignments:
        apply_override(data, assignment)
    unknown = sorted(set(data) - {"task", "network"}) + sorted(f"network.{k}" for k in data.get("network", {})
                                                             if k != "hidden_sizes")
    if unknown:
        raise ConfigError(f"--set {unknown[0]}: blur evaluate takes task.* and network.hidden_sizes only")
    hidden = data.get("network", {}).get("hidden_sizes")
    return data.get("task", {}), None if hidden is None else hidden


def evaluate_genome(genome: str, task: str = "digits", steps: int = 20, num_tasks: int = 64, split: str = "test",
                    n_way: int | None = None, batch_size: int = 16, hidden: tuple[int, ...] | None = None,
                    data_dir: str | None = None, seed: int = 0, as_json: bool = False, plot: str | None = None,
                    horizons: Sequence[int] | None = None, overrides: Sequence[str] = (),
                    tuning_tasks: int = 16) -> int:
    """``blur evaluate``: the generalization report (:func:`workers.report.generalization_report`) of
    ``genome`` (a file, ``backprop`` or ``random``) on one setting — the task family ``task`` with the
    ``--set task.*`` overrides, the hidden widths ``hidden`` / ``--set network.hidden_sizes`` (default: the
    genome's own) — at each of ``horizons`` (default: ``steps``), against the backprop genome and the tuned
    baselines. Prints a table (or JSON) and optionally writes a PNG of the learning curves. Values are
    checked here (ConfigError naming the flag), so the library call is as safe as the CLI."""
    from evolution.config import MAX_BATCH, MAX_SEED, MAX_STEPS, MAX_TASKS, MAX_WIDTH, ConfigError, build_task, check_range
    from evolution.resources import check_memory, estimate
    from evolution.run import task_family
    from evolution.settings import Setting
    from workers.report import format_generalization, generalization_report, reshape_spec
    from workers.tasks import FAMILIES

    if task not in FAMILIES:
        raise ConfigError(f"--task: unknown family {task!r}; see `blur tasks`")
    horizons = [int(h) for h in (horizons or [steps])]
    for flag, value, hi in (("--steps", steps, MAX_STEPS), ("--tasks", num_tasks, MAX_TASKS),
                            ("--batch-size", batch_size, MAX_BATCH), ("--seed", seed, MAX_SEED)):
        check_range(flag, value, 0 if flag == "--seed" else 1, hi)
    for horizon in horizons:
        check_range("--horizons", horizon, 1, MAX_STEPS)
    if n_way is not None:
        check_range("--n-way", n_way, 1, 100_000)
    task_overrides, set_hidden = _evaluate_overrides(overrides)
    hidden = set_hidden if set_hidden is not None else hidden
    for width in hidden or ():
        check_range("--hidden", width, 1, MAX_WIDTH)
    base = {"family": task, "n_way": n_way, "batch_size": batch_size, "data_dir": data_dir}
    task_config = build_task({**{k: v for k, v in base.items() if v is not None}, **task_overrides}, "task")
    family = task_family(task_config, "train")
    task_family(task_config, split)
    task_family(task_config, "validation")
    if genome == "backprop":
        layers = (family.num_inputs, *(tuple(hidden) if hidden else (32,)), family.num_classes)
        spec, rule = G.backprop_genome(layers, 1.0, loss="cross_entropy")
        name = "backprop genome (lr 1)"
    elif genome == "random":
        spec = G.NetworkSpec((family.num_inputs, *(tuple(hidden) if hidden else (32,)), family.num_classes))
        rule = G.random_genome(spec, jax.random.key(seed))
        name = "random genome"
    else:
        spec, rule, _ = G.load(genome)
        name = f"genome {Path(genome).name}"
    widths = tuple(hidden) if hidden else tuple(spec.layer_sizes[1:-1])
    try:
        spec = reshape_spec(spec, (family.num_inputs, *widths, family.num_classes))
    except ValueError as error:
        raise ConfigError(f"{genome}: {error}; set --hidden or network.hidden_sizes to that depth") from None
    check_memory(estimate(spec.layer_sizes, spec.num_states, task_config.batch_size, task_config.num_query,
                          max(horizons), 4, num_tasks, G.num_dims(spec)),
                 None, "resources", "--tasks, --horizons, --batch-size or the network's widths")
    setting_name = f"{task}-{family.num_classes}way-{'x'.join(map(str, widths))}"
    setting = Setting(setting_name, 1.0, task_config, widths, max(horizons))
    from workers import baselines
    from workers.report import Progress, report_units

    units = len(horizons) * report_units(1, baselines.DEFAULT_LEARNING_RATES, baselines.OPTIMIZERS, True)
    report = generalization_report(spec, rule, [setting], horizons, jax.random.fold_in(jax.random.key(seed), 3),
                                   num_test_tasks=num_tasks, num_tuning_tasks=tuning_tasks, rule_name=name, split=split,
                                   progress=Progress("evaluate", units))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(format_generalization(report))
    if plot:
        path = plot_generalization(report, Path(plot), f"{name} on {task}")
        if not as_json:
            print(f"plot: {path}")
    return 0


def generalization_figure(report: dict[str, Any], title: str):
    """Learning curves of a generalization report: one panel per setting at its longest horizon, mean query
    accuracy over the cell's test tasks with a band of ± one standard error over tasks, and the chance line."""
    plt = _pyplot()
    settings = report["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.5), squeeze=False)
    for ax, (name, setting) in zip(axes[0], settings.items()):
        horizon = max(setting["horizons"], key=int)
        cell = setting["horizons"][horizon]
        steps = cell["curve_steps"]
        for method, row in cell["methods"].items():
            _curve(ax, steps, row, method, True, markersize=2.5)
        ax.axhline(1.0 / setting["n_way"], color="0.5", linewidth=1, linestyle=(0, (4, 4)),
                   label=f"chance (1/{setting['n_way']})")
        ax.set_xlabel("inner steps")
        ax.set_ylabel(f"query accuracy (mean ± s.e. over {cell['num_tasks']} test tasks)")
        ax.set_title(f"{name}: network {'-'.join(map(str, setting['layer_sizes']))}, T = {horizon}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_generalization(report: dict[str, Any], path: Path, title: str) -> Path:
    return _save(generalization_figure(report, title), path)


def run_status(path: Path) -> dict[str, Any]:
    """One run directory at a glance (reads files only, changes nothing): config source, status (running /
    finished / stopped, no report / incomplete / unreadable), generations, best validation accuracy, the
    evolved rule's held-out accuracy, wall time of the evolution (generations and validation) and of the
    held-out report."""
    from evolution.checkpoint import CheckpointError, MetricsLog, load_checkpoint
    from evolution.rundir import lock_holder

    info: dict[str, Any] = {"run_dir": str(path), "config": None, "status": "incomplete", "generation": 0,
                            "generations": None, "best_val_accuracy": None, "heldout_accuracy": None,
                            "wall_time": None, "report_seconds": None}
    try:
        provenance = json.loads((path / "provenance.json").read_text())
        source = provenance.get("config_source")
        info["config"] = Path(source).stem if source else None
    except (OSError, ValueError):
        pass
    try:
        import yaml

        info["generations"] = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("run", {}).get(
            "generations")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        pass
    counters: dict[str, Any] = {}
    if (path / "checkpoint.ckpt").exists():
        try:
            counters = load_checkpoint(path)[0]
        except (CheckpointError, OSError):
            info["status"] = "unreadable checkpoint"
    info["generation"] = counters.get("generation", 0)
    info["wall_time"] = counters.get("elapsed")
    try:
        rows = MetricsLog(path / "metrics.jsonl").read()
    except (OSError, ValueError, CheckpointError):
        rows = []
    accuracies = [row["val_accuracy"] for row in rows if "val_accuracy" in row]
    info["best_val_accuracy"] = max(accuracies) if accuracies else None
    report = None
    try:
        report = json.loads((path / "report.json").read_text())
        info["heldout_accuracy"] = report["methods"]["evolved rule"]["accuracy"]
        info["report_seconds"] = report.get("report_seconds")
    except (OSError, ValueError, KeyError, TypeError):
        report = None
    if lock_holder(path) is not None:
        info["status"] = "running"
    elif counters.get("stop_reason") is not None:
        info["status"] = "finished" if report is not None else "stopped, no report"
    return info


def list_runs(root: Path, as_json: bool = False) -> int:
    """``blur runs``: every run directory directly under ``root`` (or ``root`` itself), newest first."""
    from evolution.config import ConfigError

    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory")
    candidates = [root] if (root / "run.json").is_file() else [p for p in root.iterdir() if (p / "run.json").is_file()]
    candidates.sort(key=lambda p: (p / "run.json").stat().st_mtime, reverse=True)
    runs = [run_status(p) for p in candidates]
    if as_json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print(f"no run directories in {root}")
        return 0

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    def seconds(value):
        return "-" if value is None else f"{value:.0f}s"

    print(f"{'run':<32} {'config':<14} {'status':<20} {'gens':>9} {'best val':>8} {'held-out':>8} {'evolve':>8} "
          f"{'report':>8}")
    for run in runs:
        gens = f"{run['generation']}/{run['generations'] if run['generations'] is not None else '?'}"
        print(f"{Path(run['run_dir']).name[:32]:<32} {(run['config'] or '-')[:14]:<14} {run['status']:<20} "
              f"{gens:>9} {number(run['best_val_accuracy'], '.3f'):>8} {number(run['heldout_accuracy'], '.3f'):>8} "
              f"{seconds(run['wall_time']):>8} {seconds(run['report_seconds']):>8}")
    return 0
