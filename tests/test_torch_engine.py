"""The torch evaluator backend (``evaluator.backend: torch``): pinned to the JAX engine in float32, bf16 products
that differ from fp32 only by rounding, reproducibility, chunk independence, and the config errors."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genome as G
from evolution.benchmarks import precision_comparison
from evolution.cli import main
from workers import engine as E
from workers import torch_engine as TE
from workers.evaluator import synapse_keys
from workers.task_types import Task

from helpers import (KILL_OVERRIDES, LIGHT_REPORT, SMOKE, evolve_here, evolve_signalled_at, metric_rows, resume_here,
                     same_genome, set_args)

HAS_BF16 = bool(TE.bf16_units(TE.cpu_flags()))
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 GEMM units")


def _case(spec: G.NetworkSpec, population=3, tasks=2, steps=4, batch=6, query=9, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    dims = G.num_dims(spec)
    vectors = (np.asarray(G.ravel(spec, G.neutral_genome(spec))) + noise * rng.standard_normal((population, dims)))
    n_in, n_out = spec.num_inputs, spec.num_outputs
    task = Task(jnp.asarray(rng.standard_normal((tasks, steps, batch, n_in)), jnp.float32),
                jnp.asarray(rng.integers(0, n_out, (tasks, steps, batch)), jnp.int32),
                jnp.asarray(rng.standard_normal((tasks, query, n_in)), jnp.float32),
                jnp.asarray(rng.integers(0, n_out, (tasks, query)), jnp.int32))
    return vectors.astype(np.float32), task, synapse_keys(jax.random.PRNGKey(seed), tasks)


def _spec(**options) -> G.NetworkSpec:
    base = dict(layer_sizes=(12, 9, 5), num_states=2, forward_activation="tanh", output_activation="identity",
                backward_activation="tanh")
    return G.NetworkSpec(**{**base, **options})


SPECS = {
    "paper-like": _spec(feedback="target", synapse_normalization="stored"),
    "mse-multiplicative": _spec(feedback="error_mse", backward_update="multiplicative"),
    "second-state-mean": _spec(backward_update="multiplicative_second_state", batch_reduction="mean"),
    "skip-first-relu": _spec(backward_update="multiplicative_skip_first_state", forward_activation="relu",
                             backward_activation="sigmoid"),
    "relu_tanh-k3-deep": _spec(layer_sizes=(7, 6, 5, 4), num_states=3, forward_activation="relu_tanh",
                               output_activation="tanh", synapse_normalization="stored"),
    "k1-elu-sum": _spec(num_states=1, forward_activation="elu", backward_activation="identity",
                        feedback="error_cross_entropy"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_float32_episodes_equal_the_jax_engine(name):
    spec = SPECS[name]
    vectors, tasks, keys = _case(spec)
    horizon = E.Horizon(4)
    reference = E.evaluate(spec, jnp.asarray(vectors), tasks, keys, E.Scoring(max_loss=50.0), horizon)
    result = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(max_loss=50.0), horizon)
    ce = np.asarray(reference.cross_entropy)
    assert np.max(np.abs(result.cross_entropy - ce) / np.abs(ce)) <= 1e-6
    np.testing.assert_array_equal(result.accuracy, np.asarray(reference.accuracy))
    np.testing.assert_allclose(result.fitness, np.asarray(reference.fitness), rtol=1e-6)
    np.testing.assert_array_equal(result.diverged, np.asarray(reference.diverged))
    assert result.fitness.shape == (3, 2) and not result.diverged.any()
    error_rate = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(fitness="error_rate"), horizon)
    np.testing.assert_array_equal(error_rate.fitness, (1.0 - np.asarray(reference.accuracy)).astype(np.float32))


def test_skip_last_update_and_zero_steps_follow_the_engine():
    spec = SPECS["paper-like"]
    vectors, tasks, keys = _case(spec)
    for horizon in (E.Horizon(4, skip_last_update=True), E.Horizon(0)):
        reference = E.evaluate(spec, jnp.asarray(vectors), tasks, keys, E.Scoring(), horizon)
        result = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), horizon)
        np.testing.assert_allclose(result.cross_entropy, np.asarray(reference.cross_entropy), rtol=1e-6)


def test_a_diverging_episode_scores_the_worst_value_like_the_engine():
    spec = _spec(forward_activation="identity", backward_activation="identity")
    vectors, tasks, keys = _case(spec, noise=0.0)
    genome = G.neutral_genome(spec)._replace(synapse_update=jnp.asarray(1e6), neuron_update=jnp.asarray(1e6))
    vectors[1] = np.asarray(G.ravel(spec, genome))
    scoring = E.Scoring(max_loss=7.0)
    reference = E.evaluate(spec, jnp.asarray(vectors), tasks, keys, scoring, E.Horizon(4))
    result = TE.evaluate(spec, vectors, tasks, keys, scoring, E.Horizon(4))
    assert result.diverged[1].all() and not result.diverged[0].any()
    np.testing.assert_array_equal(result.diverged, np.asarray(reference.diverged))
    assert (result.fitness[1] == 7.0).all() and (result.accuracy[1] == 0.0).all()


def test_compiled_step_equals_the_eager_one_and_the_engine():
    spec = SPECS["paper-like"]
    vectors, tasks, keys = _case(spec, population=5)
    eager = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4))
    compiled = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4), compiled=True)
    reference = E.evaluate(spec, jnp.asarray(vectors), tasks, keys, E.Scoring(), E.Horizon(4))
    ce = np.asarray(reference.cross_entropy)
    assert np.max(np.abs(compiled.cross_entropy - ce) / ce) <= 1e-6
    assert np.max(np.abs(compiled.cross_entropy - eager.cross_entropy) / ce) <= 1e-6
    again = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4), compiled=True)
    np.testing.assert_array_equal(again.cross_entropy, compiled.cross_entropy)


def test_an_episode_does_not_depend_on_the_rest_of_the_population(monkeypatch):
    """Chunks (and the padding of the last one) change which networks share a product, never the numbers."""
    spec = SPECS["paper-like"]
    vectors, tasks, keys = _case(spec, population=7)
    full = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4))
    monkeypatch.setattr(TE, "CHUNK_BYTES", int(2.5 * E.synapse_bytes(spec.layer_sizes, spec.num_states)))
    assert TE.chunk_size(spec, 14) == 2 and TE.chunk_size(spec, 5) == 2  # 3 chunks, the last one padded
    chunked = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4))
    part = TE.evaluate(spec, vectors[2:5], tasks, keys, E.Scoring(), E.Horizon(4))
    np.testing.assert_array_equal(chunked.cross_entropy, full.cross_entropy)
    np.testing.assert_array_equal(part.cross_entropy, full.cross_entropy[2:5])


@needs_bf16
def test_bfloat16_products_round_but_track_float32():
    spec = SPECS["paper-like"]
    vectors, tasks, keys = _case(spec, population=8, tasks=4, query=64)
    fp32 = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4))
    bf16 = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4), precision="bfloat16")
    again = TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4), precision="bfloat16")
    relative = np.abs(bf16.cross_entropy - fp32.cross_entropy) / fp32.cross_entropy
    assert relative.max() > 1e-5  # the products really ran in bf16 (8-bit mantissas)
    assert relative.max() < 0.02 and np.abs(bf16.accuracy - fp32.accuracy).mean() < 0.02
    np.testing.assert_array_equal(again.cross_entropy, bf16.cross_entropy)  # reproducible run to run


def test_precision_needs_bf16_units_and_the_cpu_flags_are_read():
    TE.check_precision("float32", set())
    TE.check_precision("bfloat16", {"avx512_bf16"})
    with pytest.raises(ValueError, match="needs a CPU with amx_bf16 or avx512_bf16"):
        TE.check_precision("bfloat16", {"avx512f", "fma"})
    with pytest.raises(ValueError, match="precision must be one of"):
        TE.check_precision("float16", set())
    assert TE.bf16_units({"amx_bf16", "avx512_bf16", "sse"}) == ["amx_bf16", "avx512_bf16"]
    assert "fpu" in TE.cpu_flags() or not Path("/proc/cpuinfo").exists()


def test_unsupported_options_and_curves_are_refused():
    with pytest.raises(ValueError, match="does not implement oja, saturation; use evaluator.backend: jax"):
        TE.check_support(_spec(oja=True, saturation=True))
    spec = SPECS["paper-like"]
    vectors, tasks, keys = _case(spec)
    with pytest.raises(ValueError, match="no learning curves"):
        TE.evaluate(spec, vectors, tasks, keys, E.Scoring(), E.Horizon(4, curve_steps=(2,)))


def _cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["episode.precision=bfloat16"], "episode.precision: bfloat16 runs on evaluator.backend: torch"),
    (["episode.precision=float16"], "precision must be one of float32, bfloat16"),
    (["evaluator.backend=numpy"], "evaluator.backend: must be 'jax' or 'torch'"),
    (["evaluator.backend=torch", "network.oja=true"], "network: the torch backend does not implement oja"),
    (["evaluator.backend=torch", "strategy.name=persistent_es"],
     "evaluator.backend: torch does not run the truncated windows of persistent_es"),
    (["evaluator.backend=torch", "evaluator.gpus_per_worker=1"], "evaluator.gpus_per_worker: the torch backend runs"),
])
def test_bad_backend_settings_are_one_line_errors(overrides, message, capsys, tmp_path):
    out = tmp_path / "run"
    code, err = _cli(["evolve", str(SMOKE), "--out", str(out), *set_args(overrides)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_torch_run_resumes_exactly_after_kill_9_and_records_its_backend(tmp_path):
    overrides = [*KILL_OVERRIDES, *LIGHT_REPORT, "evaluator.backend=torch", "evaluator.torch_compile=false"]
    full, out = tmp_path / "full", tmp_path / "killed"
    killed = evolve_signalled_at(out, 5, overrides)
    evolve_here(full, overrides)  # beside the killed subprocess
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL and len(metric_rows(out)) == 5
    evaluator = json.loads((full / "provenance.json").read_text())["evaluator"]
    assert evaluator["backend"] == "torch" and evaluator["precision"] == "float32"
    assert evaluator["torch_compile"] is False

    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(config.replace("backend: torch", "backend: jax"))
    code, stderr = resume_here(out)
    assert code == 2 and "evaluator.backend" in stderr, stderr
    (out / "config.yaml").write_text(config)
    code, stderr = resume_here(out)
    assert code == 0, stderr
    assert metric_rows(out) == metric_rows(full)
    same_genome(full, out)
    if HAS_BF16:  # blur bench --precision on this run: the same genome on the same tasks, fp32 and bf16
        comparison = precision_comparison([full], num_tasks=6)["runs"][str(full)]
        assert comparison["evolved_in"] == "torch float32" and comparison["num_tasks"] == 6
        assert comparison["torch_minus_jax_fp32"]["max_abs_task_difference"] == 0.0
        bf16, fp32 = comparison["torch_bfloat16"]["accuracy"], comparison["torch_float32"]["accuracy"]
        assert comparison["bf16_minus_fp32"]["paired_difference"] == pytest.approx(bf16 - fp32, abs=1e-6)
        assert 0.0 <= fp32 <= 1.0 and comparison["jax_float32"]["standard_error"] >= 0.0
