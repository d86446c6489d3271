"""The training loop: AdamW with warmup + cosine, global-norm clipping, gradient accumulation,
bf16 compute on f32 master weights, packed sequences, orbax checkpoints with exact resume.

    result = fastattn.train(TrainConfig(steps=1000, batch_size=32), model=Llama(cfg),
                            dataset=pack_documents(docs, seq_len=512))

Precision: parameters (and AdamW's moments) live in `TrainConfig.master_dtype` (float32); the
model computes in its own config's `dtype` (bfloat16 for the presets), casting weights as it
uses them, so gradients arrive in f32 and the update never rounds to bf16.

One optimizer step = `grad_accum` micro-batches of `batch_size / grad_accum` rows, scanned inside
one jitted function whose train state is donated (updated in place). The loss is the
token-weighted mean over the whole batch, so accumulation changes nothing but memory.

Resume: the data order is a function of (seed, step) (fastattn.data), the state and the metrics
history are in the checkpoint, so k steps + restart + N - k steps reproduce N straight steps
(RELIABILITY 17).

Several devices: `train(..., mesh=fastattn.sharding.make_mesh(data=2, model=4))` places the
parameters and AdamW's moments by the Megatron rules of fastattn.sharding (tensor parallel over
"model"; with fsdp=True also split over "data") and each micro-batch's rows over "data"; XLA
inserts the gradient all-reduce. A checkpoint restores onto whatever mesh the resuming run has.
With several processes (jax.distributed), every process runs this same call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fastattn import sharding
from fastattn._linear_cross_entropy import linear_cross_entropy
from fastattn.checkpoint import Checkpointer
from fastattn.data import Batch, PackedDataset


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW on a linear warmup then cosine decay to `min_lr_ratio * learning_rate`; updates
    clipped to global norm `grad_clip` (None: no clipping). Weight decay skips vectors
    (norm scales, biases)."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate={self.learning_rate} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimizerConfig.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.weight_decay < 0:
            raise ValueError(f"OptimizerConfig.weight_decay={self.weight_decay} must be >= 0")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"OptimizerConfig.{name}={getattr(self, name)} must be in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"OptimizerConfig.grad_clip={self.grad_clip} must be > 0 or None")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how often to checkpoint. A directory that already holds checkpoints is
    resumed from its newest committed step."""

    directory: str
    every: int = 500
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"CheckpointConfig.every={self.every} must be >= 1")
        if self.keep < 1:
            raise ValueError(f"CheckpointConfig.keep={self.keep} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run. `batch_size` rows of the dataset per optimizer step, split into
    `grad_accum` micro-batches."""

    steps: int
    batch_size: int
    grad_accum: int = 1
    seed: int = 0
    master_dtype: str = "float32"
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig | None = None
    eval_every: int | None = None  # None: evaluate only at the end (if eval data is given)
    log_every: int = 10
    metrics_path: str | None = None  # JSONL, one record per logged step / evaluation
    progress: bool = True
    # LM head + cross-entropy a chunk of tokens at a time (fastattn.linear_cross_entropy): the
    # [tokens, vocab] f32 logits are never materialised. Off by default until
    # experiments/bench_train.py shows it is not slower (BENCHMARKS.md, issue 8).
    fused_loss: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be a multiple of "
                             f"grad_accum={self.grad_accum}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"TrainConfig.eval_every={self.eval_every} must be >= 1 or None")
        if self.master_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"TrainConfig.master_dtype={self.master_dtype!r} must be one of "
                             "'float32', 'bfloat16', 'float16'")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


@dataclasses.dataclass
class TrainResult:
    params: Any
    state: TrainState
    history: list[dict]  # one record per step: step, loss, grad_norm, lr (+ eval_loss)
    tokens_per_s: float  # over the steps run in this call, compile excluded
    mfu: float | None  # model FLOP utilisation against the device's peak, when known


# Dense bf16 peak per chip (FLOP/s) for MFU. Unknown devices (CPUs) get no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def peak_flops(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return flops
    return None


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=max(total_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = [] if config.grad_clip is None else [optax.clip_by_global_norm(config.grad_clip)]
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def learning_rate_at(config: OptimizerConfig, total_steps: int, step: int) -> float:
    return float(optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps,
        max(total_steps, config.warmup_steps + 1),
        config.learning_rate * config.min_lr_ratio)(step))


def _weighted_nll(model: nn.Module, params, batch: dict, fused_loss: bool = False
                  ) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token NLL, sum of weights) over a batch, in f32.

    fused_loss: the LM head and the softmax cross-entropy run chunk by chunk
    (`fastattn.linear_cross_entropy`), so the [B, T, V] logits are never materialised; the
    model must offer `lm_head_inputs` (models.Llama does)."""
    inputs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    if fused_loss:
        hidden, weight, layout = model.apply({"params": params}, batch["tokens"], **inputs,
                                             method="lm_head_inputs")
        nll, _ = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                      batch["targets"].reshape(-1), weight_layout=layout)
        nll = nll.reshape(batch["targets"].shape)
    else:
        logits = model.apply({"params": params}, batch["tokens"], **inputs)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["weights"]
    return jnp.sum(nll * w), jnp.sum(w)


