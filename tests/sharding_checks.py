"""Multi-device checks of fastattn.sharding on fake CPU devices, run by tests/test_sharding.py
in subprocesses: the device count (XLA_FLAGS) must be fixed before jax starts, and the rest of
the suite shares its pytest process with one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py CHECK
        CHECK: attention | forward | train | checkpoint | errors
    python tests/sharding_checks.py train_json OUT.json [--save DIR | --restore DIR]
        (a short sharded run on mesh (2, 4), checkpointed into DIR with --save; --restore also
        reads DIR's newest step onto mesh (4, 2). With FASTATTN_PROCESS=i/n@port it is process
        i of n under jax.distributed on localhost, each with the devices XLA_FLAGS gives it)

Each check raises (non-zero exit) on a mismatch and prints one line per case it passed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax

_PROCESS = os.environ.get("FASTATTN_PROCESS")  # "i/n@port": one process of a distributed run
if _PROCESS:
    _ids, _port = _PROCESS.split("@")
    _pid, _nproc = (int(x) for x in _ids.split("/"))
    # Collectives between CPU processes: gloo (already the default on jax 0.10).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{_port}", num_processes=_nproc,
                               process_id=_pid, initialization_timeout=120)

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import fastattn
from fastattn import sharding
from fastattn.checkpoint import Checkpointer
from fastattn.data import pack_documents
from fastattn.tasks import counting_documents
from fastattn.training import OptimizerConfig, TrainConfig, TrainState, make_optimizer, train
from models import GPT2, GPT2Config, Llama, LlamaConfig

# Heads that every mesh of 8 devices divides (MHA), and a GQA model whose K=4 does not divide
# a model axis of 8.
MHA = LlamaConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=8,
                  intermediate_size=128, max_position_embeddings=64)
GQA = dataclasses.replace(MHA, num_kv_heads=4, attention_bias=True, tie_word_embeddings=True)
MESHES = ((1, 8), (2, 4), (8, 1))


def _close(name, got, want, rtol=1e-5, atol=1e-5):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        g, w = np.asarray(jax.device_get(g), np.float64), np.asarray(w, np.float64)
        with np.errstate(invalid="ignore"):  # equal infinities (lse = -inf) match
            err = np.where(g == w, 0.0, np.abs(g - w))
        if not np.all(err <= atol + rtol * np.abs(w)):
            raise AssertionError(f"{name}{jax.tree_util.keystr(path)}: max error {err.max():.3g}, "
                                 f"mean {err.mean():.3g}")


def _tokens(batch=8, length=16, vocab=64, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)),
                       jnp.int32)


def _logits_and_grads(model):
    """jit(params, tokens) -> (logits, gradient of a loss that reads every logit)."""
    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return jnp.mean(logp[..., 0] * jnp.arange(tokens.shape[1])), logits

    def run(params, tokens):
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params, tokens)
        return logits, grads
    return jax.jit(run)


def _init(model, tokens, seed):
    return jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)["params"]


# ----------------------------------------------------------------------------- checks


def check_attention():
    """fastattn.attention per shard (Pallas, interpret mode) equals the unsharded call, with
    GQA, segment ids and lse, jitted and eager, for a batch "data" divides and one it does not
    (then replicated over "data")."""
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    for B, shape in ((4, (2, 4)), (3, (4, 2))):
        q = jax.random.normal(key[0], (B, 24, 8, 16))
        k = jax.random.normal(key[1], (B, 20, 4, 16))
        v = jax.random.normal(key[2], (B, 20, 4, 16))
        seg = (jnp.arange(24)[None].repeat(B, 0) // 9, jnp.arange(20)[None].repeat(B, 0) // 7)
        kw = dict(causal=True, segment_ids=seg, return_lse=True, implementation="pallas")
        f = lambda q, k, v: fastattn.attention(q, k, v, **kw)
        run = jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(
            lambda *a: jnp.sum(f(*a)[0] ** 2), argnums=(0, 1, 2))(q, k, v)))
        want = run(q, k, v)
        with sharding.use_mesh(sharding.make_mesh(*shape)):
            assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v)), "kernel not run per shard"
            got = run(q, k, v)
            eager = f(q, k, v) if B == 4 else want[0]
        _close(f"attention (out, lse, grads) B={B} mesh={shape}", got, want, 1e-5, 1e-5)
        _close(f"attention eager B={B} mesh={shape}", eager, want[0], 1e-6, 1e-6)
        print(f"ok attention B={B} mesh={shape}")


def check_forward():
    """Sharded logits and gradients equal unsharded ones for every mesh the heads allow, for
    the XLA path (partitioned by XLA) and the Pallas kernels (per shard); meshes the heads do
    not allow raise."""
    tokens = _tokens()
    for name, cfg in (("MHA", MHA), ("GQA", GQA)):
        for impl in ("xla", "pallas"):
            model = Llama(dataclasses.replace(cfg, attention_implementation=impl))
            params = _init(model, tokens, 1)
            want = _logits_and_grads(model)(params, tokens)
            for shape in MESHES:
                mesh = sharding.make_mesh(*shape)
                if cfg.num_kv_heads % shape[1]:
                    try:
                        sharding.shard_params(params, mesh, cfg)
                    except ValueError as e:
                        assert "num_kv_heads K=4" in str(e) and "'model' axis size 8" in str(e), e
                        print(f"ok {name} mesh={shape}: {e}")
                        continue
                    raise AssertionError(f"{name} on mesh {shape} did not raise")
                sharded = sharding.shard_params(params, mesh, cfg)
                with sharding.use_mesh(mesh):
                    got = _logits_and_grads(model)(sharded, sharding.shard_batch(tokens, mesh))
                _close(f"{name} {impl} (logits, grads) mesh={shape}", got, want)
                print(f"ok {name} {impl} mesh={shape}")
    # The placement itself: Megatron column / row splits, vocab split, norms replicated.
    mesh = sharding.make_mesh(2, 4)
    sharded = sharding.shard_params(params, mesh, GQA)
    layer = sharded["layers_0"]
    expect = {"q_proj/kernel": P(None, "model"), "q_proj/bias": P("model"),
              "o_proj/kernel": P("model"), "down_proj/kernel": P("model"),
              "up_proj/kernel": P(None, "model")}
    for path, spec in expect.items():
        group = "self_attn" if "_proj" in path and path[0] in "qkvo" else "mlp"
        a, b = path.split("/")
        assert layer[group][a][b].sharding.spec == spec, (path, layer[group][a][b].sharding)
    assert layer["input_layernorm"]["weight"].sharding.spec == P()
    assert sharded["embed_tokens"]["embedding"].sharding.spec == P("model")
    assert sharded["embed_tokens"]["embedding"].addressable_shards[0].data.shape == (16, 64)
    fsdp = sharding.param_specs(params, mesh, GQA, fsdp=True)
    assert fsdp["layers_0"]["self_attn"]["q_proj"]["kernel"] == P("data", "model")
    assert fsdp["layers_0"]["mlp"]["down_proj"]["kernel"] == P("model", "data")
    assert fsdp["layers_0"]["input_layernorm"]["weight"] == P()
    print("ok placement")
    # GPT-2: fused qkv (heads not aligned to shards: XLA reshards), tied embeddings, biases.
    gpt = GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=1, n_head=8))
    params = _init(gpt, tokens, 2)
    want = jax.jit(gpt.apply)({"params": params}, tokens)
    sharded = sharding.shard_params(params, mesh, gpt)
    with sharding.use_mesh(mesh):
        got = jax.jit(gpt.apply)({"params": sharded}, sharding.shard_batch(tokens, mesh))
    _close("gpt2 logits", got, want)
    print("ok gpt2 mesh=(2, 4)")


def _dataset(num_docs=64, seq_len=16, seed=0):
    return pack_documents(counting_documents(num_docs, 64, seed=seed), seq_len)


def _train_config(**kw):
    base = dict(steps=4, batch_size=8, grad_accum=2, log_every=1, progress=False,
                optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1))
    return TrainConfig(**{**base, **kw})


def check_train():
    """train(mesh=...) follows the single-device run (losses and parameters), with and without
    FSDP, and leaves the state sharded by the rules."""
    model, data = Llama(GQA), _dataset()
    params = jax.tree.map(np.asarray, _init(model, _tokens(), 3))
    want = train(_train_config(), model=model, dataset=data, eval_dataset=_dataset(seed=1),
                 params=params)
    for shape, fsdp in (((2, 4), False), ((4, 2), True)):
        mesh = sharding.make_mesh(*shape)
        got = train(_train_config(), model=model, dataset=data, eval_dataset=_dataset(seed=1),
                    params=params, mesh=mesh, fsdp=fsdp)
        for a, b in zip(got.history, want.history, strict=True):
            _close(f"train mesh={shape} fsdp={fsdp} step {a['step']}",
                   [a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], 1e-4, 1e-6)
        _close(f"train mesh={shape} eval", got.history[-1]["eval_loss"],
               want.history[-1]["eval_loss"], 1e-4)
        _close(f"train mesh={shape} fsdp={fsdp} params", got.params, want.params, 1e-3, 1e-4)
        specs = sharding.param_specs(got.state, mesh, model, fsdp=fsdp)
        for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(got.state),
                                      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
                                      strict=True):
            assert leaf.sharding.is_equivalent_to(
                jax.sharding.NamedSharding(mesh, spec), leaf.ndim), (path, leaf.sharding, spec)
        print(f"ok train mesh={shape} fsdp={fsdp}")


def check_checkpoint():
    """A state saved on mesh (2, 4) restores on (4, 2) (and FSDP) with equal values and the new
    mesh's shardings; train() resumes a (2, 4) run on (4, 2)."""
    model, data = Llama(GQA), _dataset()
    params = jax.tree.map(np.asarray, _init(model, _tokens(), 3))
    with tempfile.TemporaryDirectory() as tmp:
        straight = train(_train_config(steps=4), model=model, dataset=data, params=params,
                         mesh=sharding.make_mesh(2, 4))
        ckpt = dict(checkpoint=fastattn.CheckpointConfig(directory=tmp, every=2, keep=2))
        first = train(_train_config(steps=2, **ckpt), model=model, dataset=data, params=params,
                      mesh=sharding.make_mesh(2, 4))
        saved = jax.device_get(first.state)
        optimizer = make_optimizer(_train_config().optimizer, 4)
        for shape, fsdp in (((4, 2), False), ((4, 2), True)):
            mesh = sharding.make_mesh(*shape)
            like = jax.eval_shape(lambda p: TrainState(step=jnp.int32(0), params=p,
                                                       opt_state=optimizer.init(p)), params)
            shardings = sharding.named_shardings(like, mesh, model, fsdp=fsdp)
            like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                like, shardings)
            with Checkpointer(tmp) as ckpt_reader:
                restored, meta = ckpt_reader.restore(2, like)
            _close(f"restore on {shape} fsdp={fsdp}", restored, saved, 0, 0)
            for leaf, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
                assert leaf.sharding == s, (leaf.sharding, s)
            assert [r["step"] for r in meta["history"]] == [1, 2]
            print(f"ok restore (2, 4) -> {shape} fsdp={fsdp}")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        one_device = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), saved)
        with Checkpointer(tmp) as ckpt_reader:
            restored, _ = ckpt_reader.restore(2, one_device)
        _close("restore on one device", restored, saved, 0, 0)
        assert all(len(x.devices()) == 1 for x in jax.tree.leaves(restored))
        print("ok restore (2, 4) -> one device")
        resumed = train(_train_config(steps=4, **ckpt), model=model, dataset=data,
                        params=params, mesh=sharding.make_mesh(4, 2))
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(resumed.history, straight.history, strict=True):
        _close(f"resume on (4, 2) step {a['step']}", a["loss"], b["loss"], 1e-4)
    _close("resume on (4, 2) params", resumed.params, straight.params, 1e-3, 1e-4)
    print("ok train resumes (2, 4) -> (4, 2)")


