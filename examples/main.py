"""Pretrain the LLaMA example once, with AdamW, a GaLore optimizer or a peer baseline.

    python -m examples.main --config small --optimizer galore_adamw --steps 200
    python -m examples.main --config 60m --optimizer galore_adamw --data /data/c4 \\
        --tokenizer /data/t5/tokenizer.json --batch-size 64 --steps 10000 --bf16 \\
        --workdir runs/60m_galore --checkpoint-every 1000          # add --resume to continue
    python -m examples.main --config tiny --mesh data=2,fsdp=2,tensor=2 --scan-layers

The loop itself is ``examples.train.train_and_evaluate(config, workdir)``; ``examples.compare`` runs it for
several optimizers, each at its own tuned learning rate.
"""

import argparse
import inspect
import os
import sys
from typing import Callable

from examples import configs as configs_lib
from examples import input_pipeline
from examples import optimizers as optimizers_lib
from examples import train as train_lib
from examples.errors import ExampleError


class Parser(argparse.ArgumentParser):
  """argparse that reports bad arguments as one ``error: ...`` line and exits 2."""

  def error(self, message):
    self.exit(2, f"error: {' '.join(message.split())}\n")


def add_common_args(p: argparse.ArgumentParser) -> None:
  """Arguments shared by examples.main and examples.compare (one training configuration)."""
  d = configs_lib.TrainConfig()
  p.add_argument("--config", default=d.model,
                 help=f"model size: {', '.join(configs_lib.MODEL_CONFIGS)}")
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--batch-size", type=int, default=d.batch_size)
  p.add_argument("--seq-len", type=int, default=None, help="default: the config's (small 128)")
  p.add_argument("--data", default=None,
                 help="C4 folder (c4-train.*.json.gz), .txt/.jsonl/.rst file or folder, "
                      "hf:NAME[:CONFIG[:SPLIT]]; default: embedded stdlib docstrings")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer.json or sentencepiece .model; default: train a byte-level BPE")
  p.add_argument("--vocab-size", type=int, default=None,
                 help="vocabulary of the trained BPE (default: small 1024, tiny 4096)")
  p.add_argument("--max-docs", type=int, default=None)
  p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                 help="documents held out for the reported validation loss")
  p.add_argument("--tuning-fraction", type=float, default=d.tuning_fraction,
                 help="documents held out for choosing learning rates")
  p.add_argument("--cache-dir", default=None, help="tokenizer/corpus cache "
                 f"(default $GALORE_EXAMPLES_CACHE or {input_pipeline.default_cache_dir()})")
  p.add_argument("--rank", type=int, default=None,
                 help="GaLore rank (default per config; apollo_mini's is always 1)")
  p.add_argument("--update-proj-gap", type=int, default=d.update_proj_gap)
  p.add_argument("--galore-scale", type=float, default=d.galore_scale)
  p.add_argument("--proj-type", default=d.proj_type)
  p.add_argument("--refresh", default=d.refresh,
                 help="galore_optax subspace refresh: svd (exact), randomized or power "
                      "(apollo_adamw and apollo_mini draw their own random projection)")
  p.add_argument("--weight-decay", type=float, default=d.weight_decay)
  p.add_argument("--grad-clip", type=float, default=None, help="global-norm clip (default off)")
  p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
  p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
  p.add_argument("--max-consecutive-nonfinite", type=int, default=d.max_consecutive_nonfinite,
                 help="skip steps with non-finite gradients and stop after this many in a "
                      "row; 0: no skipping (the first NaN stops the run)")
  p.add_argument("--eval-every", type=int, default=d.eval_every)
  p.add_argument("--eval-batches", type=int, default=d.eval_batches)
  p.add_argument("--log-every", type=int, default=d.log_every)
  p.add_argument("--scan-layers", action="store_true", help="stack layers: (L, in, out) kernels")
  p.add_argument("--fused", action="store_true",
                 help="update each layer inside the backward scan (go.fused_scan_step; "
                      "needs --scan-layers): the layers' whole gradient never exists")
  p.add_argument("--remat", default=d.remat,
                 help="none, full, or a jax.checkpoint_policies name (e.g. dots_saveable)")
  p.add_argument("--tie-embeddings", action="store_true")
  p.add_argument("--bf16", action="store_true", help="bfloat16 parameters and computation")
  p.add_argument("--dtype", default=None, help="computation dtype (float32, bfloat16)")
  p.add_argument("--param-dtype", default=None, help="parameter dtype (float32, bfloat16)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, **extra) -> configs_lib.TrainConfig:
  """The TrainConfig of ``add_common_args``' arguments, with ``extra`` fields on top."""
  dtype = args.dtype or ("bfloat16" if args.bf16 else "float32")
  param_dtype = args.param_dtype or ("bfloat16" if args.bf16 else "float32")
  return configs_lib.get_config(
      model=args.config, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
      max_docs=args.max_docs, val_fraction=args.val_fraction,
      tuning_fraction=args.tuning_fraction, cache_dir=args.cache_dir, rank=args.rank,
      update_proj_gap=args.update_proj_gap, galore_scale=args.galore_scale,
      proj_type=args.proj_type, refresh=args.refresh, weight_decay=args.weight_decay,
      grad_clip=args.grad_clip, warmup_fraction=args.warmup_fraction,
      min_lr_ratio=args.min_lr_ratio, max_consecutive_nonfinite=args.max_consecutive_nonfinite,
      eval_every=args.eval_every, eval_batches=args.eval_batches, log_every=args.log_every,
      scan_layers=args.scan_layers, fused=args.fused, remat=args.remat,
      tie_embeddings=args.tie_embeddings,
      dtype=dtype, param_dtype=param_dtype, progress=not args.no_progress, **extra)


def exit_status(command: Callable[[], int]) -> int:
  """Runs a command's body (examples.main, examples.compare); returns its exit status.

  An ExampleError (bad arguments, data or configuration, a diverged run) is one
  ``error: ...`` line and status 2, Ctrl-C status 130; anything else is a bug and keeps its
  traceback.
  """
  try:
    return command()
  except ExampleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130


def _drop_orbax_read_noise() -> None:
  """Keeps a failed checkpoint read to the command's one error line.

  When one array of a checkpoint cannot be read, orbax's other reads are still
  in flight; they finish against its closed event loop and report through
  ``sys.unraisablehook`` ("Event loop is closed", or the same read error again
  from an orbax coroutine nobody awaits any more). Those two are dropped;
  everything else reaches the default hook.
  """
  default = sys.unraisablehook

  def hook(unraisable):
    closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                   and str(unraisable.exc_value) == "Event loop is closed")
    orbax_read = (inspect.iscoroutine(unraisable.object)
                  and "orbax" in unraisable.object.cr_code.co_filename)
    if not (closed_loop or orbax_read):
      default(unraisable)

  sys.unraisablehook = hook


