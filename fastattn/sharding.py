"""Data and tensor parallelism over a `jax.sharding.Mesh` with axes ("data", "model").

    mesh = make_mesh(data=2, model=4)            # 8 devices: 2 replicas x 4-way tensor parallel
    params = shard_params(params, mesh, config)  # Megatron-style placement by parameter name
    with use_mesh(mesh):                         # Pallas kernels run per shard (shard_map)
        logits = jax.jit(model.apply)({"params": params}, shard_batch(tokens, mesh))

We build on JAX's SPMD partitioner (GSPMD): weights and batches carry a `NamedSharding`, jit
compiles one program for every device and inserts the collectives (NCCL on GPUs, gloo on
CPUs). Nothing here communicates by hand. Two things XLA cannot do on its own:

  * place the weights: `param_specs` maps each parameter's path to a `PartitionSpec` by the
    Megatron-LM rules (Shoeybi et al. 2019, section 3), so each transformer block needs one
    all-reduce after attention and one after the MLP:

        x [B, T, D] (replicated over "model")
          -> q/k/v, gate/up   column-split  [D, out/m]   each shard: its heads / its F slice
          -> attention        per shard     (heads on "model", batch on "data")
          -> o, down          row-split     [in/m, D]    partial sums -> all-reduce
        embeddings and lm_head split on the vocabulary; norms replicated.

  * partition a Pallas kernel: a kernel is an opaque custom call, so `fastattn.attention` runs
    it under `shard_map` (see `per_shard`) on the local batch rows and heads of each device.
    Heads are independent and GQA keeps each query head with its kv head (query heads
    [i N/m, (i+1) N/m) read kv heads [i K/m, (i+1) K/m)), so no communication is needed.

The mesh axes are Auto (GSPMD propagation), not Explicit (sharding in types): the Flax models
reshape and contract freely and should not have to annotate every intermediate.

Multi-host: call `jax.distributed.initialize(...)` first in every process; `jax.devices()` then
lists every process's devices and the mesh spans them (docs/multi_gpu.md).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)


# ----------------------------------------------------------------------------- the mesh


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over the first data * model of `devices` (None: `jax.devices()`,
    every process's devices after `jax.distributed.initialize`).

    Devices fill the mesh row-major, so "model" is the fastest-varying axis: with devices
    listed process by process (as jax.devices() lists them), each tensor-parallel group sits
    inside one host (NVLink) and "data" spans the hosts.
    """
    for name, size in (("data", data), ("model", model)):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"make_mesh: {name}={size!r} must be an int >= 1")
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        raise ValueError(f"make_mesh(data={data}, model={model}) needs {data * model} devices, "
                         f"only {len(devices)} exist ({devices[0].platform if devices else 'none'})")
    grid = np.array(devices[:data * model], dtype=object).reshape(data, model)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def use_mesh(mesh: Mesh | None):
    """Context manager making `mesh` the current one: jit traces under it see it through
    `jax.sharding.get_abstract_mesh()`, so the Pallas kernels run per shard. None: no-op.

    `jax.set_mesh` is the context manager on the jax versions we support; older ones used the
    mesh itself (`with mesh:`)."""
    if mesh is None:
        return contextlib.nullcontext()
    set_mesh = getattr(jax, "set_mesh", None)
    return set_mesh(mesh) if set_mesh is not None else mesh


def active_mesh():
    """The mesh of the enclosing `use_mesh` / `jax.set_mesh` (an AbstractMesh), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def axis_size(mesh, name: str) -> int:
    """Size of axis `name` of `mesh` (1 when the mesh has no such axis)."""
    return dict(mesh.shape).get(name, 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over "data", the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- placing arrays


def place(x, sharding: NamedSharding) -> jax.Array:
    """`x` (a numpy array, a jax array on one device, or a global jax array) as a global array
    with `sharding`. Works across processes: every process passes the same full value and
    keeps only the shards of its own devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # a global array: reshard inside XLA
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(batch, mesh: Mesh):
    """Every array of `batch` (a pytree of [B, ...] arrays, the same global batch in every
    process) split on its leading dimension over "data". A batch that "data" does not divide
    (an evaluation's last, short batch) is replicated instead."""
    data = axis_size(mesh, DATA)

    def put(x):
        x = np.asarray(x)
        spec = P(DATA) if x.ndim and x.shape[0] % data == 0 else P()
        return place(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, batch)


