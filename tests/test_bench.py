"""The benchmark's PyTorch baselines compute genome.step's math, and `blur bench --quick --json` reports every
documented number. No timing assertions: speed is the bench's output, not a test."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import genome as G
from genome import torch_population as TP
from workers import bench as B
from workers import engine as E
from workers.evaluator import available_cores
from workers.task_types import Task

SMALL = G.NetworkSpec((6, 5, 3), num_states=2, backward_activation="tanh")
DEEP = G.NetworkSpec((7, 6, 5, 3), num_states=3, forward_activation="relu", backward_update="multiplicative",
                     feedback="error_cross_entropy", batch_reduction="mean")
SCALE_KEYS = (
    "engine_gflops", "engine_steps_per_s", "torch_vectorized_gflops", "torch_vectorized_steps_per_s",
    "torch_vectorized_all_blocks_gflops", "torch_loop_gflops", "torch_loop_steps_per_s", "gemm_jax_gflops",
    "gemm_torch_gflops", "engine_vs_gemm", "engine_vs_torch_vectorized", "engine_vs_torch_vectorized_all_blocks",
    "engine_vs_torch_loop", "memory_bytes_T", "memory_bytes_4T", "memory_ratio_4T", "memory_temp_ratio_4T",
    "canonical_flops_per_step", "executed_flops_per_step",
)


@pytest.mark.parametrize("spec", [SMALL, B.bench_spec(B.QUICK_SCALES[0]), DEEP], ids=["small", "digits", "deep"])
def test_torch_vectorized_step_and_per_genome_loop_compute_genome_step(spec):
    errors = B.check_torch_matches_jax(spec, num_genomes=3, num_tasks=2, batch_size=8, num_steps=3)
    assert errors["torch_vectorized_max_rel_err"] < B.CHECK_TOLERANCE
    assert errors["torch_loop_max_rel_err"] < B.CHECK_TOLERANCE


def test_the_check_catches_a_wrong_torch_step(monkeypatch):
    right = TP._mix
    monkeypatch.setattr(TP, "_mix", lambda a, matrix, out: right(a, matrix * 1.01, out))  # a 1% error
    errors = B.check_torch_matches_jax(SMALL)
    assert errors["torch_vectorized_max_rel_err"] > 10 * B.CHECK_TOLERANCE
    assert errors["torch_loop_max_rel_err"] > 10 * B.CHECK_TOLERANCE


def test_skipping_the_unread_input_backward_block_changes_nothing_else():
    """The timed PyTorch runs leave backward[0] alone: every other block and the query scores are unchanged."""
    spec = SMALL
    vectors = B._genome_vectors(spec, jax.random.key(0), 2)
    g = B.torch_genomes(spec, vectors, repeats=2)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((2, 4, 8, spec.num_inputs), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, spec.num_outputs, (2, 4, 8)))
    start = B.torch_init_synapses(spec, 4, torch.Generator().manual_seed(0))
    runs = {}
    for full in (True, False):
        forward, backward = [b.clone() for b in start[0]], [b.clone() for b in start[1]]
        for t in range(4):
            B.torch_step(spec, g, forward, backward, x[:, t], y[:, t], update_input_backward=full)
        runs[full] = forward, backward, B.torch_query_scores(spec, g, forward, x[:, 0], y[:, 0])
    (forward_full, backward_full, scores_full), (forward_lean, backward_lean, scores_lean) = runs[True], runs[False]
    assert torch.equal(backward_lean[0], start[1][0]) and not torch.equal(backward_full[0], start[1][0])
    for a, b in zip(forward_full + backward_full[1:], forward_lean + backward_lean[1:]):
        assert torch.equal(a, b)
    for a, b in zip(scores_full, scores_lean):
        assert torch.equal(a, b)


def _tiny_setup(seed=0):
    spec = SMALL
    scale = B.Scale("tiny", spec.layer_sizes, batch_size=8, population=3, tasks=2, steps=3, loop_population=3,
                    query=16)
    vectors = B._genome_vectors(spec, jax.random.key(seed), scale.population)
    return spec, scale, vectors, B._random_tasks(scale, spec, scale.steps, seed=seed)


def test_vectorized_episodes_equal_the_per_genome_loop():
    spec, scale, vectors, tasks = _tiny_setup()
    g = B.torch_genomes(spec, vectors, repeats=scale.tasks)
    tasks = Task(*(torch.from_numpy(a) for a in tasks))
    vectorized = B.torch_episodes_vectorized(spec, g, tasks, torch.Generator().manual_seed(5))
    looped = B.torch_episodes_loop(spec, g, tasks, torch.Generator().manual_seed(5), scale.population)
    np.testing.assert_allclose(vectorized.numpy(), looped, rtol=1e-5)


def test_vectorized_torch_episodes_score_like_the_engine():
    """Same genomes, tasks and initial synapses: the timed PyTorch path gives the engine's query losses."""
    spec, scale, vectors, tasks = _tiny_setup(seed=3)
    keys = jax.random.split(jax.random.key(4), scale.tasks)
    engine = E.evaluate(spec, vectors, Task(*(jnp.asarray(a) for a in tasks)), keys,
                        E.Scoring(), E.Horizon(scale.steps))
    per_task = jax.vmap(lambda k: G.init_synapses(spec, k))(keys)  # shared by every genome
    initial = tuple([torch.from_numpy(np.tile(np.asarray(b), (scale.population,) + (1,) * (b.ndim - 1)))
                     for b in blocks] for blocks in (per_task.forward, per_task.backward))
    g = B.torch_genomes(spec, vectors, repeats=scale.tasks)
    losses = B.torch_episodes_vectorized(spec, g, Task(*(torch.from_numpy(a) for a in tasks)),
                                         torch.Generator(), initial=initial)
    np.testing.assert_allclose(losses.numpy(), np.asarray(engine.cross_entropy).reshape(-1), rtol=1e-5)


