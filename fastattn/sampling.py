"""Sampling: request parameters, their per-row device form, and one jitted batched sampler.

Dimension letters: S rows of a batch (one sequence each), V vocabulary, M stop ids per row, K top
logprobs returned per row.

What one row goes through (vLLM's order; every step is per row, so rows never interact)::

    raw logits ─┬──────────────────────────────────────────────► logprobs: log_softmax(raw)
                └► 1 min_tokens ban ► 2 repetition ► 3 frequency/presence ─┬► greedy rows: argmax
                                                                           │
       9 sample ◄ 8 top_p ◄ 7 top_k ◄ 6 min_p ◄ 5 / temperature ◄──────────┘ other rows

1. min_tokens: while the row's ``steps < min_tokens``, its stop ids (``stop_token_ids`` plus the
   EOS ids unless ``ignore_eos``) get ``-inf``.
2. repetition_penalty (CTRL, HF, vLLM): a token seen in the prompt or the output so far has its
   logit divided by the penalty when positive, multiplied by it otherwise.
3. frequency/presence penalty (OpenAI, vLLM), output tokens only:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
4. Greedy rows (``temperature < GREEDY_TEMPERATURE``) take the argmax of these logits (the first
   index on a tie), with no randomness and none of steps 5-8.
5. Divide by the temperature.
6. min_p: keep tokens with ``prob >= min_p * max prob``, i.e. ``logit >= max logit + log(min_p)``.
7. top_k: keep tokens whose logit is >= the k-th largest (``-1``: off; ties at the boundary kept).
8. top_p: on the distribution renormalised over what 6-7 kept, keep the smallest set of the most
   likely tokens whose mass reaches ``top_p`` (the token that crosses ``top_p`` is kept; ties at
   the boundary kept).
9. Draw from the softmax of the kept logits with the Gumbel-max trick:
   ``argmax(logit + Gumbel noise)`` is an exact draw from ``softmax(logit)``.

The returned logprob is vLLM's default: the log-probability of the sampled token under the raw
model distribution (``log_softmax`` of the logits passed in, before any of 1-8), and the optional
top-K logprobs are the K largest of that same ``log_softmax``.

Random streams (RELIABILITY 15). The noise of row s comes from its own key::

    seeded   : fold_in(jax.random.key(seed_s), steps[s])
    unseeded : fold_in(fold_in(engine_key, request_id_s), steps[s])

where ``steps[s]`` is the request's own output-token index (the number of tokens it has generated
so far). Neither the row index nor the rest of the batch enters, so a seeded request gives the same
tokens alone or in any batch, at any row. For ``n > 1``, give each child its own stream with
``SamplingParams.child(i)`` (vLLM's convention: child i of a seeded request uses ``seed + i``).

Token history for the penalties. The sampler takes, per row, ``output_counts [S, V] int32`` (how
often each token was generated so far) and ``prompt_mask [S, V] bool`` (which tokens the prompt
holds); the repetition penalty applies to ``prompt_mask | (output_counts > 0)``. Both are cheap to
keep on device: ``prompt_mask = token_counts(prompt_ids, V) > 0`` once at admission, then
``record_output_tokens`` after every step (one scatter-add of S ones). They cost S * V * 5 bytes
(160 MiB at S = 256, V = 128k), so they are optional: pass ``None`` when no row uses a penalty
(``SamplingTensors.needs_history`` is False), and the sampler refuses ``None`` when one does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# vLLM's _SAMPLING_EPS: below this, x / temperature overflows f32 for ordinary logits, and the
# distribution is a point mass at the argmax anyway.
GREEDY_TEMPERATURE = 1e-5
_NO_TOKEN = np.iinfo(np.int32).max  # stop-id padding: out of range, so the masking scatter drops it
_UINT32_LIMIT = 2**32


# ---------------------------------------------------------------------------------------------
# Request parameters (host)
# ---------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request is decoded. Validated when built: a bad field raises ``ValueError`` naming
    the field and its value (RELIABILITY 12).

    Attributes:
      temperature: >= 0, finite. Below ``GREEDY_TEMPERATURE`` (so 0) the request is greedy.
      top_k: keep the k most likely tokens; -1 turns it off. 0 is refused (ambiguous across
        libraries).
      top_p: nucleus mass in (0, 1]; 1 turns it off.
      min_p: in [0, 1]; keep tokens at least ``min_p`` times as likely as the most likely one.
      repetition_penalty: > 0; 1 is off (see the module docstring for the formula).
      presence_penalty, frequency_penalty: finite; 0 is off. Negative values reward repetition.
      seed: None (the engine's stream) or an int in [0, 2**32): the request's own stream.
      max_tokens: >= 1 tokens to generate at most.
      min_tokens: in [0, max_tokens]; stop ids and EOS are banned before this many tokens.
      stop_token_ids: token ids that end the request (a list or tuple is stored as a tuple).
      stop: strings that end the request; the engine matches them on detokenised text. A str or a
        list of str is stored as a tuple.
      n: >= 1 completions of the prompt.
      logprobs: None, or how many top logprobs to return besides the sampled token's (>= 0).
      ignore_eos: keep generating after EOS (EOS is then not banned by min_tokens either).
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        def fail(name, requirement):
            raise ValueError(f"{name} must be {requirement}, got {name}={getattr(self, name)!r}")

        def real(name, ok, requirement):
            value = getattr(self, name)
            if not _is_real(value) or math.isnan(value) or not ok(float(value)):
                fail(name, requirement)
            object.__setattr__(self, name, float(value))

        def integer(name, ok, requirement):
            value = getattr(self, name)
            if not _is_int(value) or not ok(int(value)):
                fail(name, requirement)
            object.__setattr__(self, name, int(value))

        real("temperature", lambda v: 0 <= v < math.inf, "a finite number >= 0")
        real("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        real("min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
        real("repetition_penalty", lambda v: 0 < v < math.inf, "a finite number > 0")
        real("presence_penalty", math.isfinite, "a finite number")
        real("frequency_penalty", math.isfinite, "a finite number")
        integer("top_k", lambda v: v == -1 or v >= 1, "-1 (off) or an int >= 1")
        integer("max_tokens", lambda v: v >= 1, "an int >= 1")
        integer("min_tokens", lambda v: 0 <= v <= self.max_tokens,
                f"an int in [0, max_tokens={self.max_tokens}]")
        integer("n", lambda v: v >= 1, "an int >= 1")
        if self.seed is not None:
            integer("seed", lambda v: 0 <= v < _UINT32_LIMIT, "None or an int in [0, 2**32)")
        if self.logprobs is not None:
            integer("logprobs", lambda v: v >= 0, "None or an int >= 0")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "a bool")

        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(
                _is_int(i) and i >= 0 for i in ids):
            fail("stop_token_ids", "a list or tuple of ints >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))

        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            fail("stop", "a non-empty str or a list or tuple of them")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax every step (temperature below
        ``GREEDY_TEMPERATURE``); top_k, top_p, min_p and the seed then change nothing."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        """True when the sampler needs the token history (``output_counts``, ``prompt_mask``)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def child(self, index: int) -> SamplingParams:
        """The parameters of completion ``index`` of an ``n > 1`` request: ``n = 1`` and, when
        seeded, ``seed + index`` (mod 2**32), so the children draw different tokens and each is
        reproducible. Unseeded children differ through their request ids."""
        if not _is_int(index) or not 0 <= index < self.n:
            raise ValueError(f"index must be an int in [0, n={self.n}), got index={index!r}")
        seed = None if self.seed is None else (self.seed + index) % _UINT32_LIMIT
        return dataclasses.replace(self, n=1, seed=seed)


