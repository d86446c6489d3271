"""The block manager (RELIABILITY.md 7-10): invariants under random workloads, loud misuse,
copy-on-write, prefix caching. Pure host code: no JAX, runs in a few seconds.

The random workload drives a simulated device: a KV pool of one int per slot, where the "KV" of
position t of a sequence is a chained hash of its tokens 0..t (attention sees the whole prefix).
After every operation, every computed position of every sequence must read its own KV through
its slot mapping: a page shared, revived from the prefix cache, or reused after eviction with the
wrong content shows up as a mismatch.
"""

import collections
import copy

import numpy as np
import pytest

from fastattn.block_manager import (
    ROOT_HASH, BlockManager, CopyOp, InvariantError, OutOfPagesError, page_hash)


def snapshot(bm):
    """All of the manager's state, for "unchanged after an error" checks."""
    return copy.deepcopy(vars(bm))


def prefill(bm, seq_id, token_ids):
    """Allocates a prompt and commits all of it, as the engine does after its prefill steps."""
    table, cached = bm.allocate(seq_id, token_ids)
    bm.commit(seq_id, token_ids[cached:])
    return table, cached


def kv_ids(token_ids, parent=0):
    """The simulated KV of each position: a hash of the token prefix ending there."""
    out = []
    for t in token_ids:
        parent = hash((parent, int(t)))
        out.append(parent)
    return out


# -- construction, tables, slot mapping -----------------------------------------------------


@pytest.mark.parametrize("num_pages, page_size", [(0, 4), (4, 0), (-1, 4), (4.0, 4), (True, 4),
                                                  (2**30, 4)])
def test_constructor_rejects_bad_sizes(num_pages, page_size):
    with pytest.raises(ValueError):
        BlockManager(num_pages, page_size)


