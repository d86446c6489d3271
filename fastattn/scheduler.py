"""Which tokens the next engine step computes: continuous batching with SplitFuse chunking.

Policy only: pages come from the `BlockManager`, the engine runs the step. Every step has a
token budget; it is filled in this order (SplitFuse / chunked prefill):

    1. running sequences, oldest first, decodes before prefill chunks: a decode costs 1 token;
       a prompt still being prefilled takes a chunk of what is left of the budget;
    2. waiting sequences, first come first served, while the budget, `max_num_seqs` and the
       page pool allow: each is admitted (pages for its whole prompt, cached prefix reused)
       and its first chunk goes into this step.

When a running sequence needs a page and none is free, the newest running sequence is
preempted by recompute (vLLM's default): its pages are freed and it goes back to the front of
the waiting queue with its prompt *and the tokens it generated so far* as the prompt to prefill
again, so its output continues exactly where it stopped.

Static mode (the baseline continuous batching is measured against): waiting sequences are
admitted only when nothing is running, up to `max_num_seqs` at once, and that batch runs until
its last sequence finishes.

Parallel samples (n > 1): the request's first sequence is admitted with slots for its prompt
but the last token; once that prefix is computed, the other n - 1 fork from it (sharing its
pages) and each computes the last prompt token itself, so each samples its own first token and
the shared partial last page is copied on write.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque

from fastattn.block_manager import BlockManager, CopyOp, OutOfPagesError
from fastattn.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sequence of tokens being generated (a request with n > 1 has n of them)."""

    seq_id: int
    request_id: int
    index: int  # which of the request's n samples
    prompt: list[int]
    params: SamplingParams
    arrival_time: float
    num_samples: int = 1  # the request's n (params of a forked sample have n = 1)
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV is in the cache (or being written)
    epoch: int = 0  # preemptions so far: a step launched before one must not commit
    final_pending: bool = False  # its last token is in flight: schedule nothing more
    status: Status = Status.WAITING
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    children: list[Sequence] = dataclasses.field(default_factory=list)  # forked after prefill
    text: str = ""

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (hot path)."""
        n = len(self.prompt)
        if end <= n:
            return self.prompt[start:end]
        if start >= n:
            return self.output[start - n:end - n]
        return self.prompt[start:] + self.output[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Sequence `seq` computes positions [start, start + length) this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """Whether this chunk ends at the sequence's newest token (so a token is sampled)."""
        return self.start + self.length == self.seq.num_tokens


@dataclasses.dataclass
class ScheduledStep:
    chunks: list[Chunk]
    copies: list[CopyOp]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, token_budget: int, max_num_seqs: int,
                 mode: str = "continuous"):
        if mode not in ("continuous", "static"):
            raise ValueError(f"mode={mode!r} must be 'continuous' or 'static'")
        self.blocks = block_manager
        self.token_budget = token_budget
        self.max_num_seqs = max_num_seqs
        self.mode = mode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue ------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out (finished or aborted) and frees its pages."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        budget = self.token_budget
        chunks: list[Chunk] = []
        copies: list[CopyOp] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()

        # 1. Running sequences: decodes first (1 token each, latency-critical), then chunks.
        wants = [(seq, self._target(seq) - seq.num_computed) for seq in self.running]
        wants.sort(key=lambda sw: sw[1] > 1)  # stable: decodes first, each group oldest first
        for seq, want in wants:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or seq.final_pending:
                continue
            length = min(want, budget)
            if length <= 0:
                continue
            ops = self._reserve(seq, length, scheduled, preempted)
            if ops is None:  # seq itself was preempted
                continue
            copies += ops
            chunks.append(Chunk(seq, seq.num_computed, length))
            scheduled.add(seq.seq_id)
            budget -= length

        # 2. Admit waiting sequences (not in a step that had to preempt: pages are short).
        #    Continuous: while this step has budget for their first chunk. Static: a whole
        #    batch at once when nothing runs; chunks beyond the budget run in later steps.
        admit = not preempted and (self.mode == "continuous" or not self.running)
        while admit and self.waiting and len(self.running) < self.max_num_seqs:
            if budget == 0 and self.mode == "continuous":
                break
            seq = self.waiting[0]
            if seq.final_pending:  # finishes when its in-flight token is read
                break
            target = self._admission_tokens(seq)
            if not self.blocks.can_allocate(target):
                break
            self.waiting.popleft()
            allocation = self.blocks.allocate(seq.seq_id, target)
            seq.num_computed = allocation.num_cached_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            length = min(self._target(seq) - seq.num_computed, budget)
            if length > 0:
                chunks.append(Chunk(seq, seq.num_computed, length))
                scheduled.add(seq.seq_id)
                budget -= length
        return ScheduledStep(chunks, copies, preempted)

    def _admission_tokens(self, seq: Sequence) -> list[int]:
        # A request that will fork computes its shared prefix first (all but the last token).
        if seq.num_samples > 1 and seq.index == 0 and not seq.output and len(seq.prompt) > 1:
            return seq.prompt[:-1]
        return seq.tokens

    def _target(self, seq: Sequence) -> int:
        """How many tokens `seq` may have computed once this step is done."""
        if seq.num_samples > 1 and seq.index == 0 and not seq.children and not seq.output \
                and len(seq.prompt) > 1 and self.blocks.num_tokens(seq.seq_id) < seq.num_tokens:
            return len(seq.prompt) - 1  # stop before the last token: the fork point
        return seq.num_tokens

    def _reserve(self, seq, length, scheduled, preempted) -> list[CopyOp] | None:
        """Slots for `length` more tokens of `seq`, preempting the newest unscheduled running
        sequences while pages are short; None if `seq` itself had to go."""
        missing = seq.num_computed + length - self.blocks.num_tokens(seq.seq_id)
        if missing <= 0:
            return []
        while True:
            try:  # raises before changing anything when pages are short
                return self.blocks.append_slots(seq.seq_id, missing)
            except OutOfPagesError:
                victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
                victim = victims[-1] if victims else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.epoch += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the step ---------------------------------------------------------------------

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Children share the parent's computed prefix and run right after it."""
        at = self.running.index(parent) + 1
        for child in children:
            self.blocks.fork(parent.seq_id, child.seq_id)
            child.num_computed = parent.num_computed
            child.status = Status.RUNNING
            child.first_token_time = None
        self.running[at:at] = children
        parent.children = children