# ---------------------------------------------------------------------------------------------
# Per-row parameters (device)
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class SamplingTensors:
    """The parameters of S batch rows as arrays, built on the host by ``SamplingTensors.build``.

    Attributes:
      temperature: [S] float32; 1.0 on greedy rows (they never divide by it).
      greedy: [S] bool.
      top_k: [S] int32; -1 is off, values above V act as V.
      top_p, min_p: [S] float32.
      repetition_penalty, presence_penalty, frequency_penalty: [S] float32.
      seed: [S] uint32, the request's seed (0 on unseeded rows).
      seeded: [S] bool.
      request_id: [S] uint32, the engine's request id mod 2**32; picks the stream of unseeded rows.
      min_tokens: [S] int32.
      stop_ids: [S, M] int32, the ids banned while ``steps < min_tokens``, padded with an
        out-of-range id. M is 0 when no row has ``min_tokens > 0``, else a power of two >= 4, so
        few shapes are compiled.
      needs_history: static bool; True when a row uses a penalty, so the sampler needs
        ``output_counts`` and ``prompt_mask``. Changing it retraces a jitted caller.
      filters: static bool; True when a row uses top_k or top_p, so the sampler runs the
        filters (steps 7-8). Changing it retraces a jitted caller.

    Why static, not decided on the device: a ``lax.cond`` on a device value makes XLA's GPU
    runtime copy the predicate to the host and wait for it, so an engine step with one blocks
    the host until the whole model has run (measured: the call of a 256-sequence decode step
    returned only when its device work was done), and host/device overlap is lost.
    """

    temperature: jax.Array
    greedy: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array
    seeded: jax.Array
    request_id: jax.Array
    min_tokens: jax.Array
    stop_ids: jax.Array
    needs_history: bool = flax.struct.field(pytree_node=False, default=False)
    filters: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(cls, params: Sequence[SamplingParams], *, pad_to: int | None = None,
              request_ids: Sequence[int] | None = None, eos_token_ids: Sequence[int] = (),
              vocab_size: int | None = None) -> SamplingTensors:
        """Host numpy arrays for ``params`` (row i = ``params[i]``), padded with greedy rows.

        Args:
          params: one ``SamplingParams`` per row (``n`` is ignored: a row is one sequence).
          pad_to: the row count S to pad to (a shape bucket); None: ``len(params)``.
          request_ids: the engine's id of each row's request, which keys the stream of unseeded
            rows; None: the row index (fine for one-off calls, not for an engine, where a request
            must keep its id as it moves between rows).
          eos_token_ids: the model's EOS ids, banned with the stop ids before ``min_tokens``
            (unless ``ignore_eos``).
          vocab_size: when given, stop and EOS ids must be < vocab_size.
        """
        num = len(params)
        rows = num if pad_to is None else pad_to
        if not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"params must be SamplingParams, got {[type(p) for p in params]}")
        if not _is_int(rows) or rows < max(num, 1):
            raise ValueError(f"pad_to must be None or an int >= len(params) = {num} (and >= 1), "
                             f"got pad_to={pad_to!r}")
        if request_ids is None:
            request_ids = range(num)
        if len(request_ids) != num or not all(_is_int(r) for r in request_ids):
            raise ValueError(f"request_ids must be {num} ints, got request_ids={request_ids!r}")
        if not all(_is_int(e) and e >= 0 for e in eos_token_ids):
            raise ValueError(f"eos_token_ids must be ints >= 0, got {eos_token_ids=}")

        pad = [SamplingParams(temperature=0.0)] * (rows - num)
        ps = list(params) + pad

        def col(fn, dtype):
            return np.array([fn(p) for p in ps], dtype)

        banned = [p.stop_token_ids + (() if p.ignore_eos else tuple(eos_token_ids))
                  if p.min_tokens > 0 else () for p in ps]
        width = max(len(b) for b in banned)
        width = 0 if width == 0 else max(4, 1 << (width - 1).bit_length())
        if vocab_size is not None and any(i >= vocab_size for b in banned for i in b):
            raise ValueError(f"stop_token_ids and eos_token_ids must be < {vocab_size=}, got "
                             f"{sorted({i for b in banned for i in b if i >= vocab_size})}")
        stop_ids = np.full((rows, width), _NO_TOKEN, np.int32)
        for r, b in enumerate(banned):
            stop_ids[r, :len(b)] = b

        return cls(
            temperature=col(lambda p: 1.0 if p.greedy else p.temperature, np.float32),
            greedy=col(lambda p: p.greedy, np.bool_),
            top_k=col(lambda p: p.top_k, np.int32),
            top_p=col(lambda p: p.top_p, np.float32),
            min_p=col(lambda p: p.min_p, np.float32),
            repetition_penalty=col(lambda p: p.repetition_penalty, np.float32),
            presence_penalty=col(lambda p: p.presence_penalty, np.float32),
            frequency_penalty=col(lambda p: p.frequency_penalty, np.float32),
            seed=col(lambda p: p.seed or 0, np.uint32),
            seeded=col(lambda p: p.seed is not None, np.bool_),
            request_id=np.array([r % _UINT32_LIMIT for r in request_ids] + [0] * (rows - num),
                                np.uint32),
            min_tokens=col(lambda p: p.min_tokens, np.int32),
            stop_ids=stop_ids,
            needs_history=any(p.uses_penalties for p in params),
            filters=any(p.top_k != -1 or p.top_p < 1 for p in params if not p.greedy),
        )


