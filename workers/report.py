"""Held-out comparison of learning rules: a genome vs tuned SGD, SGD+momentum, Adam and the backprop genome.

Every method trains fresh networks of the same shape on exactly the same held-out tasks and support batches
for the same number of inner steps; learning rates of the gradient methods (and of the backprop genome) are
chosen on separate meta-validation tasks, then measured on the test tasks.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

import genome as G
from workers import baselines, engine
from workers.evaluator import synapse_keys
from workers.tasks import TaskConfig, make_family

BASELINE_LABELS = {"sgd": "SGD", "momentum": "SGD+momentum", "adam": "Adam"}


def _summary(accuracy: np.ndarray, loss: np.ndarray, curve: np.ndarray | None) -> dict[str, Any]:
    accuracy = np.asarray(accuracy, np.float64)
    loss = np.asarray(loss, np.float64)
    return {
        "accuracy": float(np.mean(accuracy)),
        "accuracy_stderr": float(np.std(accuracy) / np.sqrt(max(len(accuracy), 1))),
        "cross_entropy": float(np.mean(np.where(np.isfinite(loss), loss, np.nan))) if np.isfinite(loss).any() else None,
        "diverged": int(np.sum(~np.isfinite(loss))),
        "curve": None if curve is None else [float(v) for v in np.mean(np.asarray(curve), axis=0)],
    }


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
    test_key, tuning_key = jax.random.split(key)
    family = make_family(task_config, split)
    tuning_family = make_family(task_config, "validation")
    tasks = family.sample(test_key, num_test_tasks, num_steps)
    tuning = tuning_family.sample(tuning_key, num_tuning_tasks, num_steps)
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
