"""Meta-training across settings: the combined fitness is exactly the aggregate of single-setting
evaluations, the subset choice is seeded, runs resume exactly after kill -9, and bad settings are
one-line errors naming the setting."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from evolution import settings as S
from evolution.cli import main
from evolution.config import config_from_dict, load_config, read_yaml_file, resolve_settings
from evolution.run import Run, generation_keys, local_evaluator, setting_specs
from workers.engine import aggregate_fitness
from workers.evaluator import LocalEvaluator

from helpers import ROOT, evolve_here, evolve_signalled_at, metric_rows, resume_here, same_genome

CONFIG = ROOT / "tests" / "data" / "settings_smoke.yaml"


class Recording(LocalEvaluator):
    """The in-process evaluator, keeping every training population it was asked to score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.populations = []

    def evaluate(self, vectors, split, task_key, num_tasks, num_steps, setting=0):
        if split == "train":
            self.populations.append((np.array(vectors), task_key, setting))
        return super().evaluate(vectors, split, task_key, num_tasks, num_steps, setting)


@pytest.mark.parametrize("normalization", ["chance", "rank", "none"])
def test_fitness_is_the_combination_of_single_setting_evaluations(tmp_path, normalization):
    config = load_config(CONFIG, ["run.generations=2", f"run.setting_normalization={normalization}"])
    recorders = []

    def make(config, spec):
        base = local_evaluator(config, spec)
        recorders.append(Recording(spec, config.task, config.episode, settings=base.settings))
        return recorders[-1]

    run = Run.create(config, tmp_path / "run", make)
    try:
        row = run.step()
    finally:
        run.close()
    recorder = recorders[0]
    assert [s for _, _, s in recorder.populations] == [0, 1]
    population = recorder.populations[0][0]
    np.testing.assert_array_equal(recorder.populations[1][0], population)
    task_key = generation_keys(config, 0)[1]
    per_setting = []
    for index, (setting, spec) in enumerate(setting_specs(config)):
        # an independent single-setting evaluator, on the setting's own task batch fold_in(task_key, s)
        alone = LocalEvaluator(spec, setting.task, config.episode)
        result = alone.evaluate(population, "train", jax.random.fold_in(task_key, index), 3, setting.num_steps)
        per_setting.append(aggregate_fitness(np.asarray(result.fitness, np.float64), config.episode.scoring))
    for index, (_, key, _) in enumerate(recorder.populations):  # the batch of setting s: fold_in(task_key, s)
        np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.fold_in(task_key, index)))
    chance = np.array([np.log(3), np.log(2)])
    weights = np.array([1.0, 2.0])
    if normalization == "chance":
        rows = np.stack(per_setting) / chance[:, None]
    elif normalization == "rank":
        rows = np.stack([np.argsort(np.argsort(f)) / (len(f) - 1) for f in per_setting])  # no ties here
    else:
        rows = np.stack(per_setting)
    expected = (weights[:, None] * rows).sum(0) / weights.sum()
    assert row["best_fitness"] == pytest.approx(expected.min(), rel=1e-12, abs=1e-12)
    assert row["mean_fitness"] == pytest.approx(expected.mean(), rel=1e-12, abs=1e-12)
    assert row["settings"] == ["three-way", "two-way-deep"]
    assert row["inner_steps"] == 6 * 3 * 4 + 6 * 3 * 3


def test_ranks_share_ties_and_the_subset_is_seeded():
    np.testing.assert_array_equal(S.ranks(np.array([3.0, 1.0, 3.0, 2.0])), [5 / 6, 0, 5 / 6, 1 / 3])
    key = np.arange(4, dtype=np.uint32).tobytes()
    first = S.choose(key, 5, 2)
    assert first == S.choose(key, 5, 2) and len(set(first)) == 2
    assert len({tuple(S.choose(np.array([i, 7], np.uint32).tobytes(), 5, 2)) for i in range(20)}) > 3
    assert S.choose(key, 3, None) == [0, 1, 2]


def test_a_subset_of_settings_per_generation(tmp_path):
    config = load_config(CONFIG, ["run.generations=3", "run.settings_per_generation=1", "run.validation_every=0"])
    run = Run.create(config, tmp_path / "run", local_evaluator)
    try:
        rows = [run.step() for _ in range(3)]
    finally:
        run.close()
    assert all(len(r["settings"]) == 1 for r in rows)
    assert all(f"train_accuracy/{r['settings'][0]}" in r for r in rows)


