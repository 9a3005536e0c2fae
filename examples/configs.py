"""Model and training configurations.

Model sizes follow the LLaMA configurations used in the GaLore paper (Zhao et al. 2024,
Table 2/Appendix): hidden / intermediate / heads / layers, vocabulary 32000 (the T5
tokenizer used with C4) and sequence length 256. Two CPU-sized models take their vocabulary
from the tokenizer (a byte-level BPE trained on the corpus):

* ``small`` (the comparison's default): hidden 256, 4 layers, a 1024-token BPE. The attention
  and MLP kernels hold 86% of its 3.7M parameters, as in the paper's larger models (60m: 44%,
  130m: 63%, 350m: 82%, 1b: 90% with the 32000-token vocabulary), so the projected matrices
  decide how well it trains.
* ``tiny``: hidden 128, 4 layers, a 4096-token BPE: quick to compile, but embeddings and LM
  head hold most of its parameters, which GaLore trains with plain Adam.
"""

import dataclasses
from typing import Optional

from examples.errors import ExampleError

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of the LLaMA decoder."""

  hidden_size: int
  intermediate_size: int
  num_heads: int
  num_layers: int
  # None: take the vocabulary size of the tokenizer.
  vocab_size: Optional[int] = 32000
  max_seq_len: int = 256
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  # Stack the decoder layers (nnx.vmap at init, nnx.scan in the forward pass): every
  # kernel then has a leading layer axis, shape (num_layers, in, out).
  scan_layers: bool = False
  # Rematerialisation: 'none', 'full', or the name of a jax.checkpoint_policies policy
  # (e.g. 'dots_saveable', 'nothing_saveable', 'dots_with_no_batch_dims_saveable').
  remat: str = "none"
  dtype: str = "float32"  # computation dtype
  param_dtype: str = "float32"  # parameter (and hence optimizer moment) dtype
  init_std: float = 0.02

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


MODEL_CONFIGS = {
    "tiny": LlamaConfig(hidden_size=128, intermediate_size=344, num_heads=4, num_layers=4,
                        vocab_size=None, max_seq_len=128),
    "small": LlamaConfig(hidden_size=256, intermediate_size=688, num_heads=4, num_layers=4,
                         vocab_size=None, max_seq_len=128),
    "60m": LlamaConfig(hidden_size=512, intermediate_size=1376, num_heads=8, num_layers=8),
    "130m": LlamaConfig(hidden_size=768, intermediate_size=2048, num_heads=12, num_layers=12),
    "350m": LlamaConfig(hidden_size=1024, intermediate_size=2736, num_heads=16, num_layers=24),
    "1b": LlamaConfig(hidden_size=2048, intermediate_size=5461, num_heads=32, num_layers=24),
    "7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_heads=32, num_layers=32),
}

# GaLore ranks used in the paper for each size (tiny and small: a quarter of the hidden size,
# as for 60m).
DEFAULT_RANKS = {"tiny": 32, "small": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512,
                 "7b": 1024}

# Vocabulary of the byte-level BPE trained on the corpus when no tokenizer file is given
# and the model config does not fix one (DEFAULT_BPE_VOCAB for configs not listed).
DEFAULT_BPE_VOCAB = 4096
BPE_VOCABS = {"small": 1024}


def bpe_vocab_size(name: str) -> int:
  """Vocabulary of the BPE trained for model config ``name`` when none is given."""
  return BPE_VOCABS.get(name, DEFAULT_BPE_VOCAB)


def get_model_config(name: str, **overrides) -> LlamaConfig:
  """The named model configuration with fields replaced by ``overrides`` (None = keep)."""
  if name not in MODEL_CONFIGS:
    raise ExampleError(f"unknown config {name!r} (choose from: {', '.join(MODEL_CONFIGS)})")
  cfg = MODEL_CONFIGS[name]
  overrides = {k: v for k, v in overrides.items() if v is not None}
  for key in ("dtype", "param_dtype"):
    if key in overrides and overrides[key] not in DTYPES:
      raise ExampleError(f"unknown {key} {overrides[key]!r} (choose from: {', '.join(DTYPES)})")
  cfg = dataclasses.replace(cfg, **overrides)
  if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 2:
    raise ExampleError(
        f"hidden size {cfg.hidden_size} must split into {cfg.num_heads} heads of even size")
  return cfg


@dataclasses.dataclass
class TrainConfig:
  """Everything ``train_and_evaluate`` needs. ``None`` means "the default for this model"."""

  # Model.
  model: str = "small"
  seq_len: Optional[int] = None  # default: the model's max_seq_len
  scan_layers: bool = False
  remat: str = "none"
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Apply the update inside the backward scan of the stacked layers (go.fused_scan_step):
  # the layers' whole gradient never exists. Needs scan_layers.
  fused: bool = False

  # Optimizer (see examples/optimizers.py for the per-optimizer defaults).
  optimizer: str = "galore_adamw"
  learning_rate: Optional[float] = None  # peak; default 1e-2 for GaLore variants, 1e-3 for AdamW
  rank: Optional[int] = None  # DEFAULT_RANKS[model]
  update_proj_gap: int = 200
  galore_scale: float = 0.25
  proj_type: str = "std"
  refresh: str = "svd"  # subspace refresh: svd (exact), randomized or power
  galore_targets: str = r"attn|mlp"  # regex on parameter paths selecting projected matrices
  weight_decay: float = 0.0
  grad_clip: Optional[float] = None  # global-norm clipping threshold; None = off
  warmup_fraction: float = 0.1
  min_lr_ratio: float = 0.1
  # Steps whose gradients are not finite are skipped (optax.apply_if_finite); the run stops
  # with an error after this many in a row. 0: no skipping, the first NaN stops the run.
  max_consecutive_nonfinite: int = 10

  # Data.
  data: Optional[str] = None  # None: embedded stdlib docstring corpus
  tokenizer: Optional[str] = None  # tokenizer.json / sentencepiece .model; None: train a BPE
  vocab_size: Optional[int] = None  # vocabulary of the trained BPE (default bpe_vocab_size)
  max_docs: Optional[int] = None  # cap on documents read (default: all; 20000 for C4)
  val_fraction: float = 0.05  # documents held out for the reported validation loss
  tuning_fraction: float = 0.05  # documents held out for choosing learning rates
  cache_dir: Optional[str] = None

  # Loop.
  steps: int = 200
  batch_size: int = 16
  seed: int = 0
  eval_every: int = 50
  eval_batches: int = 8
  eval_split: str = "validation"  # "tuning" while choosing a learning rate (examples.compare)
  eval_at_start: bool = True  # also evaluate before the first step (a tuning run needs no curve)
  log_every: int = 10
  checkpoint_every: int = 0  # 0: only at the end
  save_checkpoints: bool = True  # False: no checkpoints at all (examples.compare)
  keep_checkpoints: int = 2
  resume: bool = False
  stop_after: Optional[int] = None  # stop this invocation after this many steps (preemption)
  progress: bool = True

  # Device mesh over (data, fsdp, tensor): "2,4,1" or "data=2,fsdp=4" (missing axes 1);
  # None: a single device, no sharding (see examples.train.parse_mesh).
  mesh: Optional[str] = None


# Fields a resumed run may change: how it is observed, saved and laid out on devices. Every
# other field decides the trajectory (model, optimizer, data, schedule, seed), so --resume
# refuses a checkpoint written with a different value.
RESUME_MAY_CHANGE = frozenset({
    "eval_every", "eval_batches", "eval_split", "eval_at_start", "log_every", "checkpoint_every",
    "save_checkpoints", "keep_checkpoints", "resume", "stop_after", "progress", "mesh",
    "cache_dir"})


def get_config(**overrides) -> TrainConfig:
  """A TrainConfig with the given fields replaced (keys that are None are ignored)."""
  cfg = TrainConfig()
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  for key, value in overrides.items():
    if key not in fields:
      raise ExampleError(f"unknown config field {key!r}")
    if value is not None:
      setattr(cfg, key, value)
  return cfg