class SamplerOutput(NamedTuple):
    """What ``sample`` returns; every array has S rows.

    Attributes:
      tokens: [S] int32, the sampled token of each row.
      logprobs: [S] float32, its log-probability under the raw model distribution.
      top_token_ids: [S, K] int32, the K most likely tokens of the raw distribution, most likely
        first (lower id first on a tie).
      top_logprobs: [S, K] float32, their log-probabilities.
    """

    tokens: jax.Array
    logprobs: jax.Array
    top_token_ids: jax.Array
    top_logprobs: jax.Array


# ---------------------------------------------------------------------------------------------
# Token history helpers
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="vocab_size")
def token_counts(token_ids: jax.Array, vocab_size: int) -> jax.Array:
    """[S, L] int32 token ids (negative = padding, ignored) -> [S, V] int32 occurrence counts.

    ``token_counts(prompts, V) > 0`` is a ``prompt_mask``; ``token_counts(outputs, V)`` rebuilds
    ``output_counts`` (after a preemption, say)."""
    rows = jnp.arange(token_ids.shape[0])[:, None]
    ids = jnp.where(token_ids < 0, _NO_TOKEN, token_ids)  # jnp would wrap negative indices
    return jnp.zeros((token_ids.shape[0], vocab_size), jnp.int32).at[rows, ids].add(
        1, mode="drop")


