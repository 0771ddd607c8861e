"""The core install: evolve / resume / inspect / evaluate / compare run without Ray, torch, TensorBoard and
MLflow (extras `ray`, `torch`, `tracking`), and asking for them without the extra is a one-line error naming
it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import MAIN_FOR_EACH_ARGV, ROOT, SMOKE

# Run the CLI in a fresh interpreter where importing ray or torch fails as if they were not installed.
# The prefix defines print_loaded(), which writes "LOADED [...]" (the extras imported after all) to stderr.
NOT_INSTALLED = """
import sys
EXTRAS = ("ray", "torch", "mlflow", "tensorboard")
class _NotInstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NotInstalled)
def print_loaded():
    print("LOADED", sorted(m for m in EXTRAS if m in sys.modules), file=sys.stderr)
"""
BLOCKED = NOT_INSTALLED + """
from evolution.cli import main
code = main(sys.argv[1:])
print_loaded()
sys.exit(code)
"""


def blur_without_extras(*args, timeout=600):
    return subprocess.run([sys.executable, "-c", BLOCKED, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_importing_the_core_loads_neither_ray_nor_torch():
    code = ("import sys, genome, workers, evolution, evolution.cli, evolution.run, evolution.compare, "
            "evolution.inspect, workers.engine, workers.evaluator, workers.report, workers.baselines; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_strategy_backend_is_imported_only_by_the_run_that_uses_it():
    """pycma (with scipy.stats) and evosax (with flax, optax) cost 1.5 s and 0.5 s of a CLI start: the
    package imports neither, and building a strategy imports only its own backend."""
    code = ("import sys, evolution.cli, evolution.run, evolution.strategies as S; "
            "loaded = lambda: [m for m in ('cma', 'evosax') if m in sys.modules]; "
            "print(loaded(), len(S.STRATEGIES)); S.make_strategy('pycma', 4, 6); print(loaded()); "
            "S.make_strategy('snes', 4, 6); print(loaded(), S.EvosaxStrategy.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[] 9", "['cma']", "['cma', 'evosax'] evolution.strategies.evosax"]

def test_the_main_job_runs_without_the_extras(tmp_path):
    run = blur_without_extras("evolve", SMOKE, "--out", tmp_path / "run", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "LOADED []" in run.stderr and (tmp_path / "run" / "report.json").is_file()
    inspect = blur_without_extras("inspect", tmp_path / "run", "--json")
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["counters"]["stop_reason"] == "generations"


EXTRA_CASES = [
    (["evolve", SMOKE, "--workers", "2"], "ray"),
    (["evolve", SMOKE, "--set", "evaluator.kind=ray"], "ray"),
    (["bench", "--quick"], "torch"),
    (["evolve", SMOKE, "--tensorboard"], "tracking"),
    (["evolve", SMOKE, "--set", "tracking.mlflow=true"], "tracking"),
]
# the cases above one after the other in one interpreter where the extras cannot be imported: [exit code, stderr]
BLOCKED_CASES = NOT_INSTALLED + MAIN_FOR_EACH_ARGV + """
print(json.dumps(results))
print_loaded()
"""


@pytest.fixture(scope="module")
def extra_cases(tmp_path_factory):
    """Each case of EXTRA_CASES (evolve with ``--out`` a directory of its own), run in one blocked interpreter."""
    outs = [tmp_path_factory.mktemp("extra") / "out" for _ in EXTRA_CASES]
    argvs = [[*map(str, args), *(["--out", str(out)] if args[0] == "evolve" else [])]
             for (args, _), out in zip(EXTRA_CASES, outs)]
    run = subprocess.run([sys.executable, "-c", BLOCKED_CASES, json.dumps(argvs)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0 and "LOADED []" in run.stderr, run.stderr
    return list(zip(json.loads(run.stdout), outs))


@pytest.mark.parametrize("case", range(len(EXTRA_CASES)),
                         ids=[f"{extra}-{i}" for i, (_, extra) in enumerate(EXTRA_CASES)])
def test_asking_for_an_extra_that_is_not_installed_names_it(case, extra_cases):
    (code, stderr), out = extra_cases[case]
    extra = EXTRA_CASES[case][1]
    assert code == 2, stderr
    error = stderr.splitlines()
    assert len(error) == 1 and f"pip install 'blur-evolve[{extra}]'" in error[0]
    assert not out.exists()
