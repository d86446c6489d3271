"""Data and tensor parallelism (fastattn.sharding, train(mesh=...)).

The multi-device checks run in subprocesses on 8 fake CPU devices (tests/sharding_checks.py):
the device count is fixed when jax starts, and this pytest process has one device. The
distributed test starts two processes of 4 devices each under jax.distributed (gloo
collectives on localhost) and compares them with one process of 8.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fastattn
from fastattn import sharding

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_checks.py")


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_PROCESS"}
    return {**env, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def _check(*args, devices=8):
    proc = subprocess.run([sys.executable, SCRIPT, *args], env=_env(devices),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def test_attention_runs_per_shard():
    out = _check("attention")
    assert out.count("ok attention") == 2


def test_sharded_logits_and_gradients_equal_unsharded():
    out = _check("forward")
    # MHA on every mesh, GQA (K=4) on the two the heads allow, both implementations.
    for mesh in ("(1, 8)", "(2, 4)", "(8, 1)"):
        assert f"ok MHA xla mesh={mesh}" in out and f"ok MHA pallas mesh={mesh}" in out
    assert "ok GQA pallas mesh=(2, 4)" in out and "ok GQA xla mesh=(8, 1)" in out
    assert "ok GQA mesh=(1, 8): LlamaConfig.num_kv_heads K=4" in out
    assert "ok placement" in out and "ok gpt2" in out


def test_train_on_mesh_follows_one_device():
    out = _check("train")
    assert "ok train mesh=(2, 4) fsdp=False" in out and "ok train mesh=(4, 2) fsdp=True" in out


def test_checkpoint_saved_on_one_mesh_restores_on_another():
    out = _check("checkpoint")
    assert out.count("ok restore (2, 4) -> (4, 2)") == 2
    assert "ok restore (2, 4) -> one device" in out
    assert "ok train resumes (2, 4) -> (4, 2)" in out


def test_bad_meshes_and_layouts_raise_clear_errors():
    out = _check("errors")
    assert out.count("ok raises") == 10 and "ok kv pages" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    """Two jax.distributed processes (4 CPU devices each) train on one (2, 4) mesh, checkpoint
    together, and agree with one process of 8 devices; the checkpoint they wrote restores in
    one process on a (4, 2) mesh."""
    port, ckpt = _free_port(), str(tmp_path / "ckpt")
    two, one = tmp_path / "two.json", tmp_path / "one.json"
    procs = [subprocess.Popen(
        [sys.executable, SCRIPT, "train_json", str(two), "--save", ckpt],
        env=_env(4, FASTATTN_PROCESS=f"{i}/2@{port}"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-6000:]}"
        assert f"ok train_json process {i} of 2" in out
    _check("train_json", str(one), "--restore", ckpt)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], a["devices"], b["processes"], b["devices"]) == (1, 8, 2, 8)
    assert [r["step"] for r in b["history"]] == [1, 2, 3]
    for ra, rb in zip(a["history"], b["history"], strict=True):
        np.testing.assert_allclose([ra["loss"], ra["grad_norm"], ra.get("eval_loss", 0)],
                                   [rb["loss"], rb["grad_norm"], rb.get("eval_loss", 0)],
                                   rtol=1e-5)
    for pa, pb in zip(a["params"], b["params"], strict=True):
        np.testing.assert_allclose(pa, pb, rtol=1e-4, atol=1e-5)
    assert a["restored_history"] == b["history"]
    for pa, pb in zip(a["restored"], b["params"], strict=True):
        np.testing.assert_array_equal(pa, pb)


# ----------------------------------------------------------------------------- one device


def test_make_mesh_on_one_device():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match=r"make_mesh\(data=2, model=1\) needs 2 devices, only 1"):
        sharding.make_mesh(2, 1)
    with pytest.raises(ValueError, match="model=0"):
        sharding.make_mesh(1, 0)


def test_attention_under_a_trivial_mesh_is_unchanged():
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 4, 16))
    k = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 2, 16))
    want = fastattn.attention(q, k, k, causal=True, implementation="pallas")
    with sharding.use_mesh(sharding.make_mesh()):
        assert sharding.active_mesh() is not None
        assert "shard_map" not in str(jax.make_jaxpr(
            lambda q, k: fastattn.attention(q, k, k, causal=True, implementation="pallas"))(q, k))
        got = fastattn.attention(q, k, k, causal=True, implementation="pallas")
    assert sharding.active_mesh() is None
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_param_specs_follow_the_megatron_rules():
    mesh = sharding.make_mesh()
    tree = {"embed_tokens": {"embedding": jnp.zeros((8, 4))},
            "layers_0": {"self_attn": {"q_proj": {"kernel": jnp.zeros((4, 8)),
                                                  "bias": jnp.zeros(8)},
                                       "o_proj": {"kernel": jnp.zeros((8, 4))}},
                         "mlp": {"down_proj": {"kernel": jnp.zeros((8, 4))}},
                         "input_layernorm": {"weight": jnp.zeros(4)}},
            "lm_head": {"kernel": jnp.zeros((4, 8))}}
    specs = sharding.param_specs(tree, mesh)
    P = jax.sharding.PartitionSpec
    assert specs["embed_tokens"]["embedding"] == P("model")
    assert specs["layers_0"]["self_attn"]["q_proj"] == {"kernel": P(None, "model"),
                                                        "bias": P("model")}
    assert specs["layers_0"]["self_attn"]["o_proj"]["kernel"] == P("model")
    assert specs["layers_0"]["mlp"]["down_proj"]["kernel"] == P("model")
    assert specs["layers_0"]["input_layernorm"]["weight"] == P()
    assert specs["lm_head"]["kernel"] == P(None, "model")
    # Optimizer moments are placed like their parameters, by path.
    moments = {"0": {"mu": tree["layers_0"]["self_attn"]}, "count": jnp.zeros((), jnp.int32)}
    specs = sharding.param_specs(moments, mesh)
    assert specs["0"]["mu"]["q_proj"]["kernel"] == P(None, "model") and specs["count"] == P()