@jax.jit
def record_output_tokens(output_counts: jax.Array, tokens: jax.Array,
                         valid: jax.Array | None = None) -> jax.Array:
    """Adds this step's sampled ``tokens`` [S] to ``output_counts`` [S, V]; rows where ``valid``
    [S] bool is False (padding, a chunk of a prompt that sampled nothing) are unchanged."""
    ones = jnp.ones_like(tokens) if valid is None else valid.astype(jnp.int32)
    return output_counts.at[jnp.arange(tokens.shape[0]), tokens].add(ones, mode="drop")


# ---------------------------------------------------------------------------------------------
# Device pipeline
# ---------------------------------------------------------------------------------------------


def _penalised(logits, t: SamplingTensors, steps, output_counts, prompt_mask):
    """Steps 1-3: [S, V] f32 logits with min_tokens bans and penalties applied."""
    x = logits.astype(jnp.float32)
    if t.stop_ids.shape[1]:
        banned = jnp.where((steps < t.min_tokens)[:, None], t.stop_ids, _NO_TOKEN)
        x = x.at[jnp.arange(x.shape[0])[:, None], banned].set(-jnp.inf, mode="drop")
    if output_counts is not None:
        counts = output_counts.astype(jnp.float32)
        generated = output_counts > 0
        seen = generated | prompt_mask
        r = t.repetition_penalty[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
        x = x - t.frequency_penalty[:, None] * counts - t.presence_penalty[:, None] * generated
    return x


_penalised_jit = jax.jit(_penalised)


def _ordered_keys(x):
    """f32 -> uint32 with the same order (IEEE bits, sign-flipped), so a threshold search can
    work on integers, exactly. -0.0 is folded into +0.0 first so the two compare equal."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_passing(keys, passes, ways):
    """Per row, the largest uint32 t in [min key, max key] with ``passes(t)``, for ``passes``
    true at the row minimum and monotone (true, then false as t grows). A radix select: each pass
    tries ``ways - 1`` evenly spaced thresholds at once ([S, ways - 1] -> [S, ways - 1] bool) and
    keeps the interval between the last passing one and the next, so the width of the interval
    shrinks to ``width // ways``; ``ceil(32 / log2(ways))`` passes end at width 0: exact."""
    num_passes = -(-32 // (ways.bit_length() - 1))
    j = jnp.arange(1, ways, dtype=jnp.uint32)

    def narrow(_, bounds):
        lo, hi = bounds  # [S] each
        step = (hi - lo) // ways + 1  # ways * step > hi - lo: the thresholds span the interval
        t = lo[:, None] + j * step[:, None]  # [S, ways - 1]; overflows only past +inf (NaN keys)
        n = jnp.sum(passes(t) & (t <= hi[:, None]), -1, dtype=jnp.uint32)  # a prefix of t passes
        return lo + n * step, jnp.minimum(hi, lo + (n + 1) * step - 1)

    # Unrolled: a loop would be a while loop on the GPU, whose trip test the runtime reads
    # back on the host each iteration.
    lo, _ = jax.lax.fori_loop(0, num_passes, narrow, (keys.min(-1), keys.max(-1)),
                              unroll=True)
    return lo


def _filter_select(x, keep, k, p, row_max, *, ways):
    """Steps 7-8 by radix select on the float bits: per filter, ``32 / log2(ways)`` passes that
    each compare every logit with ``ways - 1`` thresholds and reduce, no sort. Both filters
    run (``SamplingTensors.filters`` says whether a batch needs them at all); a row that does
    not use one gets a threshold every key passes."""
    S, V = x.shape
    keys = _ordered_keys(x)[:, None, :]  # [S, 1, V]

    def kth_largest():  # largest t with #{keys >= t} >= k; counted in f32: exact below 2**24
        count = lambda t: jnp.where(keys >= t[:, :, None], 1.0, 0.0).sum(-1)
        return _largest_passing(keys[:, 0], lambda t: count(t) >= k[:, None], ways)

    keep &= keys[:, 0] >= kth_largest()[:, None]  # k = V: the row minimum, every key passes
    weight = jnp.where(keep, jnp.exp(x - row_max), 0.0)  # [S, V] unnormalised kept probs

    def nucleus():  # largest t with mass{keys >= t} >= p * total
        target = (p * weight.sum(-1))[:, None]
        return _largest_passing(
            keys[:, 0], lambda t: jnp.where(keys >= t[:, :, None], weight[:, None, :], 0.0)
            .sum(-1) >= target, ways)

    return keep & ((keys[:, 0] >= nucleus()[:, None]) | (p >= 1)[:, None])


def _filter_sort(x, keep, k, p, row_max):
    """Steps 7-8 from one descending sort of each row: O(V log V) per row (run only when
    ``SamplingTensors.filters`` says some row of the batch uses top_k or top_p)."""
    S, V = x.shape

    def thresholds():
        desc = jnp.flip(jnp.sort(jnp.where(keep, x, -jnp.inf), axis=-1), axis=-1)  # [S, V]
        tau_k = jnp.take_along_axis(desc, (k - 1)[:, None], -1)  # [S, 1]
        weight = jnp.where(desc >= tau_k, jnp.exp(desc - row_max), 0.0)
        cumulative = jnp.cumsum(weight, -1)
        before = jnp.concatenate([jnp.zeros((S, 1)), cumulative[:, :-1]], -1)  # more likely mass
        total = cumulative[:, -1:]
        n_keep = jnp.sum(before < p[:, None] * total, -1, keepdims=True)  # >= 1: before[0] = 0
        tau_p = jnp.where(p[:, None] >= 1, -jnp.inf,
                          jnp.take_along_axis(desc, n_keep - 1, -1))
        return tau_k[:, 0], tau_p[:, 0]

    tau_k, tau_p = thresholds()
    return keep & (x >= tau_k[:, None]) & (x >= tau_p[:, None])


FILTER_IMPLEMENTATIONS: dict[str, Callable] = {
    "select": functools.partial(_filter_select, ways=16),
    "sort": _filter_sort,
}


def default_filter_implementation() -> str:
    """"select". Both are exact. Measured on an H100 (jax 0.11.2, V = 128256, f32 logits), whole
    ``sample`` call per step, every row using the filter:

        S    filter               select   sort
        256  top_k=50             2.5 ms   3.2 ms
        256  top_p=0.95           2.2 ms   3.2 ms
        256  top_k=50, top_p=0.9  3.9 ms   3.2 ms
        32   any of the above     0.4-0.8  1.1 ms

    A batch using neither costs 0.5-0.65 ms (S = 256; temperature and min_p only), an all-greedy
    batch 0.47 ms, and ``num_logprobs=20`` adds 2.4 ms (``lax.top_k``)."""
    return "select"


def _filtered(x, t: SamplingTensors, implementation: str):
    """Steps 5-8 on [S, V] penalised logits: the temperature-scaled logits with every token the
    filters drop set to -inf."""
    V = x.shape[1]
    x = x / t.temperature[:, None]
    row_max = x.max(-1, keepdims=True)
    keep = x >= row_max + jnp.log(t.min_p)[:, None]  # log(0) = -inf keeps every token
    if t.filters:  # static: some row uses top_k or top_p
        k = jnp.where(t.top_k < 1, V, jnp.minimum(t.top_k, V))
        keep = FILTER_IMPLEMENTATIONS[implementation](x, keep, k, t.top_p, row_max)
    return jnp.where(keep, x, -jnp.inf)


def _row_keys(t: SamplingTensors, key, steps):
    """[S] typed keys: each row's own stream at its own step (module docstring)."""

    def one(seed, seeded, request_id, step):
        own = jnp.where(seeded, jax.random.key(seed), jax.random.fold_in(key, request_id))
        return jax.random.fold_in(own, step)

    return jax.vmap(one)(t.seed, t.seeded, t.request_id, steps)


@functools.partial(jax.jit, static_argnames=("num_logprobs", "implementation"))
def _sample(logits, t, key, steps, output_counts, prompt_mask, num_logprobs, implementation):
    S, V = logits.shape
    x = _penalised(logits, t, steps, output_counts, prompt_mask)
    greedy_tokens = jnp.argmax(x, -1).astype(jnp.int32)

    # Every row draws, greedy ones too (their draw is dropped): deciding on the device to skip
    # it would be a lax.cond, which blocks the host (SamplingTensors). It costs one Gumbel
    # noise [S, V] per step.
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(
        _row_keys(t, key, steps))
    drawn = jnp.argmax(_filtered(x, t, implementation) + noise, -1).astype(jnp.int32)
    tokens = jnp.where(t.greedy, greedy_tokens, drawn)

    raw = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(raw, -1)
    logprobs = jnp.take_along_axis(raw, tokens[:, None], -1)[:, 0] - lse
    if num_logprobs:
        top, top_ids = jax.lax.top_k(raw, num_logprobs)
        top_lp = top - lse[:, None]
    else:
        top_ids, top_lp = jnp.zeros((S, 0), jnp.int32), jnp.zeros((S, 0), jnp.float32)
    return SamplerOutput(tokens, logprobs, top_ids.astype(jnp.int32), top_lp)


@functools.partial(jax.jit, static_argnames="implementation")
def _probs(logits, t, steps, output_counts, prompt_mask, implementation):
    x = _penalised(logits, t, steps, output_counts, prompt_mask)
    point = jax.nn.one_hot(jnp.argmax(x, -1), x.shape[1], dtype=jnp.float32)
    spread = jax.nn.softmax(_filtered(x, t, implementation), -1)
    return jnp.where(t.greedy[:, None], point, spread)


def _check(logits, t, steps, output_counts, prompt_mask, implementation):
    """Shape and argument checks on the host (shapes are static, also under an outer jit)."""
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"logits must be [S, V], got shape {getattr(logits, 'shape', None)}")
    S, V = logits.shape
    if not isinstance(t, SamplingTensors) or t.num_rows != S:
        raise ValueError(f"tensors must be SamplingTensors with S={S} rows, got "
                         f"{getattr(t, 'num_rows', type(t))}")
    if np.shape(steps) != (S,):
        raise ValueError(f"steps must be [S={S}], got shape {np.shape(steps)}")
    if (output_counts is None) != (prompt_mask is None):
        raise ValueError("output_counts and prompt_mask go together: pass both or neither")
    if output_counts is None and t.needs_history:
        raise ValueError("a row uses repetition/presence/frequency penalty "
                         "(tensors.needs_history); pass output_counts and prompt_mask")
    if output_counts is not None and (np.shape(output_counts) != (S, V)
                                      or np.shape(prompt_mask) != (S, V)):
        raise ValueError(f"output_counts and prompt_mask must be [S, V] = [{S}, {V}], got "
                         f"{np.shape(output_counts)} and {np.shape(prompt_mask)}")
    if implementation not in FILTER_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of "
                         f"{sorted(FILTER_IMPLEMENTATIONS)}, got {implementation!r}")


