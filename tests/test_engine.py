"""The serving engine end to end on a tiny Llama (CPU): exactness against plain greedy
generation under chunking, static batching, prefix caching, preemption, forks and aborts, and
the engine rows of shared/RELIABILITY.md (10-15, 19)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastattn.engine import Engine, EngineConfig
from fastattn.sampling import SamplingParams
from fastattn.tokenizer import ByteTokenizer
from models import TINY, Llama
from models.generate import greedy_generate

MODEL = Llama(dataclasses.replace(TINY, max_position_embeddings=128))
PARAMS = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 256, n).tolist() for n in (5, 17, 33, 9, 1, 24)]


def _engine(**kw):
    base = dict(page_size=8, num_pages=48, token_budget=32, max_num_seqs=4, max_model_len=64)
    return Engine(MODEL, PARAMS, EngineConfig(**{**base, **kw}))


@pytest.fixture(scope="module")
def expected():
    return [greedy_generate(MODEL, PARAMS, np.array([p]), 10)[0].tolist() for p in PROMPTS]


def _check_idle(engine):
    engine.blocks.check_invariants()
    assert engine.blocks.usage == 0 and not engine.scheduler.has_work()


@pytest.mark.parametrize("mode, overlap, thread", [
    ("continuous", True, True), ("continuous", True, False), ("continuous", False, True),
    ("static", True, True)])
def test_greedy_tokens_equal_plain_generation(mode, overlap, thread, expected):
    engine = _engine(mode=mode, async_scheduling=overlap, dispatch_thread=thread)
    out = engine.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in out] == expected
    assert all(c.finish_reason == "length" for c in out)
    m = engine.metrics()
    assert m["tokens_generated"] == 60 and m["steps"] > 0 and m["ttft_mean_s"] > 0
    _check_idle(engine)


def test_deleting_an_engine_frees_its_page_pool_at_once():
    """No reference cycle may hold the engine (a jitted bound method did: on the GPU the
    garbage collector never freed it, and the next engine found no memory for its pool)."""
    import gc

    def pool_bytes():
        return sum(a.nbytes for a in jax.live_arrays())

    before = pool_bytes()
    engine = _engine(num_pages=512)
    engine.generate(PROMPTS[:2], GREEDY)
    assert pool_bytes() > before
    gc.disable()  # freed by reference counting alone, not by a later collection
    try:
        del engine
        assert pool_bytes() == before
    finally:
        gc.enable()


@pytest.mark.parametrize("split_kv_decode", [False, True])
def test_warmup_compiles_every_step_shape(split_kv_decode, expected):
    """After warmup() no step compiles again: the inputs a real step passes (device-resident
    sampling tensors, every bucket, decode-only and mixed) have the signatures warmup used.
    One model program per bucket (16, 32), plus a decode-only one for the buckets an
    all-decode step fits (16: max_num_seqs is 4) with `split_kv_decode`."""
    engine = _engine(split_kv_decode=split_kv_decode)
    engine.warmup()
    assert engine._step_fn.model._cache_size() == (3 if split_kv_decode else 2)
    assert set(engine.warmup_seconds) == {"compile", "first_runs"}
    compiled = engine._step_fn._cache_size()
    out = engine.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in out] == expected
    assert engine._step_fn._cache_size() == compiled
    _check_idle(engine)


def test_warmup_also_compiles_the_top_k_top_p_sampler():
    """Sampling with top_k / top_p (a static sampler variant) compiles nothing after warmup()
    either: the sampler is its own program, warmed in both variants."""
    engine = _engine()
    engine.warmup()
    compiled = engine._step_fn._cache_size()
    sampled = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=3, max_tokens=6)
    out = engine.generate(PROMPTS, [sampled, GREEDY] * 3)
    assert all(len(c.token_ids) == (6 if i % 2 == 0 else 10) for i, c in enumerate(out))
    assert engine._step_fn._cache_size() == compiled
    _check_idle(engine)


def test_prefix_cache_shares_pages_and_changes_no_token(expected):
    shared = PROMPTS[2][:24]
    prompts = [shared + [7, 8], shared + [9], shared + [7, 8]]
    plain = [greedy_generate(MODEL, PARAMS, np.array([p]), 10)[0].tolist() for p in prompts]
    cached = _engine(enable_prefix_caching=True)
    got = [cached.generate([p], GREEDY)[0].token_ids for p in prompts]  # one after the other
    assert got == plain
    assert cached.metrics()["prefix_cache_hit_rate"] > 0.5
    off = _engine(enable_prefix_caching=False)
    assert [c.token_ids for c in off.generate(prompts, GREEDY)] == plain
    assert off.metrics()["prefix_cache_hit_rate"] == 0
    _check_idle(cached)


def test_pool_exhaustion_preempts_and_every_request_still_matches(expected):
    """RELIABILITY 11: 8 pages for 6 requests -> preemption by recompute, same tokens."""
    engine = _engine(num_pages=8, max_num_seqs=6, token_budget=64)
    out = engine.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in out] == expected
    assert engine.metrics()["preemptions"] > 0
    _check_idle(engine)


def test_free_pages_full_of_nan_never_leak(expected):
    """RELIABILITY 10: a page another request freed (here: NaN everywhere) is never read."""
    engine = _engine()
    engine.kv = [(jnp.full_like(k, jnp.nan), jnp.full_like(v, jnp.nan)) for k, v in engine.kv]
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == expected


def test_seeded_sampling_is_the_same_alone_and_in_any_batch():
    """RELIABILITY 15."""
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8)
    alone = _engine().generate([PROMPTS[1]], params)[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=5), GREEDY, params]
    batch = _engine().generate([PROMPTS[0], PROMPTS[3], PROMPTS[1]], others)
    assert batch[2].token_ids == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=8)
    a, b = _engine().generate([PROMPTS[1]] * 2, unseeded)
    assert a.token_ids != b.token_ids  # unseeded requests get different streams


def test_n_samples_fork_and_copy_on_write(expected):
    """n > 1 shares the prompt's pages (one prefill) and copies the partial last page."""
    engine = _engine()
    greedy = engine.generate([PROMPTS[1]], dataclasses.replace(GREEDY, n=3))[0]
    assert [s.token_ids for s in greedy.samples] == [expected[1]] * 3
    sampled = engine.generate([PROMPTS[1]], SamplingParams(n=3, seed=5, max_tokens=6))[0]
    for i, s in enumerate(sampled.samples):  # child i == the request alone with seed + i
        solo = _engine().generate([PROMPTS[1]], SamplingParams(seed=5 + i, max_tokens=6))[0]
        assert s.token_ids == solo.token_ids
    _check_idle(engine)


