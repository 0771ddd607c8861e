"""The torch twin of the BLUR network equals the JAX engine; the backprop genome in torch equals torch.optim.SGD;
genome files, nn.Linear and DLPack conversions round-trip."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import genome as G
from genome.torch_interop import MultiStateMLP, genome_to_torch, jax_from_tensor, load_genome, tensor_from_jax
from test_genome_network import VARIANTS

NUM_STEPS = 20
SIZES = (6, 5, 3)
EXTRA_VARIANTS = {  # flag combinations the JAX test does not cover, at k = 2 only
    "symmetric_in_out_only": dict(symmetric_in_out=True),
    "symmetric_states_only": dict(symmetric_states=True, backward_update="multiplicative"),
    "everything": dict(
        oja=True, saturation=True, saturation_epsilon=0.05, activation_norm=True, synapse_normalization="activations",
        batch_reduction="mean", backward_update="multiplicative_second_state", feedback="error_cross_entropy",
        output_activation="sigmoid", backward_activation="tanh",
    ),
}
CASES = [(v, k) for v in sorted(VARIANTS) for k in (1, 2, 4)] + [(v, 2) for v in sorted(EXTRA_VARIANTS)]
PUBLISHED_VARIANTS = {  # NetworkSpec.official(...) plus the published-code options, at k = 2
    "official": {},
    "supervised_every": dict(supervised_every=3),
    "forward_synapse_update": dict(forward_synapse_update=True, oja=True, oja_use_multiplier=True),
    "forward_activations": dict(use_forward_activations_for_synapse_update=True, saturation=True),
    "normalize_at_start": dict(synapse_normalization="start", oja=True, oja_extra_multiplier=0.5),
    "skip_first_state": dict(backward_update="multiplicative_skip_first_state"),
    "per_layer_genome": dict(per_layer_genome=True, forward_synapse_update=True, activation_norm=True),
    "neurons_persist": dict(zero_out_neurons=False, supervised_every=2),
}


def random_case(spec: G.NetworkSpec, seed: int):
    """A genome, O(0.3) synapses and NUM_STEPS batches that move the synapses without diverging."""
    genome_key, synapse_key, x_key, y_key = jax.random.split(jax.random.key(seed), 4)
    k = spec.num_states
    g = G.random_genome(spec, genome_key, transform_std=0.5)._replace(
        neuron_keep=jnp.asarray(0.9), synapse_keep=jnp.asarray(0.99), synapse_update=jnp.asarray(-0.01),
        norm_scale=jnp.linspace(0.5, 1.5, k), norm_shift=jnp.linspace(-0.2, 0.3, k),
        oja=jnp.asarray(0.3), saturation=jnp.asarray(0.7), forward_synapse_update=jnp.asarray(-0.01),
    )
    g = jax.tree.map(lambda v, ref: jnp.broadcast_to(v, ref.shape), g, G.neutral_genome(spec))  # per-layer shapes
    synapses = jax.tree.map(lambda w: 3.0 * w, G.init_synapses(spec, synapse_key, batch_size=8))
    xs = jax.random.normal(x_key, (NUM_STEPS, 8, spec.num_inputs))
    ys = jax.random.randint(y_key, (NUM_STEPS, 8), 0, spec.num_outputs)
    return g, synapses, xs, ys


def assert_steps_match(spec: G.NetworkSpec, seed: int) -> tuple[float, float]:
    """Run NUM_STEPS steps in JAX and in torch from the same synapses; compare after every step."""
    g, synapses, xs, ys = random_case(spec, seed)
    initial = synapses
    mlp = MultiStateMLP.from_jax_synapses(spec, g, synapses)
    jax_step = jax.jit(G.step, static_argnums=0)
    worst = 0.0
    for t in range(NUM_STEPS):
        synapses = jax_step(spec, g, synapses, xs[t], ys[t], t)
        mlp.step(tensor_from_jax(xs[t]), tensor_from_jax(ys[t]))
        for ours, ref in zip(mlp.forward + mlp.backward, synapses.forward + synapses.backward):
            ref = np.asarray(ref)
            assert np.max(np.abs(ref)) < 100, f"the JAX reference grows at step {t}; pick a tamer case"
            np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
            worst = max(worst, float(np.max(np.abs(ours.numpy() - ref))))
    np.testing.assert_allclose(mlp.predict(np.asarray(xs[0])).numpy(), G.predict(spec, g, synapses, xs[0]),
                               rtol=1e-5, atol=1e-5)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(synapses), jax.tree.leaves(initial)))
    return worst, moved


@pytest.mark.parametrize("variant, num_states", CASES, ids=[f"{v}-k{k}" for v, k in CASES])
def test_torch_steps_match_jax_engine(variant, num_states):
    spec = G.NetworkSpec(SIZES, num_states=num_states, **{**VARIANTS, **EXTRA_VARIANTS}[variant])
    worst, moved = assert_steps_match(spec, seed=10 + num_states)
    assert moved > 0.05  # the rule really changed the synapses (>= 5000x the tolerance)


@pytest.mark.parametrize("variant", sorted(PUBLISHED_VARIANTS))
def test_torch_steps_match_jax_engine_with_the_published_options(variant):
    spec = G.NetworkSpec.official(SIZES, 2, **PUBLISHED_VARIANTS[variant])
    worst, moved = assert_steps_match(spec, seed=3)
    assert moved > 0.05


@pytest.mark.parametrize("variant", ["additive_target", "second_state_mse", "activation_norm"])
def test_torch_steps_match_jax_engine_two_hidden_layers(variant):
    """Backward messages chain through an already-updated hidden layer."""
    spec = G.NetworkSpec((6, 5, 4, 3), num_states=3, **VARIANTS[variant])
    _, moved = assert_steps_match(spec, seed=7)
    assert moved > 0.05


# ---------------------------------------------------------------------------------------------- backprop genome


def torch_mlp_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        onehot = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        return torch.mean(0.5 * torch.sum((logits - onehot) ** 2, dim=-1))
    return F.cross_entropy(logits, y)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_backprop_genome_in_torch_equals_torch_sgd_step_by_step(loss, dtype, tolerance):
    sizes, learning_rate = (5, 7, 6, 3), 0.5
    generator = torch.Generator().manual_seed(1 + (loss == "mse"))
    layers = [torch.nn.Linear(n, m, dtype=dtype) for n, m in zip(sizes[:-1], sizes[1:])]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=dtype))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator, dtype=dtype))
    model = torch.nn.Sequential(layers[0], torch.nn.Sigmoid(), layers[1], torch.nn.Sigmoid(), layers[2])
    spec, genome = G.backprop_genome(sizes, learning_rate, loss=loss)  # every entry exact in float32
    mlp = MultiStateMLP.from_linear(spec, genome, layers)
    assert mlp.dtype == dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    xs = torch.randn((NUM_STEPS, 8, sizes[0]), generator=generator, dtype=dtype)
    ys = torch.randint(0, sizes[-1], (NUM_STEPS, 8), generator=generator)
    initial = [layer.weight.detach().clone() for layer in layers]
    torch.testing.assert_close(mlp.predict(xs[0]), model(xs[0]).detach(), rtol=0, atol=tolerance)
    for t in range(NUM_STEPS):
        optimizer.zero_grad()
        torch_mlp_loss(model(xs[t]), ys[t], loss).backward()
        optimizer.step()
        mlp.step(xs[t], ys[t])
        for ours, layer in zip(mlp.to_linear(), layers):
            torch.testing.assert_close(ours.weight, layer.weight.detach(), rtol=0, atol=tolerance)
            torch.testing.assert_close(ours.bias, layer.bias.detach(), rtol=0, atol=tolerance)
        torch.testing.assert_close(mlp.predict(xs[0]), model(xs[0]).detach(), rtol=0, atol=tolerance)
    moved = max(float(torch.max(torch.abs(layer.weight.detach() - w0))) for layer, w0 in zip(layers, initial))
    assert moved > 0.02  # 2000x the float32 tolerance


# ---------------------------------------------------------------------------------------------- genome files


def test_genome_file_written_by_jax_loads_in_torch(tmp_path):
    spec = G.NetworkSpec((4, 3, 2), num_states=3, activation_norm=True, oja=True, saturation=True)
    g = G.random_genome(spec, jax.random.key(0))._replace(norm_shift=jnp.asarray([0.1, -0.2, 0.3]))
    path = G.save(tmp_path / "best.genome", spec, g, {"fitness": 0.5})
    loaded_spec, loaded = load_genome(path)
    assert loaded_spec == spec
    for name, value in g._asdict().items():
        tensor = getattr(loaded, name)
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        np.testing.assert_array_equal(tensor.numpy(), np.asarray(value), err_msg=name)
    _, loaded64 = load_genome(path, dtype=torch.float64)
    assert loaded64.synapse_update.dtype == torch.float64
    assert float(loaded64.synapse_update) == float(np.float32(g.synapse_update))


def _foreign_safetensors(path):
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), np.float32)}, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign_safetensors", "missing"])
def test_bad_genome_file_gives_the_same_one_line_error_as_jax(tmp_path, kind):
    spec = G.NetworkSpec((4, 3, 2))
    good = G.save(tmp_path / "good.genome", spec, G.neutral_genome(spec))
    path = tmp_path / f"{kind}.genome"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:-7])
    elif kind == "garbage":
        path.write_bytes(b"this is not a genome file at all")
    elif kind == "foreign_safetensors":
        _foreign_safetensors(path)
    with pytest.raises(G.GenomeFileError) as jax_error:
        G.load(path)
    with pytest.raises(G.GenomeFileError) as torch_error:
        load_genome(path)
    assert str(torch_error.value) == str(jax_error.value)
    assert "\n" not in str(torch_error.value) and str(path) in str(torch_error.value)


def test_importing_genome_does_not_import_torch():
    code = "import sys, genome; assert 'torch' not in sys.modules, 'genome imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------- conversions


def test_nn_linear_round_trip_gives_tied_synapses_like_synapses_from_weights():
    spec = G.NetworkSpec((4, 5, 3), num_states=3)
    layers = [torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)]
    mlp = MultiStateMLP.from_linear(spec, G.neutral_genome(spec), layers)
    weights = [np.concatenate([lin.weight.detach().numpy().T, lin.bias.detach().numpy()[None]]) for lin in layers]
    expected = G.synapses_from_weights(spec, [jnp.asarray(w) for w in weights])
    for ours, ref in zip(jax.tree.leaves(mlp.to_jax_synapses()), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    for back, layer in zip(mlp.to_linear(), layers):
        assert back is not layer
        torch.testing.assert_close(back.weight, layer.weight, rtol=0, atol=0)
        torch.testing.assert_close(back.bias, layer.bias, rtol=0, atol=0)
    mlp.step(torch.randn(6, 4), torch.arange(6) % 3)
    targets = [torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)]
    assert mlp.to_linear(targets)[0] is targets[0]  # written in place
    torch.testing.assert_close(targets[1].weight, mlp.forward[1][0, :-1].T, rtol=0, atol=0)
    torch.testing.assert_close(targets[1].bias, mlp.forward[1][0, -1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="spec needs 5 -> 3"):
        MultiStateMLP.from_linear(spec, G.neutral_genome(spec), [layers[0], torch.nn.Linear(5, 4)])


def test_dlpack_exchange_is_zero_copy_on_cpu_and_step_never_writes_shared_memory():
    spec = G.NetworkSpec((4, 5, 3), num_states=2)
    g = G.random_genome(spec, jax.random.key(1))
    synapses = G.init_synapses(spec, jax.random.key(2))
    before = [np.array(leaf) for leaf in jax.tree.leaves(synapses)]
    mlp = MultiStateMLP.from_jax_synapses(spec, g, synapses)
    for tensor, array in zip(mlp.forward + mlp.backward, synapses.forward + synapses.backward):
        assert tensor.data_ptr() == array.unsafe_buffer_pointer()  # JAX -> torch shares the buffer
    exported = mlp.to_jax_synapses()
    for tensor, array in zip(mlp.forward + mlp.backward, exported.forward + exported.backward):
        assert array.unsafe_buffer_pointer() == tensor.data_ptr()  # torch -> JAX shares the buffer
    snapshot = [np.array(leaf) for leaf in jax.tree.leaves(exported)]
    x, y = jax.random.normal(jax.random.key(3), (6, 4)), jnp.arange(6) % 3
    mlp.step(np.asarray(x), np.asarray(y))
    mlp.step(np.asarray(x), np.asarray(y))
    for leaf, old in zip(jax.tree.leaves(synapses), before):
        np.testing.assert_array_equal(np.asarray(leaf), old)  # the JAX input is untouched
    for leaf, old in zip(jax.tree.leaves(exported), snapshot):
        np.testing.assert_array_equal(np.asarray(leaf), old)  # an export is a snapshot
    back = jax_from_tensor(mlp.forward[0])
    assert back.unsafe_buffer_pointer() == mlp.forward[0].data_ptr()


def test_dtype_cast_and_genome_conversion_keep_the_rule():
    spec = G.NetworkSpec((4, 5, 3), num_states=2, oja=True)
    g = G.random_genome(spec, jax.random.key(4))
    mlp = MultiStateMLP.init(spec, g, seed=0)
    assert mlp.dtype == torch.float32 and mlp.genome.forward_transform.dtype == torch.float32
    wide = MultiStateMLP.init(spec, genome_to_torch(g, dtype=torch.float64), seed=0).to(dtype=torch.float64)
    assert wide.dtype == torch.float64 and wide.genome.oja.dtype == torch.float64
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    for _ in range(5):
        mlp.step(x, y)
        wide.step(x.double(), y)
    torch.testing.assert_close(mlp.predict(x).double(), wide.predict(x.double()), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_match_cpu():
    spec = G.NetworkSpec(SIZES, num_states=2, oja=True, activation_norm=True)
    g, synapses, xs, ys = random_case(spec, seed=0)
    cpu = MultiStateMLP.from_jax_synapses(spec, g, synapses)
    gpu = MultiStateMLP.from_jax_synapses(spec, g, synapses, device="cuda")
    assert gpu.device.type == "cuda" and gpu.genome.oja.device.type == "cuda"
    for t in range(NUM_STEPS):
        cpu.step(np.asarray(xs[t]), np.asarray(ys[t]))
        gpu.step(np.asarray(xs[t]), np.asarray(ys[t]))
    for a, b in zip(cpu.forward + cpu.backward, gpu.forward + gpu.backward):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
