"""pycma CMA-ES behind the ask/tell contract, with IPOP/BIPOP restarts and noise handling.

pycma's `cma.CMAEvolutionStrategy` is a mutable object; here it lives inside a `PycmaState` that
is treated as a value: `ask` and `tell` deep-copy the state they are given and return the
updated copy, so the input state is never modified and the adapter itself is immutable
configuration.

Determinism. pycma samples through its ``randn`` option; the adapter passes a `_KeyedNormal`
(a picklable callable over a ``numpy.random.Generator``) and reseeds it from the JAX key at the
start of every `init`, `ask` and `tell`. pycma's remaining draws from numpy's global RNG (the
noise handler's choice of re-evaluated solutions, some optional sigma adaptations and integer
handling) see the global RNG seeded from the same key for the duration of the call; the previous
global state is restored afterwards, so nothing leaks to the caller. (A thread drawing from
``np.random`` concurrently with `ask`/`tell` would interleave with that; the run loop is
single-threaded on the driver.) Hence ask/tell are pure functions of ``(key, state)``.

Restarts (``restarts=n``, mirroring `cma.fmin`): when ``es.stop()`` reports a condition other
than ``maxfevals``, ``ftarget`` or ``callback`` and restarts are left, a fresh
`CMAEvolutionStrategy` starts from the initial mean. IPOP (default) multiplies the population
size by ``incpopsize`` (2) at each restart. BIPOP (``bipop=True``; Hansen 2009, "Benchmarking a
BI-population CMA-ES on the BBOB-2009 function testbed") interleaves two regimes, choosing the
one that has used fewer evaluations so far: large populations ``popsize0 * 2**i`` with the
default step size, and small populations ``floor(popsize0 * (lambda_large/popsize0)**(U**2))``
with step size ``sigma0 * 0.01**U'`` and at most half the evaluations of the last large runs
(``maxiter``). Evaluations accumulate across restarts (``maxfevals`` bounds the whole run).

Noise handling (``noise_handler=True`` or a dict of `cma.NoiseHandler` arguments ``maxevals``,
``reevals``, ``epsilon``) follows `cma.fmin`, recast into one evaluation per generation: after
telling generation t, a few of its solutions are chosen (NoiseHandler's rule) and slightly
perturbed copies are appended to the population of generation t+1; their fitness (measured on
t+1's tasks, i.e. with fresh noise) goes into NoiseHandler's rank-change measurement, and the
resulting sigma factor is applied after generation t+1's update. When the handler raises
``evaluations`` above 1, `ask` repeats each candidate that many times (consecutive rows) and
`tell` aggregates the repeats with the median, as ``es.ask_and_eval`` does; repeats only help if
the evaluator draws different noise for each row.

Serialization is pycma's own mechanism, pickle (with a small header checked first). Unpickling
can execute arbitrary code, so ``blur resume`` only passes bytes to `state_from_bytes` after the
checkpoint's HMAC signature verified with the run's key from the user's key store
(:mod:`evolution.rundir`).
"""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cma
import jax
import numpy as np

from .base import check_options, pack_state, unpack_state
from .names import PYCMA_STRATEGIES

__all__ = ["PYCMA_STRATEGIES", "PycmaState", "PycmaStrategy"]


_ADAPTER_OPTIONS = {
    "restarts": "maximal number of restarts (IPOP unless bipop), default 0",
    "bipop": "BIPOP restart regime (bool, or the small/large budget ratio), default False",
    "incpopsize": "population size multiplier per large restart, default 2",
    "noise_handler": "True or a dict of cma.NoiseHandler args (maxevals, reevals, epsilon)",
    "noise_change_sigma_exponent": "exponent on the noise handler's sigma factor, default 1",
    "noise_kappa_exponent": "cmean *= exp(-x * tanh(noiseS)) after each noise measurement, default 0",
}
_NOISE_HANDLER_ARGS = ("maxevals", "reevals", "epsilon")
# Managed by the adapter: sampling is driven by the key, never by pycma's own seed.
_MANAGED_CMA_OPTIONS = ("randn", "seed")
_QUIET = {"verbose": -9, "verb_disp": 0, "verb_log": 0}
_TERMINAL_STOPS = ("maxfevals", "ftarget", "callback")


