"""The training loop: ``train_and_evaluate(config, workdir)``, as in the Flax examples.

``examples.main`` is the command line for one run. ``train_and_evaluate`` writes into ``workdir``: ``config.json``, ``metrics.jsonl``
(train and eval records), ``checkpoints/`` (an orbax ``CheckpointManager``) and
``summary.json``.

With ``config.mesh`` the model is sharded over a (data, fsdp, tensor) device mesh (see
``shard_model``) and batches over data x fsdp. On a CPU, eight virtual devices need
``XLA_FLAGS=--xla_force_host_platform_device_count=8 NPROC=16`` in the environment.

Reliability: steps whose gradients hold a NaN or an infinity are skipped
(``optax.apply_if_finite``), counted and logged; after ``config.max_consecutive_nonfinite``
of them in a row the run stops with ``DivergenceError``. ``config.resume`` first checks that
the latest checkpoint was written by the same run configuration and restores it in memory;
only then are files in ``workdir`` touched, so a refused or unreadable checkpoint leaves
every file as it was.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import galore_optax as go
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from examples import configs as configs_lib
from examples import fileio
from examples import input_pipeline
from examples import models
from examples import optimizers as optimizers_lib
from examples.errors import DivergenceError, ExampleError

# Version of the run metadata stored with every checkpoint.
_CHECKPOINT_FORMAT = 1


@dataclasses.dataclass
class TrainResult:
  summary: Dict[str, Any]
  history: List[Dict[str, Any]]  # the records written to metrics.jsonl by this invocation
  model: models.Llama
  optimizer: nnx.Optimizer


def loss_fn(model: models.Llama, batch: jax.Array) -> jax.Array:
  """Mean next-token cross entropy; batch rows hold seq_len + 1 tokens."""
  return next_token_loss(model(batch[:, :-1]), batch)


def next_token_loss(logits: jax.Array, batch: jax.Array) -> jax.Array:
  """Mean cross entropy of ``logits`` (for ``batch[:, :-1]``) against ``batch[:, 1:]``."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch[:, 1:])
  return losses.mean()


def _update(model, optimizer, metrics, batch, learning_rate) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads, learning_rate=learning_rate)
  grad_norm = optax.global_norm(grads)
  # A skipped step (non-finite gradients) stays out of the logged averages.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  metrics.update(loss=jnp.where(finite, loss, 0.0), grad_norm=jnp.where(finite, grad_norm, 0.0),
                 mask=finite)
  return loss


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def train_step(model: models.Llama, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric,
               batch: jax.Array, learning_rate: jax.Array) -> jax.Array:
  """One update at ``learning_rate`` (an array, so that every value shares one compiled
  step); returns the loss before it."""
  return _update(model, optimizer, metrics, batch, learning_rate)


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def sharded_train_step(model: models.Llama, optimizer: nnx.Optimizer,
                       metrics: nnx.MultiMetric, batch: jax.Array,
                       learning_rate: jax.Array) -> jax.Array:
  """``train_step`` on a mesh: the new weights and optimizer state keep their shardings."""
  loss = _update(model, optimizer, metrics, batch, learning_rate)
  # With Auto mesh axes XLA picks the outputs' shardings; pin them to the Variables'
  # out_sharding metadata (set by shard_model; galore_optax sets the optimizer state's).
  for node in (model, optimizer):
    state = nnx.state(node)
    nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
  return loss


@nnx.jit
def eval_step(model: models.Llama, metrics: nnx.MultiMetric, batch: jax.Array) -> None:
  metrics.update(loss=loss_fn(model, batch))


def make_train_metrics(grad_norm: bool = True) -> nnx.MultiMetric:
  """Averages of the loss and, where the step has the whole gradient, of its norm."""
  if not grad_norm:
    return nnx.MultiMetric(loss=nnx.metrics.Average("loss"))
  return nnx.MultiMetric(loss=nnx.metrics.Average("loss"),
                         grad_norm=nnx.metrics.Average("grad_norm"))


# ------------------------------------------------------------------------------ fused step


