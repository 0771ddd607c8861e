"""Shared test setup: strict JAX rank promotion, Ray on loopback, and small helpers."""

from __future__ import annotations

import gc
import os
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds to 127.0.0.1 in tests
# XLA's persistent compilation cache, shared by every test process (one per line of tests/process_groups.txt), the
# CLI subprocesses they start and later sessions in this checkout: a process that meets an executable another
# one compiled loads it instead of compiling it again (the same executable, so the same numbers, bit for bit).
# JAX keys entries by the computation, the compile options, the JAX/XLA version and the CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                                   "xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# No size bound: with one, JAX's cache lists and reads every entry's access-time file under a directory-wide
# file lock on every write (`lru_cache._evict_if_needed`), so each new entry cost more as the suite went on
# (150 shapes x 5 small ops: 31 s without the bound, 167 s with it, in a cache of 4,000 entries; 22-37 s with
# no cache) and concurrent processes waited on the lock. Without the lock, a process that reads an entry
# another one is still writing fails to decompress it, warns and compiles the program itself (same program,
# same executable).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
# run signing keys of the tests' runs go to a scratch key store, never to the user's
if "BLUR_KEY_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["BLUR_KEY_DIR"] = tempfile.mkdtemp(prefix="blur-test-keys-")
    # removed when this pytest process ends (every module's process made one and left it behind before)
    atexit.register(shutil.rmtree, os.environ["BLUR_KEY_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# Modules that compare Ray workers' shards with the in-process engine bit for bit: they need -O1 (see below).
NEEDS_O1 = {"test_ray_evaluator.py"}


def pytest_configure(config):
    """The XLA flags of this pytest process, set before anything starts JAX's backend (conftest imports jax but
    runs nothing on it; the flags are read when the backend starts). CLI subprocesses and Ray workers inherit
    them, so every comparison stays within one set of flags; `blur` itself runs at XLA's defaults.

    - LLVM at -O0 (`--xla_backend_optimization_level=0`): the suite is mostly XLA compilation, and -O0 took it
      from 1327 s to 920 s on the 2-core AMD host (test_gradients alone 105 -> 72 s; -O1 was itself chosen over
      the default -O2/-O3, which were about 2/3 of a small engine's compile time). Results differ from the
      default levels at float rounding.
    - Except in a process that runs a module of NEEDS_O1 (named, or the whole directory): at -O0 a Ray worker's
      shard of a population (3 genomes) and the driver's whole population (6) differ in the last bit of some
      fitness values, even with the driver single-threaded like the workers (XLA's code for the smaller batch
      sums in another order); at -O1 they agree bit for bit.
    - XLA's older (non-MLIR) fusion emitters compile a further ~30% faster (6-5-3 engine 1.8 -> 1.3 s, its
      meta-gradient 4.6-5.3 -> 3.4-3.9 s, a paper-scale engine 2.1 -> 1.4 s); paper-scale episodes then run
      ~15% slower, which the tests, dominated by compilation, do not feel.
    - LLVM code generation in one piece (`--xla_cpu_parallel_codegen_split_count=1`) instead of a module split
      for a thread pool: splitting, and the threads, cost CPU that two test processes on two cores never get
      back (step_states of 24 small specs: 4.1-4.5 -> 2.6-2.9 s of compile CPU; test_published_parity 57 -> 44 s
      and test_engine 89 -> 75 s of user CPU from an empty cache)."""
    files = [Path(str(arg).split("::")[0]) for arg in config.args]
    whole = any(not path.name.endswith(".py") for path in files)  # a directory: all of its modules
    level = 1 if whole or NEEDS_O1 & {path.name for path in files} else 0
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1 "
                                       f"--xla_backend_optimization_level={level} --xla_cpu_use_fusion_emitters=false "
                                       "--xla_cpu_parallel_codegen_split_count=1")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """One uninterrupted smoke run with SPLIT_KILL_OVERRIDES (the reference of the CLI's kill / resume tests)."""
    from helpers import SMOKE, SPLIT_KILL_OVERRIDES, blur, set_args

    out = tmp_path_factory.mktemp("runs") / "full"
    proc = blur("evolve", SMOKE, "--out", out, "--quiet", *set_args(SPLIT_KILL_OVERRIDES))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return out, stdout  # the test of the printed table reads stdout


def pytest_runtest_setup(item):
    """Before each test: collect the young generations, then freeze every object still alive (gc.freeze) so that
    Python's full collections no longer walk the imports, JAX's caches of traced and compiled programs and the
    session's fixtures again and again. In the engine's process group (test_engine, test_tasks, test_datasets,
    test_genome_params_io) the collector's CPU went from 6.0 to 1.2 s, 4.9 -> 0.3 s of it in full collections,
    with peak memory 2.05 -> 2.08 GB (garbage that had already reached the oldest generation stays frozen). Over
    the suite, in a paired run of both versions side by side, the user CPU of the process groups other than Ray's
    went from 1365 to 1305 s."""
    gc.collect(1)
    gc.freeze()
