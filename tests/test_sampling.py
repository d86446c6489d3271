"""Tests of fastattn.sampling: request validation (RELIABILITY 12), the filtered distribution
against the numpy reference under the tolerance policy, the empirical distribution of draws,
seeded streams independent of the batch (RELIABILITY 15), penalties, min_tokens and logprobs.

Shapes are few and shared (S x V = 16 x 64, 4096 x 8, small determinism batches) so the file
compiles a handful of programs and runs in seconds on a CPU.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastattn.sampling import (
    FILTER_IMPLEMENTATIONS,
    GREEDY_TEMPERATURE,
    SamplingParams,
    SamplingTensors,
    penalised_logits,
    record_output_tokens,
    sample,
    sampling_probs,
    sampling_probs_reference,
    token_counts,
)
from tests.tolerance import assert_within_policy

IMPLS = sorted(FILTER_IMPLEMENTATIONS)
KEY = jax.random.key(1234)
EOS = 7


def _random_params(rng, n, *, greedy_fraction=0.2):
    def one():
        return SamplingParams(
            temperature=0.0 if rng.random() < greedy_fraction else float(rng.uniform(0.3, 2.0)),
            top_k=int(rng.choice([-1, 1, 3, 10, 40, 100])),
            top_p=float(rng.choice([1.0, rng.uniform(0.05, 1.0)])),
            min_p=float(rng.choice([0.0, rng.uniform(0.0, 0.3)])),
            repetition_penalty=float(rng.choice([1.0, rng.uniform(0.6, 1.8)])),
            presence_penalty=float(rng.choice([0.0, rng.normal()])),
            frequency_penalty=float(rng.choice([0.0, rng.normal() / 2])),
            min_tokens=int(rng.integers(0, 4)),
            stop_token_ids=tuple(int(i) for i in rng.choice(20, size=rng.integers(0, 3))),
            ignore_eos=bool(rng.random() < 0.3),
            seed=int(rng.integers(0, 2**32)) if rng.random() < 0.5 else None)
    return [one() for _ in range(n)]


def _random_history(rng, S, V):
    counts = rng.integers(0, 4, size=(S, V)) * (rng.random((S, V)) < 0.2)
    return jnp.asarray(counts, jnp.int32), jnp.asarray(rng.random((S, V)) < 0.15)


# ---------------------------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------------------------

BAD_FIELDS = [
    ("temperature", -0.5), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 0), ("top_k", 2.5), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", math.nan),
    ("max_tokens", 0), ("max_tokens", -3),
    ("min_tokens", -1), ("min_tokens", 17),
    ("n", 0),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("presence_penalty", math.nan), ("presence_penalty", math.inf),
    ("frequency_penalty", math.nan), ("frequency_penalty", -math.inf),
    ("logprobs", -1), ("logprobs", 1.5),
    ("seed", 1.5), ("seed", "7"), ("seed", -1), ("seed", 2**32), ("seed", False),
    ("stop_token_ids", [-1]), ("stop_token_ids", "abc"), ("stop_token_ids", [1.0]),
    ("stop", [""]), ("stop", [3]),
    ("ignore_eos", 1),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_bad_field_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
        SamplingParams(**{field: value})


def test_params_defaults_normalisation_and_greedy():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.max_tokens, p.n) == (1.0, -1, 1.0, 0.0,
                                                                                16, 1)
    assert p.seed is None and p.logprobs is None and not p.greedy and not p.uses_penalties
    q = SamplingParams(temperature=0, stop="###", stop_token_ids=[2, np.int64(5)],
                       top_k=np.int32(3), min_tokens=16, logprobs=0, seed=2**32 - 1)
    assert q.greedy and q.stop == ("###",) and q.stop_token_ids == (2, 5)
    assert type(q.temperature) is float and type(q.top_k) is int
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    assert hash(q) == hash(SamplingParams(temperature=0.0, stop=("###",), stop_token_ids=(2, 5),
                                          top_k=3, min_tokens=16, logprobs=0, seed=2**32 - 1))
    assert SamplingParams(presence_penalty=0.5).uses_penalties
    with pytest.raises(TypeError):
        SamplingParams(1.0)  # keyword-only
    with pytest.raises(AttributeError):
        p.temperature = 2.0  # frozen


def test_child_streams():
    p = SamplingParams(n=3, seed=2**32 - 2)
    assert [c.seed for c in map(p.child, range(3))] == [2**32 - 2, 2**32 - 1, 0]
    assert all(p.child(i).n == 1 for i in range(3))
    assert SamplingParams(n=2).child(1).seed is None
    with pytest.raises(ValueError, match="index=3"):
        p.child(3)


def test_build_pads_with_greedy_rows_and_bans_eos_unless_ignored():
    ps = [SamplingParams(temperature=0.7, min_tokens=2, stop_token_ids=(3,), seed=5),
          SamplingParams(min_tokens=1, ignore_eos=True, stop_token_ids=(4, 9)),
          SamplingParams(top_k=5)]
    t = SamplingTensors.build(ps, pad_to=6, request_ids=[10, 11, 2**32 + 12], eos_token_ids=(EOS,))
    assert t.num_rows == 6 and t.greedy.tolist() == [False] * 3 + [True] * 3
    assert t.temperature.tolist()[:4] == pytest.approx([0.7, 1.0, 1.0, 1.0])
    assert t.seeded.tolist() == [True] + [False] * 5 and t.seed[0] == 5
    assert t.request_id.tolist()[:3] == [10, 11, 12]
    assert t.stop_ids.shape == (6, 4)
    assert set(t.stop_ids[0]) - {np.iinfo(np.int32).max} == {3, EOS}
    assert set(t.stop_ids[1]) - {np.iinfo(np.int32).max} == {4, 9}
    assert set(t.stop_ids[2]) == {np.iinfo(np.int32).max}  # min_tokens = 0: nothing banned
    assert not t.needs_history
    assert SamplingTensors.build([SamplingParams()]).stop_ids.shape == (1, 0)
    assert SamplingTensors.build([SamplingParams(frequency_penalty=0.1)]).needs_history
    with pytest.raises(ValueError, match="pad_to=2"):
        SamplingTensors.build(ps, pad_to=2)
    with pytest.raises(ValueError, match="vocab_size=8"):
        SamplingTensors.build([SamplingParams(min_tokens=1, stop_token_ids=(9,))], vocab_size=8)
    with pytest.raises(ValueError, match="request_ids"):
        SamplingTensors.build(ps, request_ids=[1])


def test_sampler_argument_errors():
    logits = jnp.zeros((2, 8))
    t = SamplingTensors.build([SamplingParams(repetition_penalty=1.2)], pad_to=2)
    steps = jnp.zeros(2, jnp.int32)
    counts, mask = jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 8), bool)
    with pytest.raises(ValueError, match="needs_history"):
        sample(logits, t, KEY, steps)
    with pytest.raises(ValueError, match="S=3 rows"):
        sample(jnp.zeros((3, 8)), t, KEY, jnp.zeros(3, jnp.int32), counts, mask)
    with pytest.raises(ValueError, match="steps"):
        sample(logits, t, KEY, steps[:1], counts, mask)
    with pytest.raises(ValueError, match="output_counts and prompt_mask"):
        sample(logits, t, KEY, steps, counts, mask[:, :4])
    with pytest.raises(ValueError, match="implementation"):
        sample(logits, t, KEY, steps, counts, mask, implementation="radix")
    with pytest.raises(ValueError, match="num_logprobs=9"):
        sample(logits, t, KEY, steps, counts, mask, num_logprobs=9)


# ---------------------------------------------------------------------------------------------
# The filtered distribution against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_probs_match_reference(impl):
    rng = np.random.default_rng(0)
    S, V = 16, 64
    for trial in range(3):
        logits = (rng.normal(size=(S, V)) * rng.uniform(0.5, 4)).astype(np.float32)
        params = _random_params(rng, S)
        counts, mask = _random_history(rng, S, V)
        steps = rng.integers(0, 5, size=S).astype(np.int32)
        t = SamplingTensors.build(params, eos_token_ids=(EOS,))
        got = sampling_probs(logits, t, steps, counts, mask, implementation=impl)
        args = (logits, params, steps, np.asarray(counts), np.asarray(mask), (EOS,))
        oracle = sampling_probs_reference(*args)
        low = sampling_probs_reference(*args, dtype=np.float32)
        assert_within_policy(f"probs trial {trial} ({impl})", got, oracle, low,
                             dtype=np.float32, factor=2)
        # The support itself (which tokens survive the filters) must be exactly the oracle's.
        np.testing.assert_array_equal(np.asarray(got) > 0, oracle > 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_at_the_boundary_are_kept(impl):
    logits = np.array([[3.0, 1.0, 3.0, 2.0, 1.0, 0.0, -1.0, 2.0]] * 3, np.float32)
    params = [SamplingParams(top_k=1), SamplingParams(top_k=3),
              SamplingParams(top_p=0.6)]  # mass of the two 3.0s is ~0.6; both kept either way
    got = np.asarray(sampling_probs(logits, SamplingTensors.build(params),
                                    np.zeros(3, np.int32), implementation=impl))
    np.testing.assert_array_equal(got[0] > 0, logits[0] == 3.0)
    np.testing.assert_array_equal(got[1] > 0, logits[1] >= 2.0)
    oracle = sampling_probs_reference(logits, params, [0] * 3)
    np.testing.assert_array_equal(got[2] > 0, oracle[2] > 0)
    assert got[2, 0] == got[2, 2] > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_thresholds_separate_adjacent_floats(impl):
    """Logits one ulp apart are distinct tokens to top_k and top_p (the threshold is exact)."""
    up = np.nextafter(np.float32(1.5), np.float32(np.inf))
    down = np.nextafter(np.float32(-0.25), np.float32(-np.inf))
    logits = np.array([[1.5, up, -0.25, down, -3.0, 0.0, -0.0, 0.5]] * 4, np.float32)
    params = [SamplingParams(top_k=1), SamplingParams(top_k=4), SamplingParams(top_k=6),
              SamplingParams(top_p=0.3)]
    got = np.asarray(sampling_probs(logits, SamplingTensors.build(params),
                                    np.zeros(4, np.int32), implementation=impl)) > 0
    np.testing.assert_array_equal(got[0], np.arange(8) == 1)
    np.testing.assert_array_equal(got[1], logits[1] >= 0)  # +0.0 and -0.0 tie: both kept
    np.testing.assert_array_equal(got[2], logits[2] >= -0.25)  # not the float just below
    np.testing.assert_array_equal(got[3], sampling_probs_reference(logits, params, [0] * 4)[3] > 0)
    assert got[3].sum() == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_top_k_threshold_is_exact_over_the_whole_float_range(impl):
    """Random finite bit patterns (denormals to 3e38, both signs, -inf from bans): the kept set is
    exactly the values >= the k-th largest."""
    rng = np.random.default_rng(6)
    S, V = 16, 64
    bits = rng.integers(0, 2**32, size=(S, V), dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = np.where(np.isfinite(x), x, -np.inf).astype(np.float32)
    x[:, 0] = 1.0  # a finite maximum in every row
    k = rng.integers(1, V + 1, size=S).astype(np.int32)
    keep = FILTER_IMPLEMENTATIONS[impl](jnp.asarray(x), jnp.ones((S, V), bool), jnp.asarray(k),
                                        jnp.ones(S), jnp.asarray(x.max(-1, keepdims=True)))
    kth = np.sort(x, -1)[:, ::-1][np.arange(S), k - 1]
    np.testing.assert_array_equal(keep, x >= kth[:, None])


# ---------------------------------------------------------------------------------------------
# Draws
# ---------------------------------------------------------------------------------------------


def test_greedy_is_exact_argmax_and_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(1)
    S, V = 16, 64
    logits = rng.normal(size=(S, V)).astype(np.float32)
    params = [SamplingParams(temperature=0.0)] * 8 + _random_params(rng, 8, greedy_fraction=0.0)
    t = SamplingTensors.build(params)
    counts, mask = _random_history(rng, S, V)
    steps = np.full(S, 9, np.int32)
    out = sample(logits, t, KEY, steps, counts, mask, num_logprobs=5)
    penalised = np.asarray(penalised_logits(logits, t, steps, counts, mask))
    np.testing.assert_array_equal(out.tokens[:8], np.argmax(penalised[:8], -1))
    assert out.tokens.dtype == jnp.int32 and out.top_token_ids.dtype == jnp.int32
    log_softmax = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float64)
                                                if jax.config.jax_enable_x64 else logits))
    np.testing.assert_allclose(out.logprobs, log_softmax[np.arange(S), out.tokens], atol=1e-5)
    order = np.argsort(-logits, -1, kind="stable")[:, :5]
    np.testing.assert_array_equal(out.top_token_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(log_softmax, order, -1),
                               atol=1e-5)
    assert sample(logits, t, KEY, steps, counts, mask).top_token_ids.shape == (S, 0)
    # An all-greedy batch (the skip path) gives the same argmax.
    all_greedy = SamplingTensors.build([SamplingParams(temperature=0.0)] * S)
    np.testing.assert_array_equal(sample(logits, all_greedy, KEY, steps).tokens,
                                  np.argmax(logits, -1))


@pytest.mark.parametrize("impl", IMPLS)
def test_top_k_1_and_tiny_top_p_are_greedy(impl):
    rng = np.random.default_rng(2)
    S, V = 16, 64
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    params = [SamplingParams(top_k=1, temperature=float(rng.uniform(0.5, 3)), seed=s)
              for s in range(8)]
    params += [SamplingParams(top_p=1e-7, temperature=float(rng.uniform(0.5, 3)))
               for _ in range(8)]
    t = SamplingTensors.build(params)
    for step in range(3):
        out = sample(logits, t, jax.random.key(step), np.full(S, step, np.int32),
                     implementation=impl)
        np.testing.assert_array_equal(out.tokens, np.argmax(logits, -1))


@pytest.mark.parametrize("seeded", [True, False])
def test_empirical_distribution_matches_filtered_probs(seeded):
    """4096 rows of the same request; each row its own stream (a seed, or a request id)."""
    rng = np.random.default_rng(3)
    N, V = 4096, 8
    cases = [SamplingParams(temperature=0.8),
             SamplingParams(temperature=1.3, top_k=5, presence_penalty=0.5),
             SamplingParams(temperature=1.0, top_p=0.7, repetition_penalty=1.3),
             SamplingParams(temperature=2.0, min_p=0.1, frequency_penalty=0.4)]
    base = rng.normal(size=V).astype(np.float32)
    counts = np.broadcast_to(np.array([0, 2, 0, 1, 0, 0, 3, 0], np.int32), (N, V))
    mask = np.broadcast_to(np.arange(V) % 3 == 0, (N, V))
    for p in cases:
        rows = [p.child(0) if not seeded else SamplingParams(**{**vars(p), "seed": i})
                for i in range(N)]
        t = SamplingTensors.build(rows, request_ids=range(N))
        logits = np.broadcast_to(base, (N, V))
        steps = np.full(N, 5, np.int32)
        expected = np.asarray(sampling_probs(logits, t, steps, counts, mask))[0]
        tokens = np.asarray(sample(logits, t, KEY, steps, counts, mask).tokens)
        freq = np.bincount(tokens, minlength=V) / N
        assert np.all(freq[expected == 0] == 0), (p, freq, expected)
        sigma = np.sqrt(expected * (1 - expected) / N)
        z = np.abs(freq - expected) / np.maximum(sigma, 1e-12)
        assert z.max() < 5, (p, freq.round(3), expected.round(3))
        # Chi-square over the support, far in the tail (p ~ 1e-6) so the test is not flaky.
        support = expected > 0
        chi2 = np.sum((freq[support] - expected[support]) ** 2 / expected[support]) * N
        assert chi2 < 40, (p, chi2)


def test_seeded_stream_is_independent_of_batch_row_and_neighbours():
    rng = np.random.default_rng(4)
    V = 64
    request = SamplingParams(temperature=1.1, top_k=30, top_p=0.9, min_p=0.02, seed=987654321)
    row_logits = rng.normal(size=(5, V)).astype(np.float32)  # one row per step

    def tokens_of(batch_size, row, impl, neighbour_seed):
        nrng = np.random.default_rng(neighbour_seed)
        others = _random_params(nrng, batch_size - 1)
        params = others[:row] + [request] + others[row:]
        t = SamplingTensors.build(params, request_ids=list(nrng.integers(0, 99, batch_size)))
        got = []
        for step in range(5):
            logits = nrng.normal(size=(batch_size, V)).astype(np.float32)
            logits[row] = row_logits[step]
            counts, mask = _random_history(nrng, batch_size, V)
            counts = counts.at[row].set(0)
            mask = mask.at[row].set(False)
            steps = nrng.integers(0, 9, batch_size).astype(np.int32)
            steps[row] = step
            out = sample(logits, t, jax.random.key(int(nrng.integers(99))), steps, counts, mask,
                         implementation=impl)
            got.append(int(out.tokens[row]))
        return got

    alone = tokens_of(1, 0, "select", 0)
    for batch_size, row, impl, seed in [(3, 0, "select", 1), (3, 2, "sort", 2),
                                        (8, 5, "select", 3), (8, 1, "sort", 4)]:
        assert tokens_of(batch_size, row, impl, seed) == alone, (batch_size, row, impl)
    # The stream is the documented one: Gumbel noise of fold_in(key(seed), step).
    t = SamplingTensors.build([request])
    for step in range(5):
        probs = np.asarray(sampling_probs(row_logits[step:step + 1], t, np.array([step])))[0]
        filtered = np.where(probs > 0, np.log(np.maximum(probs, 1e-30)), -np.inf)
        noise = jax.random.gumbel(jax.random.fold_in(jax.random.key(request.seed), step), (V,))
        assert alone[step] == int(np.argmax(filtered + np.asarray(noise)))


def test_unseeded_rows_follow_request_id_and_engine_key():
    V, N = 64, 32
    logits = np.zeros((N, V), np.float32)  # uniform: every row draws from 64 tokens
    t = SamplingTensors.build([SamplingParams()] * N, request_ids=range(N))
    steps = np.zeros(N, np.int32)
    a = np.asarray(sample(logits, t, KEY, steps).tokens)
    assert len(set(a.tolist())) > 10  # rows are different streams
    np.testing.assert_array_equal(a, sample(logits, t, KEY, steps).tokens)  # deterministic
    raw = jax.random.key_data(KEY)  # raw key data works too
    np.testing.assert_array_equal(a, sample(logits, t, raw, steps).tokens)
    assert not np.array_equal(a, sample(logits, t, jax.random.key(5), steps).tokens)
    assert not np.array_equal(a, sample(logits, t, KEY, steps + 1).tokens)
    # A request keeps its stream when it moves to another row.
    moved = SamplingTensors.build([SamplingParams()] * N, request_ids=range(N)[::-1])
    np.testing.assert_array_equal(a, np.asarray(sample(logits, moved, KEY, steps).tokens)[::-1])


# ---------------------------------------------------------------------------------------------
# Penalties, min_tokens, history helpers, padding
# ---------------------------------------------------------------------------------------------


def test_penalties_follow_the_formulas():
    logits = np.array([[2.0, -2.0, 2.0, -2.0, 1.0, 0.5]], np.float32)
    counts = np.array([[0, 0, 3, 1, 0, 0]], np.int32)
    prompt = np.array([[True, True, False, False, False, False]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5)
    t = SamplingTensors.build([p])
    got = np.asarray(penalised_logits(logits, t, np.zeros(1, np.int32), counts, prompt))
    # seen (prompt or output): 2 -> 2/2, -2 -> -2*2; output also pays 0.25*count + 0.5.
    expected = [1.0, -4.0, 1.0 - 0.75 - 0.5, -4.0 - 0.25 - 0.5, 1.0, 0.5]
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)
    # Defaults leave the logits bitwise unchanged.
    plain = penalised_logits(logits, SamplingTensors.build([SamplingParams()]),
                             np.zeros(1, np.int32), counts, prompt)
    np.testing.assert_array_equal(plain, logits)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_eos_and_stop_ids(temperature):
    V = 64
    logits = np.zeros((4, V), np.float32)
    logits[:, EOS] = 50.0  # EOS would win every draw
    logits[:, 11] = 45.0  # then the stop id
    params = [SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=(11,), seed=1),
              SamplingParams(temperature=temperature, min_tokens=3, seed=2, ignore_eos=True),
              SamplingParams(temperature=temperature, seed=3),
              SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=(11,), seed=4)]
    t = SamplingTensors.build(params, eos_token_ids=(EOS,), vocab_size=V)
    for step in range(5):
        steps = np.array([step, step, step, 0], np.int32)
        tok = np.asarray(sample(logits, t, KEY, steps).tokens)
        if step < 3:
            assert tok[0] not in (EOS, 11) and tok[3] not in (EOS, 11), tok
        else:
            assert tok[0] == EOS
        assert tok[1] == EOS and tok[2] == EOS  # ignore_eos: EOS not banned; no min_tokens


def test_history_helpers():
    V = 10
    prompts = np.array([[1, 2, 2, -1], [9, -1, -1, -1]], np.int32)
    counts = token_counts(prompts, V)
    np.testing.assert_array_equal(counts[0], np.bincount([1, 2, 2], minlength=V))
    np.testing.assert_array_equal(counts[1], np.bincount([9], minlength=V))
    counts = record_output_tokens(counts, jnp.array([2, 3], jnp.int32), jnp.array([True, False]))
    assert int(counts[0, 2]) == 3 and int(counts[1].sum()) == 1
    counts = record_output_tokens(counts, jnp.array([0, 3], jnp.int32))
    assert int(counts[0, 0]) == 1 and int(counts[1, 3]) == 1


def test_nan_in_a_padding_row_does_not_leak():
    rng = np.random.default_rng(5)
    S, V = 16, 64
    logits = rng.normal(size=(S, V)).astype(np.float32)
    params = _random_params(rng, 10)
    t = SamplingTensors.build(params, pad_to=S)
    counts, mask = _random_history(rng, S, V)
    steps = np.arange(S, dtype=np.int32)
    clean = sample(logits, t, KEY, steps, counts, mask, num_logprobs=2)
    poisoned = logits.copy()
    poisoned[10:] = np.nan
    dirty = sample(poisoned, t, KEY, steps, counts, mask, num_logprobs=2)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(np.asarray(a)[:10], np.asarray(b)[:10])


def test_sampler_passes_under_debug_nans():
    """RELIABILITY 19: bans, min_p = 0 (log 0 = -inf) and masked tokens make no NaN."""
    rng = np.random.default_rng(7)
    S, V = 16, 64
    logits = rng.normal(size=(S, V)).astype(np.float32)
    params = _random_params(rng, S)
    counts, mask = _random_history(rng, S, V)
    t = SamplingTensors.build(params, eos_token_ids=(EOS,))
    with jax.debug_nans(True):
        for impl in IMPLS:
            out = sample(logits, t, KEY, np.zeros(S, np.int32), counts, mask, num_logprobs=2,
                         implementation=impl)
            assert np.isfinite(np.asarray(out.logprobs)).all()


@pytest.mark.parametrize("params", [
    [SamplingParams(temperature=0.0)] * 3,
    [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0)],
    [SamplingParams(temperature=0.9, top_k=5, top_p=0.8), SamplingParams(min_p=0.1)],
], ids=["greedy", "temperature", "filters"])
@pytest.mark.parametrize("implementation", sorted(FILTER_IMPLEMENTATIONS))
def test_the_sampler_compiles_without_device_branches_or_loops(params, implementation):
    """No lax.cond or while loop in the compiled sampler: on the GPU each makes the runtime
    read a device value back on the host, which blocked every engine step's launch until the
    model had run (BENCHMARKS.md, serving)."""
    tensors = SamplingTensors.build(params)
    logits = jnp.zeros((len(params), 64), jnp.float32)
    text = jax.jit(functools.partial(sample, implementation=implementation)).trace(
        logits, tensors, jax.random.key(0), jnp.zeros(len(params), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()  # as on the GPU (threefry is a kernel there)
    for op in ("stablehlo.case", "stablehlo.if", "stablehlo.while"):
        assert op not in text, f"{op} in the sampler ({tensors.filters=})"
    assert tensors.filters == any(p.top_k != -1 or p.top_p < 1 for p in params)