class FusedOptimizer(nnx.Pytree):
  """``nnx.Optimizer``'s counterpart for ``config.fused``: the update inside the backward scan.

  ``go.fused_scan_step`` updates each stacked layer as soon as its gradient exists, so this
  optimizer takes the batch, not gradients: ``loss = optimizer.update(model, batch,
  learning_rate=...)``. ``step`` counts updates as nnx.Optimizer's does and ``opt_state`` is
  the ``go.FusedState``, kept one ``nnx.OptState`` per array (``leaves``) so that nnx.jit,
  donation and checkpoints handle it as they handle nnx.Optimizer's state. Gradient clipping
  and skipping non-finite steps are the fused step's own ``clip_norm`` and ``skip_nonfinite``
  (one more backward pass sums the squared gradients first).
  """

  def __init__(self, model: models.Llama, tx: optax.GradientTransformationExtraArgs, *,
               clip_norm: Optional[float], skip_nonfinite: bool):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    try:  # the probe needs the learning rate that every update receives
      state = go.fused_init(tx, params, learning_rate=np.float32(1e-3))
    except ValueError as e:
      raise ExampleError(f"--fused: {e}") from None
    leaves, self.treedef = jax.tree.flatten(state)
    self.step = nnx.OptState(jnp.array(0, dtype=jnp.uint32))
    self.leaves = nnx.List([nnx.OptState(x) for x in leaves])
    self.step_fn = _fused_step(model, tx, clip_norm, skip_nonfinite)

  @property
  def opt_state(self) -> go.FusedState:
    return jax.tree.unflatten(self.treedef, [v[...] for v in self.leaves])

  def update(self, model: models.Llama, batch: jax.Array, **kwargs) -> jax.Array:
    """Trains ``model`` on ``batch`` (rows of seq_len + 1 tokens); returns the loss before."""
    model_state = nnx.state(model, nnx.Param)
    params, state, loss = self.step_fn(nnx.to_pure_dict(model_state), self.opt_state, batch,
                                       **kwargs)
    nnx.replace_by_pure_dict(model_state, params)
    nnx.update(model, model_state)
    for variable, value in zip(self.leaves, jax.tree.leaves(state)):
      variable[...] = value
    self.step[...] += 1
    return loss


_FUSED_STEPS: Dict[Any, Callable] = {}


def _fused_step(model, tx, clip_norm, skip_nonfinite) -> Callable:
  """One step function per model shape and optimizer, so nnx.jit compiles it once."""
  key = (model.config, tx, clip_norm, skip_nonfinite)
  if key not in _FUSED_STEPS:
    embed_fn, layer_fn, logits_fn = models.fused_parts(model)
    _FUSED_STEPS[key] = go.fused_scan_step(
        lambda rest, batch: embed_fn(rest, batch[:, :-1]), layer_fn,
        lambda rest, h, batch: next_token_loss(logits_fn(rest, h), batch), tx,
        clip_norm=clip_norm, skip_nonfinite=skip_nonfinite)
  return _FUSED_STEPS[key]


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def fused_train_step(model: models.Llama, optimizer: FusedOptimizer, metrics: nnx.MultiMetric,
                     batch: jax.Array, learning_rate: jax.Array) -> jax.Array:
  """``train_step`` for a ``FusedOptimizer`` (no gradient norm: the whole gradient never
  exists)."""
  skipped_before = optimizer.opt_state.total_notfinite
  loss = optimizer.update(model, batch, learning_rate=learning_rate)
  finite = jnp.isfinite(loss) & (optimizer.opt_state.total_notfinite == skipped_before)
  metrics.update(loss=jnp.where(finite, loss, 0.0), mask=finite)
  return loss


def step_function(optimizer):
  """The jitted train step for ``optimizer`` (an nnx.Optimizer or a FusedOptimizer)."""
  return fused_train_step if isinstance(optimizer, FusedOptimizer) else train_step


def metrics_for(optimizer) -> nnx.MultiMetric:
  """The train metrics that ``step_function(optimizer)`` updates."""
  return make_train_metrics(grad_norm=not isinstance(optimizer, FusedOptimizer))


