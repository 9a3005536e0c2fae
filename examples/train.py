"""Pretrain the LLaMA example with AdamW, GaLore or a peer baseline.

    python -m examples.train --config tiny --optimizer galore_adamw --steps 200
    python -m examples.train --config 60m --optimizer galore_adamw --data /data/c4 \\
        --tokenizer /data/t5/tokenizer.json --batch-size 64 --steps 10000 --bf16 \\
        --workdir runs/60m_galore --checkpoint-every 1000          # add --resume to continue
    python -m examples.train --config tiny --mesh data=2,fsdp=2,tensor=2 --scan-layers

With ``--mesh`` the model is sharded over a (data, fsdp, tensor) device mesh (see
``shard_model``) and batches over data x fsdp. On a CPU, eight virtual devices need
``XLA_FLAGS=--xla_force_host_platform_device_count=8 NPROC=16`` in the environment.

``train_and_evaluate(config, workdir)`` is the library entry point (as in the Flax examples).
The workdir receives ``config.json``, ``metrics.jsonl`` (train and eval records),
``checkpoints/`` (orbax) and ``summary.json``.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from examples import configs as configs_lib
from examples import data as data_lib
from examples import fileio
from examples import llama
from examples import optimizers as optimizers_lib
from examples.errors import ExampleError


@dataclasses.dataclass
class TrainResult:
  summary: Dict[str, Any]
  history: List[Dict[str, Any]]  # the records written to metrics.jsonl by this invocation
  model: llama.Llama
  optimizer: nnx.Optimizer


def loss_fn(model: llama.Llama, batch: jax.Array) -> jax.Array:
  """Mean next-token cross entropy; batch rows hold seq_len + 1 tokens."""
  logits = model(batch[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch[:, 1:])
  return losses.mean()


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def train_step(model: llama.Llama, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric,
               batch: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
  return loss


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def sharded_train_step(model: llama.Llama, optimizer: nnx.Optimizer,
                       metrics: nnx.MultiMetric, batch: jax.Array) -> jax.Array:
  """``train_step`` on a mesh: the new weights and optimizer state keep their shardings."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
  # With Auto mesh axes XLA picks the outputs' shardings; pin them to the Variables'
  # out_sharding metadata (set by shard_model; galore_optax sets the optimizer state's).
  for node in (model, optimizer):
    state = nnx.state(node)
    nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
  return loss


@nnx.jit
def eval_step(model: llama.Llama, metrics: nnx.MultiMetric, batch: jax.Array) -> None:
  metrics.update(loss=loss_fn(model, batch))


def make_train_metrics() -> nnx.MultiMetric:
  return nnx.MultiMetric(loss=nnx.metrics.Average("loss"),
                         grad_norm=nnx.metrics.Average("grad_norm"))


def evaluate(model: llama.Llama, batches) -> Dict[str, float]:
  metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"))
  for batch in batches:
    eval_step(model, metrics, jnp.asarray(batch))
  loss = float(metrics.compute()["loss"])
  return {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}


def _peak_memory_bytes() -> Optional[int]:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  return stats.get("peak_bytes_in_use")


def _read_metrics(path: str, up_to_step: int) -> List[str]:
  if not os.path.exists(path):
    return []
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= up_to_step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        continue
  return kept


