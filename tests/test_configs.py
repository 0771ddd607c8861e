"""Every shipped config loads, validates and builds its network; configs round-trip through YAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evolution.config import ConfigError, config_from_dict, dump_config, load_config
from evolution.run import network_spec, num_steps_at

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads_and_round_trips(path):
    if "compare" in path.stem:
        from evolution.compare import load_compare_config

        config, compare = load_compare_config(path)
        assert compare.methods
    else:
        config = load_config(path)
    assert config_from_dict(yaml.safe_load(dump_config(config))) == config
    assert network_spec(config).layer_sizes[1:-1] == config.network.hidden_sizes


def test_paper_cmaes_config_is_the_paper_setup():
    config = load_config(Path(CONFIGS[0]).parent / "paper_cmaes.yaml")
    assert config.strategy.name == "pycma" and config.strategy.population_size == 80
    assert network_spec(config).layer_sizes == (196, 512, 10) and config.network.num_states == 2
    assert config.episode.num_steps == 15 and config.task.batch_size == 128
    assert config.task.num_query == 20 * 128 and config.episode.fitness == "error_rate"


def test_overrides_are_type_checked_and_nested():
    config = config_from_dict({}, ["run.curriculum.every=2", "network.hidden_sizes=[4, 5]", "strategy.sigma=1"])
    assert config.run.curriculum.every == 2 and config.network.hidden_sizes == (4, 5)
    assert isinstance(config.strategy.sigma, float)
    with pytest.raises(ConfigError, match="network.hidden_sizes\\[1\\]: expected an integer"):
        config_from_dict({}, ["network.hidden_sizes=[4, x]"])
    with pytest.raises(ConfigError, match="run.curriculum.evry: unknown key"):
        config_from_dict({}, ["run.curriculum.evry=2"])
    with pytest.raises(ConfigError, match="network.oja: expected true/false"):
        config_from_dict({"network": {"oja": "yes please"}})


def test_curriculum_adds_steps_every_n_generations_up_to_the_cap():
    config = config_from_dict({"episode": {"num_steps": 10},
                               "run": {"curriculum": {"every": 3, "increment": 5, "max_steps": 22}}})
    assert [num_steps_at(config, g) for g in (0, 2, 3, 6, 9, 30)] == [10, 10, 15, 20, 22, 22]


def test_official_preset_gives_the_published_defaults_and_yields_to_explicit_keys():
    config = config_from_dict({"network": {"preset": "official", "hidden_sizes": [8]}})
    spec = config.network_spec(64, 3)
    assert (spec.forward_activation, spec.backward_activation, spec.output_activation) == \
        ("relu_tanh", "relu_tanh", "tanh")
    assert spec.synapse_normalization_epsilon == 1e-9 and config.episode.skip_last_update is True
    config = config_from_dict({"network": {"preset": "official", "backward_activation": "tanh"},
                               "episode": {"num_steps": 5, "skip_last_update": False}})
    assert config.network.backward_activation == "tanh" and config.episode.skip_last_update is False
    assert config.network.forward_activation == "relu_tanh" and config.episode.num_steps == 5


@pytest.mark.parametrize("network, message", [
    ({"preset": "paper"}, "network.preset: must be one of official"),
    ({"supervised_every": 0}, "supervised_every"),
    ({"forward_synapse_update": True, "use_forward_activations_for_synapse_update": True}, "cannot be combined"),
    ({"oja_variant": "weights"}, "oja_variant"),
])
def test_published_option_errors_name_the_key(network, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"network": network})


SPLIT_BEFORE_EVOSAX = """
import jax
from evolution.config import load_config
from jax._src import xla_bridge
load_config("configs/smoke.yaml", ["strategy.name=open_es", "evaluator.devices=3"])
assert xla_bridge.backends_are_initialized()  # checking the evosax strategy's options started JAX
assert len(jax.local_devices()) == 3, jax.local_devices()
"""


def test_loading_a_config_asks_for_its_host_devices_before_an_evosax_strategy_starts_jax():
    """``evaluator.devices``: JAX fixes its host devices when it starts, and validating an evosax strategy
    starts it, so ``load_config`` asks for the devices first (else ``auto`` would quietly run on one)."""
    proc = subprocess.run([sys.executable, "-c", SPLIT_BEFORE_EVOSAX], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