def sample(logits: jax.Array, tensors: SamplingTensors, key: jax.Array, steps: jax.Array,
           output_counts: jax.Array | None = None, prompt_mask: jax.Array | None = None, *,
           num_logprobs: int = 0, implementation: str | None = None) -> SamplerOutput:
    """Samples one token per row, on device, with per-row parameters (module docstring: order of
    operations, logprob convention, random streams). Jitted; callable inside an outer jit.

    Args:
      logits: [S, V] raw model logits (any float dtype; computed in float32).
      tensors: ``SamplingTensors`` with S rows.
      key: the engine's key (a typed key, ``jax.random.key(seed)``, or raw ``uint32[2]`` key
        data); only unseeded rows use it.
      steps: [S] int32, each row's output-token index: tokens its request has generated so far.
        It picks the random stream and gates min_tokens.
      output_counts: [S, V] int32 generated-token counts, or None when no row uses a penalty.
      prompt_mask: [S, V] bool, the tokens of each row's prompt, or None with ``output_counts``.
      num_logprobs: static K of the top logprobs returned (the batch's largest ``logprobs``; keep
        it to a fixed value such as 0 or 20 so the step compiles once).
      implementation: the top_k/top_p filter, one of ``FILTER_IMPLEMENTATIONS``; None picks
        ``default_filter_implementation()``. Changes speed, never tokens (up to float rounding of
        the top_p mass at the boundary).

    Returns:
      ``SamplerOutput``. Greedy rows (and padding rows) hold exactly the argmax of the penalised
      logits.
    """
    implementation = implementation or default_filter_implementation()
    _check(logits, tensors, steps, output_counts, prompt_mask, implementation)
    if not _is_int(num_logprobs) or not 0 <= num_logprobs <= logits.shape[1]:
        raise ValueError(f"num_logprobs must be an int in [0, V={logits.shape[1]}], got "
                         f"{num_logprobs=}")
    if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return _sample(logits, tensors, key, steps, output_counts, prompt_mask, num_logprobs,
                   implementation)