class _Checkpoints:
  """An orbax CheckpointManager holding the model parameters and the optimizer state.

  The two states are saved as one flat mapping {path: array}. Flat, because orbax refuses
  zero-size arrays and some optimizers keep them (optax.contrib.galore stores an empty
  projector for every leaf it does not project): those leaves are left out of the
  checkpoint and keep their freshly initialised (equally empty) values on restore.
  """

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True))

  @staticmethod
  def _flat(model: nnx.Module, optimizer: nnx.Optimizer):
    state = {"model": nnx.state(model, nnx.Param), "optimizer": nnx.state(optimizer)}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = [re.sub(r"[^A-Za-z0-9_.-]", "_", jax.tree_util.keystr(path, simple=True, separator="."))
            for path, _ in leaves]
    if len(set(keys)) != len(keys):
      raise ValueError("checkpoint keys collide after sanitising the state paths")
    return keys, [leaf for _, leaf in leaves], treedef

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer) -> None:
    keys, leaves, _ = self._flat(model, optimizer)
    flat = {k: v for k, v in zip(keys, leaves) if np.size(v)}
    self.manager.save(step, args=self._ocp.args.StandardSave(flat))

  def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer) -> None:
    keys, leaves, treedef = self._flat(model, optimizer)
    abstract = {k: self._ocp.utils.to_shape_dtype_struct(v)
                for k, v in zip(keys, leaves) if np.size(v)}
    restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
    state = treedef.unflatten([restored.get(k, v) for k, v in zip(keys, leaves)])
    nnx.update(model, state["model"])
    nnx.update(optimizer, state["optimizer"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------------------- device mesh

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh(spec: str) -> Dict[str, int]:
  """Axis sizes from ``"2,4,1"`` (in MESH_AXES order) or ``"data=2,fsdp=4"`` (others 1)."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  parts = [part.strip() for part in spec.split(",") if part.strip()]
  if not parts:
    raise ExampleError(f"--mesh {spec!r} is empty; give sizes like 2,4,1 or data=2,fsdp=4")
  named = ["=" in part for part in parts]
  if any(named) and not all(named):
    raise ExampleError(f"--mesh {spec!r} mixes sizes and name=size; use one form")
  if not all(named) and len(parts) > len(MESH_AXES):
    raise ExampleError(f"--mesh {spec!r} has more than {len(MESH_AXES)} sizes "
                       f"({', '.join(MESH_AXES)})")
  for i, part in enumerate(parts):
    name, _, value = part.rpartition("=") if "=" in part else (MESH_AXES[i], "", part)
    if name not in MESH_AXES:
      raise ExampleError(f"--mesh {spec!r}: unknown axis {name!r} "
                         f"(choose from: {', '.join(MESH_AXES)})")
    if not value.isdigit() or int(value) < 1:
      raise ExampleError(f"--mesh {spec!r}: the size of {name} must be a positive integer")
    sizes[name] = int(value)
  return sizes


def build_mesh(sizes: Dict[str, int]) -> jax.sharding.Mesh:
  """A mesh with Auto axes over all devices.

  Auto, not jax.make_mesh's default Explicit axes: llama.py carries no sharding
  annotations, so XLA propagates the shardings through the forward pass (the GaLore
  optimizers work on Explicit meshes too; see galore_optax.sharding_aware).
  """
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  needed, found = math.prod(shape), jax.device_count()
  if needed != found:
    raise ExampleError(
        f"the mesh {'x'.join(map(str, shape))} ({', '.join(MESH_AXES)}) needs {needed} "
        f"devices, found {found}; on a CPU set XLA_FLAGS="
        f"--xla_force_host_platform_device_count={needed} NPROC={2 * needed}")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def param_partition_spec(path: str, shape, sizes: Dict[str, int],
                         scan_layers: bool) -> PartitionSpec:
  """Tensor parallel over the output axis of attn/mlp kernels, FSDP over the largest other
  axis that the fsdp size divides; the layer axis of scanned layers is never split."""
  spec = [None] * len(shape)
  first = 1 if scan_layers and path.startswith("layers/") else 0
  axes = list(range(first, len(shape)))
  if (sizes["tensor"] > 1 and re.search(r"(^|/)(attn|mlp)/.*kernel$", path)
      and shape[-1] % sizes["tensor"] == 0):
    spec[-1] = "tensor"
    axes.remove(len(shape) - 1)
  if sizes["fsdp"] > 1:
    for axis in sorted(axes, key=lambda a: -shape[a]):
      if shape[axis] % sizes["fsdp"] == 0:
        spec[axis] = "fsdp"
        break
  return PartitionSpec(*spec)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, sizes: Dict[str, int],
                scan_layers: bool) -> None:
  """Gives every ``nnx.Param`` an ``out_sharding`` (``param_partition_spec``) and moves its
  value there. nnx.Optimizer derives the optimizer state's shardings from that metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, variable in leaves:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    value = variable.get_value()
    spec = param_partition_spec(name, value.shape, sizes, scan_layers)
    variable.set_metadata("out_sharding", tuple(spec))
    variable.set_value(jax.device_put(value, NamedSharding(mesh, spec)))


def _batch_placer(mesh: Optional[jax.sharding.Mesh]):
  """Host batch -> device array: split over data x fsdp (replicated if that does not divide)."""
  if mesh is None:
    return jnp.asarray
  split = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  replicated = NamedSharding(mesh, PartitionSpec())
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  return lambda batch: jax.device_put(
      batch, split if np.shape(batch)[0] % ways == 0 else replicated)


def optimizer_config(config: configs_lib.TrainConfig) -> optimizers_lib.OptimizerConfig:
  rank = config.rank if config.rank is not None else configs_lib.DEFAULT_RANKS.get(config.model, 128)
  return optimizers_lib.OptimizerConfig(
      learning_rate=config.learning_rate, total_steps=config.steps,
      warmup_fraction=config.warmup_fraction, min_lr_ratio=config.min_lr_ratio,
      weight_decay=config.weight_decay, grad_clip=config.grad_clip, rank=rank,
      update_proj_gap=config.update_proj_gap, scale=config.galore_scale,
      proj_type=config.proj_type, refresh=config.refresh, targets=config.galore_targets)


def validate_config(config: configs_lib.TrainConfig) -> configs_lib.LlamaConfig:
  """Checks everything that can be checked before reading data or writing files."""
  model_cfg = configs_lib.get_model_config(
      config.model, scan_layers=config.scan_layers, remat=config.remat,
      tie_embeddings=config.tie_embeddings, dtype=config.dtype, param_dtype=config.param_dtype)
  llama.remat_policy(model_cfg.remat)
  # Builds (and drops) the optimizer: a bad learning rate, rank or projection type is
  # reported before any data is read or file written.
  optimizers_lib.build_optimizer(config.optimizer, optimizer_config(config))
  for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every"):
    if getattr(config, name) < 1:
      raise ExampleError(f"{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
  if config.checkpoint_every < 0:
    raise ExampleError(f"checkpoint-every must be >= 0, got {config.checkpoint_every}")
  if config.seq_len is not None and config.seq_len < 2:
    raise ExampleError(f"seq-len must be at least 2, got {config.seq_len}")
  if config.optimizer == "optax_contrib_galore" and config.scan_layers:
    raise ExampleError("optax_contrib_galore cannot project stacked (scan_layers) kernels; "
                       "train without --scan-layers")
  if config.stop_after is not None and config.stop_after < 1:
    raise ExampleError(f"stop-after must be positive, got {config.stop_after}")
  if config.mesh is not None:
    sizes = parse_mesh(config.mesh)
    if config.batch_size % (sizes["data"] * sizes["fsdp"]):
      raise ExampleError(f"batch-size {config.batch_size} must be a multiple of data x fsdp "
                         f"= {sizes['data'] * sizes['fsdp']} (--mesh {config.mesh})")
  return model_cfg


def load_dataset(config: configs_lib.TrainConfig) -> data_lib.Dataset:
  """The dataset ``config`` describes (corpus, tokenizer, packed train/validation rows)."""
  model_cfg = validate_config(config)
  vocab = config.vocab_size or model_cfg.vocab_size or configs_lib.DEFAULT_BPE_VOCAB
  return data_lib.build_dataset(
      config.data, config.seq_len or model_cfg.max_seq_len, tokenizer=config.tokenizer,
      vocab_size=vocab, val_fraction=config.val_fraction, max_docs=config.max_docs,
      cache_dir=config.cache_dir)


def train_and_evaluate(config: configs_lib.TrainConfig, workdir: str, *,
                       dataset: Optional[data_lib.Dataset] = None,
                       log=print) -> TrainResult:
  """Trains ``config.model`` with ``config.optimizer``; writes everything under ``workdir``.

  Args:
    config: the training configuration (examples.configs.TrainConfig).
    workdir: output folder: config.json, metrics.jsonl, checkpoints/, summary.json.
    dataset: a prebuilt dataset (examples.compare shares one between runs); built from
      ``config`` when None.
    log: where progress lines go (print by default).

  Returns:
    TrainResult with the summary, the metric records, the model and the optimizer.
  """
  t_start = time.perf_counter()
  model_cfg = validate_config(config)
  if config.mesh is None:
    return _train_and_evaluate(config, workdir, dataset, log, t_start, model_cfg, None)
  mesh = build_mesh(parse_mesh(config.mesh))
  with jax.set_mesh(mesh):  # the model's and optimizer's Variables shard on this mesh
    return _train_and_evaluate(config, workdir, dataset, log, t_start, model_cfg, mesh)


def _train_and_evaluate(config, workdir, dataset, log, t_start, model_cfg, mesh) -> TrainResult:
  seq_len = config.seq_len or model_cfg.max_seq_len

  # ---------------------------------------------------------------- data
  if dataset is None:
    dataset = load_dataset(config)
  elif dataset.seq_len != seq_len:
    raise ExampleError(f"the dataset has sequences of {dataset.seq_len} tokens, not {seq_len}")
  tok_vocab = dataset.tokenizer.vocab_size
  if model_cfg.vocab_size is not None and tok_vocab > model_cfg.vocab_size:
    raise ExampleError(f"the tokenizer has {tok_vocab} tokens but config {config.model} "
                       f"has a vocabulary of {model_cfg.vocab_size}")
  model_cfg = dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size or tok_vocab,
                                  max_seq_len=seq_len)
  sampler = data_lib.BatchSampler(dataset.train, config.batch_size, config.seed)
  place = _batch_placer(mesh)
  val_batches = [place(b) for b in data_lib.eval_batches(
      dataset.validation, config.batch_size, config.eval_batches)]

  # ---------------------------------------------------------------- model and optimizer
  model = llama.Llama(model_cfg, rngs=nnx.Rngs(params=config.seed))
  tx, schedule, peak_lr = optimizers_lib.build_optimizer(
      config.optimizer, optimizer_config(config))
  import galore_optax as go  # pylint: disable=import-outside-toplevel
  step_fn = train_step
  if mesh is not None:
    sizes = dict(mesh.shape)
    shard_model(model, mesh, sizes, model_cfg.scan_layers)
    # galore_optax's optimizers derive their state's shardings themselves; the wrapper
    # does the same for the others (optax.contrib.galore) and is a no-op on the rest.
    tx = go.sharding_aware(tx)
    step_fn = sharded_train_step
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  opt_state_bytes = go.tree_bytes(optimizer.opt_state)
  per_device = None
  if mesh is not None:
    per_device = {}
    for leaf in jax.tree.leaves(optimizer.opt_state):
      for shard in leaf.addressable_shards:
        per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    per_device = max(per_device.values())
  params_count = llama.param_count(model)

  # ---------------------------------------------------------------- workdir
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  has_checkpoints = os.path.isdir(ckpt_dir) and any(
      name.isdigit() for name in os.listdir(ckpt_dir))
  if has_checkpoints and not config.resume and config.save_checkpoints:
    raise ExampleError(f"{workdir} already holds checkpoints; pass --resume to continue "
                       "or choose another --workdir")
  os.makedirs(workdir, exist_ok=True)
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    os.unlink(summary_path)  # a summary of an earlier run would describe this one
  fileio.write_json(os.path.join(workdir, "config.json"),
                    {"train": dataclasses.asdict(config), "model": dataclasses.asdict(model_cfg)})
  checkpoints = None
  if config.save_checkpoints or config.resume:
    checkpoints = _Checkpoints(ckpt_dir, config.keep_checkpoints)
  start_step = 0
  if config.resume and checkpoints.latest_step() is not None:
    start_step = int(checkpoints.latest_step())
    checkpoints.restore(start_step, model, optimizer)
    log(f"resumed from step {start_step} ({ckpt_dir})")
  elif config.resume:
    log(f"no checkpoint in {ckpt_dir}; starting from scratch")
  # Records after the restored step belong to the interrupted future; drop them.
  fileio.write_text(metrics_path, "".join(_read_metrics(metrics_path, start_step)
                                          if start_step else []))

  log(f"model {config.model}: {params_count / 1e6:.2f}M parameters "
      f"({'scanned' if model_cfg.scan_layers else 'unrolled'} layers, remat {model_cfg.remat}, "
      f"{model_cfg.param_dtype} params / {model_cfg.dtype} compute); "
      f"optimizer {config.optimizer} (peak lr {peak_lr:g}), state {opt_state_bytes / 2**20:.2f} MiB")
  log(f"data {dataset.describe()}")
  if mesh is not None:
    log(f"mesh {', '.join(f'{k}={v}' for k, v in mesh.shape.items())} over {mesh.size} devices; "
        f"optimizer state {per_device / 2**20:.2f} MiB on the fullest device")

  history: List[Dict[str, Any]] = []
  tokens_per_step = config.batch_size * seq_len
  end_step = config.steps
  if config.stop_after is not None:
    end_step = min(end_step, start_step + config.stop_after)
  train_metrics = make_train_metrics()
  step_times: List[float] = []
  compile_time = None
  last_eval = None
  progress = None

  with open(metrics_path, "a", encoding="utf-8") as metrics_file:

    def record(entry: Dict[str, Any]) -> None:
      history.append(entry)
      metrics_file.write(json.dumps(entry) + "\n")
      metrics_file.flush()

    def run_eval(step: int) -> None:
      nonlocal last_eval
      result = evaluate(model, val_batches)
      last_eval = {"step": step, "split": "eval", **result}
      record(last_eval)
      log(f"step {step}: eval loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")

    try:
      if start_step == 0:
        run_eval(0)
      if config.progress:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        progress = tqdm(total=config.steps, initial=start_step, desc=config.optimizer,
                        unit="step", dynamic_ncols=True, leave=False)
        log = functools.partial(_tqdm_write, progress, log)
      last_logged, window_time = start_step, 0.0
      for step in range(start_step, end_step):
        batch = place(sampler(step))
        t0 = time.perf_counter()
        loss = step_fn(model, optimizer, train_metrics, batch)
        loss = float(loss)  # waits for the step
        dt = time.perf_counter() - t0
        window_time += dt
        if compile_time is None:
          compile_time = dt
        else:
          step_times.append(dt)
        if not math.isfinite(loss):
          raise FloatingPointError(f"loss became {loss} at step {step + 1}")
        done = step + 1
        if progress is not None:
          progress.update(1)
          progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                               step_s=f"{dt:.3f}")
        if done % config.log_every == 0 or done == end_step:
          values = train_metrics.compute()
          n = done - last_logged
          record({"step": done, "split": "train", "loss": float(values["loss"]),
                  "grad_norm": float(values["grad_norm"]), "lr": float(schedule(step)),
                  "tokens": done * tokens_per_step, "step_time_s": window_time / n,
                  "tokens_per_s": tokens_per_step * n / window_time})
          train_metrics.reset()
          last_logged, window_time = done, 0.0
        if done % config.eval_every == 0 or done == end_step:
          run_eval(done)
        if checkpoints is not None and config.save_checkpoints and (
            done == end_step or (config.checkpoint_every and done % config.checkpoint_every == 0)):
          checkpoints.save(done, model, optimizer)
      final_step = int(optimizer.step[...])
      if last_eval is None or last_eval["step"] != final_step:
        run_eval(final_step)
    finally:
      if progress is not None:
        progress.close()
      if checkpoints is not None:
        checkpoints.close()

  train_time = sum(step_times) + (compile_time or 0.0)
  steady = sum(step_times) / len(step_times) if step_times else (compile_time or float("nan"))
  summary = {
      "config": config.model,
      "optimizer": config.optimizer,
      "steps": final_step,
      "batch_size": config.batch_size,
      "seq_len": seq_len,
      "tokens": final_step * tokens_per_step,
      "params": params_count,
      "param_bytes": go.tree_bytes(nnx.state(model, nnx.Param)),
      "opt_state_bytes": opt_state_bytes,
      "mesh": None if mesh is None else dict(mesh.shape),
      "opt_state_bytes_per_device": per_device,
      "final_eval_loss": last_eval["loss"],
      "final_eval_perplexity": last_eval["perplexity"],
      "first_step_s": compile_time,
      "step_time_s": steady,
      "tokens_per_s": tokens_per_step / steady if steady == steady and steady > 0 else None,
      "train_time_s": train_time,
      "wall_time_s": time.perf_counter() - t_start,
      "peak_memory_bytes": _peak_memory_bytes(),
      "device": str(jax.devices()[0].device_kind),
      "peak_lr": peak_lr,
      "data": dataset.describe(),
  }
  fileio.write_json(summary_path, summary)
  log(format_summary(summary))
  return TrainResult(summary, history, model, optimizer)


def time_train_steps(model: llama.Llama, optimizer: nnx.Optimizer,
                     batches: List[np.ndarray]) -> List[float]:
  """Seconds of one (already compiled) ``train_step`` per batch, each waited for.

  examples.compare calls this for its optimizers in turn, so that they are timed side by
  side under the same machine load rather than in separate runs minutes apart.
  """
  metrics = make_train_metrics()
  times = []
  for batch in batches:
    batch = jnp.asarray(batch)
    t0 = time.perf_counter()
    float(train_step(model, optimizer, metrics, batch))
    times.append(time.perf_counter() - t0)
  return times


def _tqdm_write(progress, fallback, message: str) -> None:
  if progress is not None and not progress.disable:
    progress.write(message, file=sys.stderr)
  else:
    fallback(message)


def format_summary(s: Dict[str, Any]) -> str:
  lines = [
      f"summary ({s['optimizer']}, {s['steps']} steps, {s['tokens']:,} tokens):",
      f"  final eval loss {s['final_eval_loss']:.4f}, perplexity {s['final_eval_perplexity']:.2f}",
      f"  optimizer state {s['opt_state_bytes']:,} bytes ({s['opt_state_bytes'] / 2**20:.2f} MiB); "
      f"params {s['param_bytes']:,} bytes",
  ]
  if s["tokens_per_s"]:
    lines.append(f"  {s['tokens_per_s']:,.0f} tokens/s, {s['step_time_s'] * 1e3:.1f} ms/step "
                 f"(first step {s['first_step_s']:.1f} s incl. compilation); "
                 f"wall {s['wall_time_s']:.1f} s")
  if s["peak_memory_bytes"] is not None:
    lines.append(f"  peak device memory {s['peak_memory_bytes'] / 2**30:.2f} GiB on {s['device']}")
  return "\n".join(lines)


# -------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
  """argparse that reports bad arguments as one ``error: ...`` line and exits 2."""

  def error(self, message):
    self.exit(2, f"error: {' '.join(message.split())}\n")


def add_common_args(p: argparse.ArgumentParser) -> None:
  """Arguments shared by examples.train and examples.compare."""
  d = configs_lib.TrainConfig()
  p.add_argument("--config", default=d.model,
                 help=f"model size: {', '.join(configs_lib.MODEL_CONFIGS)} (default {d.model})")
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--batch-size", type=int, default=d.batch_size)
  p.add_argument("--seq-len", type=int, default=None, help="default: the config's (tiny 128)")
  p.add_argument("--data", default=None,
                 help="C4 folder (c4-train.*.json.gz), .txt/.jsonl/.rst file or folder, "
                      "hf:NAME[:CONFIG[:SPLIT]]; default: embedded stdlib docstrings")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer.json or sentencepiece .model; default: train a byte-level BPE")
  p.add_argument("--vocab-size", type=int, default=None,
                 help="vocabulary of the trained BPE (default 4096 for tiny, else the config's)")
  p.add_argument("--max-docs", type=int, default=None)
  p.add_argument("--val-fraction", type=float, default=d.val_fraction)
  p.add_argument("--cache-dir", default=None, help="tokenizer/corpus cache "
                 f"(default $GALORE_EXAMPLES_CACHE or {data_lib.default_cache_dir()})")
  p.add_argument("--rank", type=int, default=None, help="GaLore rank (default per config)")
  p.add_argument("--lr", type=float, default=None,
                 help="peak learning rate (default 1e-2 for GaLore, 1e-3 for AdamW)")
  p.add_argument("--update-proj-gap", type=int, default=d.update_proj_gap)
  p.add_argument("--galore-scale", type=float, default=d.galore_scale)
  p.add_argument("--proj-type", default=d.proj_type)
  p.add_argument("--refresh", default=d.refresh,
                 help="galore_optax subspace refresh: svd (exact), randomized or power")
  p.add_argument("--weight-decay", type=float, default=d.weight_decay)
  p.add_argument("--grad-clip", type=float, default=None, help="global-norm clip (default off)")
  p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
  p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--eval-every", type=int, default=d.eval_every)
  p.add_argument("--eval-batches", type=int, default=d.eval_batches)
  p.add_argument("--log-every", type=int, default=d.log_every)
  p.add_argument("--scan-layers", action="store_true", help="stack layers: (L, in, out) kernels")
  p.add_argument("--remat", default=d.remat,
                 help="none, full, or a jax.checkpoint_policies name (e.g. dots_saveable)")
  p.add_argument("--tie-embeddings", action="store_true")
  p.add_argument("--bf16", action="store_true", help="bfloat16 parameters and computation")
  p.add_argument("--dtype", default=None, help="computation dtype (float32, bfloat16)")
  p.add_argument("--param-dtype", default=None, help="parameter dtype (float32, bfloat16)")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def config_from_args(args: argparse.Namespace, **extra) -> configs_lib.TrainConfig:
  dtype = args.dtype or ("bfloat16" if args.bf16 else "float32")
  param_dtype = args.param_dtype or ("bfloat16" if args.bf16 else "float32")
  return configs_lib.get_config(
      model=args.config, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
      max_docs=args.max_docs, val_fraction=args.val_fraction, cache_dir=args.cache_dir,
      rank=args.rank, learning_rate=args.lr, update_proj_gap=args.update_proj_gap,
      galore_scale=args.galore_scale, proj_type=args.proj_type,
      refresh=args.refresh, weight_decay=args.weight_decay,
      grad_clip=args.grad_clip, warmup_fraction=args.warmup_fraction,
      min_lr_ratio=args.min_lr_ratio, seed=args.seed, eval_every=args.eval_every,
      eval_batches=args.eval_batches, log_every=args.log_every, scan_layers=args.scan_layers,
      remat=args.remat, tie_embeddings=args.tie_embeddings, dtype=dtype,
      param_dtype=param_dtype, progress=not args.no_progress, **extra)


def main(argv=None) -> int:
  p = _Parser(prog="python -m examples.train", description=__doc__.split("\n\n")[0],
              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_common_args(p)
  p.add_argument("--optimizer", default="galore_adamw",
                 help=f"one of: {', '.join(optimizers_lib.REGISTRY)}")
  p.add_argument("--workdir", default=None, help="default: runs/<config>_<optimizer>")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  p.add_argument("--checkpoint-every", type=int, default=0, help="0: only at the end")
  p.add_argument("--keep-checkpoints", type=int, default=2)
  p.add_argument("--stop-after", type=int, default=None,
                 help="stop this invocation after N steps (resume later with --resume)")
  p.add_argument("--mesh", default=None,
                 help="shard over a (data, fsdp, tensor) device mesh: sizes such as 2,4,1 or "
                      "data=2,fsdp=4 (missing axes 1); default: one device")
  p.add_argument("--list-optimizers", action="store_true",
                 help="print the optimizers and whether this galore_optax has them")
  args = p.parse_args(argv)
  try:
    if args.list_optimizers:
      for name, spec in optimizers_lib.REGISTRY.items():
        state = "available" if optimizers_lib.is_available(name) else "not available"
        print(f"{name:22s} {state:14s} {spec.description}")
      return 0
    config = config_from_args(args, optimizer=args.optimizer, resume=args.resume,
                              checkpoint_every=args.checkpoint_every,
                              keep_checkpoints=args.keep_checkpoints, stop_after=args.stop_after,
                              mesh=args.mesh)
    workdir = args.workdir or os.path.join("runs", f"{args.config}_{args.optimizer}")
    train_and_evaluate(config, workdir)
  except ExampleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
