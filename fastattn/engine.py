"""The serving engine: continuous batching over a paged KV cache, one jitted step.

    engine = Engine(model, params, EngineConfig(page_size=16, token_budget=512))
    completions = engine.generate(prompts, SamplingParams(temperature=0.8, max_tokens=64))

Each `step()`:
    host    scheduler picks this step's chunks (SplitFuse)  ->  block manager gives slots
            -> small int32 arrays: a `RaggedBatch`, padded to a bucket (T rows, S sequences)
    device  one jitted step (`_StepFns`: the model's program, then the sampler's):
            copy-on-write page copies -> model.paged_step (write K/V into the pages, ragged
            paged attention, logits of each sequence's last row) -> sampler (the KV pages are
            donated: updated in place); launched from a dispatch thread while the main thread
            applies the previous step's tokens and schedules the next
    host    only the sampled tokens (and requested logprobs) come back; stop checks, commits.

Shapes come from a few buckets (T: powers of two up to the token budget; S = min(T,
max_num_seqs)), one attention variant each (the ragged kernel; with `split_kv_decode` a second
for all-decode steps), so the step compiles a handful of times, never per request; `warmup()`
compiles them all up front.

Tensor parallel inside one engine: `Engine(model, params, config, mesh=sharding.make_mesh(
model=4))` splits the weights (Megatron-style) and every KV page's kv heads over "model"; the
step runs under the mesh, so ragged paged attention runs per shard (no communication), and
only the sampled tokens come back (replicated).

The model is any flax module with `config` (vocab_size, num_layers, num_kv_heads, head_size,
max_position_embeddings, dtype) and a `paged_step(batch, kv_pages)` method (models.Llama);
fastattn never imports models.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastattn import sharding
from fastattn.block_manager import BlockManager
from fastattn.kv_cache import PagedKVCache
from fastattn.ragged_batch import RaggedBatch
from fastattn.sampling import SamplingParams, SamplingTensors, sample, token_counts
from fastattn.scheduler import Chunk, Scheduler, Sequence as Seq, Status

MAX_LOGPROBS = 20  # top logprobs a request may ask for (one static size: one compile)
PENDING = -1  # an output token whose step is still in flight


@dataclasses.dataclass
class _InFlight:
    """A launched step: (chunk, the sequence's preemption epoch at launch, index of the output
    token it samples or None) per row, and its device outputs once the launch returns."""

    records: list
    launched: concurrent.futures.Future  # -> (sampler output, padded tokens)
    num_logprobs: int
    needs_history: bool
    pending_rows: dict[int, int]  # seq_id -> the row that samples its newest (pending) token

    @property
    def out(self):
        return self.launched.result()[0]

    @property
    def out_tokens(self) -> jax.Array:  # [max_num_seqs] int32, what the next step feeds from
        return self.launched.result()[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """page_size: tokens per KV page. num_pages: pool size (None: what fits in
    `gpu_memory_utilization` of the device memory left after the weights). token_budget: tokens
    computed per step (SplitFuse). max_model_len: prompt + output limit (None: the model's
    max_position_embeddings). mode: "continuous" or "static" (the baseline). dtype: compute and
    KV dtype (None: the params'). seed: the stream of unseeded requests."""

    page_size: int = 16
    num_pages: int | None = None
    max_num_seqs: int = 256
    token_budget: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    mode: str = "continuous"
    gpu_memory_utilization: float = 0.9
    dtype: str | None = None
    seed: int = 0
    async_scheduling: bool = True  # schedule step n + 1 while step n runs (see Engine.step)
    # The fused kernels of INFERENCE_FUSION on top of the model's own `fusion` (never on a
    # mesh: the kernels are single-device). None: on a GPU only (on a CPU the Pallas kernels
    # would run in interpret mode, while the rest of the step runs XLA); True: everywhere.
    inference_fusion: bool | None = None
    # True: an all-decode step runs the split-KV paged decode kernel (a second compiled shape
    # per bucket). Off: every step runs the ragged kernel, whose decode launch serves decodes.
    # Off by default: on the H100 the split-KV path's step took longer end to end at 256
    # decodes (more launches per layer; BENCHMARKS.md, engine step profile).
    split_kv_decode: bool = False
    # True: each step is launched from a worker thread. Launching a step's ~250 kernels takes
    # the host milliseconds (H100: ~1-2.5 ms at 256 decodes) with the GIL released, so the
    # main thread meanwhile applies the previous step's tokens and schedules the next.
    dispatch_thread: bool = True

    def __post_init__(self):
        for name in ("page_size", "max_num_seqs", "token_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r} must be an int >= 1")
        for name in ("num_pages", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name}={value!r} must be None or an int >= 1")
        if self.mode not in ("continuous", "static"):
            raise ValueError(f"EngineConfig.mode={self.mode!r} must be 'continuous' or 'static'")
        for name in ("inference_fusion", "split_kv_decode", "async_scheduling",
                     "enable_prefix_caching", "dispatch_thread"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "inference_fusion" and value is None):
                raise ValueError(f"EngineConfig.{name}={value!r} must be True or False"
                                 + (" or None" if name == "inference_fusion" else ""))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"EngineConfig.gpu_memory_utilization={self.gpu_memory_utilization}"
                             " must be in (0, 1]")