def compiled_step_peak(model, optimizer, batch: np.ndarray) -> Optional[int]:
  """XLA's planned peak of one train step (``go.planned_peak_bytes``): parameters, state,
  activations, gradients and every temporary, as compiled. Nothing runs."""
  metrics = metrics_for(optimizer)
  lowered = step_function(optimizer).lower(model, optimizer, metrics, jnp.asarray(batch),
                                           np.float32(0.0))
  return go.planned_peak_bytes(lowered.compile())


def evaluate(model: models.Llama, batches) -> Dict[str, float]:
  """Mean loss and perplexity over ``batches``."""
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


# ------------------------------------------------------------------------------ checkpoints


def first_line(e: BaseException) -> str:
  """The exception's type and the first line of its message, for one-line errors and logs."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _describe(identity: Dict[str, Any], keys) -> str:
  return ", ".join(f"{k} {identity.get(k)!r}" if isinstance(identity.get(k), str)
                   else f"{k} {identity.get(k)}" for k in keys)


class Checkpoints:
  """An orbax ``CheckpointManager`` holding the parameters, the optimizer state and the run.

  Each step stores two items: ``state``, the model parameters and optimizer state as one flat
  mapping {path: array}, and ``run``, the settings that decide the trajectory
  (``run_identity``), which ``restore`` compares with the resuming run before reading any
  array. The mapping is flat because orbax refuses zero-size arrays and some optimizers keep
  them (optax.contrib.galore stores an empty projector for every leaf it does not project):
  those leaves are left out and keep their freshly initialised (equally empty) values.
  """

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "run"),
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

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
           identity: Dict[str, Any]) -> None:
    keys, leaves, _ = self._flat(model, optimizer)
    flat = {k: v for k, v in zip(keys, leaves) if np.size(v)}
    self.manager.save(step, args=self._ocp.args.Composite(
        state=self._ocp.args.StandardSave(flat),
        run=self._ocp.args.JsonSave({"format": _CHECKPOINT_FORMAT, "run": identity})))

  def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
              identity: Optional[Dict[str, Any]] = None) -> None:
    """Loads checkpoint ``step`` into ``model`` and ``optimizer``.

    Args:
      step: the checkpoint's step.
      model, optimizer: receive the restored values (only once everything was read).
      identity: this run's ``run_identity``; a checkpoint written with other values is
        refused. None: no check.

    Raises:
      ExampleError: one line saying what does not match, or why the checkpoint cannot be
        read. Nothing is changed then.
    """
    where = f"the checkpoint of step {step} in {self.directory}"
    if identity is not None:
      try:
        meta = self.manager.restore(
            step, args=self._ocp.args.Composite(run=self._ocp.args.JsonRestore()))["run"]
      except Exception as e:  # pylint: disable=broad-except  (missing or unreadable item)
        raise ExampleError(f"{where} has no readable run settings ({first_line(e)}); it was "
                           "written by another version of this example or is damaged; "
                           "start a new --workdir") from None
      written = meta.get("run", {}) if isinstance(meta, dict) else {}
      differ = sorted(k for k in set(written) | set(identity)
                      if written.get(k) != identity.get(k))
      if differ:
        by = written.get("optimizer", "?")
        if "optimizer" in differ:
          differ.remove("optimizer")
          ask = f"this run asks for {identity.get('optimizer')}"
          ask += f" with {_describe(identity, differ)}" if differ else ""
          raise ExampleError(f"{where} was written by {by}"
                             + (f" with {_describe(written, differ)}" if differ else "")
                             + f"; {ask} (resume with the same settings or use another "
                             "--workdir)")
        raise ExampleError(f"{where} was written by {by} with {_describe(written, differ)}; "
                           f"this run asks for {_describe(identity, differ)} (resume with the "
                           "same settings or use another --workdir)")
    keys, leaves, treedef = self._flat(model, optimizer)
    abstract = {k: self._ocp.utils.to_shape_dtype_struct(v)
                for k, v in zip(keys, leaves) if np.size(v)}
    try:
      restored = self.manager.restore(step, args=self._ocp.args.Composite(
          state=self._ocp.args.StandardRestore(abstract)))["state"]
      jax.block_until_ready(restored)
    except Exception as e:  # pylint: disable=broad-except  (damaged files, other layout)
      # TensorStore appends a long dump of its spec: the first sentence says what failed.
      reason = first_line(e).split(". See full TensorStore details")[0]
      raise ExampleError(f"cannot read {where}: {reason}") from None
    if set(restored) != set(abstract):
      raise ExampleError(f"{where} holds other arrays than this run's state")
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

  Auto, not jax.make_mesh's default Explicit axes: models.py carries no sharding
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


# ------------------------------------------------------------------------------ configuration


def optimizer_config(config: configs_lib.TrainConfig) -> optimizers_lib.OptimizerConfig:
  """The optimizer's part of ``config``, with the per-model defaults filled in."""
  rank = config.rank
  if rank is None:
    rank = configs_lib.DEFAULT_RANKS.get(config.model, 128)
  return optimizers_lib.OptimizerConfig(
      learning_rate=config.learning_rate, total_steps=config.steps,
      warmup_fraction=config.warmup_fraction, min_lr_ratio=config.min_lr_ratio,
      weight_decay=config.weight_decay, grad_clip=config.grad_clip, rank=rank,
      update_proj_gap=config.update_proj_gap, scale=config.galore_scale,
      proj_type=config.proj_type, refresh=config.refresh, targets=config.galore_targets,
      max_consecutive_nonfinite=config.max_consecutive_nonfinite)