def check_errors():
    """Bad meshes and layouts say what is wrong."""
    def raises(fn, *words):
        try:
            fn()
        except ValueError as e:
            assert all(w in str(e) for w in words), (str(e), words)
            print(f"ok raises: {e}")
            return
        raise AssertionError(f"no ValueError (expected one naming {words})")

    raises(lambda: sharding.make_mesh(0, 2), "data=0")
    raises(lambda: sharding.make_mesh(2, -1), "model=-1")
    raises(lambda: sharding.make_mesh(4, 4), "data=4", "model=4", "16 devices", "only 8")
    mesh = sharding.make_mesh(1, 8)
    raises(lambda: sharding.check_heads(Llama(GQA), mesh), "num_kv_heads K=4", "size 8")
    # Without a config only shapes are checked: an MLP width "model" does not divide.
    params = {"layers_0": {"mlp": {"up_proj": {"kernel": np.ones((4, 12), np.float32)}}}}
    raises(lambda: sharding.shard_params(params, mesh), "layers_0/mlp/up_proj/kernel",
           "(12)", "'model' axis size 8")
    q = jnp.ones((2, 8, 8, 16))
    kv = jnp.ones((2, 8, 4, 16))
    with sharding.use_mesh(mesh):
        raises(lambda: fastattn.attention(q, kv, kv, implementation="pallas"), "K=4", "size 8")
    raises(lambda: sharding.shard_kv_pages(jnp.ones((4, 3, 16, 8)), mesh), "K=4", "size 8")
    raises(lambda: train(_train_config(batch_size=6), model=Llama(MHA), dataset=_dataset(),
                         mesh=sharding.make_mesh(4, 2)), "micro-batch", "'data' axis size 4")
    raises(lambda: train(_train_config(), model=Llama(MHA), dataset=_dataset(), fsdp=True),
           "fsdp")
    other = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "tensor"))
    raises(lambda: train(_train_config(), model=Llama(MHA), dataset=_dataset(), mesh=other),
           "('batch', 'tensor')")
    pages = sharding.shard_kv_pages([(jnp.ones((8, 3, 16, 8)),) * 2], mesh)
    assert pages[0][0].sharding.spec == P("model")
    print("ok kv pages")