def sampling_probs(logits: jax.Array, tensors: SamplingTensors, steps: jax.Array,
                   output_counts: jax.Array | None = None, prompt_mask: jax.Array | None = None,
                   *, implementation: str | None = None) -> jax.Array:
    """[S, V] float32: the distribution ``sample`` draws each row from (a one-hot at the argmax
    on greedy rows). Same arguments as ``sample``; for tests and analysis."""
    implementation = implementation or default_filter_implementation()
    _check(logits, tensors, steps, output_counts, prompt_mask, implementation)
    return _probs(logits, tensors, steps, output_counts, prompt_mask, implementation)


def penalised_logits(logits: jax.Array, tensors: SamplingTensors, steps: jax.Array,
                     output_counts: jax.Array | None = None,
                     prompt_mask: jax.Array | None = None) -> jax.Array:
    """[S, V] float32 logits after steps 1-3 (min_tokens bans, penalties): what greedy rows take
    the argmax of, before the temperature."""
    _check(logits, tensors, steps, output_counts, prompt_mask, default_filter_implementation())
    return _penalised_jit(logits, tensors, steps, output_counts, prompt_mask)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def sampling_probs_reference(logits, params: Sequence[SamplingParams], steps,
                             output_counts=None, prompt_mask=None,
                             eos_token_ids: Sequence[int] = (), dtype=np.float64) -> np.ndarray:
    """Pure numpy, in ``dtype`` (float64: the oracle; float32: what that precision alone costs,
    for the tolerance policy), one row at a time, from ``SamplingParams`` directly: the oracle of
    ``sampling_probs``. Shares no code with the device path; top_p follows vLLM's ascending-sort
    form (drop tokens whose ascending cumulative mass is <= 1 - top_p, always keep the largest),
    widened to keep ties of the smallest kept logit."""
    logits = np.asarray(logits, dtype)
    S, V = logits.shape
    counts = np.zeros((S, V), np.int64) if output_counts is None else np.asarray(output_counts)
    in_prompt = np.zeros((S, V), bool) if prompt_mask is None else np.asarray(prompt_mask)
    out = np.zeros((S, V), dtype)
    for s, p in enumerate(params):
        x = logits[s].copy()
        if steps[s] < p.min_tokens:
            for i in list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids)):
                x[i] = -np.inf
        for i in range(V):
            if in_prompt[s, i] or counts[s, i] > 0:
                r = dtype(p.repetition_penalty)
                x[i] = x[i] / r if x[i] > 0 else x[i] * r
            x[i] -= dtype(p.frequency_penalty) * counts[s, i] + dtype(p.presence_penalty) * (
                counts[s, i] > 0)
        if p.temperature < GREEDY_TEMPERATURE:
            out[s, np.argmax(x)] = 1.0
            continue
        x = x / dtype(p.temperature)

        def softmax(z):
            e = np.exp(z - z.max())
            return e / e.sum()

        x[softmax(x) < dtype(p.min_p) * softmax(x).max()] = -np.inf
        if p.top_k != -1 and p.top_k < V:
            x[x < np.sort(x)[::-1][p.top_k - 1]] = -np.inf
        if p.top_p < 1:
            order = np.argsort(x, kind="stable")  # ascending
            ascending_mass = np.cumsum(softmax(x)[order])
            dropped = ascending_mass <= 1 - dtype(p.top_p)
            dropped[-1] = False
            x[x < x[order[~dropped]].min()] = -np.inf
        out[s] = softmax(x)
    return out
