"""The host-side page pool of the paged KV cache: ref-counted pages, copy-on-write, prefix caching.

Plain Python and numpy: the scheduler calls it between device steps, so no JAX runs here.

`PagedKVCache` holds ``P`` pages of ``page_size`` token slots in every layer. A sequence owns a
*block table*, the ids of its pages in token order; token ``t`` lives in slot
``table[t // page_size] * page_size + t % page_size`` (the slot mapping ``write_kv`` takes).
Pages are ref-counted, so sequences can share them::

    page_size = 4, P = 8

    block tables                           page  refs  state        prefix-cache key
    seq 7: [3, 5, 1]  10 tokens            0     0     free         -
    seq 9: [3, 5, 6]  10 tokens, forked    1     1     seq 7        -  (partial: not hashed)
            ^  ^      from 7 at 9 tokens   2     0     cached free  H(H(H(0, x0-3), x4-7), x8-11)
      shared pages    (its first append    3     2     seqs 7, 9    h3 = H(0, t0-3)
                      copied page 1 to 6)  4     0     free         -
                                           5     2     seqs 7, 9    h5 = H(h3, t4-7)
    free list: deque [0, 4, 7]             6     1     seq 9        -  (copy-on-write of page 1)
    cached free (LRU, oldest first): [2]   7     0     free         -

A page is *free* (ref 0, no key), *referenced* (ref >= 1), or *cached free* (ref 0, but it holds
the KV of a full page registered in the prefix cache: a later prompt with the same prefix revives
it without recomputing; when the free list is empty, the least recently released one is evicted).

Rules that keep sharing safe:

1. Copy-on-write. A shared page is never written. Only a sequence's last page takes new tokens,
   so `append_slots` copies at most one page: when the last page is partial and shared, the
   sequence gets a fresh page and a `CopyOp` the engine runs on device before the step's writes.
   A full shared last page needs no copy: the new tokens start a new page.
2. Only full pages whose every token has been computed (`commit`) are hashed, and each key chains
   its parent's: the same tokens after a different prefix have different KV (attention saw the
   prefix), so they must not match. Keys are SHA-256, not Python's 64-bit ``hash``: a collision
   would silently serve one request's KV to another.
3. Check, then mutate: every method that can fail raises before it changes anything, so after an
   `OutOfPagesError` the scheduler preempts a sequence and retries against an unchanged pool.

A sequence's life, as the engine drives it::

    allocate(s, prompt)      -> Allocation(block_table, num_cached_tokens): slots for the whole
                                prompt, its first num_cached_tokens already in the cache
    slot_mapping(s, a, b)    -> slots of positions [a, b), to write this step
    commit(s, token_ids)     -> after the step: those positions are computed (full pages hashed)
    append_slots(s, 1)       -> before each decode step: a slot for the new token, maybe a CopyOp
    fork(s, c)               -> c shares s's pages (n > 1 sampling, beams); between steps only
    free(s)                  -> finished, aborted, or preempted (recomputed later)

Not thread-safe: one host thread owns it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

ROOT_HASH = bytes(32)  # parent key of a sequence's first page; every parent key is 32 bytes
_MAX_SLOTS = 2**31  # slot ids travel to the device as int32


def page_hash(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Prefix-cache key of one full page: SHA-256 of its parent's key and its token ids.

    Chaining makes the key name the whole prefix up to the end of the page, not only the page.
    """
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


class OutOfPagesError(RuntimeError):
    """Not enough free pages; the block manager is unchanged (preempt a sequence and retry)."""

    def __init__(self, needed: int, available: int, what: str):
        super().__init__(f"{what} needs {needed} free KV page(s), {available} available")
        self.needed = needed
        self.available = available


class InvariantError(RuntimeError):
    """`BlockManager.check_invariants` found corrupted bookkeeping (a bug, never user error)."""


class CopyOp(NamedTuple):
    """Copy page ``src`` to page ``dst`` (every layer, K and V) before the step writes anything."""

    src: int
    dst: int


