"""Our Flax Llama family against Hugging Face transformers (CPU torch), which we did not
write: logits in f32 and greedy generation token for token, plus bad checkpoints."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import fastattn  # noqa: E402
import models  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
             bos_token_id=None, eos_token_id=None)  # no EOS: generate runs all 20 steps

ARCHES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)),
    "llama3-rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=64),
        rope_theta=500000.0)),
    "mistral-window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **SMALL, sliding_window=8)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **SMALL, tie_word_embeddings=True)),
}
GPT2_SMALL = dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                  bos_token_id=None, eos_token_id=None)


def test_gpt2_logits_and_greedy_tokens_match_transformers(tmp_path):
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_SMALL)).eval()
    hf_model.save_pretrained(tmp_path)
    module, variables = models.load_hf(str(tmp_path))
    assert isinstance(module, models.GPT2)
    tokens = np.random.default_rng(2).integers(0, 128, (2, 20))
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(module.apply(variables, jnp.asarray(tokens))), theirs,
                               atol=2e-4, rtol=2e-4)
    prompt = tokens[:1, :4]
    with torch.no_grad():
        expected = hf_model.generate(torch.as_tensor(prompt), max_new_tokens=20, do_sample=False)[0, 4:].numpy()
    sequence, _ = _greedy_by_recompute(module, variables, prompt, 20)
    np.testing.assert_array_equal(sequence[0, 4:], expected)


def _greedy_by_recompute(module, variables, prompt, steps):
    """Greedy tokens, each from a full forward over the sequence so far; returns the
    sequence [1, P + steps] and the last forward's logits (every position's). One jitted
    forward over a fixed-length buffer: the model is causal, so the padding after the last
    token changes no logit before it (and one compile instead of a shape per step)."""
    forward = jax.jit(module.apply)
    sequence = np.zeros((1, prompt.shape[1] + steps), np.int64)
    sequence[:, :prompt.shape[1]] = prompt
    for position in range(prompt.shape[1], sequence.shape[1]):
        logits = forward(variables, jnp.asarray(sequence))
        sequence[0, position] = int(jnp.argmax(logits[0, position - 1]))
    return sequence, np.asarray(forward(variables, jnp.asarray(sequence)))


def _save(arch, tmp_path):
    torch.manual_seed(0)
    hf_model = ARCHES[arch]().eval()
    hf_model.save_pretrained(tmp_path)
    return hf_model


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_logits_and_greedy_tokens_match_transformers(arch, tmp_path):
    hf_model = _save(arch, tmp_path)
    module, variables = models.load_hf(str(tmp_path))
    tokens = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 24))
    ours = np.asarray(module.apply(variables, jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(tokens)).logits.numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)

    prompt = tokens[:1, :5]
    with torch.no_grad():
        expected = hf_model.generate(torch.as_tensor(prompt), max_new_tokens=20, do_sample=False)[0, 5:].numpy()
    sequence, full = _greedy_by_recompute(module, variables, prompt, 20)
    np.testing.assert_array_equal(sequence[0, 5:], expected)

    # The same 20 tokens through the contiguous KV cache: prefill once, then decode steps.
    config = module.config
    cache = fastattn.KVCache.create(num_layers=config.num_layers, batch=1, max_len=32,
                                    num_kv_heads=config.num_kv_heads,
                                    head_dim=config.head_size, dtype=jnp.float32)
    prefill = jax.jit(lambda p, t, c: module.apply(p, t, c, method=models.Llama.prefill))
    decode = jax.jit(lambda p, t, c: module.apply(p, t, c, method=models.Llama.decode))
    logits, cache = prefill(variables, jnp.asarray(prompt), cache)
    generated = []
    for step in range(20):
        nxt = jnp.argmax(logits[:, -1], axis=-1)
        generated.append(int(nxt[0]))
        logits, cache = decode(variables, nxt[:, None], cache)
        # the full recompute's logits at the position just decoded
        np.testing.assert_allclose(np.asarray(logits[:, -1]), full[:, 5 + step], atol=2e-4,
                                   rtol=2e-4)
    np.testing.assert_array_equal(generated, expected)


def test_missing_tensor_is_named(tmp_path):
    _save("llama", tmp_path)
    from safetensors.numpy import load_file, save_file
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        models.load_hf(str(tmp_path))


def test_shape_that_disagrees_with_config_is_named(tmp_path):
    _save("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                                         r"\(96, 64\), but the config implies \(100, 64\)"):
        models.load_hf(str(tmp_path))


def test_unknown_architecture_and_missing_weights_raise(tmp_path):
    _save("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"architectures\[0\]='FalconForCausalLM' is not supported"):
        models.load_hf(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no model.safetensors"):
        models.load_hf(str(tmp_path))


@pytest.mark.parametrize("arch", ["llama", "mistral-window"])
def test_engine_greedy_matches_transformers_on_32_mixed_requests(arch, tmp_path):
    """The serving engine on an imported checkpoint: chunked prefill (budget 64 over prompts of
    1-60 tokens), every T bucket, a pool small enough to preempt, prefix caching on (shared
    prefixes included), sliding window through the paged path (mistral)."""
    hf_model = _save(arch, tmp_path)
    module, variables = models.load_hf(str(tmp_path))
    rng = np.random.default_rng(3)
    shared = rng.integers(0, SMALL["vocab_size"], 24).tolist()
    prompts = [rng.integers(0, SMALL["vocab_size"], int(n)).tolist()
               for n in rng.integers(1, 61, 28)]
    prompts += [shared + [1], shared + [2, 3], shared, shared + [4]]
    engine = fastattn.Engine(module, variables["params"], fastattn.EngineConfig(
        page_size=8, num_pages=24, token_budget=64, max_num_seqs=16, max_model_len=72))
    out = engine.generate(prompts, fastattn.SamplingParams(temperature=0.0, max_tokens=8))
    for prompt, completion in zip(prompts, out):
        with torch.no_grad():
            expected = hf_model.generate(torch.as_tensor([prompt]), max_new_tokens=8,
                                         do_sample=False)[0, len(prompt):].tolist()
        assert completion.token_ids == expected
    m = engine.metrics()
    assert m["preemptions"] > 0 and m["prefix_cache_hit_rate"] > 0
    engine.blocks.check_invariants()
    assert engine.blocks.usage == 0
