"""Flat genome vectors (ravel/unravel) and genome files (save/load and every bad-file case)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

import genome as G

from pathlib import Path

ALL_EXTRAS = G.NetworkSpec((4, 3, 2), num_states=3, activation_norm=True, oja=True, saturation=True,
                           forward_synapse_update=True)
RELEASE_1_FILE = Path(__file__).parent / "data" / "release1.genome"  # written before file format 2


@pytest.mark.parametrize("spec", [G.NetworkSpec((4, 3, 2), num_states=k) for k in (1, 2, 4)] + [ALL_EXTRAS])
def test_ravel_unravel_round_trip(spec):
    g = G.random_genome(spec, jax.random.key(0))
    g = g._replace(synapse_update=jnp.asarray(-3e-3), oja=jnp.asarray(0.2), saturation=jnp.asarray(0.7),
                   norm_scale=jnp.full((spec.num_states,), 1.3), norm_shift=jnp.full((spec.num_states,), -0.1),
                   forward_synapse_keep=jnp.asarray(0.9), forward_synapse_update=jnp.asarray(2e-3))
    vector = G.ravel(spec, g)
    assert vector.shape == (G.num_dims(spec),)
    back = G.unravel(spec, vector)
    for name, value in g._asdict().items():
        used = name not in ("norm_scale", "norm_shift", "oja", "saturation", *G.params.FORWARD_SYNAPSE_FIELDS) \
            or spec == ALL_EXTRAS
        if used:
            np.testing.assert_allclose(getattr(back, name), value, rtol=1e-6, err_msg=name)
    v = jax.random.normal(jax.random.key(1), (G.num_dims(spec),))
    np.testing.assert_allclose(G.ravel(spec, G.unravel(spec, v)), v, rtol=1e-5, atol=1e-6)


def test_vector_dimension_follows_the_spec():
    assert G.num_dims(G.NetworkSpec((4, 2), num_states=2)) == 4 * 4 + 4
    assert G.num_dims(ALL_EXTRAS) == 4 * 9 + 4 + 2 * 3 + 2 + (2 * 9 + 2)
    assert G.num_dims(G.NetworkSpec((4, 2), oja=True, oja_use_multiplier=False)) == 4 * 4 + 4  # no multiplier
    with pytest.raises(ValueError, match="shape"):
        G.unravel(ALL_EXTRAS, jnp.zeros(5))


def test_synapse_rate_uses_a_signed_log_scale():
    spec = G.NetworkSpec((4, 2))
    base = G.ravel(spec, G.neutral_genome(spec))
    rate_index = 4 * 4 + 3
    rates = [float(G.unravel(spec, base.at[rate_index].set(u)).synapse_update) for u in (-8.0, -2.0, 0.0, 2.0, 8.0)]
    assert rates[2] == 0.0 and rates[0] == -rates[4] and rates[1] < 0 < rates[3]
    assert 1.0 < abs(rates[4]) < 2.0 and 3e-3 < abs(rates[3]) < 4e-3  # e^8/2·1e-3 and sinh(2)·1e-3


def test_random_genome_has_the_paper_defaults():
    spec = G.NetworkSpec((4, 2), num_states=3)
    g = G.random_genome(spec, jax.random.key(3))
    assert float(g.synapse_update) == pytest.approx(-1e-3)
    assert float(g.neuron_keep) == float(g.neuron_update) == float(g.synapse_keep) == 1.0
    many = jax.vmap(lambda k: G.random_genome(spec, k).forward_transform)(jax.random.split(jax.random.key(4), 500))
    assert abs(float(jnp.std(many)) - 1.0) < 0.05
    assert not np.allclose(g.forward_transform, G.random_genome(spec, jax.random.key(5)).forward_transform)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    spec = ALL_EXTRAS
    g = G.random_genome(spec, jax.random.key(7))
    metadata = {"fitness": 0.25, "provenance": {"commit": "abc"}, "history": np.arange(3)}
    path = G.save(tmp_path / "run" / "best.genome", spec, g, metadata)
    spec2, g2, meta2 = G.load(path)
    assert spec2 == spec
    for a, b in zip(g, g2):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert meta2 == {"fitness": 0.25, "provenance": {"commit": "abc"}, "history": [0, 1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["best.genome"]  # no temporary file left behind


def header_file(tmp_path, header, arrays=None):
    arrays = arrays if arrays is not None else {k: np.asarray(v) for k, v in G.neutral_genome(G.NetworkSpec((2, 2)))._asdict().items()}
    path = tmp_path / "g.genome"
    path.write_bytes(save_safetensors(arrays, metadata=header))
    return path


def good_header():
    return {"format": G.FORMAT_NAME, "parameterization_version": str(G.PARAMETERIZATION_VERSION),
            "spec": json.dumps(G.NetworkSpec((2, 2)).to_dict()), "metadata": "{}"}


def test_load_rejects_a_missing_file(tmp_path):
    with pytest.raises(G.GenomeFileError, match="not found"):
        G.load(tmp_path / "nope.genome")


def test_load_rejects_a_truncated_file(tmp_path):
    spec = G.NetworkSpec((3, 2))
    path = G.save(tmp_path / "g.genome", spec, G.random_genome(spec, jax.random.key(0)))
    data = path.read_bytes()
    for cut in (5, len(data) // 2, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(G.GenomeFileError, match="truncated or foreign") as info:
            G.load(path)
        assert "\n" not in str(info.value)


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "g.genome"
    path.write_bytes(b"\x80\x04\x95 this is a pickle, never unpickled")
    with pytest.raises(G.GenomeFileError, match="truncated or foreign"):
        G.load(path)
    header = good_header() | {"format": "something-else"}
    with pytest.raises(G.GenomeFileError, match="not a blur-evolve genome"):
        G.load(header_file(tmp_path, header))
    with pytest.raises(G.GenomeFileError, match="missing"):
        G.load(header_file(tmp_path, good_header(), {"weights": np.zeros(3, np.float32)}))


def test_load_rejects_a_wrong_version_and_bad_spec(tmp_path):
    with pytest.raises(G.GenomeFileError, match="version 99 is not supported"):
        G.load(header_file(tmp_path, good_header() | {"parameterization_version": "99"}))
    with pytest.raises(G.GenomeFileError, match="invalid spec"):
        G.load(header_file(tmp_path, good_header() | {"spec": json.dumps({"layer_sizes": [2, 2], "wings": 3})}))
    arrays = {k: np.asarray(v) for k, v in G.neutral_genome(G.NetworkSpec((2, 2), num_states=3))._asdict().items()}
    with pytest.raises(G.GenomeFileError, match="shape"):
        G.load(header_file(tmp_path, good_header(), arrays))


def test_per_layer_genomes_stack_one_genome_per_layer_pair(tmp_path):
    spec = G.NetworkSpec((4, 3, 3, 2), num_states=2, per_layer_genome=True, oja=True)
    single = spec.replace(per_layer_genome=False)
    assert G.num_dims(spec) == 3 * G.num_dims(single)
    g = G.random_genome(spec, jax.random.key(0))
    assert g.forward_transform.shape == (3, 2, 2) and g.synapse_update.shape == (3,)
    vector = G.ravel(spec, g)
    for layer in range(3):  # layer-major: slice l of the vector is layer l's own genome vector
        d = G.num_dims(single)
        np.testing.assert_allclose(vector[layer * d:(layer + 1) * d], G.ravel(single, G.layer_genome(spec, g, layer)))
    back = G.unravel(spec, vector)
    for name, value in g._asdict().items():
        np.testing.assert_allclose(getattr(back, name), value, rtol=1e-6, err_msg=name)
    assert not np.allclose(g.forward_transform[0], g.forward_transform[1])
    path = G.save(tmp_path / "layers.genome", spec, g)
    assert G.load(path)[0] == spec
    # a file of another depth does not fit a deeper network's genome
    arrays = {k: np.asarray(v) for k, v in G.neutral_genome(spec.replace(layer_sizes=(4, 3, 2)))._asdict().items()}
    with pytest.raises(G.GenomeFileError, match="shape"):
        G.load(header_file(tmp_path, good_header() | {"file_format_version": "2",
                                                      "spec": json.dumps(spec.to_dict())}, arrays))


def test_a_genome_file_of_the_previous_format_still_loads():
    spec, g, metadata = G.load(RELEASE_1_FILE)
    assert spec == G.NetworkSpec((4, 5, 3), num_states=2, oja=True, saturation=True, activation_norm=True)
    # what the file was written from, at XLA's default optimization level; recomputed under the tests' -O0
    # (tests/conftest.py) a scaled draw may round one float32 ulp apart
    expected = G.random_genome(spec, jax.random.key(5))
    for name, value in expected._asdict().items():  # forward_* at their neutral values
        np.testing.assert_allclose(getattr(g, name), value, rtol=2.5e-7, atol=0, err_msg=name)
    assert "format 1" in metadata["note"]


def test_genome_files_carry_the_file_format_version(tmp_path):
    path = G.save(tmp_path / "g.genome", ALL_EXTRAS, G.random_genome(ALL_EXTRAS, jax.random.key(0)))
    spec, g, _ = G.load(path)
    assert spec == ALL_EXTRAS and G.io.FILE_FORMAT_VERSION == 2
    with pytest.raises(G.GenomeFileError, match="file format version 3 is not supported"):
        G.load(header_file(tmp_path, good_header() | {"file_format_version": "3"}))
    arrays = {k: np.asarray(v) for k, v in G.neutral_genome(ALL_EXTRAS)._asdict().items()
              if k != "forward_pre_transform"}
    header = good_header() | {"file_format_version": "2", "spec": json.dumps(ALL_EXTRAS.to_dict())}
    with pytest.raises(G.GenomeFileError, match="forward_pre_transform.*missing"):
        G.load(header_file(tmp_path, header, arrays))  # a format-2 file must have every field


def test_spec_rejects_impossible_values():
    with pytest.raises(G.SpecError, match="num_states"):
        G.NetworkSpec((2, 2), num_states=0)
    with pytest.raises(G.SpecError, match="backward_update"):
        G.NetworkSpec((2, 2), backward_update="sideways")
    with pytest.raises(G.SpecError, match="layer_sizes"):
        G.NetworkSpec((2,))
    assert G.NetworkSpec.from_dict(ALL_EXTRAS.to_dict()) == ALL_EXTRAS
    assert hash(ALL_EXTRAS) == hash(G.NetworkSpec.from_dict(ALL_EXTRAS.to_dict()))