def test_abort_some_requests_mid_flight(expected):
    """RELIABILITY 14: the rest finish unchanged and every page returns."""
    engine = _engine()
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    for _ in range(3):
        engine.step()
    engine.abort(ids[1])
    engine.abort(ids[4])
    engine.abort(999)  # unknown: no-op
    done = {}
    while engine.has_unfinished():
        for c in engine.step():
            done[c.request_id] = c
    engine.abort(ids[0])  # finished: no-op
    for i, request_id in enumerate(ids):
        c = done[request_id]
        if i in (1, 4):
            assert c.finish_reason == "abort"
            assert c.token_ids == expected[i][:len(c.token_ids)]
        else:
            assert c.token_ids == expected[i]
    _check_idle(engine)


def test_stream_yields_the_tokens_of_generate(expected):
    engine = _engine()
    got = {}
    for event in engine.stream(PROMPTS[:3], GREEDY):
        got.setdefault(event.request_id, []).append(event.token_id)
    assert [got[k] for k in sorted(got)] == expected[:3]


def test_text_prompts_stop_strings_and_eos():
    tok = ByteTokenizer()
    model = Llama(dataclasses.replace(MODEL.config, vocab_size=tok.vocab_size))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    engine = Engine(model, params, EngineConfig(page_size=8, num_pages=48, max_model_len=64),
                    tokenizer=tok)
    base = engine.generate(["hello"], GREEDY)[0]
    assert base.text == tok.decode(base.token_ids)
    assert len(base.text) >= 4, base.text  # 10 greedy bytes decode to some characters
    stop_text = base.text[2:4]
    cut = engine.generate(["hello"], dataclasses.replace(GREEDY, stop=(stop_text,)))[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[:base.text.index(stop_text)]
    stop_id = base.token_ids[2]
    early = engine.generate(["hello"], dataclasses.replace(GREEDY, stop_token_ids=(stop_id,)))
    assert early[0].token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    assert early[0].finish_reason == "stop"
    # The model's EOS ends a request (kept as its last token) unless ignore_eos.
    eos = base.token_ids[3]
    with_eos = Engine(model, params, EngineConfig(page_size=8, num_pages=48, max_model_len=64),
                      tokenizer=tok, eos_token_ids=(eos,))
    stopped = with_eos.generate(["hello"], GREEDY)[0]
    assert stopped.token_ids == base.token_ids[:base.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "stop"
    ignored = with_eos.generate(["hello"], dataclasses.replace(GREEDY, ignore_eos=True))[0]
    assert ignored.token_ids == base.token_ids and ignored.finish_reason == "length"


def test_logprobs_are_the_raw_model_distribution():
    engine = _engine()
    c = engine.generate([PROMPTS[0]], dataclasses.replace(GREEDY, logprobs=3, max_tokens=2))[0]
    logits = MODEL.apply({"params": PARAMS}, jnp.asarray([PROMPTS[0]]))[0, -1]
    logp = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(c.logprobs[0], logp[c.token_ids[0]], atol=1e-4)
    top = c.samples[0].top_logprobs[0]
    assert list(top) == np.argsort(-logp)[:3].tolist()


@pytest.mark.parametrize("prompt, params, match", [
    ([], GREEDY, "empty"),
    ([1] * 65, GREEDY, "65 tokens, more than max_model_len=64"),
    ([1] * 60, dataclasses.replace(GREEDY, max_tokens=5), "max_tokens=5 exceeds"),
    ([1, 256], GREEDY, "token id 256 is outside"),
    ([1, -1], GREEDY, "token id -1 is outside"),
    ([1, 2], dataclasses.replace(GREEDY, logprobs=50), "logprobs=50"),
    ("text", GREEDY, "needs a tokenizer"),
])
def test_bad_requests_raise_before_anything_is_queued(prompt, params, match):
    """RELIABILITY 12 (SamplingParams' own fields: tests/test_sampling.py)."""
    engine = _engine()
    with pytest.raises(ValueError, match=match):
        engine.generate([PROMPTS[0], prompt], params)
    assert not engine.scheduler.has_work() and not engine.has_unfinished()


@pytest.mark.parametrize("field", ["inference_fusion", "split_kv_decode", "async_scheduling",
                                   "enable_prefix_caching", "dispatch_thread"])
def test_engine_config_switches_must_be_bools(field):
    with pytest.raises(ValueError, match=f"EngineConfig.{field}='yes' must be True or False"):
        EngineConfig(**{field: "yes"})


def test_refuses_to_start_when_one_max_length_request_cannot_fit():
    """RELIABILITY 13."""
    with pytest.raises(ValueError, match=r"needs 8 pages .*max_model_len <= 56"):
        _engine(num_pages=7)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        _engine(max_model_len=4096)


def test_engine_step_passes_under_debug_nans():
    """RELIABILITY 19."""
    engine = _engine()
    with jax.debug_nans(True):
        out = engine.generate(PROMPTS[:2], dataclasses.replace(GREEDY, max_tokens=3))
    assert all(len(c.token_ids) == 3 for c in out)


def test_router_spreads_requests_over_replicas(expected):
    """Data parallel serving: two replicas behind the router give the tokens of one engine."""
    from fastattn.router import Router

    router = Router([_engine(), _engine()])
    out = router.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in out] == expected
    assert [c.request_id for c in out] == list(range(len(PROMPTS)))
    assert all(m["tokens_generated"] > 0 for m in router.metrics())  # both replicas served
    for engine in router.engines:
        _check_idle(engine)