# optax.tree.norm replaced optax.global_norm (deprecated) in newer optax.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, grad_accum: int,
                    *, state_shardings=None, fused_loss: bool = False):
    """jit(state, batch) -> (state, metrics); the state is donated. `batch` holds arrays
    [grad_accum * micro_batch, T]. fused_loss: see `TrainConfig.fused_loss`.

    state_shardings: NamedShardings of the state's arrays on a mesh (fastattn.sharding);
    the step keeps the state in them and splits each micro-batch's rows over "data". Trace
    and call it under `fastattn.sharding.use_mesh(mesh)`."""
    mesh = None
    if state_shardings is not None:
        mesh = jax.tree.leaves(state_shardings)[0].mesh

    def step(state: TrainState, batch: dict):
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
        if mesh is not None:  # each micro-batch over "data", not the micro-batches
            micro = jax.lax.with_sharding_constraint(
                micro, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                    None, sharding.DATA)))
        nll_and_grad = jax.value_and_grad(
            lambda p, mb: _weighted_nll(model, p, mb, fused_loss), has_aux=True)

        def one_micro_batch(carry, mb):
            grads, nll_sum, weight_sum = carry
            (nll, weight), g = nll_and_grad(state.params, mb)
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, nll_sum + nll, weight_sum + weight), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, nll, weight), _ = jax.lax.scan(
            one_micro_batch, (zeros, jnp.float32(0), jnp.float32(0)), micro)
        weight = jnp.where(weight > 0, weight, 1.0)  # an all-padding batch: zero grads, not NaN
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": nll / weight, "grad_norm": _global_norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0,
                   out_shardings=(state_shardings, sharding.replicated(mesh)))


def make_eval_step(model: nn.Module, fused_loss: bool = False):
    """jit(params, batch) -> (sum of weighted NLL, sum of weights)."""
    return jax.jit(lambda params, batch: _weighted_nll(model, params, batch, fused_loss))


def evaluate(model: nn.Module, params, dataset: PackedDataset, batch_size: int,
             eval_step=None, mesh=None) -> float:
    """Token-weighted mean next-token loss over every row of `dataset` (batches split over
    the "data" axis of `mesh` when given)."""
    eval_step = eval_step or make_eval_step(model)
    nll, weight = 0.0, 0.0
    for batch in dataset.batches(batch_size):
        n, w = eval_step(params, _device_batch(batch, mesh))
        nll, weight = nll + float(n), weight + float(w)
    return nll / max(weight, 1e-9)


def init_params(model: nn.Module, dataset: PackedDataset, seed: int, dtype: str = "float32"):
    """Fresh parameters for `model`, shaped by one row of `dataset`, in `dtype`."""
    sample = dataset.batch(0, 1, seed)
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(sample.tokens))["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def _device_batch(batch: Batch, mesh=None) -> dict:
    arrays = {f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)}
    if mesh is not None:
        return sharding.shard_batch(arrays, mesh)
    return {name: jnp.asarray(x) for name, x in arrays.items()}


