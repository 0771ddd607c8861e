"""Shared test setup: strict JAX rank promotion, Ray on loopback, and small helpers."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds to 127.0.0.1 in tests
# LLVM at -O1 for the tests' XLA programs: the expensive -O2/-O3 passes were about 2/3 of a small engine's
# compile time (6.5 s -> 2.4 s for a 6-5-3 network), and the suite is mostly compilation; the compiled
# programs ran as fast as at the default level (digits and paper-scale episodes, measured). Results differ
# from the default level at float rounding, so every comparison stays within this process's flags (CLI
# subprocesses and Ray workers inherit them); `blur` itself runs at XLA's default level.
# XLA's older (non-MLIR) fusion emitters compile a further ~30% faster (6-5-3 engine 1.8 -> 1.3 s, its
# meta-gradient 4.6-5.3 -> 3.4-3.9 s, a paper-scale engine 2.1 -> 1.4 s); the paper-scale episodes then run
# ~15% slower, which the tests, dominated by compilation, do not feel.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=1 "
                                   "--xla_cpu_use_fusion_emitters=false")
# XLA's persistent compilation cache, shared by every test module (each runs in its own pytest process), the
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


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """One uninterrupted smoke run with KILL_OVERRIDES (the reference of every kill / resume test)."""
    from helpers import KILL_OVERRIDES, SMOKE, blur, set_args

    out = tmp_path_factory.mktemp("runs") / "full"
    proc = blur("evolve", SMOKE, "--out", out, "--quiet", *set_args(KILL_OVERRIDES))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return out, stdout  # the test of the printed table reads stdout
