"""The model with fused kernels (models.Fusion, TrainConfig.fused_loss) computes what the plain
model computes: same logits and gradients, same engine tokens, same training losses (f32, the
Pallas kernels in interpret mode)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastattn.data import pack_documents
from fastattn.engine import Engine, EngineConfig
from fastattn.sampling import SamplingParams
from fastattn.training import TrainConfig, _weighted_nll, train
from models import TINY, Llama
from models.llama import Fusion

BASE = dataclasses.replace(TINY, max_position_embeddings=128, dtype="float32")
ALL = Fusion(add_rmsnorm=True, swiglu=True, rope_write_kv=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)))


def _params(config):
    return Llama(config).init(jax.random.PRNGKey(0), TOKENS[:1, :8])["params"]


def _close(got, want, tol=1e-5):
    """Each leaf within tol of its own largest magnitude: the fused kernels reduce in another
    order (f32 rounding), so an element near 0 may differ relatively but not absolutely."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=tol * np.abs(w).max())


@pytest.mark.parametrize("tied", [False, True])
def test_fused_model_has_the_same_parameters_logits_and_gradients(tied):
    plain_cfg = dataclasses.replace(BASE, tie_word_embeddings=tied)
    fused_cfg = dataclasses.replace(plain_cfg, fusion=ALL)
    params = _params(plain_cfg)
    # One parameter tree either way (checkpoints and HF imports load into both).
    assert jax.tree.structure(_params(fused_cfg)) == jax.tree.structure(params)
    plain, fused = Llama(plain_cfg), Llama(fused_cfg)
    _close(fused.apply({"params": params}, TOKENS), plain.apply({"params": params}, TOKENS))

    def loss(model):
        return lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, TOKENS)))

    _close(jax.grad(loss(fused))(params), jax.grad(loss(plain))(params), tol=1e-4)


def test_engine_with_inference_fusion_gives_the_same_tokens():
    """EngineConfig.inference_fusion=True (the fused SwiGLU; on a GPU the default) gives the
    plain engine's greedy tokens. On a CPU the default (None) leaves the step unfused."""
    params = _params(BASE)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 17, 33, 9)]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    config = EngineConfig(page_size=8, num_pages=48, token_budget=32, max_num_seqs=4,
                          max_model_len=64)
    plain = Engine(Llama(BASE), params, config)
    assert plain.model.config.fusion == Fusion()
    want = [c.token_ids for c in plain.generate(prompts, greedy)]
    fused = Engine(Llama(BASE), params, dataclasses.replace(config, inference_fusion=True))
    assert fused.model.config.fusion == Fusion(swiglu=True)
    got = [c.token_ids for c in fused.generate(prompts, greedy)]
    assert got == want


@pytest.mark.parametrize("tied", [False, True])
def test_fused_loss_equals_the_plain_loss_and_gradients(tied):
    config = dataclasses.replace(BASE, tie_word_embeddings=tied)
    model, params = Llama(config), _params(config)
    rng = np.random.default_rng(2)
    batch = {"tokens": TOKENS, "targets": jnp.roll(TOKENS, -1, axis=1),
             "weights": jnp.asarray(rng.random(TOKENS.shape), jnp.float32),  # varied dloss
             "positions": jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape),
             "segment_ids": jnp.ones_like(TOKENS)}

    def nll(fused_loss):
        return jax.value_and_grad(
            lambda p: _weighted_nll(model, p, batch, fused_loss), has_aux=True)(params)

    (want, want_w), want_grad = nll(False)
    (got, got_w), got_grad = nll(True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got_w == want_w
    _close(got_grad, want_grad, tol=1e-5)


def test_training_with_the_fused_loss_follows_the_plain_loss_curve():
    model = Llama(BASE)
    docs = np.random.default_rng(3).integers(0, 256, (16, 40)).tolist()
    data = pack_documents(docs, 32)
    runs = [train(TrainConfig(steps=4, batch_size=4, progress=False, log_every=1,
                              fused_loss=fused), model=model, dataset=data)
            for fused in (False, True)]
    plain, fused = ([r["loss"] for r in run.history] for run in runs)
    np.testing.assert_allclose(fused, plain, rtol=1e-4)


def test_fused_loss_on_a_model_without_lm_head_inputs_raises_before_training():
    from models import GPT2, GPT2Config

    model = GPT2(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    data = pack_documents(np.random.default_rng(4).integers(0, 256, (4, 40)).tolist(), 32)
    with pytest.raises(ValueError, match="fused_loss=True needs a model with lm_head_inputs"):
        train(TrainConfig(steps=1, batch_size=2, progress=False, fused_loss=True),
              model=model, dataset=data)