def train(config: TrainConfig, *, model: nn.Module, dataset: PackedDataset,
          eval_dataset: PackedDataset | None = None, params=None,
          flops_per_token: float | None = None, mesh: jax.sharding.Mesh | None = None,
          fsdp: bool = False) -> TrainResult:
    """Trains `model` on `dataset` for `config.steps` optimizer steps and returns the result.

    params: initial parameters (cast to `config.master_dtype`); None initialises from the seed.
    A checkpoint directory holding committed steps is resumed from the newest one (its params
    win over `params`). flops_per_token: model FLOPs of one trained token (forward + backward)
    for MFU; None estimates 6 x parameter count (attention FLOPs not counted).
    mesh: a ("data", "model") mesh (fastattn.sharding.make_mesh) to train on: parameters and
        optimizer state placed by fastattn.sharding.param_specs, each micro-batch's rows split
        over "data" (which must divide batch_size / grad_accum); the returned state stays
        sharded. None: one device, as without it.
    fsdp: with a mesh, also split parameters and optimizer state over "data".
    """
    if dataset.num_rows < 1:
        raise ValueError("dataset has no rows")
    if config.fused_loss and not hasattr(model, "lm_head_inputs"):
        raise ValueError(f"TrainConfig.fused_loss=True needs a model with lm_head_inputs "
                         f"(models.Llama has it); {type(model).__name__} has not: set "
                         "fused_loss=False")
    if mesh is not None:
        _check_mesh(config, mesh)
    elif fsdp:
        raise ValueError("fsdp=True shards over a mesh's 'data' axis; pass mesh=")
    optimizer = make_optimizer(config.optimizer, config.steps)
    history: list[dict] = []
    with sharding.use_mesh(mesh):
        state, state_shardings = _initial_state(config, model, dataset, params, optimizer,
                                                mesh, fsdp)
        checkpointer = None
        if config.checkpoint is not None:
            checkpointer = Checkpointer(config.checkpoint.directory, keep=config.checkpoint.keep,
                                        async_save=config.checkpoint.async_save)
        try:
            if checkpointer is not None and checkpointer.latest_step() is not None:
                # Restored into `state`'s shardings: a run on another mesh shape reshards.
                state, meta = checkpointer.restore(checkpointer.latest_step(), state)
                history = [r for r in meta["history"] if r["step"] <= int(state.step)]
            return _run(config, model, dataset, eval_dataset, state, optimizer, history,
                        checkpointer, flops_per_token, mesh, state_shardings)
        finally:
            if checkpointer is not None:
                checkpointer.close()  # waits for background saves; raises if one failed


def _check_mesh(config: TrainConfig, mesh) -> None:
    if tuple(mesh.axis_names) != sharding.AXES:
        raise ValueError(f"mesh axes {tuple(mesh.axis_names)} must be {sharding.AXES}; build "
                         "the mesh with fastattn.sharding.make_mesh")
    data = sharding.axis_size(mesh, sharding.DATA)
    if config.micro_batch_size % data:
        raise ValueError(
            f"TrainConfig.batch_size={config.batch_size} / grad_accum={config.grad_accum} = "
            f"{config.micro_batch_size} rows per micro-batch are not divisible by the mesh's "
            f"'data' axis size {data}")


def _initial_state(config, model, dataset, params, optimizer, mesh, fsdp):
    """(TrainState, its NamedShardings or None). On a mesh, fresh parameters and the optimizer
    state are created already sharded (jit with out_shardings): no device ever holds them
    whole."""
    def new_state(p):
        return TrainState(step=jnp.int32(0), params=p, opt_state=optimizer.init(p))

    if mesh is None:
        if params is None:
            params = init_params(model, dataset, config.seed, config.master_dtype)
        else:
            params = jax.tree.map(lambda p: jnp.asarray(p, config.master_dtype), params)
        return new_state(params), None
    if params is None:
        fresh = lambda: new_state(init_params(model, dataset, config.seed, config.master_dtype))
        shardings = sharding.named_shardings(jax.eval_shape(fresh), mesh, model, fsdp=fsdp)
        return jax.jit(fresh, out_shardings=shardings)(), shardings
    dtype = jnp.dtype(config.master_dtype)
    params = jax.tree.map(
        lambda p: p.astype(dtype) if isinstance(p, jax.Array) else np.asarray(p, dtype), params)
    shardings = sharding.named_shardings(jax.eval_shape(new_state, params), mesh, model,
                                         fsdp=fsdp)
    params = jax.tree.map(sharding.place, params, shardings.params)
    return jax.jit(new_state, out_shardings=shardings, donate_argnums=0)(params), shardings


