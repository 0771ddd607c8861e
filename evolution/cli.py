"""The ``blur`` command line. Exit codes: 0 ok, 2 bad usage/config/input (one line, no traceback), 1 failure."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from genome.errors import UserError

VERBS = {
    "evolve": "evolve a learning rule from a YAML config",
    "resume": "continue a run directory from its last checkpoint",
    "inspect": "show a genome file or a run directory",
    "evaluate": "learning curves of a genome vs tuned SGD/Adam on held-out tasks",
    "compare": "compare evolution with gradient-based outer loops on equal budgets",
    "bench": "benchmark the evaluation engine against GEMM and PyTorch",
    "tasks": "list task families and their options",
    "runs": "list run directories: status, generations, validation and held-out accuracy",
}


class UsageError(UserError):
    """Bad usage, config or input: reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        verb = self.prog.removeprefix("blur").strip()
        raise UsageError(f"{verb}: {message}" if verb else message)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blur-evolve")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _verb_list() -> str:
    return "verbs:\n" + "\n".join(f"  {name:<9} {text}" for name, text in VERBS.items())


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _add_evaluator_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, help="evaluate with N Ray workers (sets evaluator.kind=ray)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray worker (fractions allowed)")
    parser.add_argument("--ray-address", help="Ray cluster address ('auto' for an existing cluster); "
                        "default: a local Ray started by the run")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blur", description="Evolutionary search for BLUR learning rules.")
    parser.add_argument("--version", action="version", version=f"blur-evolve {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("evolve", help=VERBS["evolve"], description=VERBS["evolve"])
    p.add_argument("config", help="YAML config file, or the name of a shipped config (digits, smoke, ...)")
    p.add_argument("--out", help="run directory (default: runs/<config>-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set run.generations=5 (repeatable)")
    p.add_argument("--seed", type=int, help="root seed (same as --set seed=S)")
    p.add_argument("--quiet", action="store_true", help="no per-generation lines")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard event files under RUN/tensorboard "
                   "(same as --set tracking.tensorboard=true; extra blur-evolve[tracking])")
    p.add_argument("--mlflow", action="store_true", help="track the run in MLflow (tracking.mlflow=true; "
                   "store: RUN/mlruns unless tracking.mlflow_uri)")
    _add_evaluator_flags(p)
    p = sub.add_parser("resume", help=VERBS["resume"], description=VERBS["resume"])
    p.add_argument("run_dir")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--recompute", action="store_true",
                   help="on a complete run, recompute the held-out report instead of printing the stored one")
    _add_evaluator_flags(p)
    p = sub.add_parser("inspect", help=VERBS["inspect"], description=VERBS["inspect"])
    p.add_argument("path", nargs="+", help="a .genome file or a run directory; several run directories: "
                   "their reports side by side and one fitness plot")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="write PNG plots with this path prefix")
    p = sub.add_parser("evaluate", help=VERBS["evaluate"], description=VERBS["evaluate"])
    p.add_argument("genome", help="a .genome file, 'backprop' or 'random'")
    p.add_argument("--task", default="digits", help="task family (see `blur tasks`)")
    p.add_argument("--steps", type=int, default=20, help="inner steps T (when --horizons is not given)")
    p.add_argument("--horizons", type=_int_list, metavar="T1,T2,...",
                   help="horizons to report, e.g. 10,20,40,80 (baselines tuned per horizon)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a held-out setting: task.KEY=VALUE (e.g. task.n_way=10) or network.hidden_sizes=[32,32]")
    p.add_argument("--tasks", type=int, default=64, help="test tasks per setting and horizon (default 64)")
    p.add_argument("--tuning-tasks", type=int, default=16, help="validation tasks to tune the baselines on")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--n-way", type=int, help="classes per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="*", help="hidden widths (default: the genome's; 32 for "
                   "backprop/random)")
    p.add_argument("--data-dir", help="data directory for IDX families")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="write a PNG of the learning curves")
    p = sub.add_parser("compare", help=VERBS["compare"], description=VERBS["compare"])
    p.add_argument("config")
    p.add_argument("--out", help="output directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("bench", help=VERBS["bench"], description=VERBS["bench"])
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--ray", action="store_true", help="also measure Ray with 1 and 2 local workers")
    p.add_argument("--precision", nargs="+", metavar="RUN", default=[],
                   help="instead: the best genomes of these runs on the same test tasks in fp32 and bf16, "
                        "accuracy ± standard error and the paired difference")
    p.add_argument("--tasks", type=int, default=128, help="test tasks of --precision (default 128)")
    p = sub.add_parser("tasks", help=VERBS["tasks"], description=VERBS["tasks"])
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("runs", help=VERBS["runs"], description=VERBS["runs"])
    p.add_argument("directory", nargs="?", default="runs", help="where the run directories are (default: runs)")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `blur`: what can it do?
        print(f"usage: blur VERB ... (blur VERB --help for one verb; blur --version)\n{_verb_list()}", file=sys.stderr)
        return 2
    try:
        return _main(parser, argv)
    except BrokenPipeError:  # `blur ... | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    try:
        args = parser.parse_args(argv)
        handler = globals()[f"cmd_{args.verb}"]
        return int(handler(args) or 0)
    except UsageError as error:
        print(f"blur: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # handled by main
    except KeyboardInterrupt:
        print("blur: interrupted", file=sys.stderr)
        return 130
    except BaseException as error:  # noqa: BLE001
        from evolution.signals import Interrupted
        from genome.io import WriteError

        if isinstance(error, Interrupted):
            if not getattr(error, "reported", False):
                print(f"blur: interrupted ({error})", file=sys.stderr)
            return error.exit_code
        if not isinstance(error, Exception):
            raise
        if isinstance(error, UserError):
            print(f"blur: error: {str(error).splitlines()[0]}", file=sys.stderr)
            return 2
        if isinstance(error, WriteError):
            if not getattr(error, "reported", False):
                print(f"blur: failed: {error.strerror}", file=sys.stderr)
            return 1
        if os.environ.get("BLUR_DEBUG"):
            raise
        print(f"blur: failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
              "(set BLUR_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


# -------------------------------------------------------------------------------------------- evolve


def _evaluator_overrides(args) -> list[str]:
    overrides = []
    if getattr(args, "workers", None) is not None:
        overrides += ["evaluator.kind=ray", f"evaluator.workers={args.workers}"]
    if getattr(args, "gpus_per_worker", None) is not None:
        overrides += ["evaluator.kind=ray", f"evaluator.gpus_per_worker={args.gpus_per_worker}"]
    if getattr(args, "ray_address", None) is not None:
        overrides += ["evaluator.kind=ray", f"evaluator.ray_address={args.ray_address}"]
    return overrides


def _evaluator_fn():
    def make(config, spec):
        if config.evaluator.kind == "ray":
            from workers.ray import RayEvaluator

            from evolution.run import evaluator_settings

            return RayEvaluator.from_config(spec, config, evaluator_settings(config))
        from evolution.run import local_evaluator

        return local_evaluator(config, spec)

    return make


class _Progress:
    """A progress bar on a terminal, one line per generation otherwise (and unless --quiet)."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.quiet = quiet
        self.bar = None
        if sys.stderr.isatty() and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="evolve", unit="gen", file=sys.stderr)

    def __call__(self, row: dict[str, Any]) -> None:
        val = f"  val_acc {row['val_accuracy']:.3f}" if "val_accuracy" in row else ""
        line = (f"gen {row['generation'] + 1:>4}  T={row['num_steps']:<3} best {row['best_fitness']:.4f}  "
                f"mean {row['mean_fitness']:.4f}  train_acc {row['best_train_accuracy']:.3f}{val}  "
                f"diverged {row['diverged']}  {row['generation_time']:.1f}s")
        if self.bar is not None:
            self.bar.set_postfix_str(f"best {row['best_fitness']:.3f}" + (val and f" val {row['val_accuracy']:.3f}"))
            self.bar.update(1)
            if "val_accuracy" in row:
                self.bar.write(line)
        elif not self.quiet:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _run_to_end(run, quiet: bool) -> int:
    try:
        return _run_and_report(run, quiet)
    finally:
        run.close()


def _run_and_report(run, quiet: bool) -> int:
    from evolution.checkpoint import atomic_write_text
    from workers.report import format_generalization, format_markdown, format_table, generalization_markdown
    from evolution.run import num_steps_at
    from evolution.signals import Interrupted

    config = run.config
    print(f"run directory: {run.run_dir}")
    print(f"network {run.spec.layer_sizes} k={run.spec.num_states}, genome dims {run.strategy.num_dims}, "
          f"strategy {config.strategy.name} (population {config.strategy.population_size}), "
          f"task {config.task.family}, evaluator {config.evaluator.kind}; one generation "
          f"{run.estimate.describe()}", flush=True)
    from evolution.signals import reassert

    reassert()  # the evaluator may have replaced the handlers (ray.init sets its own SIGTERM handler)
    progress = _Progress(config.run.generations, run.state.generation, quiet)
    try:
        reason = run.run(progress)
    except BaseException as error:
        from genome.io import WriteError

        if isinstance(error, Interrupted):
            what = f"interrupted ({error})"
        elif isinstance(error, WriteError):
            what = f"failed: {error.strerror}"
        else:
            what = "the run stopped"
        print(f"blur: {what}; checkpointed at generation {run.checkpointed_generation} "
              f"(continue with `blur resume {run.run_dir}`)", file=sys.stderr)
        error.reported = isinstance(error, (Interrupted, WriteError))
        raise
    finally:
        progress.close()
    state = run.state
    print(f"stopped: {reason} after {state.generation} generations, {state.evaluations} evaluations, "
          f"{state.inner_steps} inner steps, {state.elapsed:.1f}s")
    rows = run.metrics.read()  # the report trains for the horizon of the last generation
    num_steps = rows[-1]["num_steps"] if rows else num_steps_at(config, 0)
    try:
        from genome.io import failpoint

        failpoint("report")
        report_start = time.perf_counter()
        report = _report(run, num_steps)
        report["report_seconds"] = round(time.perf_counter() - report_start, 1)  # `blur runs` shows it
    except Interrupted as error:
        print(f"blur: interrupted ({error}) during the held-out report; the run is complete and checkpointed "
              f"(`blur resume {run.run_dir}` writes the report)", file=sys.stderr)
        error.reported = True
        raise
    generalization = report.get("kind") == "generalization"
    atomic_write_text(run.run_dir / "report.json", json.dumps(report, indent=2))
    atomic_write_text(run.run_dir / "report.md", (generalization_markdown if generalization else format_markdown)(report))
    if generalization:
        from evolution.inspect import plot_generalization

        plot_generalization(report, run.run_dir / "generalization.png", f"{run.run_dir.name}: evolved rule")
    if run.tracker is not None:
        run.tracker.log_report(report, run.metrics.read())
    print()
    print((format_generalization if generalization else format_table)(report))
    print(f"\nbest genome: {run.run_dir / 'best.genome'} (generation {state.best_generation}); "
          f"report: {run.run_dir / 'report.md'}")
    return 0


def _report(run, num_steps: int) -> dict:
    from workers.report import Progress, compare_on_heldout, report_units
    from evolution.run import _TEST, split_key

    config = run.config
    units = report_units(1, config.report.learning_rates, config.report.baselines, config.report.backprop_genome)
    if config.settings or config.report.settings or config.report.horizons:
        # the generalization report: the held-out settings (else the meta-training settings' test splits)
        from evolution.config import resolve_settings
        from workers.report import generalization_report

        settings = resolve_settings(config, "report") or resolve_settings(config)
        horizons = list(config.report.horizons) or [num_steps]
        selection = run.selection_check(config.report.test_tasks)
        report = generalization_report(
            run.spec, run.best_genome(), settings, horizons, split_key(config, _TEST),
            num_test_tasks=config.report.test_tasks, num_tuning_tasks=config.report.tuning_tasks,
            learning_rates=config.report.learning_rates, baseline_names=config.report.baselines,
            include_backprop_genome=config.report.backprop_genome, skip_last_update=config.episode.skip_last_update,
            progress=Progress("held-out report", units * len(settings) * len(horizons)))
        return {**report, "selection": selection}
    return compare_on_heldout(
        run.spec, {"evolved rule": run.best_genome()}, config.task, num_steps, split_key(config, _TEST),
        num_test_tasks=config.report.test_tasks, num_tuning_tasks=config.report.tuning_tasks,
        learning_rates=config.report.learning_rates, baseline_names=config.report.baselines,
        include_backprop_genome=config.report.backprop_genome, skip_last_update=config.episode.skip_last_update,
        progress=Progress("held-out report", units),
    )


def cmd_evolve(args) -> int:
    from evolution.config import load_config, resolve_config_path
    from evolution.run import Run
    from evolution.signals import handle_signals

    overrides = list(args.overrides) + _evaluator_overrides(args)
    overrides += ["tracking.tensorboard=true"] if args.tensorboard else []
    overrides += ["tracking.mlflow=true"] if args.mlflow else []
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    source = resolve_config_path(args.config)
    config = load_config(source, overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{source.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    with handle_signals():
        run = Run.create(config, out, _evaluator_fn(), source=str(source))
        return _run_to_end(run, args.quiet)


def cmd_resume(args) -> int:
    from evolution.run import Run
    from evolution.signals import handle_signals

    overrides = _evaluator_overrides(args)
    if overrides:
        raise UsageError("resume: evaluator flags are taken from the run's config.yaml; edit it to change them")
    with handle_signals():
        run = Run.resume(Path(args.run_dir), _evaluator_fn())
        stored = None if args.recompute else _stored_report(run)
        if stored is not None:
            from workers.report import format_table

            state = run.state
            run.close()
            print(f"run {run.run_dir} is complete (stopped: {state.stop_reason} after {state.generation} "
                  f"generations); its stored report (`blur resume --recompute` computes it again):\n")
            print(format_table(stored))
            print(f"\nbest genome: {run.run_dir / 'best.genome'} (generation {state.best_generation}); "
                  f"report: {run.run_dir / 'report.md'}")
            return 0
        print(f"resuming at generation {run.state.generation}")
        return _run_to_end(run, args.quiet)


def _stored_report(run) -> dict | None:
    """The held-out report of a complete run (None if the run is not complete or has no readable report)."""
    if run.state.stop_reason is None or run.stop_reason() is None:
        return None
    try:
        report = json.loads((run.run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "methods" in report else None


# -------------------------------------------------------------------------------------------- others


def cmd_tasks(args) -> int:
    from workers.tasks import FAMILIES

    if args.json:
        print(json.dumps({name: info._asdict() for name, info in FAMILIES.items()}, indent=2))
        return 0
    for name, info in FAMILIES.items():
        needs = "  (needs --data-dir)" if info.needs_data_dir else ""
        print(f"{name:<16} {info.description}{needs}")
        print(f"{'':<16} default n_way {info.default_n_way}; options: {', '.join(info.options)}")
    print("\ncommon options: n_way, batch_size, num_query (set under `task:` in a config)")
    return 0


def cmd_runs(args) -> int:
    from evolution.inspect import list_runs

    return list_runs(Path(args.directory), as_json=args.json)


def cmd_inspect(args) -> int:
    from evolution.inspect import inspect_runs

    return inspect_runs([Path(p) for p in args.path], as_json=args.json, plot=args.plot)


def cmd_evaluate(args) -> int:
    from evolution.inspect import evaluate_genome

    if args.tuning_tasks < 2:
        raise UsageError(f"evaluate: --tuning-tasks must be >= 2, got {args.tuning_tasks}")
    return evaluate_genome(args.genome, task=args.task, steps=args.steps, num_tasks=args.tasks, split=args.split,
                           n_way=args.n_way, batch_size=args.batch_size, hidden=args.hidden, data_dir=args.data_dir,
                           seed=args.seed, as_json=args.json, plot=args.plot, horizons=args.horizons,
                           overrides=args.overrides, tuning_tasks=args.tuning_tasks)


def cmd_bench(args) -> int:
    from genome.errors import require_extra

    require_extra("torch", "torch", "blur bench")
    if args.ray:
        require_extra("ray", "ray", "blur bench --ray")
    from evolution.benchmarks import run_bench

    if args.tasks < 2:
        raise UsageError(f"bench: --tasks must be >= 2, got {args.tasks}")
    return run_bench(quick=args.quick, as_json=args.json, with_ray=args.ray, precision_runs=args.precision,
                     num_tasks=args.tasks)


def cmd_compare(args) -> int:
    try:
        from evolution.compare import main_compare
    except ImportError:
        raise UsageError("compare: not available in this build") from None
    from evolution.config import resolve_config_path

    return main_compare(str(resolve_config_path(args.config)), args.out, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