def test_executed_flops_count_the_products_an_episode_needs():
    spec = G.NetworkSpec((2, 3, 4), num_states=1)
    # layer 0: forward + forward Hebbian, 2·(2·B·k·(2+1)·3) = 36; layer 1: forward + forward Hebbian
    # 2·(2·1·1·4·4) = 64, backward + backward Hebbian 2·(2·1·1·4·3) = 48
    assert B.executed_flops(spec, 1) == 36 + 64 + 48


def test_ray_section_reports_unavailable_without_workers_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "workers.ray", None)  # makes `import workers.ray` raise ImportError
    section = B._ray_section(quick=True)
    assert section["available"] is False and "ray bench unavailable" in section["reason"]


def test_quick_bench_json_has_every_documented_number(capsys):
    from evolution import benchmarks

    assert benchmarks.run_bench(quick=True, as_json=True, with_ray=False) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["mode"] == "quick" and results["correctness"]["ok"]
    assert set(results["scales"]) == {s.name for s in B.QUICK_SCALES}
    for name, scale in results["scales"].items():
        for key in SCALE_KEYS:
            value = scale[key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, key, value)
        assert scale["memory_ratio_4T"] >= scale["memory_temp_ratio_4T"] - 1e-9  # task data grow with T
        assert scale["torch_backend_fp32_steps_per_s"] > 0 and scale["torch_backend_compiled"] is False
        has_bf16 = scale["torch_backend_bf16_steps_per_s"] is not None
        assert (scale["bf16_vs_fp32"] is not None) == has_bf16 and (not has_bf16 or scale["bf16_vs_fp32"] > 0)
    paper = results["paper_run"]
    assert paper["available"] and paper["population"] == benchmarks.QUICK_PAPER_POPULATION and paper["num_steps"] == 15
    assert paper["num_query"] == 2560 and paper["config"].endswith("paper_cmaes.yaml")
    # the FLOP count of a generation, written out: P·K·(T·canonical step + the query pass of every layer)
    spec = G.NetworkSpec((196, 512, 10), num_states=2)
    query = 2 * 2560 * (197 * 512 + 513 * 10) * 2
    assert paper["flops_per_generation"] == 16 * 1 * (15 * E.canonical_flops(spec, 128) + query)
    assert paper["predicted_seconds_per_generation"] == pytest.approx(
        paper["flops_per_generation"] / (paper["gemm_jax_gflops"] * 1e9))
    assert {"jax_float32", "torch_float32"} <= set(paper["backends"])
    for name, row in paper["backends"].items():
        assert row["seconds_per_generation"] > 0 and row["episode_seconds"] > 0, name
        assert row["seconds_per_generation"] >= row["episode_seconds"] + row["sampling_seconds"] - 1e-9
        backend, precision = name.split("_")
        assert row["evaluator"]["backend"] == backend and row["evaluator"]["precision"] == precision
    # the paper config's evaluator.devices: auto splits the JAX engine's population over one host device per core
    cores = available_cores()
    assert paper["backends"]["jax_float32"]["evaluator"]["split_over"] == cores
    assert paper["seconds_per_generation"] == paper["backends"]["jax_float32"]["seconds_per_generation"]
    table = "\n".join([B.format_table(results), *benchmarks._format_paper_run(paper)])
    assert "engine / GEMM" in table and "memory ratio 4T/T" in table and "Paper run" in table
    assert (f"population split over {cores} devices" in table) == (cores > 1)


SPLIT_BENCH = """
from workers import bench as B
B.request_devices(2)  # as `blur bench` does before anything starts JAX (2: whatever this machine's cores)
scale = B.Scale("tiny", (6, 5, 3), batch_size=4, population=5, tasks=2, steps=3, loop_population=2, query=8)
result = B.bench_scale(scale, rounds=2, gemm_size=64, log=lambda _: None, quick=True)
print(B.format_table({"mode": "quick", "machine": B.machine_info(), "gemm_size": 64, "scales": {"tiny": result},
                      "correctness": {"ok": True, "torch_vectorized_max_rel_err": 0.0,
                                      "torch_loop_max_rel_err": 0.0, "tolerance": 1e-5}}))
for key in ("engine_split_gflops", "engine_split_vs_engine", "engine_split_vs_gemm",
            "engine_split_vs_torch_vectorized"):
    assert result[key] > 0, (key, result[key])
assert result["engine_split_devices"] == 2 and len(result["samples_steps_per_s"]["engine_split"]) == 2
"""


def test_the_bench_times_the_engine_split_over_host_devices_in_a_fresh_process():
    """``blur bench`` asks for host devices before JAX starts and then also times the engine as
    ``evaluator.devices: auto`` runs it, split over them: its rate and its ratios to the one-device engine, the
    GEMM and the vectorized PyTorch version, in the JSON and the table. (The in-process quick bench above runs
    after JAX started with one device: no split row there.)"""
    proc = subprocess.run([sys.executable, "-c", SPLIT_BENCH], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "engine split over host devices" in proc.stdout and "split / torch vectorized (>= 1.5)" in proc.stdout