def main(argv=None, prog: str = "python -m examples.main") -> int:
  """Runs one training from command-line arguments; returns the exit status."""
  p = Parser(prog=prog, description=__doc__.split("\n\n")[0],
             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_common_args(p)
  p.add_argument("--optimizer", default="galore_adamw",
                 help=f"one of: {', '.join(optimizers_lib.REGISTRY)}")
  p.add_argument("--lr", type=float, default=None,
                 help="peak learning rate (default 1e-2 for GaLore, 1e-3 for AdamW)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default=None, help="default: runs/<config>_<optimizer>")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  p.add_argument("--checkpoint-every", type=int, default=0, help="0: only at the end")
  p.add_argument("--keep-checkpoints", type=int, default=2)
  p.add_argument("--stop-after", type=int, default=None,
                 help="stop this invocation after N steps (resume later with --resume)")
  p.add_argument("--mesh", default=None,
                 help="shard over a (data, fsdp, tensor) device mesh: sizes such as 2,4,1 or "
                      "data=2,fsdp=4 (missing axes 1); default: one device")
  p.add_argument("--list-optimizers", action="store_true", help="print the optimizers")
  args = p.parse_args(argv)
  return exit_status(lambda: _list_or_train(args))


def _list_or_train(args: argparse.Namespace) -> int:
  """Prints the optimizers (--list-optimizers) or runs the training the arguments describe."""
  if args.list_optimizers:
    for name, spec in optimizers_lib.REGISTRY.items():
      print(f"{name:22s} peak lr {spec.default_lr:<6g} {spec.description}")
    return 0
  config = config_from_args(args, optimizer=args.optimizer, learning_rate=args.lr,
                            seed=args.seed, resume=args.resume,
                            checkpoint_every=args.checkpoint_every,
                            keep_checkpoints=args.keep_checkpoints, stop_after=args.stop_after,
                            mesh=args.mesh)
  workdir = args.workdir or os.path.join("runs", f"{args.config}_{args.optimizer}")
  train_lib.train_and_evaluate(config, workdir)
  return 0


if __name__ == "__main__":
  _drop_orbax_read_noise()
  sys.exit(main())