class Allocation(NamedTuple):
    """What `BlockManager.allocate` gives a new prompt."""

    block_table: list[int]
    num_cached_tokens: int  # leading prompt tokens whose KV is already in the pages: skip them


@dataclasses.dataclass(frozen=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache and how many were found, since creation."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclasses.dataclass
class _Sequence:
    pages: list[int]  # the block table
    num_slots: int  # positions [0, num_slots) have a slot
    token_ids: list[int]  # ids of the computed positions [0, num_computed)
    page_hashes: list[bytes]  # key of each full computed page (empty without prefix caching)

    @property
    def num_computed(self) -> int:
        return len(self.token_ids)


class BlockManager:
    """Hands out the ``num_pages`` pages (ids ``0 .. num_pages - 1``, all usable) of the KV pool.

    Sequences are named by int ids the caller chooses. Misuse raises: an unknown id `KeyError`,
    a bad argument `ValueError`, no page `OutOfPagesError`; none of them changes any state.
    """

    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True):
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        if num_pages * page_size > _MAX_SLOTS:
            raise ValueError(f"{num_pages=} * {page_size=} slots overflow int32 slot ids")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * self.num_pages
        self._num_referenced = 0
        self._free: deque[int] = deque(range(self.num_pages))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU: oldest release first
        self._page_to_hash: dict[int, bytes] = {}
        self._hash_to_page: dict[bytes, int] = {}
        self._seqs: dict[int, _Sequence] = {}
        self._stats = PrefixCacheStats()

    # -- queries ----------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        """Pages a new request can get: free plus cached free (evictable)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free_pages(self) -> int:
        return len(self._cached_free)

    @property
    def usage(self) -> float:
        """Fraction of the pages referenced by some sequence (KV utilisation)."""
        return self._num_referenced / self.num_pages

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self._stats

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def page_key(self, page: int) -> bytes | None:
        """The prefix-cache key registered for ``page``, or None."""
        return self._page_to_hash.get(page)

    def num_tokens(self, seq_id: int) -> int:
        """Positions of ``seq_id`` that have a slot (computed or reserved for this step)."""
        return self._seq(seq_id).num_slots

    def num_computed_tokens(self, seq_id: int) -> int:
        """Positions of ``seq_id`` whose KV is written (cache hits plus everything committed)."""
        return self._seq(seq_id).num_computed

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).pages)

    def block_tables(self, seq_ids: Sequence[int], width: int, *, pad_page: int = 0) -> np.ndarray:
        """int32 ``[len(seq_ids), width]`` block tables, padded with ``pad_page`` (a valid id,
        so a kernel that reads past a table's end reads real memory it then masks out)."""
        if not 0 <= pad_page < self.num_pages:
            raise ValueError(f"pad_page={pad_page} is not a page id in [0, {self.num_pages})")
        out = np.full((len(seq_ids), width), pad_page, np.int32)
        for row, seq_id in enumerate(seq_ids):
            pages = self._seq(seq_id).pages
            if len(pages) > width:
                raise ValueError(f"seq_id={seq_id} has {len(pages)} pages, more than {width=}")
            out[row, :len(pages)] = pages
        return out

    def slot_mapping(self, seq_id: int, start: int, end: int) -> np.ndarray:
        """int32 ``[end - start]`` slots of positions ``[start, end)`` of ``seq_id``."""
        seq = self._seq(seq_id)
        if not 0 <= start <= end <= seq.num_slots:
            raise ValueError(f"positions [{start}, {end}) are outside the {seq.num_slots} slots "
                             f"of seq_id={seq_id}")
        ps = self.page_size
        positions = np.arange(start, end)
        pages = np.asarray(seq.pages[start // ps: -(-end // ps)], np.int64)
        return (pages[positions // ps - start // ps] * ps + positions % ps).astype(np.int32)

    def cached_prefix_len(self, token_ids: Sequence[int]) -> int:
        """How many tokens `allocate(_, token_ids)` would find cached now (no state changes)."""
        return len(self._lookup(token_ids)[0]) * self.page_size

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether `allocate(_, token_ids)` would succeed now (prefix-cache hits included)."""
        return self._allocate_shortfall(token_ids)[0] == 0

    def can_append_slots(self, seq_id: int, num_new_tokens: int = 1) -> bool:
        needed, _ = self._append_needs(self._seq(seq_id), num_new_tokens)
        return needed <= self.num_free_pages

    # -- mutations --------------------------------------------------------------------------

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> Allocation:
        """Slots for every token of a new prompt, reusing cached full pages of its prefix.

        At least the last prompt token is left to compute, even when the whole prompt is cached:
        the engine needs its logits. So ``num_cached_tokens`` is a multiple of ``page_size`` and
        at most ``len(token_ids) - 1``.
        """
        if seq_id in self._seqs:
            raise ValueError(f"seq_id={seq_id} is already allocated")
        if len(token_ids) == 0:
            raise ValueError(f"seq_id={seq_id}: cannot allocate an empty prompt")
        shortfall, hits, hashes, needed, available = self._allocate_shortfall(token_ids)
        if shortfall:
            raise OutOfPagesError(needed, available, f"a {len(token_ids)}-token prompt")
        for page in hits:
            self._acquire(page)
        pages = hits + [self._take_fresh_page() for _ in range(needed)]
        num_cached = len(hits) * self.page_size
        self._seqs[seq_id] = _Sequence(
            pages=pages, num_slots=len(token_ids),
            token_ids=[int(t) for t in token_ids[:num_cached]], page_hashes=hashes)
        if self.enable_prefix_caching:
            self._stats = PrefixCacheStats(queries=self._stats.queries + len(token_ids),
                                           hits=self._stats.hits + num_cached)
        return Allocation(list(pages), num_cached)

    def append_slots(self, seq_id: int, num_new_tokens: int = 1) -> list[CopyOp]:
        """Slots for ``num_new_tokens`` more positions at the end of ``seq_id``.

        Returns the copies to run on device before this step writes (at most one: the sequence's
        partial last page, when it is shared).
        """
        seq = self._seq(seq_id)
        # Hot path (a decode step inside the last page, which this sequence owns alone):
        # nothing to take or copy.
        if (type(num_new_tokens) is int and 0 < num_new_tokens
                and seq.num_slots + num_new_tokens <= len(seq.pages) * self.page_size
                and (seq.num_slots % self.page_size == 0 or self._refs[seq.pages[-1]] == 1)):
            seq.num_slots += num_new_tokens
            return []
        needed, copy = self._append_needs(seq, num_new_tokens)
        if needed > self.num_free_pages:
            raise OutOfPagesError(needed, self.num_free_pages,
                                  f"appending {num_new_tokens} token(s) to seq_id={seq_id}")
        ops = []
        if copy:
            src, dst = seq.pages[-1], self._take_fresh_page()
            seq.pages[-1] = dst
            self._release(src)  # still referenced by the sharers, so it stays intact
            ops.append(CopyOp(src, dst))
        seq.pages.extend(self._take_fresh_page() for _ in range(needed - copy))
        seq.num_slots += num_new_tokens
        return ops

    def commit(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Marks the next ``len(token_ids)`` positions of ``seq_id`` as computed (their KV is
        written), with these token ids; pages this fills are registered in the prefix cache.

        Call it after the device step that wrote them. A page whose key is already registered
        (the same prefix computed twice at once) stays unregistered and is freed normally.
        """
        seq = self._seq(seq_id)
        start, end = seq.num_computed, seq.num_computed + len(token_ids)
        if end > seq.num_slots:
            raise ValueError(f"committing positions [{start}, {end}) of seq_id={seq_id}, but "
                             f"only {seq.num_slots} have slots")
        seq.token_ids.extend(map(int, token_ids))
        ps = self.page_size
        if not self.enable_prefix_caching or end // ps == start // ps:
            return  # no page filled
        for i in range(start // ps, end // ps):  # the pages that this commit fills
            parent = seq.page_hashes[-1] if seq.page_hashes else ROOT_HASH
            key = page_hash(parent, seq.token_ids[i * ps:(i + 1) * ps])
            seq.page_hashes.append(key)
            if key not in self._hash_to_page:
                self._hash_to_page[key] = seq.pages[i]
                self._page_to_hash[seq.pages[i]] = key

    def fork(self, parent_id: int, child_id: int) -> None:
        """``child_id`` shares every page of ``parent_id`` (copy-on-write on the first write).

        Only between steps: the parent's reserved slots must all be committed, so no shared
        page ever has a write pending.
        """
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"fork: child seq_id={child_id} is already allocated")
        if parent.num_computed != parent.num_slots:
            raise ValueError(
                f"fork: seq_id={parent_id} has {parent.num_slots - parent.num_computed} "
                "reserved slot(s) not yet committed; fork between steps")
        for page in parent.pages:  # all referenced already: no free-list changes
            self._refs[page] += 1
        self._seqs[child_id] = dataclasses.replace(
            parent, pages=list(parent.pages), token_ids=list(parent.token_ids),
            page_hashes=list(parent.page_hashes))

    def free(self, seq_id: int) -> None:
        """Releases every page of ``seq_id`` (finished, aborted or preempted).

        Releases the table back to front: the pool appends released cached pages to the LRU
        end, so a prefix's tail is evicted before its head (a head is shared more often, and
        a tail without its head can never be hit again).
        """
        seq = self._seq(seq_id)
        del self._seqs[seq_id]
        for page in reversed(seq.pages):
            self._release(page)

    def reset_prefix_cache(self) -> None:
        """Forgets every prefix-cache key; cached free pages become plain free pages."""
        self._free.extend(self._cached_free)
        self._cached_free.clear()
        self._page_to_hash.clear()
        self._hash_to_page.clear()

    # -- internals --------------------------------------------------------------------------

    def _seq(self, seq_id: int) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown seq_id={seq_id}: never allocated, or already freed") from None

    def _lookup(self, token_ids: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Pages (and keys) of the longest cached prefix of full pages, leaving >= 1 token."""
        hits: list[int] = []
        keys: list[bytes] = []
        if not self.enable_prefix_caching:
            return hits, keys
        ps, key = self.page_size, ROOT_HASH
        for i in range((len(token_ids) - 1) // ps):
            key = page_hash(key, token_ids[i * ps:(i + 1) * ps])
            page = self._hash_to_page.get(key)
            if page is None:
                break
            hits.append(page)
            keys.append(key)
        return hits, keys

    def _allocate_shortfall(self, token_ids: Sequence[int]
                            ) -> tuple[int, list[int], list[bytes], int, int]:
        """(pages missing, cache-hit pages, their keys, fresh pages needed, pages available)."""
        hits, keys = self._lookup(token_ids)
        needed = -(-len(token_ids) // self.page_size) - len(hits)
        revived = sum(self._refs[page] == 0 for page in hits)  # leave the evictable pool
        available = self.num_free_pages - revived
        return max(0, needed - available), hits, keys, needed, available

    def _append_needs(self, seq: _Sequence, num_new_tokens: int) -> tuple[int, bool]:
        """(fresh pages needed, whether the last page is copied first)."""
        if not isinstance(num_new_tokens, (int, np.integer)) or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be an int >= 0, got {num_new_tokens!r}")
        ps = self.page_size
        copy = num_new_tokens > 0 and seq.num_slots % ps != 0 and self._refs[seq.pages[-1]] > 1
        grow = -(-(seq.num_slots + num_new_tokens) // ps) - len(seq.pages)
        return grow + copy, copy

    def _take_fresh_page(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:  # evict the least recently released cached page; its key no longer names it
            page, _ = self._cached_free.popitem(last=False)
            del self._hash_to_page[self._page_to_hash.pop(page)]
        self._refs[page] = 1
        self._num_referenced += 1
        return page

    def _acquire(self, page: int) -> None:
        if self._refs[page] == 0:  # a prefix-cache hit on a cached free page revives it
            del self._cached_free[page]
            self._num_referenced += 1
        self._refs[page] += 1

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._num_referenced -= 1
            if page in self._page_to_hash:
                self._cached_free[page] = None
            else:
                self._free.append(page)

    # -- invariants -------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Recounts everything from the block tables; raises `InvariantError` on the first fault.

        O(pages + tokens held): for tests and debugging, not for every engine step.
        """
        def fail(msg: str) -> None:
            raise InvariantError(msg)

        P, ps = self.num_pages, self.page_size
        if len(self._refs) != P:
            fail(f"{len(self._refs)} ref counts for {P} pages")
        held = [0] * P
        for seq_id, seq in self._seqs.items():
            if len(set(seq.pages)) != len(seq.pages):
                fail(f"seq_id={seq_id} holds a page twice: {seq.pages}")
            if len(seq.pages) != -(-seq.num_slots // ps):
                fail(f"seq_id={seq_id}: {len(seq.pages)} pages for {seq.num_slots} slots")
            if not 0 <= seq.num_computed <= seq.num_slots:
                fail(f"seq_id={seq_id}: {seq.num_computed} computed of {seq.num_slots} slots")
            full = seq.num_computed // ps
            if len(seq.page_hashes) != (full if self.enable_prefix_caching else 0):
                fail(f"seq_id={seq_id}: {len(seq.page_hashes)} page keys, {full} full pages")
            for i, page in enumerate(seq.pages):
                if not 0 <= page < P:
                    fail(f"seq_id={seq_id} holds page {page}, outside [0, {P})")
                held[page] += 1
                key = self._page_to_hash.get(page)
                if i < full and key is not None and key != seq.page_hashes[i]:
                    fail(f"page {page} is cached under another prefix than seq_id={seq_id}'s")
                if i >= full and key is not None:
                    fail(f"page {page} is cached but not full and computed in seq_id={seq_id}")
            has_pending = seq.num_slots > seq.num_computed
            for page in seq.pages[seq.num_computed // ps:] if has_pending else ():
                # the pages this sequence writes next must be its own
                if self._refs[page] != 1:
                    fail(f"page {page} has a pending write of seq_id={seq_id} but "
                         f"{self._refs[page]} references")
        for page in range(P):
            if self._refs[page] < 0:
                fail(f"page {page} has ref count {self._refs[page]}")
            if self._refs[page] != held[page]:
                fail(f"page {page} has ref count {self._refs[page]}, {held[page]} block tables "
                     "hold it")
        free = set(self._free)
        if len(free) != len(self._free):
            fail(f"a page is twice in the free list: {sorted(self._free)}")
        for page in free:
            if self._refs[page]:
                fail(f"page {page} is free and referenced ({self._refs[page]})")
            if page in self._page_to_hash:
                fail(f"page {page} is in the free list but holds a prefix-cache key")
        for page in self._cached_free:
            if self._refs[page]:
                fail(f"page {page} is cached free and referenced ({self._refs[page]})")
            if page not in self._page_to_hash:
                fail(f"page {page} is cached free without a prefix-cache key")
        referenced = sum(r > 0 for r in self._refs)
        if referenced != self._num_referenced:
            fail(f"{referenced} pages referenced, counter says {self._num_referenced}")
        if len(self._free) + len(self._cached_free) + referenced != P:
            fail(f"free {len(self._free)} + cached free {len(self._cached_free)} + referenced "
                 f"{referenced} != {P} pages")
        if len(self._hash_to_page) != len(self._page_to_hash) or any(
                self._page_to_hash.get(page) != key for key, page in self._hash_to_page.items()):
            fail("the prefix-cache maps key -> page and page -> key disagree")
        if self._page_to_hash and not self.enable_prefix_caching:
            fail("prefix-cache keys registered with prefix caching disabled")
        if not 0 <= self._stats.hits <= self._stats.queries:
            fail(f"prefix-cache stats {self._stats}")

    def __repr__(self) -> str:
        return (f"BlockManager(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"sequences={len(self._seqs)}, free={len(self._free)}, "
                f"cached_free={len(self._cached_free)}, referenced={self._num_referenced})")