# The fused kernels EngineConfig.inference_fusion turns on (issue 8): those that win forward at
# the engine's step sizes in experiments/bench_fused.py (chained timing, H100, BENCHMARKS.md):
# the SwiGLU matmul, 1.19x XLA at 512 rows. RoPE inside the KV write lost there (0.81-0.86x
# at 256-512 rows), so it stays off (the model's `fusion` can still ask for it).
INFERENCE_FUSION = dict(swiglu=True)


@dataclasses.dataclass
class Sample:
    """One of a request's n generated sequences."""

    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # "stop" (EOS, stop id or string), "length", "abort"
    logprobs: list[float] | None  # of each sampled token (raw model distribution)
    top_logprobs: list[dict[int, float]] | None


@dataclasses.dataclass
class Completion:
    """A finished request. `token_ids`, `text`, `finish_reason`, `logprobs` are its first
    sample's; `samples` holds all n."""

    request_id: int
    prompt_token_ids: list[int]
    samples: list[Sample]
    ttft: float | None  # seconds from arrival to the first token

    token_ids = property(lambda self: self.samples[0].token_ids)
    text = property(lambda self: self.samples[0].text)
    finish_reason = property(lambda self: self.samples[0].finish_reason)
    logprobs = property(lambda self: self.samples[0].logprobs)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """What `stream` yields: one new token of one sample of one request."""

    request_id: int
    index: int
    token_id: int
    text: str | None  # the sample's text so far (with a tokenizer)
    finish_reason: str | None  # set on the sample's last event


