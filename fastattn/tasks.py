"""Synthetic tasks generated in code whose answers can be checked exactly: for demos, smoke
runs and tests (nothing to download).

Addition: "047+385=" -> "2340" then end-of-sequence. Operands are zero-padded to `digits` and
the sum (digits + 1 wide) is written least-significant digit first: a left-to-right decoder then
produces each digit after the carry it depends on, which small models learn in minutes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fastattn.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class CheckableTask:
    """Training documents (token ids + loss weights on the answer only) and held-out prompts
    with their expected answers (token ids, end-of-sequence included)."""

    train_documents: list[list[int]]
    train_weights: list[list[float]]
    test_documents: list[list[int]]  # the held-out sums as documents (for an eval loss)
    test_weights: list[list[float]]
    test_prompts: np.ndarray  # [n_test, prompt_len] int32, all the same length
    test_answers: np.ndarray  # [n_test, answer_len] int32
    prompt_len: int
    answer_len: int


def addition_prompt(a: int, b: int, digits: int) -> str:
    return f"{a:0{digits}d}+{b:0{digits}d}="


def addition_answer(a: int, b: int, digits: int) -> str:
    return f"{a + b:0{digits + 1}d}"[::-1]


def addition_task(tokenizer: Tokenizer, *, digits: int = 3, num_train: int = 20000,
                  num_test: int = 500, seed: int = 0) -> CheckableTask:
    """`num_train` training sums and `num_test` held-out ones (no (a, b) pair in both)."""
    if digits < 1:
        raise ValueError(f"digits={digits} must be >= 1")
    space = (10 ** digits) ** 2
    if num_train + num_test > space:
        raise ValueError(f"num_train + num_test = {num_train + num_test} exceeds the "
                         f"{space} distinct {digits}-digit pairs")
    rng = np.random.default_rng(seed)
    pairs = rng.choice(space, size=num_train + num_test, replace=False)
    a_all, b_all = np.divmod(pairs, 10 ** digits)

    def encode(a, b):
        prompt = tokenizer.encode(addition_prompt(a, b, digits), add_bos=True)
        answer = tokenizer.encode(addition_answer(a, b, digits)) + [tokenizer.eos_id]
        return prompt, answer

    train = [encode(int(a), int(b)) for a, b in zip(a_all[:num_train], b_all[:num_train])]
    tests = [encode(int(a), int(b)) for a, b in zip(a_all[num_train:], b_all[num_train:])]
    # weights[t] weighs predicting token t + 1: the answer tokens only.
    weigh = lambda prompt, answer: [0.0] * (len(prompt) - 1) + [1.0] * len(answer) + [0.0]
    prompts = np.array([p for p, _ in tests], np.int32)
    answers = np.array([ans for _, ans in tests], np.int32)
    return CheckableTask(
        train_documents=[p + ans for p, ans in train], train_weights=[weigh(*t) for t in train],
        test_documents=[p + ans for p, ans in tests], test_weights=[weigh(*t) for t in tests],
        test_prompts=prompts, test_answers=answers, prompt_len=prompts.shape[1],
        answer_len=answers.shape[1])


def counting_documents(num_docs: int, vocab_size: int, *, seed: int = 0,
                       min_len: int = 4, max_len: int = 12) -> list[list[int]]:
    """Documents that count up modulo `vocab_size` from a random start: every next token
    follows from the one before, so a tiny model learns them in a few steps (smoke tests)."""
    rng = np.random.default_rng(seed)
    return [((rng.integers(vocab_size) + np.arange(rng.integers(min_len, max_len)))
             % vocab_size).tolist() for _ in range(num_docs)]