def test_a_multi_setting_run_resumes_identically_after_kill_9(tmp_path):
    full, out = tmp_path / "full", tmp_path / "killed"
    killed = evolve_signalled_at(out, 4, config=CONFIG)
    evolve_here(full, [], CONFIG)  # beside the killed subprocess
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL and len(metric_rows(out)) == 4
    code, stderr = resume_here(out)
    assert code == 0, stderr
    assert metric_rows(out) == metric_rows(full)
    assert {"val_accuracy/three-way", "val_accuracy/two-way-deep"} <= set(metric_rows(full)[2])
    same_genome(full, out)
    # the end of the run: the generalization report on the held-out setting at both horizons, and the check
    # of the selection on fresh validation tasks and on test tasks of the meta-training settings
    report = json.loads((full / "report.json").read_text())
    assert report["kind"] == "generalization" and list(report["settings"]) == ["wide"]
    assert set(report["settings"]["wide"]["horizons"]) == {"2", "4"}
    assert report["settings"]["wide"]["layer_sizes"] == [64, 32, 3]
    selection = report["selection"]
    best = [r for r in metric_rows(full) if r["generation"] == selection["best_generation"]][0]
    assert selection["validation_accuracy_at_selection"] == best["val_accuracy"]
    assert set(selection["settings"]) == {"three-way", "two-way-deep"}
    weighted = (selection["settings"]["three-way"]["test_accuracy"]
                + 2 * selection["settings"]["two-way-deep"]["test_accuracy"]) / 3
    assert selection["test_accuracy"] == pytest.approx(weighted)
    assert (full / "generalization.png").stat().st_size > 1000
    assert "| wide | 64-32-3 | 4 |" in (full / "report.md").read_text()


# a held-out setting whose own splits are disjoint but which tests on classes the settings meta-train on
HELDOUT_ON_TRAIN_CLASSES = {"train_classes": [3, 4, 5], "validation_classes": [7, 8, 9], "test_classes": [0, 1, 2]}


def _write(tmp_path: Path, edit) -> Path:
    data = read_yaml_file(CONFIG)
    edit(data)
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["settings"][1].update(weight=-1), "settings[1].weight: must be a positive finite number"),
    (lambda d: d["settings"][1].update(weight=float("inf")), "settings[1].weight: must be a finite number"),
    (lambda d: d["settings"][0].update(num_steps=0), "settings[0].num_steps: must be an integer in [1,"),
    (lambda d: d["report"].update(horizons=[0, 4]), "report.horizons[0]: must be an integer in [1,"),
    (lambda d: d["network"].update(per_layer_genome=True),
     "settings[1] (two-way-deep): 2 hidden layers, but network.per_layer_genome ties the genome to 1"),
    (lambda d: d["settings"][1]["task"].update(n_way=11), "settings[1].task: "),
    (lambda d: d["report"]["settings"][0]["task"].update(HELDOUT_ON_TRAIN_CLASSES),
     "report.settings[0] (wide): its test classes [0, 1, 2] are meta-training classes of setting 'three-way'"),
    (lambda d: d["settings"][1].update(name="three-way"), "settings[1].name: 'three-way' is used by another"),
    (lambda d: d["run"].update(settings_per_generation=3), "run.settings_per_generation: 3 is more than the 2"),
    (lambda d: d["run"].update(curriculum={"every": 2}), "run.curriculum.every: not supported with a settings"),
])
def test_bad_settings_are_one_line_errors_naming_the_setting(tmp_path, capsys, edit, message):
    path = _write(tmp_path, edit)
    out = tmp_path / "out"
    assert main(["evolve", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_overlap_is_accepted_when_the_heldout_setting_allows_it():
    data = read_yaml_file(CONFIG)
    data["report"]["settings"][0]["task"].update(HELDOUT_ON_TRAIN_CLASSES, allow_overlap=True)
    config = config_from_dict(data)
    assert [s.name for s in resolve_settings(config, "report")] == ["wide"]
    assert len(setting_specs(config)) == 2


def test_every_setting_compiles_once_and_stays_warm(tmp_path):
    from workers.engine import compiled_cache_size

    config = load_config(CONFIG, ["run.generations=4", "run.validation_every=2"])
    run = Run.create(config, tmp_path / "run", local_evaluator)
    try:
        run.step()
        run.step()  # the first validation compiles the validation shapes of both settings
        warm = compiled_cache_size()
        run.step()
        run.step()
    finally:
        run.close()
    assert compiled_cache_size() == warm
