"""The PyTorch evaluator backend (``evaluator.backend: torch``): the engine's math on oneDNN, fp32 or bf16.

Same contract as :func:`workers.engine.evaluate` — genome vectors ``[P, D]`` × a task batch -> per-episode
results ``[P, K]`` — with the same tasks, the same initial synapses (drawn by the JAX initializer from the
same keys) and the same scoring, so a run can switch backends without changing what it measures. It exists
because JAX's CPU backend does not use the AMX / AVX-512 bf16 units of recent x86 CPUs, while oneDNN (torch's
CPU GEMM) runs bf16 products several times faster than fp32 there.

Layout: networks ``n = p·K + t`` (genome p on task t) with the engine's state-axis-first blocks, every product
one ``torch.bmm`` over ``networks × k`` batches. Networks are processed in chunks (:data:`CHUNK_BYTES` of
synapses at most) that run all T inner steps and the query pass before the next chunk starts, so a chunk's
synapses stay in cache for the memory-bound elementwise passes (update, normalization, casts) of every step.

Precision (``episode.precision``):

* ``float32``: everything in fp32 (pinned to the JAX engine by tests).
* ``bfloat16``: the operands of every product (neuron states and synapse blocks) are rounded to bf16 and
  the products run on the bf16 units; oneDNN accumulates in fp32 and rounds the result to bf16. Synapse
  state, neuron states, activations, the Hebbian accumulation ``W ← f̃·W + η̃·H`` (H upcast), normalization
  and the query scores stay fp32: a bf16 synapse state would drop every update below 2⁻⁸ of a weight.

Covered: the plain BLUR rule with every activation, feedback and backward-update variant, sum/mean batch
reduction and ``synapse_normalization: none|stored`` (the paper configs). Other options raise a one-line
error naming them (:func:`check_support`); use the JAX backend for those.
"""

from __future__ import annotations


from typing import Callable

import jax
import numpy as np
import torch

import genome as G
from genome.torch_population import _TORCH_ACTIVATIONS
from workers.engine import synapse_bytes
from workers.task_types import Task
from workers.unroll import EpisodeResult, Horizon, Scoring, init_task_synapses, num_updates

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: synapse bytes (fp32, all blocks) of one chunk of networks: a few networks at paper scale, so that a chunk's
#: blocks and their per-step temporaries stay within the L2/L3 caches of a small CPU
CHUNK_BYTES = 4 << 20