def validate_config(config: configs_lib.TrainConfig) -> configs_lib.LlamaConfig:
  """Checks everything that can be checked before reading data or writing files."""
  model_cfg = configs_lib.get_model_config(
      config.model, scan_layers=config.scan_layers, remat=config.remat,
      tie_embeddings=config.tie_embeddings, dtype=config.dtype, param_dtype=config.param_dtype)
  models.remat_policy(model_cfg.remat)
  optimizers_lib.check_config(config.optimizer, optimizer_config(config),
                              stacked_kernels=config.scan_layers)
  for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every"):
    if getattr(config, name) < 1:
      raise ExampleError(f"{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
  if config.checkpoint_every < 0:
    raise ExampleError(f"checkpoint-every must be >= 0, got {config.checkpoint_every}")
  if config.seq_len is not None and config.seq_len < 2:
    raise ExampleError(f"seq-len must be at least 2, got {config.seq_len}")
  if config.stop_after is not None and config.stop_after < 1:
    raise ExampleError(f"stop-after must be positive, got {config.stop_after}")
  if config.eval_split not in ("validation", "tuning"):
    raise ExampleError(f"eval split must be 'validation' or 'tuning', got {config.eval_split!r}")
  if config.fused and not config.scan_layers:
    raise ExampleError("--fused updates each layer inside the backward scan of stacked layers: "
                       "add --scan-layers")
  if config.fused and config.mesh is not None:
    raise ExampleError("--fused is not implemented on a --mesh yet; train without one of them")
  if config.mesh is not None:
    sizes = parse_mesh(config.mesh)
    if config.batch_size % (sizes["data"] * sizes["fsdp"]):
      raise ExampleError(f"batch-size {config.batch_size} must be a multiple of data x fsdp "
                         f"= {sizes['data'] * sizes['fsdp']} (--mesh {config.mesh})")
  return model_cfg


def load_dataset(config: configs_lib.TrainConfig) -> input_pipeline.Dataset:
  """The dataset ``config`` describes (corpus, tokenizer, packed train/tuning/validation rows)."""
  model_cfg = validate_config(config)
  vocab = config.vocab_size or model_cfg.vocab_size or configs_lib.bpe_vocab_size(config.model)
  return input_pipeline.build_dataset(
      config.data, config.seq_len or model_cfg.max_seq_len, tokenizer=config.tokenizer,
      vocab_size=vocab, val_fraction=config.val_fraction,
      tuning_fraction=config.tuning_fraction, max_docs=config.max_docs,
      cache_dir=config.cache_dir)


def run_identity(config: configs_lib.TrainConfig, model_cfg: configs_lib.LlamaConfig,
                 peak_lr: float) -> Dict[str, Any]:
  """The settings that decide a run's trajectory, with defaults resolved (JSON-able).

  A checkpoint stores them; ``--resume`` refuses one written with other values.
  """
  identity = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in configs_lib.RESUME_MAY_CHANGE}
  identity.update(learning_rate=peak_lr, rank=optimizer_config(config).rank,
                  seq_len=model_cfg.max_seq_len, vocab_size=model_cfg.vocab_size)
  for key in ("data", "tokenizer"):  # the same file, named from another folder
    if identity[key] and os.path.exists(os.path.expanduser(identity[key])):
      identity[key] = os.path.abspath(os.path.expanduser(identity[key]))
  # The model's shape, whatever the config's name stands for today.
  identity.update({f"model.{k}": v for k, v in dataclasses.asdict(model_cfg).items()})
  return json.loads(json.dumps(identity))