def _run(config, model, dataset, eval_dataset, state, optimizer, history, checkpointer,
         flops_per_token, mesh, state_shardings):
    train_step = make_train_step(model, optimizer, config.grad_accum,
                                 state_shardings=state_shardings, fused_loss=config.fused_loss)
    eval_step = make_eval_step(model, config.fused_loss)
    tokens_per_step = config.batch_size * dataset.seq_len
    flops_per_token = flops_per_token or 6.0 * count_params(state.params)
    peak = peak_flops()
    if peak and mesh is not None:
        peak *= mesh.devices.size  # MFU per chip: the whole mesh's tokens over its peak
    # With several processes, the first writes the metrics and draws the progress bar.
    lead = jax.process_index() == 0
    metrics_file = open(config.metrics_path, "a") if config.metrics_path and lead else None
    start = int(state.step)
    last_saved = start
    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched (keeps dispatch async)
    timed_steps, timed_seconds = 0, 0.0
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step",
               disable=not (config.progress and lead), dynamic_ncols=True)

    def flush(now_step):
        nonlocal timed_steps, timed_seconds
        for step, m in pending:
            record = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                      "lr": learning_rate_at(config.optimizer, config.steps, step - 1)}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {step}; lower "
                                         "OptimizerConfig.learning_rate or set grad_clip")
            history.append(record)
            _write(metrics_file, record)
        pending.clear()
        return now_step

    def save(step):
        checkpointer.save(step, state, {"history": history, "config": _jsonable(config)})

    try:
        tic = None
        for step in range(start, config.steps):
            batch = _device_batch(dataset.batch(step, config.batch_size, config.seed), mesh)
            state, metrics = train_step(state, batch)
            pending.append((step + 1, metrics))
            done = step + 1
            if tic is None:  # the first step compiles: time from its end
                jax.block_until_ready(metrics)
                tic, tic_step = time.perf_counter(), done
            if done % config.log_every == 0 or done == config.steps:
                flush(done)
                elapsed = time.perf_counter() - tic
                if done > tic_step:
                    timed_steps, timed_seconds = done - tic_step, elapsed
                tps = tokens_per_step * timed_steps / timed_seconds if timed_seconds else 0.0
                post = {"loss": f"{history[-1]['loss']:.3f}", "tok/s": f"{tps:,.0f}"}
                if peak and tps:
                    post["MFU"] = f"{100 * tps * flops_per_token / peak:.1f}%"
                bar.set_postfix(post, refresh=False)
            bar.update(1)
            evaluate_now = eval_dataset is not None and (
                (config.eval_every and done % config.eval_every == 0) or done == config.steps)
            if evaluate_now:
                flush(done)
                loss = evaluate(model, state.params, eval_dataset, config.micro_batch_size,
                                eval_step, mesh)
                history[-1]["eval_loss"] = loss
                _write(metrics_file, {"step": done, "eval_loss": loss})
            if checkpointer is not None and done % config.checkpoint.every == 0:
                flush(done)
                save(done)
                last_saved = done
        flush(config.steps)
    except KeyboardInterrupt:
        # Save on exit: an interrupted run keeps what it trained.
        if checkpointer is not None and int(state.step) > last_saved:
            flush(int(state.step))
            save(int(state.step))
        raise
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    if checkpointer is not None and config.steps > last_saved:
        save(config.steps)
    tps = tokens_per_step * timed_steps / timed_seconds if timed_seconds else 0.0
    mfu = tps * flops_per_token / peak if (peak and tps) else None
    return TrainResult(params=state.params, state=state, history=history, tokens_per_s=tps,
                       mfu=mfu)


def _write(file, record):
    if file is not None:
        file.write(json.dumps(record) + "\n")
        file.flush()


def _jsonable(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