def check_support(spec: G.NetworkSpec) -> None:
    """Raise ``ValueError`` naming the options of ``spec`` that this backend does not implement."""
    unsupported = [name for name in ("symmetric_in_out", "symmetric_states", "activation_norm", "oja", "saturation",
                                     "forward_synapse_update", "use_forward_activations_for_synapse_update",
                                     "per_layer_genome") if getattr(spec, name)]
    if not spec.zero_out_neurons:
        unsupported.append("zero_out_neurons=false")
    if spec.supervised_every != 1:
        unsupported.append("supervised_every")
    unsupported += [f"{name}={getattr(spec, name)}" for name in ("forward_activation", "output_activation",
                                                                 "backward_activation")
                    if getattr(spec, name) not in _TORCH_ACTIVATIONS]
    if spec.synapse_normalization not in ("none", "stored"):
        unsupported.append(f"synapse_normalization={spec.synapse_normalization}")
    if unsupported:
        raise ValueError(f"the torch backend does not implement {', '.join(unsupported)}; use evaluator.backend: jax")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags (empty where the file is unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_units(flags: set[str]) -> list[str]:
    """The bf16 GEMM units among CPU ``flags`` (``amx_bf16``, ``avx512_bf16``)."""
    return sorted(flags & {"amx_bf16", "avx512_bf16"})


def check_precision(precision: str, flags: set[str] | None = None) -> None:
    """Raise ``ValueError`` when ``precision`` cannot run fast here: bfloat16 needs a CPU with bf16 GEMM units
    (oneDNN would otherwise emulate it, slower than fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "bfloat16":
        flags = cpu_flags() if flags is None else flags
        if not bf16_units(flags):
            raise ValueError("episode.precision: bfloat16 needs a CPU with amx_bf16 or avx512_bf16 (this one has "
                             "neither); use float32")


def describe(precision: str) -> dict:
    """Provenance of the backend: torch version, threads, precision and the CPU's bf16 units."""
    return {"backend": "torch", "precision": precision, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "bf16_units": bf16_units(cpu_flags()),
            "onednn": bool(torch.backends.mkldnn.is_available())}


def _tanh(s: torch.Tensor) -> torch.Tensor:
    """``tanh(s) = 2·σ(2s) − 1`` in place: torch's CPU ``tanh`` (Sleef, 1 ulp) ran ~10× slower than its
    ``sigmoid`` here and was the largest cost of a step; absolute error ≤ 2⁻²³ (XLA's own tanh is an
    approximation of the same order)."""
    return s.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


_ACTIVATIONS = dict(_TORCH_ACTIVATIONS, tanh=_tanh, relu_tanh=lambda s: torch.relu_(_tanh(s)))


class _Genes:
    """The genome fields of a chunk of networks, as torch tensors ``[n, k, k]`` / ``[n, 1, 1, 1]``."""

    def __init__(self, genomes: G.Genome, rows: np.ndarray):
        """``genomes``: every genome's fields as NumPy arrays (converted once per call); ``rows``: the chunk's."""
        def field(name):
            return torch.from_numpy(np.ascontiguousarray(getattr(genomes, name)[rows]))

        self.forward_transform = field("forward_transform")
        self.backward_transform = field("backward_transform")
        self.pre_transform = field("pre_transform")
        self.post_transform_t = field("post_transform").transpose(1, 2).contiguous()  # Σ_d µ̃[o,d] a[d]
        scalar = (-1, 1, 1, 1)
        self.neuron_keep = field("neuron_keep").view(scalar)
        self.neuron_update = field("neuron_update").view(scalar)
        self.synapse_keep = field("synapse_keep").view(scalar)
        self.synapse_update = field("synapse_update").view(scalar)


def _mix(a: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``Σ_d a[:, d] · matrix[:, d, c]`` for ``a [n, k, ...]``, ``matrix [n, k, k]`` -> ``[n, k, ...]``."""
    n, k = matrix.shape[:2]
    column = (n, k) + (1,) * (a.dim() - 2)
    out = matrix[:, 0].reshape(column) * a[:, :1]
    for d in range(1, k):
        out.addcmul_(matrix[:, d].reshape(column), a[:, d : d + 1])
    return out


def _with_bias(mixed: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Append the bias unit's mix (``Σ_d matrix[:, d, c]``: the unit is 1 in every state) as a last neuron."""
    bias = matrix.sum(dim=1)[:, :, None, None].expand(mixed.shape[:-1] + (1,))
    return torch.cat([mixed, bias], dim=-1)


def _bmm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` over leading ``[n, k]`` axes with operands in ``dtype``; the result stays in ``dtype`` (its
    consumer is one fp32 elementwise op that promotes it, so no separate cast pass)."""
    n, k = a.shape[:2]
    out = torch.bmm(a.reshape(n * k, *a.shape[2:]).to(dtype), b.reshape(n * k, *b.shape[2:]).to(dtype))
    return out.view(n, k, *out.shape[1:])


def _normalize(block: torch.Tensor, epsilon: float) -> torch.Tensor:
    """In place: ``W / sqrt(Σ_i W[i, j]² + ε)`` per destination neuron (source axis 2 of ``[n, k, i, j]``)."""
    squares = torch.mul(block, block).sum(dim=2, keepdim=True)  # 10x faster here than linalg.vector_norm
    return block.mul_(squares.add_(epsilon).rsqrt_())


class _Chunk:
    """The synapses of a chunk of networks and their inner step (DESIGN §2)."""

    def __init__(self, spec: G.NetworkSpec, genes: _Genes, forward: list[torch.Tensor], backward: list[torch.Tensor],
                 dtype: torch.dtype):
        self.spec, self.g, self.forward, self.backward, self.dtype = spec, genes, forward, backward, dtype
        self.act = _ACTIVATIONS[spec.forward_activation]
        self.act_out = _ACTIVATIONS[spec.output_activation]
        self.act_b = _ACTIVATIONS[spec.backward_activation]

    def forward_pass(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Neuron states ``[n, k, B, n_l]`` of every layer from all-zero neurons; ``x [n, B, n_in]``.

        η is folded into the k×k forward mix, and the bias unit enters as its row of the block times the
        mix of a unit that is 1 in every state (no neuron tensor gets a bias column appended)."""
        spec, g = self.spec, self.g
        nu = g.forward_transform * g.neuron_update.view(-1, 1, 1)  # η ν [n, d, c]
        states = [torch.cat([x[:, None], x.new_zeros((x.shape[0], spec.num_states - 1) + x.shape[1:])], dim=1)]
        for layer, w in enumerate(self.forward):
            # layer 0's input is state 0 only, so its mix is η ν[0, c] · x
            mixed = nu[:, 0, :, None, None] * x[:, None] if layer == 0 else _mix(states[-1], nu)
            bias = nu.sum(dim=1)[:, :, None, None] * w[:, :, -1:]  # [n, c, 1, j]
            s = torch.add(_bmm(mixed, w[:, :, :-1], self.dtype), bias)
            states.append((self.act_out if layer == spec.num_layers - 1 else self.act)(s))
        return states

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One inner step on ``x [n, B, n_in]``, ``y [n, B]``, updating the synapses in place. The backward
        block of layer 0 is not updated: no pass reads it (the backward pass stops at layer 1). Per-network
        scalars (η, η̃, the batch scale) are folded into the k×k mixes."""
        spec, g = self.spec, self.g
        states = self.forward_pass(x)
        self._feedback(states[-1], y)
        f = g.neuron_keep
        for layer in range(spec.num_layers - 1, 0, -1):  # backward pass
            a = states[layer]
            if spec.backward_update == "additive":  # act_b(f·a + η·Δ), η folded into µ
                mu = g.backward_transform * g.neuron_update.view(-1, 1, 1)
                delta = _bmm(_mix(states[layer + 1], mu), self.backward[layer], self.dtype)
                states[layer] = self.act_b(torch.addcmul(delta, a, f))
                continue
            delta = _bmm(_mix(states[layer + 1], g.backward_transform), self.backward[layer], self.dtype).float()
            if spec.backward_update == "multiplicative":
                a = self.act_b(delta.mul_(a).mul_(f))
            elif spec.backward_update == "multiplicative_second_state":
                delta[:, 1:].mul_(a[:, 1:])
                delta[:, :1].copy_(a[:, :1])
                a = self.act_b(delta.mul_(f))
            else:  # multiplicative_skip_first_state
                a = torch.cat([a[:, :1], self.act_b(delta[:, 1:].mul_(a[:, 1:]).mul_(f))], dim=1)
            states[layer] = a
        scale = 1.0 / x.shape[1] if spec.batch_reduction == "mean" else 1.0
        post_transform = g.post_transform_t * (g.synapse_update.view(-1, 1, 1) * scale)  # η̃ · µ̃ᵀ
        bias_pre = g.pre_transform.sum(dim=1)[:, :, None, None]  # the bias unit's ν̃ mix, [n, o, 1, 1]
        for layer in range(spec.num_layers):  # Hebbian update
            a_in, a_out = states[layer], states[layer + 1]
            pre = (g.pre_transform[:, 0, :, None, None] * x[:, None] if layer == 0
                   else _mix(a_in, g.pre_transform))  # Σ_e a^l[e] ν̃[e, o]: [n, o, B, n_in]
            post = _mix(a_out, post_transform)  # η̃ Σ_d µ̃[o,d] a^{l+1}[d]: [n, o, B, n_out]
            w = self.forward[layer].mul_(g.synapse_keep)
            w[:, :, :-1].add_(_bmm(pre.transpose(2, 3), post, self.dtype))
            w[:, :, -1:].add_(bias_pre * post.sum(dim=2, keepdim=True))
            self._normalize(w)
            if layer:
                pre_b = _mix(a_out, g.pre_transform)
                post_b = _mix(a_in, post_transform)
                v = self.backward[layer].mul_(g.synapse_keep)
                v.add_(_bmm(pre_b.transpose(2, 3), post_b, self.dtype))
                self._normalize(v)

    def _feedback(self, output: torch.Tensor, y: torch.Tensor) -> None:
        spec = self.spec
        onehot = torch.nn.functional.one_hot(y.long(), spec.num_outputs).to(output.dtype)  # [n, B, n_out]
        if spec.feedback == "target":
            signal = 2.0 * onehot - 1.0
        elif spec.feedback == "error_mse":
            signal = output[:, 0] - onehot
        else:  # error_cross_entropy
            signal = torch.softmax(output[:, 0], dim=-1) - onehot
        k = spec.num_states
        output[:, min(1, k - 1)] = signal
        if k > 2:
            output[:, 2:] = 0.0

    def _normalize(self, block: torch.Tensor) -> None:
        if self.spec.synapse_normalization == "stored":
            _normalize(block, self.spec.synapse_normalization_epsilon)

    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        """State 0 of the last layer ``[n, Q, n_out]`` for ``x [n, Q, n_in]`` (Q ≫ layer widths).

        The same values as ``forward_pass(x)[-1][:, 0]`` with every per-state scale folded into the (small)
        synapse blocks instead of the (large) neuron tensors: layer l's pre-activation in state c is
        ``Σ_d a[d] @ (η ν[d, c] W[c])`` plus the bias row times ``η Σ_d ν[d, c]``, so a layer costs one
        product per (source, destination) state pair and the activation; of the last layer only state 0 is
        computed. A tanh hidden layer is evaluated as ``2σ(2z) − 1`` with the factor 2 folded into its block
        and the affine ``2·σ − 1`` folded into the next block, leaving one ``sigmoid_`` pass."""
        spec, g = self.spec, self.g
        n, k = g.forward_transform.shape[:2]
        states = [x[:, None]]  # layer 0 carries the input in state 0 only
        shift = None  # [n, 1, m]: per-source constant added to the previous layer (the folded 2σ − 1)
        for layer, w in enumerate(self.forward):
            last = layer == spec.num_layers - 1
            targets = 1 if last else k
            nu = g.forward_transform * g.neuron_update.view(-1, 1, 1)  # η ν [n, d, c]
            sources = states[-1]
            tanh = not last and spec.forward_activation in ("tanh", "relu_tanh")
            factor = 2.0 if tanh else 1.0
            gain = factor * nu[:, : sources.shape[1], :targets]  # [n, d, c]
            scale = 2.0 if shift is not None else 1.0  # the previous layer is σ with a = 2σ − 1
            z = None
            for d in range(sources.shape[1]):
                block = w[:, :targets, :-1] * (scale * gain[:, d, :, None, None])  # [n, c, i, j]
                term = _bmm(sources[:, d : d + 1].expand(n, targets, *sources.shape[2:]), block, self.dtype).float()
                z = term if z is None else z.add_(term)
            bias = factor * nu[:, :, :targets].sum(dim=1)[:, :, None] * w[:, :targets, -1]  # [n, c, j]
            if shift is not None:  # Σ_d η ν[d, c] (−1) Σ_i W[c, i, j]
                bias = bias - factor * nu[:, :, :targets].sum(dim=1)[:, :, None] * w[:, :targets, :-1].sum(dim=2)
            z.add_(bias[:, :, None])
            if tanh:
                states.append(z.sigmoid_())
                shift = True
                if spec.forward_activation == "relu_tanh":  # relu(2σ − 1) has no affine fold
                    states[-1] = torch.relu_(z.mul_(2.0).sub_(1.0))
                    shift = None
            else:
                states.append((self.act_out if last else self.act)(z))
                shift = None
        return states[-1][:, 0]



def _query_scores(logits: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(accuracy, raw cross-entropy, diverged) ``[n]`` of ``logits [n, Q, n_out]`` against ``y [n, Q]``
    (as :func:`workers.unroll.query_outputs`)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    cross_entropy = -log_probs.gather(-1, y.long()[..., None])[..., 0].mean(dim=1)
    accuracy = (logits.argmax(dim=-1) == y.long()).float().mean(dim=1)
    finite = torch.isfinite(logits).flatten(1).all(dim=1) & torch.isfinite(cross_entropy)
    return accuracy.numpy(), cross_entropy.numpy(), (~finite).numpy()


_COMPILED: dict[str, Callable] = {}


def _kernels(compiled: bool) -> tuple[Callable, Callable]:
    """(step, query_logits) of :class:`_Chunk`, eager or through ``torch.compile`` (Inductor fuses each
    step's elementwise passes and casts into a few C++ loops; compiled once per process and chunk shape —
    every chunk has the same shape — and reused by later calls)."""
    if not compiled:
        return _Chunk.step, _Chunk.query_logits
    if not _COMPILED:
        _COMPILED["step"] = torch.compile(_Chunk.step, dynamic=False)
        _COMPILED["query_logits"] = torch.compile(_Chunk.query_logits, dynamic=False)
    return _COMPILED["step"], _COMPILED["query_logits"]


def chunk_size(spec: G.NetworkSpec, num_networks: int) -> int:
    """Networks per chunk: about :data:`CHUNK_BYTES` of fp32 synapses (at least one network), evened out over
    the chunks so that padding the last one costs less than one chunk."""
    chunks = -(-num_networks // max(1, CHUNK_BYTES // synapse_bytes(spec.layer_sizes, spec.num_states)))
    return -(-num_networks // chunks)


@torch.no_grad()
def evaluate(spec: G.NetworkSpec, vectors, tasks: Task, synapse_keys: jax.Array, scoring: Scoring,
             horizon: Horizon, precision: str = "float32", compiled: bool = False) -> EpisodeResult:
    """Score genome vectors ``[P, D]`` on a task batch (leading axis K) -> :class:`EpisodeResult` ``[P, K]``
    of NumPy arrays: the episodes of :func:`workers.engine.evaluate` (same initial synapses from
    ``synapse_keys``, same support batches, same scoring), computed with torch in ``precision``;
    ``compiled``: run the step through ``torch.compile`` (see :func:`_kernels`)."""
    check_support(spec)
    if horizon.curve_steps:
        raise ValueError("the torch backend records no learning curves; use the JAX engine for curve_steps")
    dtype = PRECISIONS[precision]
    step, query_logits = _kernels(compiled)
    vectors = np.asarray(vectors, np.float32)
    genomes = jax.tree.map(lambda a: np.asarray(a, np.float32),
                           jax.vmap(G.unravel, (None, 0))(spec, jax.numpy.asarray(vectors)))
    num_genomes, num_tasks = vectors.shape[0], int(tasks.query_y.shape[0])
    init = init_task_synapses(spec, synapse_keys)

    def tensor(array, dtype=None):
        return torch.from_numpy(np.array(array, dtype))  # a writable copy

    forward0 = [tensor(w) for w in init.forward]  # [K, k, n_in + 1, n_out]
    backward0 = [tensor(v) for v in init.backward]
    support_x, support_y = tensor(tasks.support_x, np.float32), tensor(tasks.support_y)  # [K, T, B, ...]
    query_x, query_y = tensor(tasks.query_x, np.float32), tensor(tasks.query_y)  # [K, Q, ...]
    steps = num_updates(horizon)

    num_networks = num_genomes * num_tasks
    size = chunk_size(spec, num_networks)
    accuracy, cross_entropy, diverged = (np.empty(num_networks, np.float32), np.empty(num_networks, np.float32),
                                         np.empty(num_networks, bool))
    for first in range(0, num_networks, size):
        real = min(size, num_networks - first)
        # the last chunk is padded with copies of its last network: every chunk has one shape (one compilation)
        networks = np.minimum(np.arange(first, first + size), num_networks - 1)
        genome_rows, task_rows = networks // num_tasks, torch.from_numpy(networks % num_tasks)
        chunk = _Chunk(spec, _Genes(genomes, genome_rows), [w[task_rows] for w in forward0],
                       [v[task_rows] for v in backward0], dtype)
        chunk_x, chunk_y = support_x[task_rows], support_y[task_rows]  # [n, T, B, n_in]: one gather per chunk
        for t in range(steps):
            step(chunk, chunk_x[:, t], chunk_y[:, t])
        scores = _query_scores(query_logits(chunk, query_x[task_rows]), query_y[task_rows])
        for out, value in zip((accuracy, cross_entropy, diverged), scores):
            out[first : first + real] = value[:real]
    shape = (num_genomes, num_tasks)
    accuracy, cross_entropy, diverged = accuracy.reshape(shape), cross_entropy.reshape(shape), diverged.reshape(shape)
    if scoring.fitness == "cross_entropy":
        fitness = np.where(diverged, scoring.max_loss, np.minimum(cross_entropy, scoring.max_loss))
    else:
        fitness = np.where(diverged, 1.0, 1.0 - accuracy)
    return EpisodeResult(fitness.astype(np.float32), np.where(diverged, 0.0, accuracy).astype(np.float32),
                         cross_entropy, diverged, np.zeros(shape + (0,), np.float32))
