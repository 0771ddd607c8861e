"""Held-out comparison of learning rules: a genome vs tuned SGD, SGD+momentum, Adam and the backprop genome.

Every method trains fresh networks of the same shape on exactly the same held-out tasks and support batches
for the same number of inner steps; learning rates of the gradient methods (and of the backprop genome) are
chosen on separate meta-validation tasks, then measured on the test tasks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import genome as G
from workers import baselines, engine
from workers.evaluator import synapse_keys
from workers.tasks import TaskConfig, make_family

BASELINE_LABELS = {"sgd": "SGD", "momentum": "SGD+momentum", "adam": "Adam"}


def _stderr(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Standard error of the mean over ``axis`` (sample std, ddof 1; 0 for a single value)."""
    values = np.asarray(values, np.float64)
    n = values.shape[axis]
    return np.std(values, axis=axis, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(np.delete(values.shape, axis))


def _summary(accuracy: np.ndarray, loss: np.ndarray, curve: np.ndarray | None) -> dict[str, Any]:
    accuracy = np.asarray(accuracy, np.float64)
    loss = np.asarray(loss, np.float64)
    error = float(_stderr(accuracy))
    return {
        "accuracy": float(np.mean(accuracy)),
        "accuracy_stderr": error,
        "standard_error": error,  # of the mean over tasks
        "cross_entropy": float(np.mean(np.where(np.isfinite(loss), loss, np.nan))) if np.isfinite(loss).any() else None,
        "diverged": int(np.sum(~np.isfinite(loss))),
        "curve": None if curve is None else [float(v) for v in np.mean(np.asarray(curve), axis=0)],
        "curve_stderr": None if curve is None else [float(v) for v in _stderr(np.asarray(curve))],
        "per_task_accuracy": [float(v) for v in accuracy],
    }


def paired_statistics(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of the per-task differences ``a - b``, its standard error (ddof 1) and the two-sided p-value of
    the paired t-test (``n - 1`` degrees of freedom)."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean, error = float(np.mean(d)), float(_stderr(d))
    if error > 0:
        p = float(2 * stats.t.sf(abs(mean) / error, len(d) - 1))
    else:
        p = 1.0 if mean == 0 else 0.0
    return {"paired_difference": mean, "paired_standard_error": error, "p_value": p}


class Progress:
    """``done/total`` of a long phase with elapsed time and an ETA, one line to stderr at most every
    ``every`` seconds (and for the last unit), so nothing runs silently."""

    def __init__(self, what: str, total: int, every: float = 5.0, stream=None):
        import sys
        import time

        self.what, self.total, self.every = what, max(int(total), 1), every
        self.stream = sys.stderr if stream is None else stream
        self.clock = time.perf_counter
        self.start = self.last = self.clock()
        self.done = 0

    def __call__(self, label: str = "") -> None:
        self.done += 1
        now = self.clock()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"{self.what}: {self.done}/{self.total} ({label}), {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
              file=self.stream, flush=True)


def _genome_scores(spec, genome, tasks, key, horizon: engine.Horizon):
    result = engine.evaluate(spec, G.ravel(spec, genome)[None], tasks, synapse_keys(key, tasks.query_y.shape[0]),
                             engine.Scoring(), horizon)
    return result.accuracy[0], result.cross_entropy[0], result.curve[0]


def report_units(num_genomes: int, learning_rates: Sequence[float], baseline_names: Sequence[str],
                 include_backprop_genome: bool) -> int:
    """Training runs :func:`compare_on_heldout` makes (the ``total`` of its :class:`Progress`)."""
    backprop = len(learning_rates) + 1 if include_backprop_genome else 0
    return num_genomes + backprop + len(baseline_names) * (len(learning_rates) + 2)


def report_tasks(task_config: TaskConfig, num_steps: int, key: jax.Array, num_test_tasks: int,
                 num_tuning_tasks: int, split: str = "test"):
    """The tasks of a held-out comparison: (test tasks of ``split``, tuning tasks of the validation split,
    their keys). Learning rates are chosen on the tuning tasks only."""
    test_key, tuning_key = jax.random.split(key)
    tasks = make_family(task_config, split).sample(test_key, num_test_tasks, num_steps)
    tuning = make_family(task_config, "validation").sample(tuning_key, num_tuning_tasks, num_steps)
    return tasks, tuning, test_key, tuning_key


def compare_on_heldout(
    spec: G.NetworkSpec,
    genomes: dict[str, G.Genome],
    task_config: TaskConfig,
    num_steps: int,
    key: jax.Array,
    num_test_tasks: int = 32,
    num_tuning_tasks: int = 16,
    split: str = "test",
    learning_rates: Sequence[float] = baselines.DEFAULT_LEARNING_RATES,
    baseline_names: Sequence[str] = baselines.OPTIMIZERS,
    include_backprop_genome: bool = True,
    curve_steps: Sequence[int] = (),
    skip_last_update: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Scores of ``genomes`` (name -> genome of ``spec``) and of the tuned baselines on held-out tasks.
    ``progress``: ticked once per training run (see :func:`report_units`)."""
    tick = progress or (lambda label="": None)
    tasks, tuning, test_key, tuning_key = report_tasks(task_config, num_steps, key, num_test_tasks, num_tuning_tasks,
                                                       split)
    family = make_family(task_config, split)
    horizon = engine.Horizon(num_steps, skip_last_update, tuple(curve_steps))
    methods: dict[str, dict[str, Any]] = {}
    for name, genome in genomes.items():
        accuracy, loss, curve = _genome_scores(spec, genome, tasks, test_key, horizon)
        tick(name)
        methods[name] = {"learning_rate": None, **_summary(accuracy, loss, curve if curve_steps else None)}

    if include_backprop_genome:
        def backprop_scores(lr, eval_tasks, eval_key, eval_horizon):
            bp_spec, bp_genome = G.backprop_genome(spec.layer_sizes, lr, loss="cross_entropy")
            return _genome_scores(bp_spec, bp_genome, eval_tasks, eval_key, eval_horizon)

        tuning_horizon = engine.Horizon(num_steps, skip_last_update)
        scores = {}
        for lr in learning_rates:
            scores[lr] = float(np.mean(backprop_scores(lr, tuning, tuning_key, tuning_horizon)[0]))
            tick(f"backprop genome lr {lr:g}")
        best_lr = max(scores, key=scores.get)
        accuracy, loss, curve = backprop_scores(best_lr, tasks, test_key, horizon)
        tick("backprop genome")
        methods["backprop genome"] = {"learning_rate": best_lr, **_summary(accuracy, loss, curve if curve_steps else None)}

    activation = spec.forward_activation if spec.forward_activation in baselines.ACTIVATIONS else "sigmoid"
    sweep = baselines.sweep(tasks, spec.layer_sizes, test_key, learning_rates=learning_rates,
                            optimizers=baseline_names, validation_tasks=tuning, activation=activation,
                            skip_last_update=skip_last_update, progress=tick)
    for name in baseline_names:
        best_lr = sweep[name]["best_lr"]
        result = baselines.run_baseline(name, best_lr, spec.layer_sizes, tasks, test_key, curve_steps=curve_steps,
                                        activation=activation, skip_last_update=skip_last_update)
        tick(BASELINE_LABELS[name])
        curve = result.get("curve_accuracy") if curve_steps else None
        methods[BASELINE_LABELS[name]] = {"learning_rate": best_lr, "sweep": sweep[name]["sweep"],
                                          **_summary(result["accuracy"], result["loss"], curve)}
    return {
        "split": split,
        "family": task_config.family,
        "n_way": family.num_classes,
        "classes": list(family.classes),
        "num_tasks": num_test_tasks,
        "num_steps": num_steps,
        "baseline_activation": activation,
        "curve_steps": list(curve_steps),
        "methods": methods,
    }


def format_table(report: dict[str, Any]) -> str:
    """A readable table of a :func:`compare_on_heldout` report."""
    lines = [
        f"Held-out {report['split']} tasks: {report['family']}, {report['n_way']}-way, classes "
        f"{report['classes']}, {report['num_tasks']} tasks, accuracy after {report['num_steps']} inner steps",
    ]
    curve_steps = report.get("curve_steps") or []
    header = f"{'method':<18}{'lr':>9}  {'accuracy':>15}  {'cross-entropy':>13}"
    header += "".join(f"  {'acc@' + str(s):>8}" for s in curve_steps)
    lines += [header, "-" * len(header)]
    for name, row in report["methods"].items():
        lr = "-" if row["learning_rate"] is None else f"{row['learning_rate']:.3g}"
        ce = "diverged" if row["cross_entropy"] is None else f"{row['cross_entropy']:.3f}"
        line = f"{name:<18}{lr:>9}  {row['accuracy']:>7.3f} ± {row['accuracy_stderr']:.3f}  {ce:>13}"
        if curve_steps and row.get("curve"):
            line += "".join(f"  {v:>8.3f}" for v in row["curve"])
        lines.append(line)
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    rows = ["| method | lr | held-out accuracy | cross-entropy |", "|---|---|---|---|"]
    for name, row in report["methods"].items():
        lr = "-" if row["learning_rate"] is None else f"{row['learning_rate']:.3g}"
        ce = "diverged" if row["cross_entropy"] is None else f"{row['cross_entropy']:.3f}"
        rows.append(f"| {name} | {lr} | {row['accuracy']:.3f} ± {row['accuracy_stderr']:.3f} | {ce} |")
    title = (f"Held-out {report['split']} tasks ({report['family']}, {report['n_way']}-way, classes "
             f"{report['classes']}, {report['num_tasks']} tasks, {report['num_steps']} inner steps)")
    return title + "\n\n" + "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------ generalization report

#: a predictor is flagged as collapsed when this share of its query predictions is one class (mean over tasks)
COLLAPSE_SHARE = 0.9
#: learning-curve points of a generalization cell (plus step 0 and the horizon)
CURVE_POINTS = 20


def reshape_spec(spec: G.NetworkSpec, layer_sizes: Sequence[int]) -> G.NetworkSpec:
    """``spec`` with other layer sizes: the genome is shared by every layer and width, so any shape runs it,
    except that a per-layer genome needs the same number of layer pairs."""
    layer_sizes = tuple(int(n) for n in layer_sizes)
    if spec.per_layer_genome and len(layer_sizes) != len(spec.layer_sizes):
        raise ValueError(f"the genome is per layer for {len(spec.layer_sizes) - 2} hidden layer(s); "
                         f"{layer_sizes} has {len(layer_sizes) - 2}")
    return dataclasses.replace(spec, layer_sizes=layer_sizes)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _majority_shares(spec, genome, tasks, synapse_keys, horizon):
    """Per task: the share of the query predictions that fall on the most-predicted class."""
    def one(task, key):
        synapses, _ = engine.train(spec, genome, task, key, horizon)
        predictions = jnp.argmax(G.query_logits(spec, genome, synapses, task.query_x), axis=-1)
        counts = jnp.sum(predictions[:, None] == jnp.arange(spec.num_outputs)[None, :], axis=0)
        return jnp.max(counts) / predictions.shape[0]

    return jax.vmap(one)(tasks, synapse_keys)


def majority_share(spec: G.NetworkSpec, genome: G.Genome, task_config: TaskConfig, num_steps: int,
                   key: jax.Array, num_tasks: int, split: str = "test", skip_last_update: bool = False) -> float:
    """Mean over the report's test tasks (same tasks and synapse keys as :func:`compare_on_heldout` with
    ``key``) of the share of the most-predicted class: 1/n for a balanced predictor, 1 for a constant one."""
    test_key, _ = jax.random.split(key)
    tasks = make_family(task_config, split).sample(test_key, num_tasks, num_steps)
    shares = _majority_shares(spec, genome, tasks, synapse_keys(test_key, num_tasks),
                              engine.Horizon(num_steps, skip_last_update))
    return float(np.mean(np.asarray(shares)))


def curve_steps_for(num_steps: int) -> list[int]:
    """Every ~5% of the horizon (resolves the early rise), with 0 and the horizon."""
    return sorted(set(range(0, num_steps + 1, max(1, num_steps // CURVE_POINTS))) | {num_steps})


def generalization_report(spec: G.NetworkSpec, genome: G.Genome, settings: Sequence[Any], horizons: Sequence[int],
                          key: jax.Array, num_test_tasks: int = 64, num_tuning_tasks: int = 16,
                          learning_rates: Sequence[float] = baselines.DEFAULT_LEARNING_RATES,
                          baseline_names: Sequence[str] = baselines.OPTIMIZERS, include_backprop_genome: bool = True,
                          skip_last_update: bool = False, rule_name: str = "evolved rule", split: str = "test",
                          progress: Progress | None = None) -> dict[str, Any]:
    """The rule ``genome`` (of ``spec``, reshaped to each setting) against the backprop genome and SGD,
    SGD+momentum and Adam on held-out settings × horizons.

    ``settings``: records with ``name``, ``task`` (a TaskConfig) and ``hidden_sizes``. Every cell (setting,
    horizon) samples its own test tasks of the test split and tuning tasks of the validation split; every
    method trains on the cell's same tasks, and each baseline's learning rate (and the backprop genome's)
    is tuned for that cell on the validation tasks only. Per method: accuracy ± standard error over tasks,
    divergences, the per-task accuracies, and — for every method but the rule — the paired difference
    rule − method over the same tasks with its standard error and p-value. ``best_baseline`` is the tuned
    optimizer with the highest test accuracy (the comparison least favourable to the rule); a learning rate
    at the edge of the grid is flagged, and so is a collapsed rule (:data:`COLLAPSE_SHARE`)."""
    horizons = [int(h) for h in horizons]
    cells: dict[str, Any] = {}
    optimizers = [BASELINE_LABELS[n] for n in baseline_names]
    edges = (min(learning_rates), max(learning_rates))
    for index, setting in enumerate(settings):
        family = make_family(setting.task, split)
        setting_spec = reshape_spec(spec, (family.num_inputs, *setting.hidden_sizes, family.num_classes))
        per_horizon = {}
        for horizon in horizons:
            cell_key = jax.random.fold_in(jax.random.fold_in(key, index), horizon)
            cell = compare_on_heldout(setting_spec, {rule_name: genome}, setting.task, horizon, cell_key,
                                      num_test_tasks=num_test_tasks, num_tuning_tasks=num_tuning_tasks, split=split,
                                      learning_rates=learning_rates, baseline_names=baseline_names,
                                      include_backprop_genome=include_backprop_genome,
                                      curve_steps=curve_steps_for(horizon), skip_last_update=skip_last_update,
                                      progress=progress)
            methods = cell["methods"]
            rule = methods[rule_name]
            for name, row in methods.items():
                row["lr_at_grid_edge"] = row["learning_rate"] is not None and row["learning_rate"] in edges
                if name != rule_name:
                    row.update(paired_statistics(rule["per_task_accuracy"], row["per_task_accuracy"]))
            share = majority_share(setting_spec, genome, setting.task, horizon, cell_key, num_test_tasks, split,
                                   skip_last_update)
            rule.update(majority_share=share, collapsed=bool(share >= COLLAPSE_SHARE and family.num_classes > 1))
            best = max(optimizers, key=lambda n: methods[n]["accuracy"]) if optimizers else None
            per_horizon[str(horizon)] = {**cell, "best_baseline": best}
        cells[setting.name] = {"family": setting.task.family, "n_way": family.num_classes,
                               "classes": list(family.classes), "hidden_sizes": list(setting.hidden_sizes),
                               "layer_sizes": list(setting_spec.layer_sizes), "horizons": per_horizon}
    first = next(iter(cells.values()))["horizons"][str(horizons[0])] if cells else {}
    # the top level repeats the first cell in the format of compare_on_heldout (readers of report.json)
    return {**{k: first[k] for k in ("split", "family", "n_way", "classes", "num_tasks", "num_steps", "curve_steps",
                                     "methods")
               if k in first},
            "kind": "generalization", "rule": rule_name, "horizons": horizons, "num_test_tasks": num_test_tasks,
            "num_tuning_tasks": num_tuning_tasks, "learning_rates": list(learning_rates), "settings": cells}


def _cell_lines(rule_name: str, cell: dict[str, Any]) -> list[str]:
    lines = []
    for name, row in cell["methods"].items():
        lr = "-" if row["learning_rate"] is None else f"{row['learning_rate']:.3g}" + ("*" if row["lr_at_grid_edge"] else "")
        text = f"  {name:<18}{lr:>8}  {row['accuracy']:.3f} ± {row['standard_error']:.3f}  {row['diverged']:>4}"
        if name == rule_name:
            text += f"  {'':>22}  top class {row['majority_share']:.2f}" + ("  COLLAPSED" if row["collapsed"] else "")
        else:
            text += (f"  {100 * row['paired_difference']:+6.1f} ± {100 * row['paired_standard_error']:.1f} pt"
                     f"  p={row['p_value']:.2g}" + ("  (best baseline)" if name == cell["best_baseline"] else ""))
        lines.append(text)
    return lines


def format_generalization(report: dict[str, Any]) -> str:
    """The generalization report as text: one block per setting × horizon."""
    rule = report["rule"]
    lines = [f"Generalization of {rule}: {report['num_test_tasks']} test tasks per cell, learning rates tuned per "
             f"cell on {report['num_tuning_tasks']} validation tasks (* = at the edge of the grid); "
             f"paired difference = {rule} − method over the same tasks"]
    selection = report.get("selection")
    if selection:
        at = selection["validation_accuracy_at_selection"]
        lines.append(f"selection: best genome of generation {selection['best_generation']}, validation accuracy "
                     f"{'-' if at is None else f'{at:.3f}'} when chosen, {selection['validation_accuracy']:.3f} on "
                     f"{selection['num_tasks']} fresh validation tasks and {selection['test_accuracy']:.3f} on as many "
                     "test tasks of each meta-training setting")
    for name, setting in report["settings"].items():
        for horizon, cell in setting["horizons"].items():
            lines.append(f"\n{name}: {setting['family']} {setting['n_way']}-way, network {setting['layer_sizes']}, "
                         f"T = {horizon}")
            lines.append(f"  {'method':<18}{'lr':>8}  {'accuracy':>13}  {'div':>4}  {'rule − method':>22}")
            lines += _cell_lines(rule, cell)
    return "\n".join(lines)


def generalization_markdown(report: dict[str, Any]) -> str:
    """One markdown table: a row per setting × horizon, accuracy ± s.e. of every method, and the paired
    difference rule − best baseline."""
    rule = report["rule"]
    first = next(iter(report["settings"].values()))["horizons"]
    methods = list(next(iter(first.values()))["methods"]) if first else []
    header = ["setting", "network", "T"] + methods + [f"{rule} − best baseline (p)"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, setting in report["settings"].items():
        for horizon, cell in setting["horizons"].items():
            values = []
            for method in methods:
                row = cell["methods"][method]
                text = f"{row['accuracy']:.3f} ± {row['standard_error']:.3f}"
                if row["diverged"]:
                    text += f" ({row['diverged']} div.)"
                if method == rule and row.get("collapsed"):
                    text += " collapsed"
                values.append(text)
            best = cell["best_baseline"]
            diff = cell["methods"][best] if best else None
            values.append("-" if diff is None else f"{100 * diff['paired_difference']:+.1f} ± "
                          f"{100 * diff['paired_standard_error']:.1f} pt vs {best} (p={diff['p_value']:.2g})")
            rows.append("| " + " | ".join([name, "-".join(map(str, setting["layer_sizes"])), horizon] + values) + " |")
    text = (f"Generalization of {rule} ({report['num_test_tasks']} test tasks per cell, learning rates tuned per "
            "cell on validation tasks, ± standard error over tasks, differences paired per task)\n\n"
            + "\n".join(rows) + "\n")
    selection = report.get("selection")
    if selection:
        at = selection["validation_accuracy_at_selection"]
        text += ("\nSelection (meta-training settings, weighted): validation accuracy when chosen "
                 f"{'-' if at is None else f'{at:.3f}'}, on {selection['num_tasks']} fresh validation tasks "
                 f"{selection['validation_accuracy']:.3f}, on test tasks {selection['test_accuracy']:.3f}\n")
    return text