class Engine:
    def __init__(self, model, params, config: EngineConfig = EngineConfig(), *, tokenizer=None,
                 eos_token_ids: Sequence[int] | None = None, mesh=None):
        """mesh: a `fastattn.sharding.make_mesh` mesh for tensor parallelism inside this engine
        (None: one device, as before). The weights are placed by `sharding.shard_params`
        (Megatron-style over "model"), every layer's KV pages split on their kv heads K over
        "model" (`sharding.kv_pages_spec`) and kept so across steps (donated in place), the
        step runs under `sharding.use_mesh(mesh)` so ragged paged attention runs per shard,
        and the sampled tokens come back replicated. "model" must divide the model's heads
        (ValueError). A "data" axis > 1 only replicates the whole engine over it."""
        mc = model.config
        self.mesh = mesh
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = mc.vocab_size
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len} exceeds the "
                             f"model's max_position_embeddings={mc.max_position_embeddings}")
        dtype = jnp.dtype(config.dtype or jax.tree.leaves(params)[0].dtype)
        self.model = type(model)(self._serving_config(mc, dtype, config, mesh))
        self.params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
        if mesh is not None:  # checks the heads divide "model" before anything is allocated
            self.params = sharding.shard_params(self.params, mesh, mc)
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_ids if tokenizer is not None else ()
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)

        self.pages_per_seq = -(-self.max_model_len // config.page_size)
        num_pages = config.num_pages or self._pages_that_fit(mc, dtype)
        self._check_pool(num_pages, mc, dtype)
        shape = (mc.num_kv_heads, num_pages, config.page_size, mc.head_size)
        if mesh is None:
            self.kv = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                       for _ in range(mc.num_layers)]
        else:  # created in place on each device: K / model kv heads of every page each
            pages = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=jax.sharding
                            .NamedSharding(mesh, sharding.kv_pages_spec()))
            self.kv = [(pages(), pages()) for _ in range(mc.num_layers)]
        self.num_pages = num_pages
        self.blocks = BlockManager(num_pages, config.page_size,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, token_budget=config.token_budget,
                                   max_num_seqs=config.max_num_seqs, mode=config.mode)
        self.buckets = _buckets(config.token_budget)
        self._key = jax.random.key_data(jax.random.key(config.seed))
        self._step_fn = _StepFns(self.model, config.max_num_seqs, mesh)
        # Step inputs that live on the device are placed like the step's outputs (replicated
        # on a mesh): the step fed by `_no_tokens` and the one fed by the last step's tokens
        # must have one signature, or each bucket compiles twice.
        self._replicated = None if mesh is None else sharding.replicated(mesh)
        self._no_tokens = jax.device_put(jnp.zeros(config.max_num_seqs, jnp.int32),
                                         self._replicated)
        self._inflight: _InFlight | None = None
        # The thread each step launches from (`dispatch_thread`); started at the first step.
        self._dispatcher: concurrent.futures.ThreadPoolExecutor | None = None
        self.warmup_seconds: dict[str, float] = {}  # warmup()'s phases
        self._sampling_cache: tuple = (None, None)
        self._busy_since: float | None = None
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._requests: dict[int, list[Seq]] = {}
        self._finished: dict[int, Completion] = {}
        self._events: list[TokenEvent] = []  # collected only while a stream() is open
        self._streams = 0
        self._stats = {"steps": 0, "tokens_computed": 0, "tokens_generated": 0,
                       "busy_seconds": 0.0, "ttft": [], "tpot": [], "kv_usage": [], "kv_fill": []}

    # -- memory -----------------------------------------------------------------------------

    @staticmethod
    def _serving_config(mc, dtype, config: EngineConfig, mesh):
        """The model config the engine runs: its compute dtype, and INFERENCE_FUSION where
        `config.inference_fusion` asks for it (None: on a GPU; models with a `fusion` field
        only; the kernels are single-device, so not on a mesh)."""
        mc = dataclasses.replace(mc, dtype=dtype.name)
        fusion = config.inference_fusion
        if fusion is None:
            fusion = jax.default_backend() == "gpu"
        if fusion and mesh is None and hasattr(mc, "fusion"):
            mc = dataclasses.replace(mc, fusion=dataclasses.replace(mc.fusion,
                                                                    **INFERENCE_FUSION))
        return mc

    def _pages_that_fit(self, mc, dtype) -> int:
        """Pages that fit in `gpu_memory_utilization` of the first device's memory left after
        the weights. On a mesh the pages split over "model" (each device holds K / model kv
        heads of every page), so that is per-device free memory x the model axis size (the
        first device of the mesh stands for all). A CPU (no memory limit; every fake device
        shares the host's memory) gets a quarter of the memory available now, at most 4 GiB,
        mesh or not."""
        device = jax.devices()[0] if self.mesh is None else self.mesh.devices.flat[0]
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            free = stats["bytes_limit"] * self.config.gpu_memory_utilization \
                - stats.get("bytes_in_use", 0)
            if self.mesh is not None:
                free = max(free, 0) * sharding.axis_size(self.mesh, sharding.MODEL)
        else:  # a CPU: a quarter of the memory available now, at most 4 GiB
            free = min(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4, 4 << 30)
        return PagedKVCache.num_pages_for_memory(
            bytes_available=max(int(free), 0), num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads, page_size=self.config.page_size,
            head_dim=mc.head_size, dtype=dtype)

    def _check_pool(self, num_pages, mc, dtype) -> None:
        """RELIABILITY 13: refuse to start if one max_model_len request cannot fit."""
        page_bytes = 2 * mc.num_layers * mc.num_kv_heads * self.config.page_size \
            * mc.head_size * dtype.itemsize
        if num_pages < self.pages_per_seq:
            raise ValueError(
                f"the KV pool holds {num_pages} pages of {self.config.page_size} tokens "
                f"({num_pages * page_bytes / 2**20:.1f} MiB), but one request of max_model_len="
                f"{self.max_model_len} needs {self.pages_per_seq} pages "
                f"({self.pages_per_seq * page_bytes / 2**20:.1f} MiB); set EngineConfig."
                f"max_model_len <= {num_pages * self.config.page_size} or give the pool more "
                "memory (num_pages / gpu_memory_utilization)")

    # -- requests ---------------------------------------------------------------------------

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: Engine(..., tokenizer=...)")
            return self.tokenizer.encode(prompt, add_bos=self.tokenizer.bos_id is not None)
        return [int(t) for t in prompt]

    def _validate(self, tokens: list[int], params: SamplingParams, where: str) -> None:
        """RELIABILITY 12: every fault named before anything is queued."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"{where}: sampling must be SamplingParams, got {type(params)}")
        if not tokens:
            raise ValueError(f"{where}: the prompt is empty")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if len(tokens) > self.max_model_len:
            raise ValueError(f"{where}: the prompt has {len(tokens)} tokens, more than "
                             f"max_model_len={self.max_model_len}")
        if len(tokens) + params.max_tokens > self.max_model_len:
            raise ValueError(f"{where}: prompt ({len(tokens)} tokens) + max_tokens="
                             f"{params.max_tokens} exceeds max_model_len={self.max_model_len}")
        if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
            raise ValueError(f"{where}: logprobs={params.logprobs} exceeds {MAX_LOGPROBS}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"{where}: stop={params.stop!r} needs a tokenizer")

    def add_request(self, prompt, sampling: SamplingParams = SamplingParams()) -> int:
        """Queues one request; returns its id."""
        tokens = self._tokenize(prompt)
        self._validate(tokens, sampling, "add_request")
        return self._enqueue(tokens, sampling)

    def _enqueue(self, tokens: list[int], sampling: SamplingParams) -> int:
        request_id = next(self._ids)
        arrival = time.perf_counter()
        seqs = [Seq(seq_id=next(self._seq_ids), request_id=request_id, index=i, prompt=tokens,
                    params=sampling.child(i) if sampling.n > 1 else sampling,
                    arrival_time=arrival, num_samples=sampling.n) for i in range(sampling.n)]
        self._requests[request_id] = seqs
        # n > 1 with a prompt of 2+ tokens: the first sequence prefills, the rest fork from it.
        queued = seqs[:1] if sampling.n > 1 and len(tokens) > 1 else seqs
        for seq in queued:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: int) -> None:
        """Stops a request (its pages return to the pool); unknown or finished ids: no-op."""
        seqs = self._requests.get(request_id)
        if seqs is None:
            return
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[Completion]:
        """Runs one engine step; returns the requests that finished in it.

        With `EngineConfig.async_scheduling` the host schedules and launches step n + 1 before
        it reads step n's tokens, so host work overlaps device work: a decode row of step n + 1
        takes its input token straight from step n's output on device (`feed`). A sequence that
        step n finishes (EOS, stop id) has then computed one token too many in n + 1, which is
        dropped. Penalties need the exact token history on the host, so a step whose rows use
        them waits for the previous one (synchronous).
        """
        if self._inflight is None:
            self._inflight = self._launch(self.scheduler.schedule(), None)
            if self._inflight is None:
                if self._requests and not self._finished:
                    # Never spin: unfinished requests with nothing to run is an engine bug.
                    raise RuntimeError(
                        f"{len(self._requests)} unfinished request(s) but nothing can be "
                        "scheduled (the engine checks at start that one max_model_len request "
                        "fits the pool)")
                return self._pop_finished()
        if self.config.async_scheduling and not self._inflight.needs_history:
            nxt = self._launch(self.scheduler.schedule(), self._inflight)
            self._process(self._inflight)
        else:
            self._process(self._inflight)
            nxt = self._launch(self.scheduler.schedule(), None)
        self._inflight = nxt
        if nxt is None and self._busy_since is not None:
            self._stats["busy_seconds"] += time.perf_counter() - self._busy_since
            self._busy_since = None
        return self._pop_finished()

    def _launch(self, scheduled, prev: _InFlight | None) -> _InFlight | None:
        """Dispatches one step (asynchronously) and advances the host state as if it ran."""
        chunks = scheduled.chunks
        if not chunks:
            return None
        if self._busy_since is None:
            self._busy_since = time.perf_counter()
        T = _bucket(scheduled.num_tokens, self.buckets)
        S = min(T, self.config.max_num_seqs)
        batch, feed, sampling, steps, counts, prompt_mask = self._inputs(chunks, T, S, prev)
        copies = np.full((2, S), [[0], [self.num_pages]], np.int32)  # padding: dropped
        for i, op in enumerate(scheduled.copies):
            copies[:, i] = op
        num_logprobs = MAX_LOGPROBS if any(
            c.seq.params.logprobs is not None for c in chunks) else 0

        def launch():  # on the dispatch thread: steps launch in order, one at a time
            prev_tokens = self._no_tokens if prev is None else prev.out_tokens
            with sharding.use_mesh(self.mesh):  # a mesh context is per thread
                out, padded, self.kv = self._step_fn(
                    self.params, self.kv, batch, sampling, self._key, steps, counts,
                    prompt_mask, copies, prev_tokens, feed, num_logprobs=num_logprobs)
            return out, padded

        if self.config.dispatch_thread:
            if self._dispatcher is None:
                self._dispatcher = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="fastattn-dispatch")
            launched = self._dispatcher.submit(launch)
        else:
            launched = concurrent.futures.Future()
            launched.set_result(launch())
        records, pending_rows = [], {}
        for row, c in enumerate(chunks):
            seq, out_index = c.seq, None
            if c.samples:  # a token comes out of this step: hold its place
                seq.output.append(PENDING)
                out_index = len(seq.output) - 1
                pending_rows[seq.seq_id] = row
                seq.final_pending = len(seq.output) >= seq.params.max_tokens \
                    or seq.num_tokens >= self.max_model_len
            seq.num_computed += c.length
            records.append((c, seq.epoch, out_index))
        self._stats["steps"] += 1
        self._stats["tokens_computed"] += scheduled.num_tokens
        self._stats["kv_usage"].append(self.blocks.usage)
        self._stats["kv_fill"].append(self._kv_fill())
        return _InFlight(records, launched, num_logprobs, sampling.needs_history, pending_rows)

    def _process(self, step: _InFlight) -> None:
        """Reads a launched step's tokens back and applies them: commits, forks, stops."""
        # Python lists: one conversion each, not one numpy scalar per row (a hot path).
        tokens = np.asarray(step.out.tokens).tolist()
        logprobs = np.asarray(step.out.logprobs).tolist()
        top_ids = np.asarray(step.out.top_token_ids) if step.num_logprobs else None
        top_lps = np.asarray(step.out.top_logprobs) if step.num_logprobs else None
        now = time.perf_counter()
        for i, (chunk, epoch, out_index) in enumerate(step.records):
            seq = chunk.seq
            if seq.is_finished:  # aborted, or stopped by an earlier token
                continue
            if out_index is not None:
                seq.output[out_index] = tokens[i]
            if seq.epoch == epoch and seq.status is Status.RUNNING:  # not preempted since
                self.blocks.commit(seq.seq_id,
                                   seq.token_slice(chunk.start, chunk.start + chunk.length))
                if out_index is None and seq.index == 0 and not seq.children \
                        and len(self._requests[seq.request_id]) > 1 \
                        and seq.num_computed == len(seq.prompt) - 1:
                    # The shared prefix is computed: the other samples fork from it.
                    self.scheduler.fork(seq, self._requests[seq.request_id][1:])
            if out_index is None:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.logprobs.append(logprobs[i])
            if seq.params.logprobs:
                k = seq.params.logprobs
                seq.top_logprobs.append({int(t): float(lp) for t, lp in
                                         zip(top_ids[i, :k], top_lps[i, :k])})
            self._stats["tokens_generated"] += 1
            self._after_token(seq, out_index)

    def _after_token(self, seq: Seq, out_index: int) -> None:
        token = seq.output[out_index]
        reason = self._stop_reason(seq, token, out_index + 1)
        if self.tokenizer is not None and (seq.params.stop or reason):
            seq.text = self.tokenizer.decode(seq.output[:out_index + 1])
            for stop in seq.params.stop:
                if stop in seq.text:
                    seq.text = seq.text[:seq.text.index(stop)]
                    reason = "stop"
        if self._streams:  # the text so far is decoded only when someone reads it
            text = None
            if self.tokenizer is not None:
                text = seq.text if (seq.params.stop or reason) else \
                    self.tokenizer.decode(seq.output[:out_index + 1])
            self._events.append(TokenEvent(seq.request_id, seq.index, token, text, reason))
        if reason:
            del seq.output[out_index + 1:]  # tokens launched past the stop
            self.scheduler.remove(seq)
            self._finish(seq, reason)

    def warmup(self) -> float:
        """Compiles every step shape (each T bucket; see `_max_q_lens`) with all-padding
        batches that write and read nothing; returns the seconds it took, and keeps each
        phase's seconds in `warmup_seconds`. Batches whose rows use penalties or min_tokens
        select sampler variants (`SamplingTensors`' static fields) that compile at their first
        use (about a second each: the sampler alone).

        Every program compiles side by side in threads (XLA's compiler releases the GIL; each
        compiled program lands in the jit's cache): the model's step per shape, and after it
        the sampler's plain and top_k / top_p variants for its row count. Then each runs
        once, in turn."""
        start = time.perf_counter()
        steps = [self._warmup_args(T, max_q) for T in self.buckets
                 for max_q in self._max_q_lens(T)]
        # The sampler after each step: plain, and for the first step of each row count S also
        # the variant for rows that use top_k / top_p.
        filtered = SamplingParams(temperature=1.0, top_k=2, top_p=0.5)
        sampler_runs, row_counts = [], set()
        for _, sampling, key, rows, counts, mask, *_ in steps:
            runs = [(sampling, key, rows, counts, mask)]
            if sampling.num_rows not in row_counts:
                row_counts.add(sampling.num_rows)
                runs.append((jax.device_put(SamplingTensors.build(
                    [filtered], pad_to=sampling.num_rows), self._replicated), key, rows, None,
                    None))
            sampler_runs.append(runs)

        def compile_step(i):
            batch, *_, copies, prev, feed = steps[i]
            with sharding.use_mesh(self.mesh):
                lowered = self._step_fn.model.lower(self.params, self.kv, batch, copies, prev,
                                                    feed)
                lowered.compile()
                if len(sampler_runs[i]) > 1:  # the first step of its row count
                    for args in sampler_runs[i]:
                        self._step_fn.sample.lower(lowered.out_info[0], *args,
                                                   num_logprobs=0).compile()

        workers = max(1, min(len(steps), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(compile_step, range(len(steps))))  # re-raises a failed compile here
        compiled = time.perf_counter()
        for (batch, *_, copies, prev, feed), runs in zip(steps, sampler_runs):
            with sharding.use_mesh(self.mesh):
                logits, self.kv = self._step_fn.model(self.params, self.kv, batch, copies,
                                                      prev, feed)
                for args in runs:
                    out = self._step_fn.sample(logits, *args, num_logprobs=0)[0]
        jax.block_until_ready(out.tokens)
        done = time.perf_counter()
        self.warmup_seconds = {"compile": compiled - start, "first_runs": done - compiled}
        return done - start

    def _max_q_lens(self, T: int) -> list[int]:
        """The static max_q_len of every step shape of bucket T: T (the ragged kernel), and 1
        (all decodes: split-KV decode) with `split_kv_decode` where an all-decode step fits (at
        most max_num_seqs rows, so not in larger buckets)."""
        decode_only = self.config.split_kv_decode and \
            T <= _bucket(self.config.max_num_seqs, self.buckets)
        return [1, T] if decode_only and T > 1 else [T]

    def _warmup_args(self, T: int, max_q: int) -> tuple:
        """The step's arguments after (params, kv) for an all-padding batch of bucket T, as
        `_launch` passes them (numpy batch, device-resident sampling tensors)."""
        S = min(T, self.config.max_num_seqs)
        batch = RaggedBatch(
            tokens=np.zeros(T, np.int32), positions=np.zeros(T, np.int32),
            slot_mapping=np.full(T, -1, np.int32),
            block_tables=np.zeros((S, self.pages_per_seq), np.int32),
            context_lens=np.zeros(S, np.int32), query_start=np.zeros(S + 1, np.int32),
            num_seqs=np.int32(0), logits_rows=np.zeros(S, np.int32), max_q_len=max_q)
        sampling = jax.device_put(SamplingTensors.build([], pad_to=S), self._replicated)
        copies = np.full((2, S), [[0], [self.num_pages]], np.int32)
        return (batch, sampling, self._key, np.zeros(S, np.int32), None, None, copies,
                self._no_tokens, np.full(T, -1, np.int32))

    def _inputs(self, chunks: list[Chunk], T: int, S: int, prev: _InFlight | None):
        """The step's host arrays, padded to T rows and S sequences. A token still being
        sampled by the step in flight (`prev`) is fed from its output on device."""
        n = len(chunks)
        tokens: list[int] = []
        fed_rows, fed_from = [], []
        pending_rows = {} if prev is None else prev.pending_rows
        for c in chunks:  # the only per-sequence Python of the inputs: the token ids
            seq, end = c.seq, c.start + c.length
            if seq.output and seq.output[-1] == PENDING:  # only the newest can be pending
                tokens += seq.token_slice(c.start, end - 1)
                tokens.append(0)
                fed_rows.append(len(tokens) - 1)
                fed_from.append(pending_rows[seq.seq_id])
            else:
                tokens += seq.token_slice(c.start, end)
        used = len(tokens)
        tok = np.zeros(T, np.int32)
        tok[:used] = tokens
        feed = np.full(T, -1, np.int32)
        feed[fed_rows] = fed_from
        lengths = np.fromiter((c.length for c in chunks), np.int64, n)
        first = np.fromiter((c.start for c in chunks), np.int64, n)
        ends = np.cumsum(lengths)  # each chunk's end row in the flattened batch
        starts = np.full(S + 1, used, np.int32)
        starts[0] = 0
        starts[1:n + 1] = ends
        ctx = np.zeros(S, np.int32)
        ctx[:n] = first + lengths
        rows = np.zeros(S, np.int32)
        rows[:n] = ends - 1
        tables = np.zeros((S, self.pages_per_seq), np.int32)
        tables[:n] = self.blocks.block_tables([c.seq.seq_id for c in chunks],
                                              self.pages_per_seq)
        # Positions and slots of every row at once: row r of chunk i is position
        # first[i] + (r - chunk start row), held in page tables[i, pos // page_size].
        row_chunk = np.repeat(np.arange(n), lengths)
        pos = np.zeros(T, np.int32)
        pos[:used] = first[row_chunk] + np.arange(used) - (ends - lengths)[row_chunk]
        ps = self.config.page_size
        slots = np.full(T, -1, np.int32)
        slots[:used] = tables[row_chunk, pos[:used] // ps] * ps + pos[:used] % ps
        decode_only = self.config.split_kv_decode and int(lengths.max()) == 1
        batch = RaggedBatch(tokens=tok, positions=pos, slot_mapping=slots, block_tables=tables,
                            context_lens=ctx, query_start=starts, num_seqs=np.int32(n),
                            logits_rows=rows, max_q_len=1 if decode_only else T)
        seqs = [c.seq for c in chunks]
        key = (S, tuple(s.seq_id for s in seqs))
        if self._sampling_cache[0] != key:  # decode steps repeat the batch: build once
            # ... and send once.
            self._sampling_cache = (key, jax.device_put(SamplingTensors.build(
                [s.params for s in seqs], pad_to=S, request_ids=[s.request_id for s in seqs],
                eos_token_ids=self.eos_token_ids, vocab_size=self.vocab_size), self._replicated))
        sampling = self._sampling_cache[1]
        steps = np.zeros(S, np.int32)
        steps[:len(seqs)] = [len(s.output) for s in seqs]
        counts = prompt_mask = None
        if sampling.needs_history:  # penalties: token history of each row, built on device
            width = max(s.num_tokens for s in seqs)
            outputs = np.full((S, width), -1, np.int32)
            prompts = np.full((S, width), -1, np.int32)
            for i, s in enumerate(seqs):
                outputs[i, :len(s.output)] = s.output
                prompts[i, :len(s.prompt)] = s.prompt
            counts = token_counts(jnp.asarray(outputs), self.vocab_size)
            prompt_mask = token_counts(jnp.asarray(prompts), self.vocab_size) > 0
        return batch, feed, sampling, steps, counts, prompt_mask

    def _stop_reason(self, seq: Seq, token: int, num_output: int) -> str | None:
        p = seq.params
        if num_output >= p.min_tokens:
            if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
                return "stop"
        if num_output >= p.max_tokens or len(seq.prompt) + num_output >= self.max_model_len:
            return "length"
        return None

    def _text(self, seq: Seq) -> str | None:
        if self.tokenizer is None:
            return None
        if not seq.params.stop:
            seq.text = self.tokenizer.decode(seq.output)
        return seq.text

    def _finish(self, seq: Seq, reason: str) -> None:
        while seq.output and seq.output[-1] == PENDING:  # aborted with a token in flight
            seq.output.pop()
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()
        if seq.first_token_time is not None and len(seq.output) > 1:
            self._stats["tpot"].append((seq.finish_time - seq.first_token_time)
                                       / (len(seq.output) - 1))
        seqs = self._requests[seq.request_id]
        if all(s.is_finished for s in seqs):
            del self._requests[seq.request_id]
            first = min((s.first_token_time for s in seqs if s.first_token_time), default=None)
            ttft = None if first is None else first - seqs[0].arrival_time
            if ttft is not None:
                self._stats["ttft"].append(ttft)
            self._finished[seq.request_id] = Completion(
                request_id=seq.request_id, prompt_token_ids=list(seqs[0].prompt),
                samples=[Sample(index=s.index, token_ids=list(s.output),
                                text=self._text(s) if self.tokenizer else None,
                                finish_reason=s.finish_reason,
                                logprobs=list(s.logprobs) if s.params.logprobs is not None
                                else None,
                                top_logprobs=list(s.top_logprobs) if s.params.logprobs
                                else None) for s in seqs],
                ttft=ttft)

    def _kv_fill(self) -> float:
        """Live tokens / slots of the pages in use (vLLM's "waste" is 1 minus this); a page
        shared by forks counts once per sharer, so this can overstate a little with n > 1."""
        pages = self.num_pages - self.blocks.num_free_pages
        live = sum(self.blocks.num_tokens(s.seq_id) for s in self.scheduler.running)
        return min(live / (pages * self.config.page_size), 1.0) if pages else 1.0

    def _pop_finished(self) -> list[Completion]:
        done = list(self._finished.values())
        self._finished.clear()
        return done

    # -- front doors ------------------------------------------------------------------------

    def generate(self, prompts, sampling: SamplingParams | Sequence[SamplingParams]
                 = SamplingParams(), *, progress: bool = False) -> list[Completion]:
        """Generates for every prompt (token-id lists or strings); results in prompt order."""
        ids = self._add_all(prompts, sampling)
        results: dict[int, Completion] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while len(results) < len(ids):
            for c in self.step():
                results[c.request_id] = c
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [results[i] for i in ids]

    def stream(self, prompts, sampling: SamplingParams | Sequence[SamplingParams]
               = SamplingParams()) -> Iterator[TokenEvent]:
        """Yields each new token of each request as soon as its step finishes."""
        ids = set(self._add_all(prompts, sampling))
        pending = set(ids)
        self._streams += 1
        try:
            while pending:
                done = self.step()
                events, self._events = self._events, []
                yield from (e for e in events if e.request_id in ids)
                pending -= {c.request_id for c in done}
        finally:
            self._streams -= 1

    def _add_all(self, prompts, sampling) -> list[int]:
        return [self._enqueue(t, p) for t, p in self._prepare(prompts, sampling)]

    def _prepare(self, prompts, sampling) -> list[tuple[list[int], SamplingParams]]:
        """Tokenizes and validates every request (RELIABILITY 12) before any is queued."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            raise ValueError("prompts must be a list of prompts (token-id lists or strings), "
                             "got a single prompt; wrap it in a list")
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) \
            else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        tokens = [self._tokenize(p) for p in prompts]
        for i, (t, p) in enumerate(zip(tokens, params)):
            self._validate(t, p, f"prompts[{i}]")
        return list(zip(tokens, params))

    def metrics(self) -> dict[str, Any]:
        s = self._stats
        mean = lambda xs: float(np.mean(xs)) if xs else None
        return {
            "steps": s["steps"],
            "tokens_computed": s["tokens_computed"],
            "tokens_generated": s["tokens_generated"],
            "output_tokens_per_s": s["tokens_generated"] / s["busy_seconds"]
            if s["busy_seconds"] else 0.0,
            "ttft_mean_s": mean(s["ttft"]),
            "tpot_mean_s": mean(s["tpot"]),
            "kv_usage_mean": mean(s["kv_usage"]),
            "kv_usage_now": self.blocks.usage,
            "kv_fill_mean": mean(s["kv_fill"]),
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": self.blocks.prefix_cache_stats.hit_rate,
            "num_pages": self.num_pages,
        }


class _StepFns:
    """One engine step as two jitted programs, called like one function:

        model   (params, kv, batch, copies, prev_tokens, feed) -> (logits [S, V], kv)
                feeds the previous step's tokens, copies pages (copy-on-write), runs the
                model's paged step; the pages are donated (updated in place).
        sample  (logits, sampling, key, steps, counts, prompt_mask) -> (out, padded tokens)

    Two programs, not one, because the sampler has variants (`SamplingTensors`' static
    fields: filters, penalties, min_tokens bans) and a variant of a small sampler compiles in
    about a second, where one of the whole step recompiles the model (seconds per shape on a
    GPU). Module-level functions, not bound methods: a jitted bound method holds the engine,
    the engine holds the jitted function, and on the GPU (jax 0.11) that cycle kept a deleted
    engine's whole page pool allocated (57 GB), so the next engine found no room.
    On a mesh the logits and tokens come back replicated and the pages stay K-split (so the
    donated buffers are reused in place); call under `sharding.use_mesh(mesh)`."""

    def __init__(self, model, max_num_seqs: int, mesh):
        kv_spec = None if mesh is None else jax.sharding.NamedSharding(
            mesh, sharding.kv_pages_spec())
        replicated = None if mesh is None else sharding.replicated(mesh)
        model_out = {} if mesh is None else {"out_shardings": (replicated, kv_spec)}
        sample_out = {} if mesh is None else {"out_shardings": (replicated, replicated)}
        self.model = jax.jit(functools.partial(_model_step, model), donate_argnums=1,
                             **model_out)
        self.sample = jax.jit(functools.partial(_sample_step, max_num_seqs),
                              static_argnames=("num_logprobs",), **sample_out)

    def __call__(self, params, kv, batch, sampling, key, steps, counts, prompt_mask, copies,
                 prev_tokens, feed, *, num_logprobs):
        logits, kv = self.model(params, kv, batch, copies, prev_tokens, feed)
        out, padded = self.sample(logits, sampling, key, steps, counts, prompt_mask,
                                  num_logprobs=num_logprobs)
        return out, padded, kv

    def lower(self, params, kv, batch, sampling, key, steps, counts, prompt_mask, copies,
              prev_tokens, feed, *, num_logprobs, **lowering):
        """(model, sampler) lowered for these arguments (`lowering`: e.g. lowering_platforms;
        the sampler's logits are the model's, abstractly)."""
        model = self.model.trace(params, kv, batch, copies, prev_tokens, feed)
        logits, _ = jax.eval_shape(self.model, params, kv, batch, copies, prev_tokens, feed)
        sampler = self.sample.trace(logits, sampling, key, steps, counts, prompt_mask,
                                    num_logprobs=num_logprobs)
        return model.lower(**lowering), sampler.lower(**lowering)

    def _cache_size(self) -> int:
        """Compiled variants of both programs (a jitted function's own count)."""
        return self.model._cache_size() + self.sample._cache_size()


def _model_step(model, params, kv, batch, copies, prev_tokens, feed):
    tokens = jnp.where(feed >= 0, prev_tokens[jnp.maximum(feed, 0)], batch.tokens)
    batch = batch.replace(tokens=tokens)
    src, dst = copies[0], copies[1]
    kv = [(k.at[:, dst].set(k[:, src], mode="drop"), v.at[:, dst].set(v[:, src], mode="drop"))
          for k, v in kv]  # copy-on-write before any write of this step
    return model.apply({"params": params}, batch, kv, method=type(model).paged_step)


def _sample_step(max_num_seqs, logits, sampling, key, steps, counts, prompt_mask,
                 num_logprobs):
    out = sample(logits, sampling, key, steps, counts, prompt_mask, num_logprobs=num_logprobs)
    # The next step reads its fed tokens from here: one fixed shape for every bucket.
    padded = jnp.zeros(max_num_seqs, jnp.int32).at[:out.tokens.shape[0]].set(out.tokens)
    return out, padded


def _buckets(token_budget: int) -> list[int]:
    sizes = [2 ** i for i in range(4, max(4, math.ceil(math.log2(token_budget))) + 1)]
    return sorted({s for s in sizes if s < token_budget} | {token_budget})


def _bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise AssertionError(f"{n} exceeds the largest bucket {buckets[-1]}")