def _gathered(params, mesh):
    """Every parameter whole, as nested lists (a jitted identity to replicated shardings
    gathers them to every process)."""
    full = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(params)
    return [np.asarray(x.addressable_shards[0].data).tolist() for x in jax.tree.leaves(full)]


def train_json(out_path, mode=None, directory=None):
    """A short sharded run on mesh (2, 4); its history and final parameters go to out_path
    (from process 0 when distributed)."""
    model = Llama(GQA)
    ckpt = None
    if mode == "--save":
        ckpt = fastattn.CheckpointConfig(directory=directory, every=2, keep=2)
    mesh = sharding.make_mesh(2, 4)
    result = train(_train_config(steps=3, checkpoint=ckpt), model=model, dataset=_dataset(),
                   eval_dataset=_dataset(seed=1), mesh=mesh)
    record = {"history": result.history, "params": _gathered(result.params, mesh),
              "processes": jax.process_count(), "devices": jax.device_count()}
    if mode == "--restore":  # the same call on another mesh resumes at the end: no step runs
        other = sharding.make_mesh(4, 2)
        resumed = train(_train_config(steps=3, checkpoint=fastattn.CheckpointConfig(
            directory=directory)), model=model, dataset=_dataset(), mesh=other)
        record["restored"] = _gathered(resumed.params, other)
        record["restored_history"] = resumed.history
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            json.dump(record, f)
    print(f"ok train_json process {jax.process_index()} of {jax.process_count()}")


if __name__ == "__main__":
    check = sys.argv[1]
    if check == "train_json":
        train_json(*sys.argv[2:])
    else:
        assert jax.device_count() == 8, f"run with 8 devices, got {jax.devices()}"
        globals()[f"check_{check}"]()
