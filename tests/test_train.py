"""The training loop: learning, accumulation, packing, mixed precision, metrics, and the
checkpoint faults of shared/RELIABILITY.md 16-19."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastattn.checkpoint import Checkpointer
from fastattn.data import pack_documents
from fastattn.tasks import counting_documents
from fastattn.training import (
    CheckpointConfig,
    OptimizerConfig,
    TrainConfig,
    TrainState,
    _weighted_nll,
    init_params,
    make_optimizer,
    make_train_step,
    train,
)
from models import GPT2Config, Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                  intermediate_size=64, max_position_embeddings=64)
MODEL = Llama(CFG)


def _dataset(num_docs=64, seq_len=32, seed=0):
    return pack_documents(counting_documents(num_docs, 32, seed=seed), seq_len)


def _config(**kw):
    base = dict(steps=8, batch_size=4, log_every=1, progress=False,
                optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2))
    return TrainConfig(**{**base, **kw})


def _assert_trees_equal(a, b):
    """Bitwise on a CPU. On a GPU, XLA's scatter-add (the embedding gradient) uses atomics in
    no fixed order unless XLA_FLAGS=--xla_gpu_deterministic_ops=true, so there the runs agree
    to float rounding only."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.default_backend() == "cpu":
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)


def test_loss_falls_and_metrics_are_written(tmp_path):
    data = _dataset()
    metrics = tmp_path / "metrics.jsonl"
    result = train(_config(steps=40, metrics_path=str(metrics), eval_every=20), model=MODEL,
                   dataset=data, eval_dataset=_dataset(seed=1))
    losses = [r["loss"] for r in result.history]
    assert [r["step"] for r in result.history] == list(range(1, 41))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert result.tokens_per_s > 0
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)  # warmup, then decay


def test_gradient_accumulation_changes_nothing_but_memory():
    data = _dataset()
    one = train(_config(steps=3, grad_accum=1), model=MODEL, dataset=data)
    four = train(_config(steps=3, grad_accum=4), model=MODEL, dataset=data)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose([r["loss"] for r in one.history],
                               [r["loss"] for r in four.history], rtol=1e-5)


def test_packed_rows_give_the_loss_of_separate_documents():
    docs = [[1, 2, 3, 4, 5], [9, 8, 7], [3, 3, 4, 5, 6, 7]]
    packed = pack_documents(docs, 16)
    separate = [pack_documents([d], 16) for d in docs]
    params = init_params(MODEL, packed, seed=0)
    as_dict = lambda ds: {k: jnp.asarray(getattr(ds, k)) for k in
                          ("tokens", "targets", "weights", "positions", "segment_ids")}
    nll, weight = _weighted_nll(MODEL, params, as_dict(packed))
    parts = [_weighted_nll(MODEL, params, as_dict(ds)) for ds in separate]
    assert float(weight) == sum(float(w) for _, w in parts) == 4 + 2 + 5
    np.testing.assert_allclose(float(nll), sum(float(n) for n, _ in parts), rtol=1e-5)


def test_bf16_compute_keeps_f32_master_params():
    model = Llama(dataclasses.replace(CFG, dtype="bfloat16"))
    result = train(_config(steps=3), model=model, dataset=_dataset())
    assert {p.dtype for p in jax.tree.leaves(result.params)} == {jnp.dtype(jnp.float32)}
    assert all(np.isfinite(r["loss"]) for r in result.history)


def test_step_passes_under_debug_nans():
    """RELIABILITY 19: no NaN anywhere in the train step (masked rows included)."""
    data = _dataset()
    params = init_params(MODEL, data, seed=0)
    optimizer = make_optimizer(OptimizerConfig(), 10)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
    batch = data.batch(0, 4, seed=0)
    batch = {k: jnp.asarray(getattr(batch, k)) for k in
             ("tokens", "targets", "weights", "positions", "segment_ids")}
    with jax.debug_nans(True):
        state, metrics = make_train_step(MODEL, optimizer, 2)(state, batch)
        jax.block_until_ready(state)
    assert np.isfinite(float(metrics["loss"]))


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    """RELIABILITY 17: k steps, restart, N - k steps == N straight (params and loss curve)."""
    data = _dataset()
    straight = train(_config(steps=10), model=MODEL, dataset=data)
    ckpt = CheckpointConfig(directory=str(tmp_path / "ckpt"), every=4, keep=2)
    # Run 6 of the 10 steps (same schedule: steps=10 fixes the LR curve), as if interrupted.
    partial = _config(steps=10, checkpoint=ckpt)
    _train_until(partial, data, stop_after=6)
    assert Checkpointer(ckpt.directory).all_steps() == [4, 6]
    resumed = train(partial, model=MODEL, dataset=data)
    _assert_trees_equal(straight.params, resumed.params)
    np.testing.assert_allclose([r["loss"] for r in resumed.history],
                               [r["loss"] for r in straight.history],
                               rtol=0 if jax.default_backend() == "cpu" else 1e-4)
    assert int(resumed.state.step) == 10