# ------------------------------------------------------------------------------ training


def train_and_evaluate(config: configs_lib.TrainConfig, workdir: str, *,
                       dataset: Optional[input_pipeline.Dataset] = None,
                       log: Callable[[str], None] = print,
                       on_step: Optional[Callable[[int, float], None]] = None) -> TrainResult:
  """Trains ``config.model`` with ``config.optimizer``; writes everything under ``workdir``.

  Args:
    config: the training configuration (examples.configs.TrainConfig).
    workdir: output folder: config.json, metrics.jsonl, checkpoints/, summary.json.
    dataset: a prebuilt dataset (examples.compare shares one between runs); built from
      ``config`` when None.
    log: where progress lines go (print by default).
    on_step: called after every training step with (step, loss) (examples.compare's
      progress bar).

  Returns:
    TrainResult with the summary, the metric records, the model and the optimizer.

  Raises:
    ExampleError: bad configuration or data, or a checkpoint that ``--resume`` cannot use.
    DivergenceError: ``config.max_consecutive_nonfinite`` steps in a row had non-finite
      gradients (or, without skipping, the loss was not finite).
  """
  t_start = time.perf_counter()
  model_cfg = validate_config(config)
  if config.mesh is None:
    return _train_and_evaluate(config, workdir, dataset, log, on_step, t_start, model_cfg, None)
  mesh = build_mesh(parse_mesh(config.mesh))
  with jax.set_mesh(mesh):  # the model's and optimizer's Variables shard on this mesh
    return _train_and_evaluate(config, workdir, dataset, log, on_step, t_start, model_cfg, mesh)


