"""The strategy names each adapter builds, with a one-line description, kept apart from the adapters so that
listing or checking a name imports neither pycma (which pulls in scipy.stats: 1.5 s) nor evosax (flax, optax:
0.5 s); `make_strategy` imports only the adapter it builds."""

from __future__ import annotations

__all__ = ["EVOSAX_STRATEGIES", "PYCMA_STRATEGIES"]

# pycma's adapter (`pycma.PycmaStrategy`) -> one-line description
PYCMA_STRATEGIES: dict[str, str] = {
    "pycma": (
        "CMA-ES from pycma (cma.CMAEvolutionStrategy); pycma options pass through; "
        "IPOP (restarts=n) and BIPOP (restarts=n, bipop=True) restarts; noise_handler option"
    ),
}

# evosax's adapter (`evosax.EvosaxStrategy`) -> one-line description
EVOSAX_STRATEGIES: dict[str, str] = {
    "cma_es": "evosax CMA_ES: full-covariance CMA-ES in JAX (usable inside lax.scan)",
    "sep_cma_es": "evosax Sep_CMA_ES: diagonal-covariance CMA-ES, linear cost in dimension",
    "open_es": "evosax Open_ES: OpenAI-ES, antithetic Gaussian gradient estimate + optax optimizer",
    "pgpe": "evosax PGPE: symmetric sampling with per-coordinate std adaptation, ClipUp",
    "snes": "evosax SNES: separable natural evolution strategy",
    "xnes": "evosax xNES: exponential natural evolution strategy (full covariance)",
    "persistent_es": (
        "evosax PersistentES: unbiased ES for truncated unrolls; needs per-candidate inner state "
        "carried across generations (see unroll_start)"
    ),
    "noise_reuse_es": (
        "evosax NoiseReuseES: reuses each candidate's perturbation over a whole unroll; needs "
        "per-candidate inner state carried across generations (see unroll_start)"
    ),
}