def kv_pages_spec() -> P:
    """Paged KV cache pages [K, P, page_size, H]: kv heads on "model", as the k/v projections
    that fill them."""
    return P(MODEL)


def shard_kv_pages(kv, mesh: Mesh):
    """A pytree of page arrays [K, P, page_size, H] (e.g. a list of (k_pages, v_pages) per
    layer) placed with K split over "model"; ValueError when "model" does not divide K."""
    model = axis_size(mesh, MODEL)

    def put(pages):
        if pages.ndim != 4:
            raise ValueError(f"KV pages must be [K, P, page_size, H], got shape {pages.shape}")
        if pages.shape[0] % model:
            raise ValueError(f"KV pages have K={pages.shape[0]} kv heads, not divisible by the "
                             f"mesh's 'model' axis size {model}")
        return place(pages, NamedSharding(mesh, kv_pages_spec()))

    return jax.tree.map(put, kv)


# ----------------------------------------------------------------------------- parameter rules

# (path pattern, PartitionSpec of an array of len(spec) dims). The first rule that matches a
# parameter's path ("layers_3/self_attn/q_proj/kernel", also inside optimizer state:
# "opt_state/1/0/mu/layers_3/self_attn/q_proj/kernel") and its rank places it; anything else is
# replicated. Names: models/llama.py (Hugging Face's) and models/gpt2.py.
_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|c_attn|c_fc)"
_ROW = r"(o_proj|down_proj|c_proj|mlp_c_proj)"
RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)(embed_tokens|wte)/embedding$", P(MODEL, None)),  # [V, D]: vocab split
    (r"(^|/)lm_head/kernel$", P(None, MODEL)),                 # [D, V]: vocab split
    (rf"(^|/){_COLUMN}/kernel$", P(None, MODEL)),              # [D, out]: output features
    (rf"(^|/){_COLUMN}/bias$", P(MODEL)),                      # [out]: with its columns
    (rf"(^|/){_ROW}/kernel$", P(MODEL, None)),                 # [in, D]: input features
)
# Splitting the vocabulary only saves memory; one that "model" does not divide (GPT-2's 50257)
# stays replicated rather than fail. Every other split carries heads or MLP features and must
# divide: a ValueError says which parameter does not.
_OPTIONAL_SPLITS = (r"(^|/)(embed_tokens|wte)/embedding$", r"(^|/)lm_head/kernel$")


def _path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _config_of(model_config):
    """A model config, or the config of a Flax module that has one."""
    return getattr(model_config, "config", model_config)


def check_heads(model_config, mesh) -> None:
    """ValueError when the mesh's "model" axis does not divide the model's attention heads
    (query and kv heads split over "model"). Reads `num_heads` / `num_kv_heads` (Llama) or
    `n_head` (GPT-2); a config without them passes."""
    model = axis_size(mesh, MODEL)
    config = _config_of(model_config)
    for field, letter in (("num_kv_heads", "K"), ("num_heads", "N"), ("n_head", "N")):
        heads = getattr(config, field, None)
        if heads is not None and heads % model:
            raise ValueError(
                f"{type(config).__name__}.{field} {letter}={heads} is not divisible by the "
                f"mesh's 'model' axis size {model}: attention heads and the KV cache split on "
                f"'model'; use a model axis that divides {heads}")