def _train_and_evaluate(config, workdir, dataset, log, on_step, t_start, model_cfg,
                        mesh) -> TrainResult:
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
  sampler = input_pipeline.BatchSampler(dataset.train, config.batch_size, config.seed)
  place = _batch_placer(mesh)
  eval_label = "eval" if config.eval_split == "validation" else config.eval_split
  eval_batches = [place(b) for b in input_pipeline.eval_batches(
      dataset.split(config.eval_split), config.batch_size, config.eval_batches)]

  # ---------------------------------------------------------------- model and optimizer
  model = models.Llama(model_cfg, rngs=nnx.Rngs(params=config.seed))
  opt_cfg = optimizer_config(config)
  if config.fused:  # the fused step clips and skips itself; tx holds neither
    tx, schedule, peak_lr = optimizers_lib.build_optimizer(config.optimizer, dataclasses.replace(
        opt_cfg, grad_clip=None, max_consecutive_nonfinite=0))
    optimizer = FusedOptimizer(model, tx, clip_norm=opt_cfg.grad_clip,
                               skip_nonfinite=opt_cfg.max_consecutive_nonfinite > 0)
    step_fn = fused_train_step
  else:
    tx, schedule, peak_lr = optimizers_lib.build_optimizer(config.optimizer, opt_cfg)
    step_fn = train_step
    if mesh is not None:
      shard_model(model, mesh, dict(mesh.shape), model_cfg.scan_layers)
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
  params_count = models.param_count(model)
  identity = run_identity(config, model_cfg, peak_lr)

  # ---------------------------------------------------------------- workdir
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  has_checkpoints = os.path.isdir(ckpt_dir) and any(
      name.isdigit() for name in os.listdir(ckpt_dir))
  if has_checkpoints and not config.resume and config.save_checkpoints:
    raise ExampleError(f"{workdir} already holds checkpoints; pass --resume to continue "
                       "or choose another --workdir")
  checkpoints = None
  start_step = 0
  with contextlib.ExitStack() as cleanup:
    if config.resume and has_checkpoints:
      # Checked and read into memory before anything in workdir changes.
      checkpoints = Checkpoints(ckpt_dir, config.keep_checkpoints)
      cleanup.callback(checkpoints.close)
      start_step = int(checkpoints.latest_step())
      checkpoints.restore(start_step, model, optimizer, identity)
    os.makedirs(workdir, exist_ok=True)
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):
      os.unlink(summary_path)  # a summary of an earlier run would describe this one
    fileio.write_json(os.path.join(workdir, "config.json"),
                      {"train": dataclasses.asdict(config), "model": dataclasses.asdict(model_cfg)})
    if checkpoints is None and config.save_checkpoints:
      checkpoints = Checkpoints(ckpt_dir, config.keep_checkpoints)
      cleanup.callback(checkpoints.close)
    if start_step:
      log(f"resumed from step {start_step} ({ckpt_dir})")
    elif config.resume:
      log(f"no checkpoint in {ckpt_dir}; starting from scratch")
    # Records after the restored step belong to the interrupted future; drop them.
    fileio.write_text(metrics_path, "".join(_read_metrics(metrics_path, start_step)
                                            if start_step else []))

    log(f"model {config.model}: {params_count / 1e6:.2f}M parameters "
        f"({'scanned' if model_cfg.scan_layers else 'unrolled'} layers"
        f"{', update fused into the backward scan' if config.fused else ''}, "
        f"remat {model_cfg.remat}, "
        f"{model_cfg.param_dtype} params / {model_cfg.dtype} compute); optimizer "
        f"{config.optimizer} (peak lr {peak_lr:g}), state {opt_state_bytes / 2**20:.2f} MiB")
    log(f"data {dataset.describe()}; evaluating on the {config.eval_split} split")
    if mesh is not None:
      log(f"mesh {', '.join(f'{k}={v}' for k, v in mesh.shape.items())} over {mesh.size} "
          f"devices; optimizer state {per_device / 2**20:.2f} MiB on the fullest device")

    loop = _Loop(config, model, optimizer, step_fn, sampler, place, eval_batches, eval_label,
                 schedule, checkpoints, identity, log, on_step)
    with open(metrics_path, "a", encoding="utf-8") as metrics_file:
      loop.run(start_step, metrics_file)

  train_time = sum(loop.step_times) + (loop.compile_time or 0.0)
  steps_timed = loop.step_times
  steady = sum(steps_timed) / len(steps_timed) if steps_timed else (
      loop.compile_time or float("nan"))
  tokens_per_step = config.batch_size * seq_len
  summary = {
      "config": config.model,
      "optimizer": config.optimizer,
      "fused": config.fused,
      "steps": loop.final_step,
      "batch_size": config.batch_size,
      "seq_len": seq_len,
      "tokens": loop.final_step * tokens_per_step,
      "params": params_count,
      "param_bytes": go.tree_bytes(nnx.state(model, nnx.Param)),
      "opt_state_bytes": opt_state_bytes,
      "mesh": None if mesh is None else dict(mesh.shape),
      "opt_state_bytes_per_device": per_device,
      "eval_split": config.eval_split,
      "final_eval_loss": loop.last_eval["loss"],
      "final_eval_perplexity": loop.last_eval["perplexity"],
      "skipped_steps": loop.skipped_total,
      "first_step_s": loop.compile_time,
      "step_time_s": steady,
      "tokens_per_s": tokens_per_step / steady if steady == steady and steady > 0 else None,
      "train_time_s": train_time,
      "wall_time_s": time.perf_counter() - t_start,
      "peak_memory_bytes": _peak_memory_bytes(),
      "device": str(jax.devices()[0].device_kind),
      "peak_lr": peak_lr,
      "seed": config.seed,
      "data": dataset.describe(),
  }
  fileio.write_json(os.path.join(workdir, "summary.json"), summary)
  log(format_summary(summary))
  return TrainResult(summary, loop.history, model, optimizer)