class _KeyedNormal:
    """pycma ``randn`` option: standard normals from a Generator reseeded from each call's key."""

    def __init__(self):
        self.rng = np.random.Generator(np.random.PCG64(0))

    def __call__(self, *size):
        if len(size) == 1 and isinstance(size[0], tuple):
            size = size[0]
        return self.rng.standard_normal(size)


@contextlib.contextmanager
def _keyed_randomness(key, randn: _KeyedNormal):
    """Reseed ``randn`` and numpy's global RNG from ``key``; restore the global RNG on exit."""
    words = np.asarray(jax.random.key_data(key), dtype=np.uint32).ravel()
    sample_seq, global_seq = np.random.SeedSequence(words.tolist()).spawn(2)
    randn.rng = np.random.Generator(np.random.PCG64(sample_seq))
    saved = np.random.get_state()
    np.random.seed(global_seq.generate_state(4))
    try:
        yield
    finally:
        np.random.set_state(saved)


@dataclass
class _Reevaluation:
    """Noise measurement in flight: generation t's fitness and the points re-evaluated at t+1."""

    fitness: list[float]
    indices: np.ndarray  # which of generation t's candidates are re-evaluated
    points: np.ndarray  # [len(indices) * evaluations, D], consecutive rows per index
    evaluations: int


@dataclass
class _RestartLog:
    """Bookkeeping of `cma.fmin`'s restart loop."""

    run: int = 0  # index of the current run (0: the first)
    runs_with_small: int = 0
    small_evals: list[int] = field(default_factory=list)
    large_evals: list[int] = field(default_factory=list)
    popsize0: int = 0
    maxiter0: float = 0.0
    base_evals: int = 0
    regime: str = "default"  # default | large | small
    stops: list[dict] = field(default_factory=list)  # es.stop() of each finished run


@dataclass
class PycmaState:
    """Everything that changes during a pycma run. Treated as a value by the adapter."""

    es: cma.CMAEvolutionStrategy
    randn: _KeyedNormal
    noise_handler: cma.NoiseHandler | None
    x0: np.ndarray
    sigma0: float
    restart: _RestartLog = field(default_factory=_RestartLog)
    pending: _Reevaluation | None = None
    layout: tuple[int, int, int] | None = None  # (candidates, repeats, re-evaluations) of last ask
    terminal: dict = field(default_factory=dict)
    best_x: np.ndarray | None = None
    best_f: float = float("inf")


