"""The evolution driver end to end: resume after kill -9 equals the uninterrupted run, atomic checkpoints,
stop criteria, curriculum, CLI errors and ``blur inspect``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import genome as G
from evolution.checkpoint import load_checkpoint, save_checkpoint
from evolution.cli import main
from evolution.config import load_config
from evolution.run import Run, local_evaluator

from helpers import (LIGHT_REPORT, ROOT, SMOKE, SPLIT_KILL_OVERRIDES, blur, kill_after_rows,  # noqa: F401
                     metric_rows, same_genome, set_args)


def test_evolve_prints_a_heldout_table_against_tuned_baselines(uninterrupted):
    out, stdout = uninterrupted
    for method in ("evolved rule", "backprop genome", "SGD", "SGD+momentum", "Adam"):
        assert method in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "test" and set(report["methods"]) >= {"evolved rule", "Adam"}
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in report["methods"].values())
    rows = metric_rows(out)
    assert [r["generation"] for r in rows] == list(range(24))
    assert {"best_fitness", "mean_fitness", "evaluations", "inner_steps", "diverged"} <= set(rows[0])
    assert "val_accuracy" in rows[2] and "val_accuracy" not in rows[0]
    assert rows[-1]["evaluations"] == 24 * 8 and rows[-1]["inner_steps"] == 24 * 8 * 12 * 4
    for name in ("config.yaml", "provenance.json", "best.genome", "checkpoint.ckpt", "report.md"):
        assert (out / name).is_file()
    assert load_config(out / "config.yaml").run.generations == 24


def test_resume_after_kill_9_equals_the_uninterrupted_run_split_over_two_host_devices(uninterrupted, tmp_path):
    """``evaluator.devices: 2`` (SPLIT_KILL_OVERRIDES): the run and its resume (which takes the setting from
    config.yaml and asks JAX for the host devices before anything starts it) split every population over two
    devices; the killed and resumed run ends exactly like the uninterrupted one, and both record the split in
    provenance.json."""
    full, _ = uninterrupted
    out = tmp_path / "killed"
    killed = blur("evolve", str(SMOKE), "--out", str(out), "--quiet", *set_args(SPLIT_KILL_OVERRIDES))
    kill_after_rows(killed, out, 5)
    assert len(metric_rows(out)) < 24
    resumed = blur("resume", str(out), "--quiet")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    for run in (full, out):
        assert json.loads((run / "provenance.json").read_text())["evaluator"]["split_over"] == 2
    assert metric_rows(out) == metric_rows(full)
    same_genome(full, out)


WRITER = """
import sys, numpy as np
from pathlib import Path
from evolution.checkpoint import save_checkpoint
run_dir, i = Path(sys.argv[1]), 0
while True:
    i += 1
    save_checkpoint(run_dir, {"generation": i}, bytes([i % 251]) * 3_000_000, np.full(5, i, np.float32))
    print(i, flush=True)