class _Loop:
  """The step loop of one run: steps, metric records, evaluations, checkpoints, skips."""

  def __init__(self, config, model, optimizer, step_fn, sampler, place, eval_batches,
               eval_label, schedule, checkpoints, identity, log, on_step):
    self.config, self.model, self.optimizer = config, model, optimizer
    self.step_fn, self.sampler, self.place = step_fn, sampler, place
    self.eval_batches, self.eval_label, self.schedule = eval_batches, eval_label, schedule
    self.checkpoints, self.identity = checkpoints, identity
    self.log, self.on_step = log, on_step
    self.history: List[Dict[str, Any]] = []
    self.step_times: List[float] = []
    self.compile_time: Optional[float] = None
    self.last_eval: Optional[Dict[str, Any]] = None
    self.final_step = 0
    self.skipped_total = 0
    self._file = None

  def _record(self, entry: Dict[str, Any]) -> None:
    self.history.append(entry)
    self._file.write(json.dumps(entry) + "\n")
    self._file.flush()

  def _evaluate(self, step: int) -> None:
    result = evaluate(self.model, self.eval_batches)
    self.last_eval = {"step": step, "split": self.eval_label, **result}
    self._record(self.last_eval)
    self.log(f"step {step}: {self.eval_label} loss {result['loss']:.4f}, "
             f"perplexity {result['perplexity']:.2f}")

  def _check_finite(self, step: int, loss: float) -> None:
    """Counts skipped steps; raises DivergenceError when too many came in a row."""
    counts = optimizers_lib.nonfinite_counts(self.optimizer.opt_state)
    limit = self.config.max_consecutive_nonfinite
    if counts is None:
      if not math.isfinite(loss):
        raise DivergenceError(f"the loss became {loss} at step {step}; lower the learning "
                              "rate, or let --max-consecutive-nonfinite skip such steps")
      return
    in_a_row, total = int(counts[0][...]), int(counts[1][...])
    if total > self.skipped_total:
      self.log(f"step {step}: non-finite gradients, update skipped ({in_a_row} in a row, "
               f"{total} in all)")
    self.skipped_total = total
    if in_a_row >= limit:
      raise DivergenceError(f"{in_a_row} steps in a row up to step {step} had non-finite "
                            f"gradients (--max-consecutive-nonfinite {limit}); lower the "
                            "learning rate or check the data")

  def run(self, start_step: int, metrics_file) -> None:
    config = self.config
    self._file = metrics_file
    self.skipped_total = 0
    counts = optimizers_lib.nonfinite_counts(self.optimizer.opt_state)
    if counts is not None:
      self.skipped_total = int(counts[1][...])
    end_step = config.steps
    if config.stop_after is not None:
      end_step = min(end_step, start_step + config.stop_after)
    tokens_per_step = config.batch_size * (self.sampler.rows.shape[1] - 1)
    metrics = metrics_for(self.optimizer)
    progress = None
    log = self.log
    try:
      if start_step == 0 and config.eval_at_start:
        self._evaluate(0)
      if config.progress:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        progress = tqdm(total=config.steps, initial=start_step, desc=config.optimizer,
                        unit="step", dynamic_ncols=True, leave=False)
        self.log = functools.partial(_tqdm_write, progress, log)
      last_logged, window_time = start_step, 0.0
      for step in range(start_step, end_step):
        batch = self.place(self.sampler(step))
        learning_rate = np.float32(self.schedule(step))
        t0 = time.perf_counter()
        loss = float(self.step_fn(self.model, self.optimizer, metrics, batch,
                                  learning_rate))  # waits
        dt = time.perf_counter() - t0
        window_time += dt
        if self.compile_time is None:
          self.compile_time = dt
        else:
          self.step_times.append(dt)
        done = step + 1
        self._check_finite(done, loss)
        if self.on_step is not None:
          self.on_step(done, loss)
        if progress is not None:
          progress.update(1)
          progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                               step_s=f"{dt:.3f}")
        if done % config.log_every == 0 or done == end_step:
          # Averages over the window's finite steps (None: every step was skipped).
          values = {k: float(v) for k, v in metrics.compute().items()}
          values = {k: v if math.isfinite(v) else None for k, v in values.items()}
          n = done - last_logged
          self._record({"step": done, "split": "train", "loss": values["loss"],
                        "grad_norm": values.get("grad_norm"),
                        "lr": float(learning_rate), "tokens": done * tokens_per_step,
                        "skipped_steps": self.skipped_total,
                        "step_time_s": window_time / n,
                        "tokens_per_s": tokens_per_step * n / window_time})
          metrics.reset()
          last_logged, window_time = done, 0.0
        if done % config.eval_every == 0 or done == end_step:
          self._evaluate(done)
        if self.checkpoints is not None and config.save_checkpoints and (
            done == end_step or (config.checkpoint_every and done % config.checkpoint_every == 0)):
          self.checkpoints.save(done, self.model, self.optimizer, self.identity)
      self.final_step = int(self.optimizer.step[...])
      if self.last_eval is None or self.last_eval["step"] != self.final_step:
        self._evaluate(self.final_step)
    finally:
      self.log = log
      if progress is not None:
        progress.close()