@dataclass(frozen=True)
class PycmaStrategy:
    """pycma CMA-ES with optional IPOP/BIPOP restarts and noise handling.

    ``options``: any `cma.CMAOptions` key (passed through, e.g. ``CMA_diagonal``, ``popsize``,
    ``tolfun``, ``maxfevals``; pycma is made quiet and file-free by default) except ``seed`` and
    ``randn``, plus the adapter options ``restarts``, ``bipop``, ``incpopsize``,
    ``noise_handler``, ``noise_change_sigma_exponent``, ``noise_kappa_exponent``.
    """

    num_dims: int
    num_candidates: int | None = None  # None: pycma's default 4 + floor(3 ln D)
    cma_options: tuple[tuple[str, Any], ...] = ()
    restarts: int = 0
    bipop: float = 0.0  # 0: IPOP; > 0: BIPOP with this small/large budget ratio
    incpopsize: float = 2.0
    noise_handler: tuple[tuple[str, Any], ...] | None = None
    noise_change_sigma_exponent: float = 1.0
    noise_kappa_exponent: float = 0.0
    name: str = "pycma"
    # state_to_bytes is a pickle: resume loads it only from a checkpoint signed with the run's key
    state_is_pickle = True

    @classmethod
    def create(
        cls, num_dims: int, population_size: int | None, options: Mapping[str, Any]
    ) -> PycmaStrategy:
        options = dict(options)
        known_cma = cma.CMAOptions()
        allowed = {k: None for k in known_cma if k not in _MANAGED_CMA_OPTIONS} | _ADAPTER_OPTIONS
        for key in _MANAGED_CMA_OPTIONS:
            if key in options:
                raise ValueError(
                    f"option {key!r} is managed by the pycma adapter (sampling follows the JAX key)"
                )
        check_options(
            "pycma", options, allowed, known=f"cma.CMAOptions() keys and {', '.join(_ADAPTER_OPTIONS)}"
        )
        adapter = {k: options.pop(k) for k in list(options) if k in _ADAPTER_OPTIONS}
        if "popsize" in options:
            popsize = options.pop("popsize")
            if isinstance(popsize, bool) or not isinstance(popsize, (int, np.integer)) or popsize < 2:
                raise ValueError(f"option 'popsize' must be an integer >= 2, got {popsize!r}")
            if population_size is not None and population_size != popsize:
                raise ValueError(
                    f"option 'popsize' ({popsize}) contradicts population_size ({population_size})"
                )
            population_size = int(popsize)

        restarts = adapter.get("restarts", 0)
        if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 0:
            raise ValueError(f"option 'restarts' must be a non-negative integer, got {restarts!r}")
        bipop = adapter.get("bipop", False)
        if not isinstance(bipop, (bool, int, float)) or bipop < 0:
            raise ValueError(f"option 'bipop' must be a bool or a non-negative number, got {bipop!r}")
        incpopsize = adapter.get("incpopsize", 2.0)
        if isinstance(incpopsize, bool) or not isinstance(incpopsize, (int, float)) or incpopsize < 1:
            raise ValueError(f"option 'incpopsize' must be a number >= 1, got {incpopsize!r}")
        noise = adapter.get("noise_handler", False)
        if noise is True:
            noise = {}
        elif noise is False or noise is None:
            noise = None
        elif isinstance(noise, Mapping):
            noise = dict(noise)
            for key in noise:
                if key not in _NOISE_HANDLER_ARGS:
                    raise ValueError(
                        f"unknown noise_handler argument {key!r}; known: {', '.join(_NOISE_HANDLER_ARGS)}"
                    )
        else:
            raise ValueError(f"option 'noise_handler' must be a bool or a dict, got {noise!r}")
        exponents = {}
        for key, default in (("noise_change_sigma_exponent", 1.0), ("noise_kappa_exponent", 0.0)):
            value = adapter.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"option {key!r} must be a number, got {value!r}")
            exponents[key] = float(value)
        return cls(
            num_dims=num_dims,
            num_candidates=population_size,
            cma_options=tuple(sorted(copy.deepcopy(options).items())),
            restarts=int(restarts),
            bipop=float(bipop),
            incpopsize=float(incpopsize),
            noise_handler=None if noise is None else tuple(sorted(noise.items())),
            **exponents,
        )

    # ----------------------------------------------------------------- Strategy contract
    def init(self, key, mean: np.ndarray, sigma: float) -> PycmaState:
        mean = np.array(mean, dtype=np.float64)
        if mean.shape != (self.num_dims,):
            raise ValueError(f"mean must have shape ({self.num_dims},), got {mean.shape}")
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be positive and finite, got {sigma!r}")
        randn = _KeyedNormal()
        with _keyed_randomness(key, randn):
            es = self._new_es(mean, float(sigma), randn, self.num_candidates, None, 0)
        return PycmaState(
            es=es,
            randn=randn,
            noise_handler=self._new_noise_handler(),
            x0=mean,
            sigma0=float(sigma),
            restart=_RestartLog(regime="default"),
        )

    def ask(self, key, state: PycmaState) -> tuple[np.ndarray, PycmaState]:
        state = copy.deepcopy(state)
        with _keyed_randomness(key, state.randn):
            candidates = np.asarray(state.es.ask(), dtype=np.float64)
        repeats = self._repeats(state)
        rows = [np.repeat(candidates, repeats, axis=0)]
        if state.pending is not None:
            rows.append(state.pending.points)
        population = np.concatenate(rows)
        state.layout = (len(candidates), repeats, len(population) - len(candidates) * repeats)
        return population, state

    def tell(self, key, population, fitness, state: PycmaState) -> PycmaState:
        if state.layout is None:
            raise ValueError("tell needs the state returned by ask")
        num_candidates, repeats, num_reeval = state.layout
        num_rows = num_candidates * repeats + num_reeval
        population = np.asarray(population, dtype=np.float64)
        fitness = np.asarray(fitness, dtype=np.float64)
        if population.shape != (num_rows, self.num_dims):
            raise ValueError(
                f"population must have shape ({num_rows}, {self.num_dims}), got {population.shape}"
            )
        if fitness.shape != (num_rows,):
            raise ValueError(f"fitness must have shape ({num_rows},), got {fitness.shape}")
        state = copy.deepcopy(state)
        state.layout = None
        es = state.es
        finite = np.isfinite(fitness)
        main = slice(0, num_candidates * repeats)
        with _keyed_randomness(key, state.randn):
            if not finite[main].any():  # nothing to learn from: discard the generation
                es.countevals += num_rows
                state.pending = None
                return state
            # NaN / inf count as the worst finite value of the generation.
            fitness = np.where(finite, fitness, fitness[finite].max())
            candidates = population[main][::repeats]
            candidate_fitness = np.median(fitness[main].reshape(num_candidates, repeats), axis=1)
            es.evaluations_per_f_value = repeats
            es.tell(list(candidates), candidate_fitness.tolist())

            best = int(np.argmin(candidate_fitness))
            if candidate_fitness[best] < state.best_f:
                state.best_f = float(candidate_fitness[best])
                state.best_x = candidates[best].copy()

            if state.pending is not None:
                self._finish_noise_measurement(state, fitness[num_candidates * repeats :])
            state.pending = self._plan_reevaluation(state, candidates, candidate_fitness)

            stop = {} if state.terminal else dict(es.stop())
            if stop:
                self._restart_or_terminate(state, stop)
        return state

    def mean(self, state: PycmaState) -> np.ndarray:
        es = state.es
        return np.array(es.gp.pheno(es.mean[:], into_bounds=es.boundary_handler.repair), dtype=np.float64)

    def population_size(self, state: PycmaState) -> int:
        pending = 0 if state.pending is None else len(state.pending.points)
        return state.es.popsize * self._repeats(state) + pending

    def stop(self, state: PycmaState) -> dict[str, Any]:
        """Terminal conditions (``maxfevals``, ``ftarget``, ``callback``, or restarts used up)."""
        return dict(state.terminal)

    def info(self, state: PycmaState) -> dict[str, float]:
        es, log = state.es, state.restart
        info = {
            "sigma": float(es.sigma),
            "generation": int(es.countiter),
            "evaluations": int(es.countevals),
            "population_size": int(es.popsize),
            "restarts": int(log.run),
            "small_regime": float(log.regime == "small"),
            "best_fitness": float(state.best_f),
        }
        if state.noise_handler is not None:
            info["noise_level"] = float(state.noise_handler.noiseS)
            info["noise_evaluations"] = float(state.noise_handler.evaluations)
        return info

    def best(self, state: PycmaState) -> tuple[np.ndarray | None, float]:
        """Best candidate told so far across all restarts and its fitness."""
        return (None if state.best_x is None else state.best_x.copy()), state.best_f

    def _header(self) -> dict[str, Any]:
        return {"format": "pycma-pickle", "strategy": self.name, "num_dims": self.num_dims}

    def state_to_bytes(self, state: PycmaState) -> bytes:
        return pack_state(self._header(), pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def state_from_bytes(self, data: bytes) -> PycmaState:
        """Unpickle a state. ONLY for states written by this run into its own directory."""
        payload = unpack_state(data, self._header())
        state = pickle.loads(payload)  # noqa: S301 -- trusted: the run's own checkpoint
        if not isinstance(state, PycmaState):
            raise ValueError(f"expected a PycmaState, got {type(state).__name__}")
        return state

    # ----------------------------------------------------------------- internals
    def _new_es(self, x0, sigma0, randn, popsize, maxiter, countevals) -> cma.CMAEvolutionStrategy:
        opts = dict(_QUIET) | copy.deepcopy(dict(self.cma_options))
        opts.update(randn=randn, seed=np.nan, verb_append=int(countevals))
        if popsize is not None:
            opts["popsize"] = int(popsize)
        if maxiter is not None:
            opts["maxiter"] = maxiter
        if self.noise_handler is not None and self.noise_change_sigma_exponent > 0:
            opts["tolfacupx"] = np.inf  # as cma.fmin does with noise handling
        return cma.CMAEvolutionStrategy(np.array(x0), sigma0, opts)

    def _new_noise_handler(self) -> cma.NoiseHandler | None:
        if self.noise_handler is None:
            return None
        kwargs = copy.deepcopy(dict(self.noise_handler))
        return cma.NoiseHandler(self.num_dims, **kwargs)

    @staticmethod
    def _repeats(state: PycmaState) -> int:
        handler = state.noise_handler
        return 1 if handler is None else max(1, int(handler.evaluations))

    @staticmethod
    def _plan_reevaluation(state, candidates, candidate_fitness) -> _Reevaluation | None:
        """NoiseHandler.reeval's first half: which solutions to re-evaluate, and where."""
        handler, es = state.noise_handler, state.es
        if handler is None or not handler.maxevals or handler.lam_reeval == 0:
            return None
        fitness = candidate_fitness.tolist()
        indices = np.asarray(handler.indices(fitness), dtype=int)  # draws from the seeded global RNG
        if not len(indices):
            return None
        evaluations = int(handler.evaluations) if handler.f_aggregate else 1
        points = []
        for i in indices:
            for _ in range(evaluations):
                if handler.epsilon:
                    points.append(es.ask(1, candidates[i], handler.epsilon)[0])
                else:
                    points.append(candidates[i])
        return _Reevaluation(fitness, indices, np.asarray(points, dtype=np.float64), evaluations)

    def _finish_noise_measurement(self, state: PycmaState, reeval_fitness: np.ndarray) -> None:
        """NoiseHandler.__call__'s second half (update_measure, treat) and fmin's sigma update."""
        pending, handler, es = state.pending, state.noise_handler, state.es
        aggregate = np.median if handler.f_aggregate is None else handler.f_aggregate
        values = reeval_fitness.reshape(len(pending.indices), pending.evaluations)
        fitre = list(pending.fitness)
        for row, i in enumerate(pending.indices):
            fitre[i] = float(aggregate(values[row]))
        handler.fit, handler.fitre, handler.idx = list(pending.fitness), fitre, pending.indices
        handler.evaluations_just_done = len(reeval_fitness)
        handler.update_measure()
        es.sigma *= handler.treat() ** self.noise_change_sigma_exponent
        es.countevals += len(reeval_fitness)
        es.sp.cmean *= float(np.exp(-self.noise_kappa_exponent * np.tanh(handler.noiseS)))
        if es.sp.cmean > 1:
            es.sp.cmean = 1.0

    def _restart_or_terminate(self, state: PycmaState, stop: dict) -> None:
        """`cma.fmin`'s restart loop, one decision per stopped run."""
        es, log = state.es, state.restart
        this_evals = es.countevals - log.base_evals
        log.base_evals = es.countevals
        if log.run == 0:
            log.popsize0 = int(es.popsize)
            log.maxiter0 = float(es.opts["maxiter"])
        if self.bipop:
            (log.large_evals if log.regime == "large" else log.small_evals).append(this_evals)
        log.stops.append(stop)
        if log.run + 1 - log.runs_with_small > self.restarts or any(k in stop for k in _TERMINAL_STOPS):
            state.terminal = stop  # the search is over; ask keeps sampling from the last run
            return
        log.run += 1
        sigma_factor, maxiter = 1.0, log.maxiter0
        if self.bipop and sum(log.small_evals) < self.bipop * max(1, sum(log.large_evals)):
            # Small regime: local search with a budget of half the large runs' evaluations.
            u_sigma, u_popsize = np.random.uniform(), np.random.uniform()  # seeded global RNG
            log.runs_with_small += 1
            sigma_factor = 0.01**u_sigma
            multiplier = self.incpopsize ** (log.run - log.runs_with_small)
            popsize = int(log.popsize0 * multiplier ** (u_popsize**2))
            maxiter = min(log.maxiter0, 0.5 * sum(log.large_evals) / popsize)
            log.regime = "small"
        else:
            popsize = int(round(log.popsize0 * self.incpopsize ** (log.run - log.runs_with_small)))
            log.regime = "large"
        state.es = self._new_es(
            state.x0, state.sigma0 * sigma_factor, state.randn, popsize, maxiter, es.countevals
        )
        state.noise_handler = self._new_noise_handler()
        state.pending = None

