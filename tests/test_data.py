"""Packing documents into rows, and the (seed, step) -> batch order that makes resume exact."""

import numpy as np
import pytest

from fastattn.data import pack_documents


def test_packing_layout_matches_the_docstring_picture():
    docs = [[10, 11, 12, 13], [20, 21, 22], [30, 31]]
    ds = pack_documents(docs, 11, pad_id=99)
    assert ds.num_rows == 1
    np.testing.assert_array_equal(ds.tokens[0], [10, 11, 12, 13, 20, 21, 22, 30, 31, 99, 99])
    np.testing.assert_array_equal(ds.segment_ids[0], [1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 0])
    np.testing.assert_array_equal(ds.positions[0], [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 0])
    np.testing.assert_array_equal(ds.targets[0][[0, 1, 2, 4, 5, 7]], [11, 12, 13, 21, 22, 31])
    # A document's last token predicts nothing (no target across a boundary); padding neither.
    np.testing.assert_array_equal(ds.weights[0], [1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0])
    assert ds.num_target_tokens == 6


def test_documents_that_do_not_fit_start_a_new_row_and_long_ones_are_cut():
    ds = pack_documents([[1] * 6, [2] * 3, list(range(3, 20))], 8)
    # row 0: doc 0 (6); doc 1 (3) does not fit -> row 1; doc 2 (17) -> pieces 8, 8, 1 (dropped:
    # a single token predicts nothing).
    assert ds.num_rows == 4
    np.testing.assert_array_equal(ds.segment_ids[0], [1] * 6 + [0, 0])
    np.testing.assert_array_equal(ds.segment_ids[1], [1] * 3 + [0] * 5)
    np.testing.assert_array_equal(ds.tokens[2], range(3, 11))
    np.testing.assert_array_equal(ds.tokens[3], range(11, 19))
    assert ds.weights[2, -1] == 0  # the cut does not predict across pieces


def test_weights_select_the_predicted_tokens():
    ds = pack_documents([[5, 6, 7, 8]], 4, weights=[[0, 0, 1, 1]])
    np.testing.assert_array_equal(ds.weights[0], [0, 0, 1, 0])


def test_batch_order_is_a_function_of_seed_and_step():
    ds = pack_documents([[i, i + 1] for i in range(10)], 2)
    assert ds.num_rows == 10
    epoch = np.concatenate([ds.batch(s, 2, seed=3).tokens[:, 0] for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(10))  # one epoch visits every row once
    again = ds.batch(3, 2, seed=3)
    np.testing.assert_array_equal(again.tokens, ds.batch(3, 2, seed=3).tokens)
    next_epoch = np.concatenate([ds.batch(s, 2, seed=3).tokens[:, 0] for s in range(5, 10)])
    assert sorted(next_epoch.tolist()) == list(range(10))
    assert not np.array_equal(epoch, next_epoch)  # a fresh permutation per epoch
    assert not np.array_equal(epoch, np.concatenate(
        [ds.batch(s, 2, seed=4).tokens[:, 0] for s in range(5)]))
    # A batch that straddles two epochs takes the end of one and the start of the next.
    straddle = ds.batch(1, 7, seed=3).tokens[:, 0]
    order0 = np.concatenate([ds.batch(s, 1, seed=3).tokens[:, 0] for s in range(7, 14)])
    np.testing.assert_array_equal(straddle, order0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(documents=[[1, 2]], seq_len=1), "seq_len=1"),
    (dict(documents=[[1]], seq_len=4), "nothing to train on"),
    (dict(documents=[[1, -2]], seq_len=4), "negative token id"),
    (dict(documents=[[1, 2]], seq_len=4, weights=[[1]]), r"weights\[0\]"),
    (dict(documents=[[1, 2]], seq_len=4, weights=[]), "len\\(weights\\)"),
])
def test_bad_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_documents(**kwargs)


def test_bad_batch_arguments():
    ds = pack_documents([[1, 2]], 4)
    with pytest.raises(ValueError, match="batch_size=0"):
        ds.batch(0, 0, seed=0)
    with pytest.raises(ValueError, match="step=-1"):
        ds.batch(-1, 1, seed=0)