def test_allocate_gives_distinct_pages_and_slot_mapping_addresses_them():
    bm = BlockManager(16, 4)
    table_a, cached_a = bm.allocate(1, list(range(10)))
    table_b, cached_b = bm.allocate(2, list(range(100, 105)))
    assert (cached_a, cached_b) == (0, 0)
    assert len(table_a) == 3 and len(table_b) == 2
    assert len(set(table_a) | set(table_b)) == 5
    assert bm.block_table(1) == table_a and bm.num_tokens(1) == 10
    assert bm.num_computed_tokens(1) == 0
    expected = [table_a[t // 4] * 4 + t % 4 for t in range(10)]
    np.testing.assert_array_equal(bm.slot_mapping(1, 0, 10), expected)
    np.testing.assert_array_equal(bm.slot_mapping(1, 3, 9), expected[3:9])
    np.testing.assert_array_equal(bm.slot_mapping(1, 8, 8), [])
    assert bm.slot_mapping(1, 0, 10).dtype == np.int32
    for bad in [(-1, 2), (5, 4), (0, 11)]:
        with pytest.raises(ValueError, match="outside"):
            bm.slot_mapping(1, *bad)
    tables = bm.block_tables([2, 1], width=4, pad_page=15)
    np.testing.assert_array_equal(tables, [table_b + [15, 15], table_a + [15]])
    assert tables.dtype == np.int32
    with pytest.raises(ValueError, match="width"):
        bm.block_tables([1], width=2)
    with pytest.raises(ValueError, match="pad_page"):
        bm.block_tables([1], width=4, pad_page=16)
    assert bm.usage == 5 / 16 and bm.num_free_pages == 11
    bm.check_invariants()


def test_append_slots_extends_the_last_page_then_adds_pages():
    bm = BlockManager(8, 4)
    prefill(bm, 1, [1, 2, 3, 4, 5])
    table = bm.block_table(1)
    assert bm.append_slots(1, 3) == []  # fills the partial page
    assert bm.block_table(1) == table and bm.num_tokens(1) == 8
    assert bm.append_slots(1, 1) == []
    assert len(bm.block_table(1)) == 3 and bm.block_table(1)[:2] == table
    assert bm.append_slots(1, 0) == [] and bm.num_tokens(1) == 9
    slots = bm.slot_mapping(1, 8, 9)
    assert slots[0] == bm.block_table(1)[2] * 4
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.append_slots(1, -1)
    bm.check_invariants()


def test_commit_past_the_reserved_slots_raises_and_changes_nothing():
    bm = BlockManager(8, 4)
    bm.allocate(1, [1, 2, 3])
    before = snapshot(bm)
    with pytest.raises(ValueError, match="only 3 have slots"):
        bm.commit(1, [1, 2, 3, 4])
    assert snapshot(bm) == before


# -- RELIABILITY 8: misuse is loud, out of pages changes nothing ----------------------------


def test_double_free_raises_and_changes_nothing():
    bm = BlockManager(8, 4)
    prefill(bm, 1, list(range(6)))
    bm.free(1)
    before = snapshot(bm)
    with pytest.raises(KeyError, match="seq_id=1"):
        bm.free(1)
    assert snapshot(bm) == before
    assert bm.num_free_pages == 8 and bm.usage == 0.0
    bm.check_invariants()


@pytest.mark.parametrize("call", [
    lambda bm: bm.free(9), lambda bm: bm.append_slots(9, 1), lambda bm: bm.commit(9, [1]),
    lambda bm: bm.slot_mapping(9, 0, 1), lambda bm: bm.block_table(9), lambda bm: bm.fork(9, 10),
    lambda bm: bm.num_tokens(9), lambda bm: bm.block_tables([1, 9], width=4),
])
def test_unknown_seq_id_raises_key_error(call):
    bm = BlockManager(8, 4)
    bm.allocate(1, [1, 2])
    before = snapshot(bm)
    with pytest.raises(KeyError, match="seq_id=9"):
        call(bm)
    assert snapshot(bm) == before


def test_bad_allocate_and_fork_calls_raise_value_error():
    bm = BlockManager(8, 4)
    prefill(bm, 1, [1, 2, 3])
    bm.allocate(2, [1, 2, 3])
    before = snapshot(bm)
    for call, match in [(lambda: bm.allocate(1, [5]), "already allocated"),
                        (lambda: bm.allocate(3, []), "empty prompt"),
                        (lambda: bm.fork(1, 2), "already allocated"),
                        (lambda: bm.fork(2, 3), "not yet committed")]:
        with pytest.raises(ValueError, match=match):
            call()
        assert snapshot(bm) == before


def test_out_of_pages_raises_typed_error_and_changes_nothing():
    bm = BlockManager(4, 4)
    prefill(bm, 1, list(range(9)))  # 3 pages, the last partial
    bm.fork(1, 2)
    before = snapshot(bm)
    assert not bm.can_allocate(list(range(100, 105)))
    with pytest.raises(OutOfPagesError) as err:
        bm.allocate(3, list(range(100, 105)))  # needs 2 pages, 1 free
    assert isinstance(err.value, RuntimeError)
    assert (err.value.needed, err.value.available) == (2, 1)
    assert snapshot(bm) == before
    with pytest.raises(OutOfPagesError):
        bm.append_slots(2, 8)  # a copy of the shared partial page + 2 pages
    assert snapshot(bm) == before
    assert bm.can_append_slots(2, 3) and not bm.can_append_slots(2, 4)
    assert bm.append_slots(2, 3) == [CopyOp(bm.block_table(1)[2], bm.block_table(2)[2])]
    assert bm.num_free_pages == 0
    before = snapshot(bm)
    with pytest.raises(OutOfPagesError):
        bm.append_slots(1, 4)
    assert snapshot(bm) == before
    bm.check_invariants()


def test_prompt_longer_than_the_pool_is_refused_and_changes_nothing():
    bm = BlockManager(2, 4)
    before = snapshot(bm)
    with pytest.raises(OutOfPagesError, match="3 free KV page"):
        bm.allocate(1, list(range(9)))
    assert snapshot(bm) == before


# -- RELIABILITY 9: fork and copy-on-write ---------------------------------------------------


def test_fork_then_append_copies_a_shared_partial_last_page_once():
    bm = BlockManager(8, 4)
    prefill(bm, 1, list(range(10)))  # pages [a, b, c], c holds 2 tokens
    parent = bm.block_table(1)
    bm.fork(1, 2)
    assert bm.block_table(2) == parent and bm.num_tokens(2) == 10
    assert [bm.ref_count(p) for p in parent] == [2, 2, 2]

    ops = bm.append_slots(2, 1)
    child = bm.block_table(2)
    assert ops == [CopyOp(src=parent[2], dst=child[2])]
    assert child[:2] == parent[:2] and child[2] not in parent
    assert bm.block_table(1) == parent  # the parent's pages are unchanged
    assert [bm.ref_count(p) for p in parent] == [2, 2, 1]
    assert bm.append_slots(1, 1) == []  # the parent's last page is its own again
    assert bm.block_table(1) == parent
    assert bm.append_slots(2, 1) == []
    bm.check_invariants()


def test_fork_then_append_after_a_full_last_page_needs_no_copy():
    bm = BlockManager(8, 4)
    prefill(bm, 1, list(range(8)))  # two full pages
    parent = bm.block_table(1)
    bm.fork(1, 2)
    assert bm.append_slots(2, 1) == []
    assert bm.block_table(2)[:2] == parent and len(bm.block_table(2)) == 3
    assert bm.append_slots(1, 5) == []
    assert bm.block_table(1)[:2] == parent
    assert set(bm.block_table(1)[2:]).isdisjoint(bm.block_table(2))
    assert [bm.ref_count(p) for p in parent] == [2, 2]
    bm.check_invariants()


def test_n_samples_share_a_partial_page_and_all_but_the_last_writer_copy_it():
    bm = BlockManager(16, 4)
    prefill(bm, 0, list(range(6)))
    for child in (1, 2, 3):
        bm.fork(0, child)
    last = bm.block_table(0)[1]
    assert bm.ref_count(last) == 4
    copies = [bm.append_slots(s, 1) for s in (2, 0, 3, 1)]
    assert [len(ops) for ops in copies] == [1, 1, 1, 0]
    assert all(op.src == last for ops in copies for op in ops)
    assert bm.block_table(1)[1] == last and bm.ref_count(last) == 1
    tails = {bm.block_table(s)[1] for s in range(4)}
    assert len(tails) == 4
    bm.check_invariants()
    for s in range(4):
        bm.free(s)
    assert bm.num_free_pages == 16 and bm.usage == 0.0
    bm.check_invariants()


# -- RELIABILITY 10: prefix cache -----------------------------------------------------------


def test_only_full_computed_pages_are_hashed_with_chained_keys():
    bm = BlockManager(8, 4)
    tokens = list(range(10))
    table, _ = bm.allocate(1, tokens)
    bm.commit(1, tokens[:6])  # page 0 full, page 1 half computed
    k0 = page_hash(ROOT_HASH, tokens[:4])
    assert [bm.page_key(p) for p in table] == [k0, None, None]
    bm.commit(1, tokens[6:])
    k1 = page_hash(k0, tokens[4:8])
    assert [bm.page_key(p) for p in table] == [k0, k1, None]  # page 2 holds 2 tokens
    assert k1 != page_hash(ROOT_HASH, tokens[4:8])  # same page tokens, another prefix
    bm.check_invariants()


def test_identical_prompts_share_pages_and_hits_are_counted():
    bm = BlockManager(16, 4)
    prompt = list(range(10))
    table_a, cached_a = prefill(bm, 1, prompt)
    assert cached_a == 0
    assert bm.cached_prefix_len(prompt) == 8 and bm.can_allocate(prompt)
    table_b, cached_b = bm.allocate(2, prompt)
    assert cached_b == 8 and bm.num_computed_tokens(2) == 8
    assert table_b[:2] == table_a[:2] and table_b[2] != table_a[2]
    assert bm.ref_count(table_a[0]) == 2
    stats = bm.prefix_cache_stats
    assert (stats.queries, stats.hits) == (20, 8) and stats.hit_rate == 8 / 20
    np.testing.assert_array_equal(bm.slot_mapping(2, 0, 8), bm.slot_mapping(1, 0, 8))
    bm.check_invariants()


@pytest.mark.parametrize("length, expected", [(8, 4), (9, 8), (4, 0), (5, 4), (1, 0)])
def test_a_fully_cached_prompt_still_computes_its_last_token(length, expected):
    bm = BlockManager(16, 4)
    prompt = list(range(length))
    prefill(bm, 1, prompt)
    _, cached = bm.allocate(2, prompt)
    assert cached == expected  # <= length - 1, a whole number of pages


def test_same_page_tokens_after_another_prefix_do_not_hit():
    bm = BlockManager(16, 4)
    x, y, z = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    prefill(bm, 1, x + y + [9])
    assert bm.cached_prefix_len(z + y + [9]) == 0
    assert bm.cached_prefix_len(x + z + [9]) == 4
    assert bm.cached_prefix_len(x + y + [5]) == 8
    assert bm.cached_prefix_len(y + y + [9]) == 0


def test_a_prefix_is_only_a_hit_once_its_kv_is_committed():
    bm = BlockManager(16, 4)
    prompt = list(range(9))
    bm.allocate(1, prompt)
    bm.commit(1, prompt[:3])
    assert bm.allocate(2, prompt).num_cached_tokens == 0  # page 0 not yet written
    bm.commit(1, prompt[3:])
    bm.commit(2, prompt)  # the same prefix computed twice: only seq 1's pages are registered
    assert all(bm.page_key(p) is None for p in bm.block_table(2))
    table_c, cached_c = bm.allocate(3, prompt)
    assert cached_c == 8 and table_c[:2] == bm.block_table(1)[:2]
    bm.check_invariants()
    for s in (1, 2, 3):
        bm.free(s)
    assert bm.num_cached_free_pages == 2 and bm.num_free_pages == 16
    bm.check_invariants()


def test_freed_cached_pages_are_revived_by_a_later_prompt():
    bm = BlockManager(4, 4)
    prompt = list(range(9))
    table, _ = prefill(bm, 1, prompt)
    bm.free(1)
    assert bm.num_free_pages == 4 and bm.num_cached_free_pages == 2 and bm.usage == 0.0
    again, cached = bm.allocate(2, prompt)
    assert cached == 8 and again[:2] == table[:2]
    assert bm.num_cached_free_pages == 0 and bm.usage == 3 / 4
    bm.check_invariants()


def test_eviction_takes_plain_free_pages_first_then_least_recently_released():
    bm = BlockManager(4, 4)
    a, b, c = [1] * 4 + [0], [2] * 4 + [0], [3] * 4 + [0]
    prefill(bm, 1, a)
    prefill(bm, 2, b)
    bm.free(1)  # a's full page is released before b's: a is the least recently used
    bm.free(2)
    assert bm.num_cached_free_pages == 2
    prefill(bm, 3, c)  # two plain free pages: no eviction
    assert bm.cached_prefix_len(a) == 4 and bm.cached_prefix_len(b) == 4
    bm.append_slots(3, 4)  # one more page: evicts a's
    assert bm.cached_prefix_len(a) == 0 and bm.cached_prefix_len(b) == 4
    bm.append_slots(3, 4)
    assert bm.cached_prefix_len(b) == 0 and bm.num_free_pages == 0
    bm.check_invariants()


def test_a_freed_and_reused_page_is_never_a_hit_for_its_old_content():
    bm = BlockManager(2, 4)
    old, new = [7] * 4 + [0], [8] * 4 + [0]
    table_old, _ = prefill(bm, 1, old)
    bm.free(1)
    table_new, cached = prefill(bm, 2, new)  # needs both pages: evicts the cached one
    assert cached == 0 and table_old[0] in table_new
    assert bm.page_key(table_new[0]) == page_hash(ROOT_HASH, new[:4])
    assert bm.cached_prefix_len(old) == 0
    bm.free(2)
    _, cached = bm.allocate(3, old)
    assert cached == 0
    bm.check_invariants()


def test_tail_pages_are_evicted_before_their_heads():
    bm = BlockManager(4, 2)
    prompt = [1, 2, 3, 4, 5, 6, 0]  # three full pages and a partial one
    prefill(bm, 1, prompt)
    bm.free(1)
    bm.allocate(2, [9, 9])  # the partial page's plain free page
    bm.append_slots(2, 2)  # evicts the tail [5, 6], keeping the prefix [1, 2, 3, 4]
    assert bm.cached_prefix_len(prompt) == 4


def test_prefix_caching_disabled_shares_nothing():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    prompt = list(range(9))
    table_a, _ = prefill(bm, 1, prompt)
    table_b, cached = bm.allocate(2, prompt)
    assert cached == 0 and set(table_a).isdisjoint(table_b)
    assert all(bm.page_key(p) is None for p in table_a)
    assert bm.prefix_cache_stats.queries == 0
    bm.free(1)
    assert bm.num_cached_free_pages == 0
    bm.check_invariants()


def test_reset_prefix_cache_forgets_every_key():
    bm = BlockManager(8, 4)
    prompt = list(range(9))
    prefill(bm, 1, prompt)
    prefill(bm, 2, [5] * 9)
    bm.free(2)
    bm.reset_prefix_cache()
    assert bm.num_cached_free_pages == 0 and bm.num_free_pages == 5
    assert bm.cached_prefix_len(prompt) == 0
    bm.check_invariants()
    bm.free(1)
    assert bm.num_free_pages == 8
    bm.check_invariants()


# -- the invariant checker catches corruption ------------------------------------------------


@pytest.mark.parametrize("corrupt, match", [
    (lambda bm: bm._refs.__setitem__(bm.block_table(1)[0], 3), "block tables hold it"),
    (lambda bm: bm._refs.__setitem__(bm._free[0], -1), "ref count -1"),
    (lambda bm: bm._free.append(bm._free[0]), "twice in the free list"),
    (lambda bm: bm._free.append(bm.block_table(1)[0]), "free and referenced"),
    (lambda bm: bm._free.popleft(), r"!= 8 pages"),
    (lambda bm: bm._seqs[1].pages.append(bm._seqs[1].pages[0]), "holds a page twice"),
    (lambda bm: bm._hash_to_page.__setitem__(b"x" * 32, bm.block_table(1)[0]), "disagree"),
    (lambda bm: bm._seqs[2].page_hashes.__setitem__(0, b"x" * 32), "another prefix"),
    (lambda bm: bm._seqs[3].pages.__setitem__(0, bm.block_table(1)[1]), "pending write"),
])
def test_check_invariants_detects_corruption(corrupt, match):
    bm = BlockManager(8, 4)
    prefill(bm, 1, list(range(6)))
    bm.fork(1, 2)
    bm.allocate(3, [9, 9])
    bm.check_invariants()
    corrupt(bm)
    with pytest.raises(InvariantError, match=match):
        bm.check_invariants()


# -- RELIABILITY 7: random workloads against a simulated device ------------------------------


class Simulation:
    """An engine's use of the block manager, with a KV pool of one int per slot."""

    def __init__(self, rng, num_pages, page_size, enable_prefix_caching):
        self.rng = rng
        self.bm = BlockManager(num_pages, page_size, enable_prefix_caching=enable_prefix_caching)
        self.kv = np.full(num_pages * page_size, -1, np.int64)  # garbage until written
        self.tokens = {}  # seq_id -> every token id with a slot
        self.next_id = 0
        self.freed = []
        vocab = 3  # small: identical pages at different prefixes are common
        self.prefixes = [list(rng.integers(0, vocab, rng.integers(0, 3 * page_size + 1)))
                         for _ in range(3)]
        self.vocab = vocab
        self.counts = collections.Counter()

    def ids(self, seq_id):
        return np.array(kv_ids(self.tokens[seq_id]), np.int64)

    def write(self, seq_id, start, end):
        """The device step: computes positions [start, end) and writes their KV."""
        self.kv[self.bm.slot_mapping(seq_id, start, end)] = self.ids(seq_id)[start:end]
        self.bm.commit(seq_id, self.tokens[seq_id][start:end])

    def copy(self, ops):
        ps = self.bm.page_size
        for src, dst in ops:
            self.kv[dst * ps:(dst + 1) * ps] = self.kv[src * ps:(src + 1) * ps]

    def verify(self):
        self.bm.check_invariants()
        for seq_id, tokens in self.tokens.items():
            n = self.bm.num_computed_tokens(seq_id)
            assert self.bm.num_tokens(seq_id) == len(tokens)
            np.testing.assert_array_equal(self.kv[self.bm.slot_mapping(seq_id, 0, n)],
                                          self.ids(seq_id)[:n], err_msg=f"seq_id={seq_id}")

    def new_request(self):
        rng, ps = self.rng, self.bm.page_size
        prompt = list(self.prefixes[rng.integers(len(self.prefixes))])
        prompt += list(rng.integers(0, self.vocab, rng.integers(1, 2 * ps + 2)))
        prompt = [int(t) for t in prompt]
        expected_cached = self.bm.cached_prefix_len(prompt)
        fits = self.bm.can_allocate(prompt)
        before = snapshot(self.bm)
        try:
            table, cached = self.bm.allocate(self.next_id, prompt)
        except OutOfPagesError:
            assert not fits and snapshot(self.bm) == before
            self.counts["allocate_out_of_pages"] += 1
            return
        self.counts["hit_tokens"] += cached
        assert fits and cached == expected_cached
        assert cached % ps == 0 and cached <= len(prompt) - 1
        assert len(table) == -(-len(prompt) // ps)
        self.tokens[self.next_id] = prompt
        self.next_id += 1

    def prefill_chunk(self, seq_id):
        start, end = self.bm.num_computed_tokens(seq_id), len(self.tokens[seq_id])
        self.write(seq_id, start, int(self.rng.integers(start + 1, end + 1)))

    def decode(self, seq_id, k):
        bm, ps = self.bm, self.bm.page_size
        n = bm.num_tokens(seq_id)
        last = bm.block_table(seq_id)[-1]
        expect_copy = n % ps != 0 and bm.ref_count(last) > 1
        others = {s: bm.block_table(s) for s in self.tokens if s != seq_id}
        fits = bm.can_append_slots(seq_id, k)
        before = snapshot(bm)
        try:
            ops = bm.append_slots(seq_id, k)
        except OutOfPagesError:
            assert not fits and snapshot(bm) == before
            self.free(max(self.tokens))  # preempt the newest request (recompute later)
            self.counts["preemptions"] += 1
            return
        self.counts["copies"] += len(ops)
        assert fits and len(ops) == expect_copy
        if ops:
            assert ops[0].src == last and ops[0].dst == bm.block_table(seq_id)[n // ps]
        assert others == {s: bm.block_table(s) for s in others}  # nobody else's table moved
        self.copy(ops)  # before the step's writes, as the engine must
        self.tokens[seq_id] += [int(t) for t in self.rng.integers(0, self.vocab, k)]
        self.write(seq_id, n, n + k)

    def fork(self, seq_id):
        self.bm.fork(seq_id, self.next_id)
        self.tokens[self.next_id] = list(self.tokens[seq_id])
        self.next_id += 1

    def free(self, seq_id):
        self.bm.free(seq_id)
        del self.tokens[seq_id]
        self.freed.append(seq_id)

    def double_free(self):
        before = snapshot(self.bm)
        with pytest.raises(KeyError):
            self.bm.free(self.freed[self.rng.integers(len(self.freed))])
        assert snapshot(self.bm) == before

    def step(self):
        rng, bm = self.rng, self.bm
        live = sorted(self.tokens)
        prefilling = [s for s in live if bm.num_computed_tokens(s) < len(self.tokens[s])]
        decoding = [s for s in live if s not in prefilling]
        op = rng.choice(["new", "prefill", "decode", "decode_k", "fork", "free", "double_free",
                         "reset"], p=[0.22, 0.2, 0.3, 0.05, 0.08, 0.11, 0.02, 0.02])
        if op == "new" or not live:
            self.new_request()
        elif op == "prefill" and prefilling:
            self.prefill_chunk(prefilling[rng.integers(len(prefilling))])
        elif op in ("decode", "decode_k") and decoding:
            k = 1 if op == "decode" else int(rng.integers(2, 2 * bm.page_size + 2))
            self.decode(decoding[rng.integers(len(decoding))], k)
        elif op == "fork" and decoding:
            self.fork(decoding[rng.integers(len(decoding))])
        elif op == "free":  # finished, aborted mid-prefill, or preempted: all the same here
            self.free(live[rng.integers(len(live))])
        elif op == "double_free" and self.freed:
            self.double_free()
        elif op == "reset":
            bm.reset_prefix_cache()


@pytest.mark.parametrize("enable_prefix_caching, seed",
                         [(True, s) for s in range(30)] + [(False, s) for s in range(8)])
def test_random_workload_keeps_invariants_and_every_sequence_reads_its_own_kv(
        enable_prefix_caching, seed):
    rng = np.random.default_rng(seed)
    page_size = int(rng.choice([1, 2, 4, 8]))
    num_pages = int(rng.integers(12, 40)) * (8 // page_size if page_size < 4 else 1)
    sim = Simulation(rng, num_pages, page_size, enable_prefix_caching)
    for _ in range(200):
        sim.step()
        sim.verify()
    for seq_id in list(sim.tokens):
        sim.free(seq_id)
    sim.bm.check_invariants()
    assert sim.bm.num_free_pages == num_pages and sim.bm.usage == 0.0
    assert sim.bm.num_sequences == 0
    if not enable_prefix_caching:
        assert sim.bm.num_cached_free_pages == 0


def test_the_random_workload_exercises_what_it_claims_to():
    """The workload above is only as good as its coverage: copies, prefix-cache hits,
    evictions, out-of-pages errors and preemptions must all happen."""
    total = collections.Counter()
    for seed in range(10):
        sim = Simulation(np.random.default_rng(seed), 16, 2, True)
        take = sim.bm._take_fresh_page

        def counting_take(sim=sim, take=take):
            sim.counts["evictions"] += not sim.bm._free
            return take()

        sim.bm._take_fresh_page = counting_take
        for _ in range(200):
            sim.step()
        total += sim.counts
    assert set(total) == {"copies", "hit_tokens", "evictions", "allocate_out_of_pages",
                          "preemptions"}, total