def param_specs(tree, mesh, model_config=None, *, fsdp: bool = False):
    """The PartitionSpec of every array of `tree` (parameters, or any pytree holding them by
    path: a TrainState, optax moments), by `RULES`.

    model_config (or a module with `.config`): checks the heads divide "model" (`check_heads`).
    fsdp: also split each array of rank >= 2 over "data" on its largest dimension that no
        rule split and "data" divides (ZeRO-3 / FSDP: weights and optimizer moments are stored
        once per data group and gathered when used). Vectors (norms, biases) stay replicated.
    Leaves may be arrays or jax.ShapeDtypeStruct.
    """
    if model_config is not None:
        check_heads(model_config, mesh)
    sizes = {name: axis_size(mesh, name) for name in AXES}

    def spec_of(path, leaf):
        name, shape = _path_name(path), tuple(getattr(leaf, "shape", ()))
        spec = [None] * len(shape)
        for pattern, rule in RULES:
            if re.search(pattern, name) and len(rule) == len(shape):
                spec = list(rule)
                break
        for dim, axis in enumerate(spec):
            if axis is not None and shape[dim] % sizes[axis]:
                if any(re.search(p, name) for p in _OPTIONAL_SPLITS):
                    spec[dim] = None
                else:
                    raise ValueError(
                        f"parameter {name} of shape {shape}: dimension {dim} ({shape[dim]}) "
                        f"is not divisible by the mesh's {axis!r} axis size {sizes[axis]}")
        if fsdp and len(shape) >= 2 and sizes[DATA] > 1:
            free = [d for d in range(len(shape))
                    if spec[d] is None and shape[d] % sizes[DATA] == 0]
            if free:
                spec[max(free, key=lambda d: shape[d])] = DATA
        while spec and spec[-1] is None:
            spec.pop()
        return P(*spec)

    return jax.tree_util.tree_map_with_path(spec_of, tree)


def named_shardings(tree, mesh: Mesh, model_config=None, *, fsdp: bool = False):
    """`param_specs` as NamedShardings of `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                        param_specs(tree, mesh, model_config, fsdp=fsdp),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh, model_config=None, *, fsdp: bool = False):
    """`params` placed on `mesh` by `param_specs` (Megatron-style tensor parallelism over
    "model", replicated over "data" unless fsdp). model_config (or the model): checks its
    heads divide "model"; ValueError otherwise."""
    shardings = named_shardings(params, mesh, model_config, fsdp=fsdp)
    return jax.tree.map(place, params, shardings)


# ----------------------------------------------------------------------------- kernels per shard


def per_shard(fn: Callable, args: Sequence[Any], in_specs, out_specs, mesh=None):
    """fn(*local_args) on every device of `mesh` (None: the active mesh) under `shard_map`, for
    ops XLA cannot partition (Pallas kernels). Specs name mesh axes; axes a spec leaves out are
    replicated. `fn` must need no communication (heads and batch rows are independent)."""
    mesh = active_mesh() if mesh is None else mesh
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                         check_vma=False)(*args)


def attention_axes(mesh, batch: int, kv_heads: int) -> tuple[str | None, str | None]:
    """(batch axis, head axis) to run an attention kernel on under `mesh`, each None when it
    does not split: "data" splits the batch when it divides it (otherwise the batch is
    replicated: a short evaluation batch or one generation row still runs); "model" splits the
    heads and must divide the kv heads (ValueError naming K). Axes already manual (inside a
    user's shard_map) are left alone."""
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    sizes = {name: axis_size(mesh, name) for name in AXES}
    head_axis = MODEL if sizes[MODEL] > 1 and MODEL not in manual else None
    if head_axis is not None and kv_heads % sizes[MODEL]:
        raise ValueError(
            f"attention on a mesh splits heads over 'model': K={kv_heads} kv heads are not "
            f"divisible by the mesh's 'model' axis size {sizes[MODEL]}")
    batch_axis = DATA if (sizes[DATA] > 1 and DATA not in manual
                          and batch % sizes[DATA] == 0) else None
    return batch_axis, head_axis