def time_train_steps(model: models.Llama, optimizer: nnx.Optimizer,
                     batches: List[np.ndarray], learning_rate: float) -> List[float]:
  """Seconds of one (already compiled) train step per batch, each waited for.

  examples.compare calls this for its optimizers in turn, so that they are timed side by
  side under the same machine load rather than in separate runs minutes apart.
  """
  metrics = metrics_for(optimizer)
  step = step_function(optimizer)
  times = []
  for batch in batches:
    batch = jnp.asarray(batch)
    t0 = time.perf_counter()
    float(step(model, optimizer, metrics, batch, np.float32(learning_rate)))
    times.append(time.perf_counter() - t0)
  return times


def _tqdm_write(progress, fallback, message: str) -> None:
  if progress is not None and not progress.disable:
    progress.write(message, file=sys.stderr)
  else:
    fallback(message)


def format_summary(s: Dict[str, Any]) -> str:
  """A few lines for the log: losses, state size, speed."""
  split = "eval" if s.get("eval_split", "validation") == "validation" else s["eval_split"]
  lines = [
      f"summary ({s['optimizer']}, {s['steps']} steps, {s['tokens']:,} tokens):",
      f"  final {split} loss {s['final_eval_loss']:.4f}, "
      f"perplexity {s['final_eval_perplexity']:.2f}",
      f"  optimizer state {s['opt_state_bytes']:,} bytes ({s['opt_state_bytes'] / 2**20:.2f} MiB); "
      f"params {s['param_bytes']:,} bytes",
  ]
  if s.get("skipped_steps"):
    lines.append(f"  {s['skipped_steps']} steps skipped (non-finite gradients)")
  if s["tokens_per_s"]:
    lines.append(f"  {s['tokens_per_s']:,.0f} tokens/s, {s['step_time_s'] * 1e3:.1f} ms/step "
                 f"(first step {s['first_step_s']:.1f} s incl. compilation); "
                 f"wall {s['wall_time_s']:.1f} s")
  if s["peak_memory_bytes"] is not None:
    lines.append(f"  peak device memory {s['peak_memory_bytes'] / 2**30:.2f} GiB on {s['device']}")
  return "\n".join(lines)