def _train_until(config, data, stop_after):
    """Trains `config` but stops (KeyboardInterrupt, as Ctrl-C) after `stop_after` steps; the
    loop saves on exit."""
    import fastattn.training as train_module

    real = train_module.make_train_step

    def interrupting(*args, **kw):
        step_fn = real(*args, **kw)

        def wrapped(state, batch):
            if int(state.step) == stop_after:
                raise KeyboardInterrupt
            return step_fn(state, batch)
        return wrapped

    train_module.make_train_step = interrupting
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config, model=MODEL, dataset=data)
    finally:
        train_module.make_train_step = real


CRASHING_RUN = textwrap.dedent("""
    import os, sys
    from orbax.checkpoint._src.path import atomicity
    import tests.test_train as t
    from fastattn.training import CheckpointConfig, train

    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *args, **kwargs):
        if os.path.basename(str(self.get_final())) == "4":
            os._exit(17)  # the process dies after writing step 4, before committing it
        return await real_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    ckpt = CheckpointConfig(directory=sys.argv[1], every=2, keep=5)
    train(t._config(steps=6, checkpoint=ckpt), model=t.MODEL, dataset=t._dataset())
""")


def test_crash_between_write_and_commit_resumes_from_last_commit(tmp_path):
    """RELIABILITY 16: the process dies mid-save; the next start resumes from the last
    committed step and the half-written one is never restored."""
    directory = tmp_path / "ckpt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", CRASHING_RUN, str(directory)], cwd=root,
                          env={**os.environ, "PYTHONPATH": root}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 17, proc.stderr[-2000:]
    leftovers = [p for p in os.listdir(directory) if p.startswith("4")]
    assert leftovers and all("tmp" in p for p in leftovers)  # written, never committed
    assert Checkpointer(directory).latest_step() == 2
    data = _dataset()
    resumed = train(_config(steps=6, checkpoint=CheckpointConfig(directory=str(directory),
                                                                every=2, keep=5)),
                    model=MODEL, dataset=data)
    straight = train(_config(steps=6), model=MODEL, dataset=data)
    _assert_trees_equal(straight.params, resumed.params)
    assert Checkpointer(directory).all_steps() == [2, 4, 6]


def test_failed_async_save_surfaces(tmp_path, monkeypatch):
    """RELIABILITY 18: an error in the background save is raised, never swallowed."""
    from orbax.checkpoint._src.path import atomicity

    async def failing_finalize(self, *args, **kwargs):
        raise OSError("simulated: disk full while committing")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", failing_finalize)
    ckpt = CheckpointConfig(directory=str(tmp_path / "ckpt"), every=2, async_save=True)
    with pytest.raises(OSError, match="disk full"):
        train(_config(steps=4, checkpoint=ckpt), model=MODEL, dataset=_dataset())


@pytest.mark.parametrize("make, match", [
    (lambda: TrainConfig(steps=0, batch_size=1), "steps=0"),
    (lambda: TrainConfig(steps=1, batch_size=6, grad_accum=4), "batch_size=6"),
    (lambda: TrainConfig(steps=1, batch_size=1, master_dtype="int8"), "master_dtype"),
    (lambda: OptimizerConfig(learning_rate=0), "learning_rate=0"),
    (lambda: OptimizerConfig(b2=1.0), "b2=1.0"),
    (lambda: OptimizerConfig(grad_clip=-1), "grad_clip=-1"),
    (lambda: CheckpointConfig(directory="x", every=0), "every=0"),
    (lambda: dataclasses.replace(CFG, deterministic_attention="no"),
     "deterministic_attention='no'"),
    (lambda: GPT2Config(vocab_size=8, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                        deterministic_attention=0), "deterministic_attention=0"),
])
def test_bad_configs_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_deterministic_attention_off_reaches_the_kernels(monkeypatch):
    """LlamaConfig.deterministic_attention=False is what fastattn.attention receives (off a
    Hopper GPU every implementation is deterministic either way, so the logits agree)."""
    import fastattn

    seen = []
    original = fastattn.attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return original(*args, **kwargs)

    monkeypatch.setattr(fastattn, "attention", spy)
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % CFG.vocab_size
    outputs = []
    for deterministic in (True, False):
        model = Llama(dataclasses.replace(CFG, deterministic_attention=deterministic))
        params = model.init(jax.random.key(0), tokens)
        outputs.append(model.apply(params, tokens))
    assert seen == [True, True, False, False]  # init and apply, each configuration
    np.testing.assert_array_equal(outputs[0], outputs[1])
