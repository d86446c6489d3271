"""Tensor parallelism inside one engine (Engine(..., mesh=...)): greedy tokens on (1, 2),
(1, 4) and (2, 2) meshes equal one device's, with the weights Megatron-split, the KV pages split
on their kv heads across donated steps, and ragged paged attention run per shard ("xla", the
CPU default, and the Pallas kernel in interpret mode).

The checks run in subprocesses on 8 fake CPU devices (tests/engine_sharding_checks.py): the
device count is fixed when jax starts, and this pytest process has one device."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_sharding_checks.py")


def _check(*checks):
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_PROCESS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, SCRIPT, *checks], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{checks} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def test_sharded_engine_greedy_tokens_equal_one_device_xla():
    out = _check("xla")
    for mesh in ("(1, 2)", "(1, 4)", "(2, 2)"):
        assert f"ok xla mesh={mesh}" in out
    assert "ok xla sync mesh=(1, 2)" in out


def test_sharded_engine_greedy_tokens_equal_one_device_pallas():
    out = _check("pallas")
    assert "ok pallas mesh=(1, 2)" in out and "ok pallas mesh=(1, 4)" in out


def test_decode_ops_per_shard_and_indivisible_kv_heads_raise():
    out = _check("ops", "errors")
    for op in ("paged", "decode", "ragged"):
        assert f"ok op {op} xla" in out and f"ok op {op} pallas" in out
    assert out.count("ok raises") == 5
    assert "ok raises: LlamaConfig.num_kv_heads K=4 is not divisible" in out


def test_router_over_tensor_parallel_replicas_equals_one_device():
    assert "ok router 2x2" in _check("router")