"""


def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    save_checkpoint(tmp_path, {"generation": 0}, b"\x00" * 10, None)
    for delay in (0.3, 0.45, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        counters, state, best = load_checkpoint(tmp_path)[:3]  # never torn: an old or a new checkpoint
        generation = counters["generation"]
        assert state == (bytes([generation % 251]) * 3_000_000 if generation else b"\x00" * 10)
        assert best is None or np.all(best == generation)


def in_process_run(tmp_path, overrides):
    config = load_config(SMOKE, overrides)
    run = Run.create(config, tmp_path / "run", local_evaluator)
    run.run()
    run.close()
    return run, metric_rows(tmp_path / "run")


def test_stop_criteria_and_curriculum(tmp_path):
    run, rows = in_process_run(tmp_path, ["run.generations=50", "run.max_evaluations=18",
                                          "run.curriculum.every=1", "run.curriculum.increment=2",
                                          "run.curriculum.max_steps=7"])
    assert run.state.stop_reason == "max_evaluations" and len(rows) == 3
    assert [r["num_steps"] for r in rows] == [4, 6, 7]
    run, rows = in_process_run(tmp_path / "b", ["run.generations=50", "run.target_fitness=100.0"])
    assert run.state.stop_reason == "target_fitness" and len(rows) == 1


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["evolve", "missing.yaml"], "config file not found"),
    (["evolve", str(SMOKE), "--set", "task.n_wya=3"], "task.n_wya: unknown key"),
    (["evolve", str(SMOKE), "--set", "run.generations=many"], "run.generations: expected an integer"),
    (["evolve", str(SMOKE), "--set", "strategy.population_size=1"], "strategy.population_size: must be an integer in [2, "),
    (["evolve", str(SMOKE), "--set", "episode.num_steps=-3"], "num_steps must be >= 0"),
    (["evolve", str(SMOKE), "--set", "strategy.name=hillclimb"], "strategy.name: unknown strategy"),
    (["evolve", str(SMOKE), "--set", "task.family=imagenet"], "unknown task family"),
    (["evolve", str(SMOKE), "--set", "nonsense"], "expected key=value"),
    (["evolve", str(SMOKE), "--set", "task.family=fashion_mnist", "--set", "task.data_dir=/nonexistent/dir"],
     "/nonexistent/dir"),
    (["evolve"], "required"),
    (["evolve", str(SMOKE), "--seed", "x"], "invalid int"),
    (["frobnicate"], "invalid choice"),
    (["resume", "/nonexistent/run"], "run directory not found"),
    (["inspect", "/nonexistent.genome"], "not found"),
    (["evaluate", "random", "--task", "imagenet"], "unknown family"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    code, out, err = run_cli(argv + (["--out", str(tmp_path / "o")] if argv[:1] == ["evolve"] and len(argv) > 1
                                     and argv[1] != "--seed" else []), capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_bad_yaml_and_existing_run_are_rejected_without_damage(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    code, _, err = run_cli(["evolve", str(bad)], capsys)
    assert code == 2 and "invalid YAML" in err
    existing = tmp_path / "run"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text('{"generation": 0}\n')
    code, _, err = run_cli(["evolve", str(SMOKE), "--out", str(existing)], capsys)
    assert code == 2 and "already exists" in err
    assert (existing / "metrics.jsonl").read_text() == '{"generation": 0}\n'
    assert sorted(p.name for p in existing.iterdir()) == ["metrics.jsonl"]
    code, _, err = run_cli(["resume", str(existing)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_inspect_a_genome_file_and_a_run(uninterrupted, tmp_path, capsys):
    full, _ = uninterrupted
    spec, genome = G.backprop_genome((4, 3, 2), 0.1)
    path = G.save(tmp_path / "bp.genome", spec, genome, {"fitness": 0.5})
    code, out, _ = run_cli(["inspect", str(path), "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["distance_to_backprop_genome"] == 0.0 and info["metadata"] == {"fitness": 0.5}
    code, out, _ = run_cli(["inspect", str(path), "--plot", str(tmp_path / "g")], capsys)
    assert code == 0 and "ν forward" in out and (tmp_path / "g_genome.png").stat().st_size > 1000
    code, out, _ = run_cli(["inspect", str(full), "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and len(info["metrics"]) == 24 and info["counters"]["stop_reason"] == "generations"
    assert info["best_genome"]["spec"]["layer_sizes"] == [64, 8, 3]
    code, out, _ = run_cli(["inspect", str(full), "--plot", str(tmp_path / "r")], capsys)
    assert code == 0 and "best genome" in out and (tmp_path / "r_fitness.png").is_file()


def test_blur_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for verb in ("evolve", "resume", "inspect", "evaluate", "compare", "bench", "tasks"):
        assert verb in out


def test_evaluate_prints_curves_of_a_genome_and_tuned_baselines(tmp_path, capsys):
    spec, genome = G.backprop_genome((64, 8, 3), 0.5, loss="cross_entropy")
    path = G.save(tmp_path / "bp.genome", spec, genome)
    code, out, err = run_cli(["evaluate", str(path), "--task", "digits", "--steps", "4", "--tasks", "4",
                              "--json", "--plot", str(tmp_path / "curves.png")], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["split"] == "test" and report["curve_steps"] == [0, 1, 2, 3, 4]
    assert {"genome bp.genome", "backprop genome", "SGD", "SGD+momentum", "Adam"} == set(report["methods"])
    for row in report["methods"].values():
        assert len(row["curve"]) == 5 and all(0.0 <= v <= 1.0 for v in row["curve"])
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # the genome is shared by every layer and width: the report runs it on the task's shape
    setting = next(iter(report["settings"].values()))
    assert setting["layer_sizes"] == [64, 8, 3] and report["kind"] == "generalization"


def test_tasks_lists_every_family(capsys):
    code, out, _ = run_cli(["tasks", "--json"], capsys)
    families = json.loads(out)
    assert code == 0
    assert {"digits", "fashion_mnist", "mnist", "idx", "mnist1d", "toy2d", "teacher_student"} <= set(families)
    assert families["mnist"]["needs_data_dir"] is True


class FailingEvaluator:
    """The in-process evaluator that fails for good after ``calls`` evaluations (all workers lost)."""

    def __init__(self, inner, calls):
        self.inner, self.calls, self.spec = inner, calls, inner.spec

    def evaluate(self, *args):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("every worker is gone")
        return self.inner.evaluate(*args)

    def describe(self):
        return self.inner.describe()

    def pop_metrics(self):
        return self.inner.pop_metrics()

    def close(self):
        self.inner.close()


def test_a_run_whose_evaluator_fails_checkpoints_and_resumes_exactly(tmp_path):
    overrides = ["run.generations=6", "run.validation_every=2"]
    _, reference = in_process_run(tmp_path / "ref", overrides)
    config = load_config(SMOKE, overrides)
    run = Run.create(config, tmp_path / "run", lambda c, s: FailingEvaluator(local_evaluator(c, s), calls=5))
    with pytest.raises(RuntimeError, match="every worker is gone"):
        run.run()
    run.close()
    counters = load_checkpoint(tmp_path / "run").counters
    assert counters["generation"] == 3  # generations 0-2 complete (train + one validation = 4 calls), 3 failed
    resumed = Run.resume(tmp_path / "run", local_evaluator)
    resumed.run()
    assert metric_rows(tmp_path / "run") == reference


def test_inspect_shows_which_options_a_genome_file_uses(tmp_path, capsys):
    official = G.NetworkSpec.official((4, 3, 2), supervised_every=2)
    path = G.save(tmp_path / "o.genome", official, G.random_genome(official, jax.random.key(0)))
    code, out, _ = run_cli(["inspect", str(path)], capsys)
    assert code == 0 and "supervised_every=2" in out.split("options in use:")[1].splitlines()[0]
    assert "published-code defaults (network.preset: official): no; differs in supervised_every" in out
    code, out, _ = run_cli(["inspect", str(path), "--json"], capsys)
    info = json.loads(out)
    assert info["options"]["forward_activation"] == "relu_tanh" and info["official_preset"] is False
    plain = G.NetworkSpec((4, 3, 2))
    path = G.save(tmp_path / "p.genome", plain, G.neutral_genome(plain))
    code, out, _ = run_cli(["inspect", str(path)], capsys)
    assert "options in use: none (all defaults)" in out


def test_version_bare_blur_and_one_prefix(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("blur-evolve ")
    code, _, err = run_cli([], capsys)
    assert code == 2 and all(verb in err for verb in ("evolve", "resume", "inspect", "compare", "bench", "tasks"))
    code, _, err = run_cli(["evolve"], capsys)
    assert code == 2 and err.count("blur:") == 1 and err.startswith("blur: error: evolve: ")


def test_output_into_a_closed_pipe_is_not_an_error():
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited: every write gets EPIPE
    blur_tasks = subprocess.Popen([sys.executable, "-m", "evolution.cli", "tasks"], stdout=write_end,
                                  stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    os.close(write_end)
    _, err = blur_tasks.communicate(timeout=120)
    assert blur_tasks.returncode == 0 and b"BrokenPipeError" not in err, err


def test_resume_of_a_complete_run_prints_its_stored_report(uninterrupted, tmp_path, capsys):
    import shutil

    full, _ = uninterrupted
    copy = tmp_path / "done"
    shutil.copytree(full, copy)
    stored = (copy / "report.json").read_text()
    code, out, _ = run_cli(["resume", str(copy)], capsys)
    assert code == 0 and "is complete (stopped: generations after 24 generations)" in out
    assert "evolved rule" in out and "resuming" not in out
    assert (copy / "report.json").read_text() == stored  # nothing recomputed
    report = json.loads(stored)
    (copy / "report.json").write_text("{}")  # no readable report: the run writes it again
    code, out, _ = run_cli(["resume", str(copy), "--quiet"], capsys)
    assert code == 0 and "resuming at generation 24" in out
    assert json.loads((copy / "report.json").read_text())["methods"] == report["methods"]


def test_a_checkpoint_from_an_earlier_release_resumes_when_new_settings_keep_their_defaults():
    from evolution.checkpoint import config_differences, config_identity
    from evolution.config import config_from_dict

    current = config_identity(config_from_dict({"network": {"hidden_sizes": [8]}}))
    stored = {k: v for k, v in current.items() if k != "network.zero_out_neurons"}  # written before it existed
    assert config_differences(stored, current) == []
    changed = config_identity(config_from_dict({"network": {"hidden_sizes": [8], "zero_out_neurons": False}}))
    assert config_differences(stored, changed) == ["network.zero_out_neurons"]


def test_run_files_share_one_permission_mode_and_the_run_key_stays_private(uninterrupted):
    import os
    import stat

    from evolution import rundir

    full, _ = uninterrupted
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in full.iterdir()
             if path.is_file() and not path.name.startswith(".")}
    assert set(modes) >= {"best.genome", "report.md", "config.yaml", "metrics.jsonl", "checkpoint.ckpt"}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    run_id = json.loads((full / "run.json").read_text())["run_id"]
    assert stat.S_IMODE((rundir.key_dir() / f"{run_id}.key").stat().st_mode) == 0o600


def test_blur_runs_lists_status_and_results_and_shipped_configs_resolve_by_name(uninterrupted, tmp_path, capsys,
                                                                                monkeypatch):
    import shutil

    from evolution import rundir

    full, _ = uninterrupted
    root = tmp_path / "runs"
    shutil.copytree(full, root / "finished")
    shutil.copytree(full, root / "busy")
    (root / "finished" / "report.json").unlink()  # -> stopped, no report
    lock = rundir.open_run_dir(root / "busy")
    try:
        code, out, _ = run_cli(["runs", str(root), "--json"], capsys)
    finally:
        lock.release()
    runs = {Path(r["run_dir"]).name: r for r in json.loads(out)}
    assert code == 0 and runs["busy"]["status"] == "running" and runs["finished"]["status"] == "stopped, no report"
    assert runs["busy"]["config"] == "smoke" and runs["busy"]["generation"] == 24 == runs["busy"]["generations"]
    assert 0 < runs["busy"]["heldout_accuracy"] <= 1 and runs["busy"]["best_val_accuracy"] is not None
    assert runs["busy"]["wall_time"] > 0 and runs["busy"]["report_seconds"] > 0
    assert runs["finished"]["report_seconds"] is None
    code, out, _ = run_cli(["runs", str(root)], capsys)
    assert code == 0 and "stopped, no report" in out and "finished" in out  # the lock is released
    monkeypatch.chdir(tmp_path)  # away from the source tree: `smoke` is the shipped config
    code, out, err = run_cli(["evolve", "smoke", "--out", "by-name", "--quiet",
                              *set_args(["run.generations=1", *LIGHT_REPORT])], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "by-name" / "provenance.json").read_text())["config_source"].endswith("smoke.yaml")
    code, _, err = run_cli(["evolve", "no-such-config"], capsys)
    assert code == 2 and "shipped configs:" in err and "digits" in err


def test_plots_name_run_and_metric_and_the_genome_heatmaps_show_states_values_and_the_backprop_genome(
        uninterrupted, tmp_path, capsys):
    import shutil

    from helpers import metric_rows

    from evolution.inspect import fitness_figure, genome_figure

    full, _ = uninterrupted
    ax = fitness_figure({"full": metric_rows(full)}, "cross_entropy").axes[0]
    assert ax.get_xlabel() == "generation" and ax.get_ylabel() == "cross entropy (lower is better)"
    assert "full" in ax.get_title() and "cross entropy" in ax.get_title()
    assert {line.get_label() for line in ax.get_lines()} == {
        "best candidate (train tasks)", "population mean (train tasks)", "validation (held-out tasks)"}
    spec = G.NetworkSpec((4, 3, 2))
    figure = genome_figure(spec, G.random_genome(spec, jax.random.key(0)), "a rule")
    heatmaps = [a for a in figure.axes if a.get_title()]
    assert len(heatmaps) == 8 and sum("(backprop genome)" in a.get_title() for a in heatmaps) == 4
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == ["0", "1"] and len(heatmaps[0].texts) == 4
    assert "a rule" in figure._suptitle.get_text() and "η̃=" in figure._suptitle.get_text()
    copy = tmp_path / "second"
    shutil.copytree(full, copy)
    code, out, _ = run_cli(["inspect", str(full), str(copy), "--plot", str(tmp_path / "both")], capsys)
    assert code == 0 and "full" in out.splitlines()[1] and "second" in out.splitlines()[1]
    assert "evolved rule" in out and (tmp_path / "both_fitness.png").stat().st_size > 1000
    code, _, err = run_cli(["inspect", str(full), str(tmp_path / "nothing")], capsys)
    assert code == 2 and "not a run directory" in err


def test_comparison_and_learning_curve_plots_label_their_error_bars_chance_and_scales():
    from evolution.compare import comparison_figures
    from evolution.inspect import curves_figure

    curve = [{"inner_steps": s, "wall_time": 0.5 * s, "accuracy": 0.3 + 0.01 * s} for s in (0, 10, 100, 1000)]
    runs = {"es": {0: {"curve": curve}, 1: {"curve": curve}}, "bptt": {0: {"curve": curve[:2]}}}
    method = {"memory_short": 2048, "memory_long": 4096, "final_accuracy_mean": 0.6, "final_accuracy_std": 0.02}
    summary = {"methods": {"es": method, "bptt": method}, "memory_steps": [10, 40],
               "baselines": {"SGD": {"accuracy": 0.7, "accuracy_stderr": 0.01}}}
    figures = comparison_figures("cmp", runs, summary, chance=1 / 3)
    assert set(figures) == {"accuracy_vs_inner_steps.png", "accuracy_vs_wall_clock.png", "memory.png",
                            "final_accuracy.png"}
    wall = figures["accuracy_vs_wall_clock.png"].axes[0]
    assert wall.get_xscale() == "symlog" and "cmp" in wall.get_title()
    assert "chance (0.33)" in [line.get_label() for line in wall.get_lines()]
    final = figures["final_accuracy.png"].axes[0]
    labels = final.get_legend_handles_labels()[1]
    assert "outer loops: mean ± std over seeds" in labels
    assert "tuned baselines: mean ± standard error over tasks" in labels
    report = {"n_way": 3, "num_tasks": 16, "methods": {"rule": {"curve": [0.3, 0.5, 0.6]}}}
    ax = curves_figure(report, [0, 5, 10], "rule on digits").axes[0]
    assert ax.get_title() == "rule on digits" and ax.get_ylabel() == "query accuracy (mean over 16 held-out tasks)"
    assert "chance (1/3)" in [line.get_label() for line in ax.get_lines()]
    assert not ax.collections  # no spread stored: no band, and the label says "mean"
    report["methods"]["rule"]["curve_stderr"] = [0.01, 0.02, 0.03]
    ax = curves_figure(report, [0, 5, 10], "rule on digits").axes[0]
    assert ax.get_ylabel() == "query accuracy (mean ± s.e. over 16 held-out tasks)"
    (band,) = ax.collections  # ± one standard error over tasks around the mean
    np.testing.assert_allclose(band.get_paths()[0].vertices[:, 1].min(), 0.29)
    np.testing.assert_allclose(band.get_paths()[0].vertices[:, 1].max(), 0.63)
