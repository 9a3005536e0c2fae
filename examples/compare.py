"""Several optimizers on the same data, seed and token budget: a markdown table and loss curves.

    python -m examples.compare                    # tiny LLaMA on the embedded corpus (CPU, minutes)
    python -m examples.compare --results          # also write benchmarks/results/llama.{md,png}
    python -m examples.compare --optimizers adamw:3e-3,galore_adamw --config 60m \\
        --data /usr/share/doc/python3.11/html/_sources --steps 2000 --batch-size 32 \\
        --seq-len 256 --update-proj-gap 200 --out runs/compare_60m

Every optimizer trains the same model (same initial weights: same seed) on the same batches
(one shared dataset, batches a pure function of the step) for the same number of steps, through
``examples.train.train_and_evaluate``; each run keeps its own workdir under ``--out``.
``--optimizers`` takes ``name`` or ``name:learning_rate`` entries (``adamw:3e-3``), so an
optimizer can appear more than once with different peak learning rates.

Timing: the tokens/s of separate runs minutes apart mostly measure what else the machine was
doing, so after training the optimizers are timed side by side: ``--timing-rounds`` rounds, in
each of which every optimizer runs ``--timing-steps`` more (compiled) steps in turn; the table
shows the median step time over all of them.

Outputs under ``--out`` (default ``runs/compare``): ``compare.md``, ``compare.png``,
``compare.json`` and one workdir per optimizer. The subspace refresh gap defaults to 50 here
(200 in the paper and in examples.train) so that a short CPU run still refreshes a few times.
"""

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from examples import data as data_lib
from examples import fileio
from examples import optimizers as optimizers_lib
from examples import train as train_lib
from examples.errors import ExampleError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
RESULTS_NAME = "llama"

# Defaults of the README run: the tiny config on the embedded corpus, a few minutes on two
# CPU cores for all optimizers together.
DEFAULTS = dict(steps=150, batch_size=8, update_proj_gap=50, eval_every=25, log_every=5,
                eval_batches=8)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One entry of --optimizers: ``name`` or ``name:learning_rate``."""

  label: str  # as written, e.g. "adamw:3e-3"; names the table row and the run folder
  optimizer: str
  learning_rate: Optional[float] = None  # None: --lr, else the optimizer's default

  @property
  def folder(self) -> str:
    return self.label.replace(":", "_lr")


@dataclasses.dataclass
class RunOutcome:
  spec: RunSpec
  summary: Optional[Dict[str, Any]] = None
  history: Optional[List[Dict[str, Any]]] = None
  step_times: Optional[List[float]] = None  # side-by-side timing, seconds per step
  error: Optional[str] = None
  result: Any = None  # train.TrainResult while the timing phase needs the model

  @property
  def name(self) -> str:
    return self.spec.label

  @property
  def step_time(self) -> Optional[float]:
    return statistics.median(self.step_times) if self.step_times else None


def parse_optimizers(text: Optional[str]) -> List[RunSpec]:
  """``name[:lr],...``; default: every registered optimizer that is available."""
  if text is None:
    return [RunSpec(name, name) for name in optimizers_lib.available_optimizers()]
  specs = []
  for item in (i.strip() for i in text.split(",")):
    if not item:
      continue
    name, _, lr_text = item.partition(":")
    learning_rate = None
    if lr_text:
      try:
        learning_rate = float(lr_text)
      except ValueError:
        raise ExampleError(f"bad learning rate {lr_text!r} in --optimizers entry {item!r} "
                           "(write name:lr, e.g. adamw:3e-3)") from None
      if not learning_rate > 0:
        raise ExampleError(f"learning rate must be positive in --optimizers entry {item!r}")
    optimizers_lib.check_available(name)  # unknown or missing from galore_optax: error
    if any(s.label == item for s in specs):
      raise ExampleError(f"{item} is listed twice in --optimizers")
    specs.append(RunSpec(item, name, learning_rate))
  if not specs:
    raise ExampleError("--optimizers is empty (give names separated by commas)")
  return specs


def _run_config(config, spec: RunSpec):
  lr = spec.learning_rate if spec.learning_rate is not None else config.learning_rate
  return dataclasses.replace(config, optimizer=spec.optimizer, learning_rate=lr,
                             save_checkpoints=False, resume=False)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- report


def _versions() -> Dict[str, str]:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  out = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tokenizers", "numpy"):
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out[dist] = "not installed"
  try:
    import galore_optax  # pylint: disable=import-outside-toplevel
    out["galore_optax"] = getattr(galore_optax, "__version__", "unknown")
  except Exception:  # pylint: disable=broad-except
    out["galore_optax"] = "not importable"
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                            capture_output=True, check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=REPO_ROOT, text=True, capture_output=True, check=True,
                           timeout=10).stdout.strip()
    out["git commit"] = commit + (" (with uncommitted changes)" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return out


def _machine() -> str:
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  text = f"{cores}-core CPU ({cpu}), {platform.system()} {platform.machine()}"
  if device.platform != "cpu":
    text += f"; accelerator: {device.device_kind} ({device.platform})"
  else:
    text += "; JAX on CPU"
  return text


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


def _table(outcomes: List[RunOutcome], baseline: Optional[RunOutcome]) -> str:
  base = baseline.name if baseline else "baseline"
  header = ["optimizer", "final eval loss", "perplexity", f"ppl gap vs {base}",
            "optimizer state", f"state vs {base}", "tokens/s", f"step time vs {base}"]
  show_memory = any(o.summary and o.summary.get("peak_memory_bytes") for o in outcomes)
  if show_memory:
    header.append("peak device memory")
  rows = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  bs = baseline.summary if baseline else None
  for o in outcomes:
    if o.error is not None:
      cells = [o.name, f"failed: {o.error}"] + [""] * (len(header) - 2)
      rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
      continue
    s = o.summary
    is_base = o is baseline
    gap = state_ratio = time_ratio = "—"
    if bs and not is_base:
      gap = f"{(s['final_eval_perplexity'] / bs['final_eval_perplexity'] - 1) * 100:+.1f}%"
      state_ratio = f"{s['opt_state_bytes'] / bs['opt_state_bytes'] * 100:.0f}%"
      if o.step_time and baseline.step_time:
        time_ratio = f"{o.step_time / baseline.step_time:.2f}×"
    elif is_base:
      gap, state_ratio, time_ratio = "0 (baseline)", "100%", "1.00×"
    tokens_per_step = s["batch_size"] * s["seq_len"]
    tok_s = f"{tokens_per_step / o.step_time:,.0f}" if o.step_time else "—"
    cells = [f"`{o.name}`", f"{s['final_eval_loss']:.4f}", f"{s['final_eval_perplexity']:.2f}",
             gap, _mib(s["opt_state_bytes"]), state_ratio, tok_s, time_ratio]
    if show_memory:
      peak = s.get("peak_memory_bytes")
      cells.append(f"{peak / 2**30:.2f} GiB" if peak else "—")
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def render_markdown(outcomes, baseline, *, command: str, plot_name: str, config,
                    dataset: data_lib.Dataset, started: datetime.datetime,
                    wall_s: float, timing_rounds: int, timing_steps: int) -> str:
  ok = [o for o in outcomes if o.error is None]
  s0 = ok[0].summary if ok else None
  lines = [f"# LLaMA pretraining: optimizers side by side ({config.model} config)", ""]
  lines += [f"Command (from the repository root): `{command}`", ""]
  lines += [f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; whole comparison took "
            f"{wall_s / 60:.1f} min",
            f"- Machine: {_machine()}",
            "- Versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()),
            f"- Data: {dataset.describe()}"]
  if s0:
    lines.append(
        f"- Model `{config.model}`: {s0['params'] / 1e6:.2f}M parameters; {s0['steps']} steps "
        f"of {config.batch_size}×{s0['seq_len']} tokens = {s0['tokens']:,} tokens per optimizer; "
        f"seed {config.seed}")
  lr = ", ".join(f"`{o.name}` {o.summary['peak_lr']:g}" for o in ok)
  lines.append(
      f"- Recipe: peak learning rate {lr}; linear warmup over {config.warmup_fraction:.0%} of "
      f"the steps, cosine decay to {config.min_lr_ratio:.0%} of the peak; GaLore rank "
      f"{train_lib.optimizer_config(config).rank}, scale {config.galore_scale}, refresh every "
      f"{config.update_proj_gap} steps, projected matrices: paths matching "
      f"`{config.galore_targets}` (embeddings, norms and LM head get full-rank Adam)")
  lines += ["", _table(outcomes, baseline), ""]
  lines += [
      "Final eval loss: mean next-token cross entropy on the same held-out validation batches "
      "after the last step; perplexity = exp(loss); the gap is the perplexity relative to "
      f"`{baseline.name if baseline else 'the baseline'}`. Optimizer state: bytes of all arrays "
      "in the optimizer state (`galore_optax.tree_bytes`). Tokens/s and step time: median of "
      f"{timing_rounds} × {timing_steps} compiled steps per optimizer, timed side by side after "
      "training (optimizers interleaved round by round).", ""]
  failed = [o for o in outcomes if o.error is not None]
  if failed:
    lines += ["Failed runs: " + "; ".join(f"`{o.name}`: {o.error}" for o in failed), ""]
  lines += [f"![loss curves]({plot_name})", ""]
  return "\n".join(lines)


def render_plot(outcomes, path: str, title: str, warmup_steps: int = 0) -> None:
  """Training loss (left) and validation loss (right) against steps, one line per optimizer."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
  for o in outcomes:
    if o.error is not None:
      continue
    train = [r for r in o.history if r["split"] == "train"]
    evals = [r for r in o.history if r["split"] == "eval"]
    line, = ax_train.plot([r["step"] for r in train], [r["loss"] for r in train],
                          label=o.name, linewidth=1.3)
    ax_eval.plot([r["step"] for r in evals], [r["loss"] for r in evals], marker="o",
                 markersize=3, color=line.get_color(), label=o.name, linewidth=1.3)
  for ax, name in ((ax_train, "training loss (mean over each log window)"),
                   (ax_eval, "validation loss")):
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  # The loss at initialisation (~ln vocab) would squash the curves that matter: cap the
  # training panel at the highest loss any run still has once the warmup is over.
  later = [r["loss"] for o in outcomes if o.error is None for r in o.history
           if r["split"] == "train" and r["step"] > warmup_steps]
  if later:
    low, high = min(later), max(later)
    ax_train.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
  fig.suptitle(title, fontsize=11)
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)


# ----------------------------------------------------------------------------- main


def run_comparison(config, specs: List[RunSpec], out_dir: str, *, dataset=None,
                   timing_rounds: int = 3, timing_steps: int = 5, log=print):
  """Trains ``config`` once per entry of ``specs``; returns (outcomes, dataset).

  Runs that raise are recorded as failed (``RunOutcome.error``) and the others go on.
  """
  for spec in specs:
    train_lib.validate_config(_run_config(config, spec))
  if dataset is None:
    dataset = train_lib.load_dataset(config)
  outcomes = []
  for spec in specs:
    log(f"=== {spec.label} ===")
    try:
      result = train_lib.train_and_evaluate(_run_config(config, spec),
                                            os.path.join(out_dir, spec.folder),
                                            dataset=dataset, log=log)
    except (KeyboardInterrupt, ExampleError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (report it and compare the rest)
      log(f"warning: {spec.label} failed: {_first_line(e)}")
      outcomes.append(RunOutcome(spec, error=_first_line(e)))
      continue
    outcomes.append(RunOutcome(spec, result.summary, result.history, result=result))

  # Side-by-side timing on batches after the training budget (same batches for everyone).
  sampler = data_lib.BatchSampler(dataset.train, config.batch_size, config.seed)
  timed = [o for o in outcomes if o.error is None]
  for o in timed:
    o.step_times = []
  if timed and timing_rounds > 0 and timing_steps > 0:
    log(f"timing {len(timed)} optimizers side by side: {timing_rounds} rounds "
        f"x {timing_steps} steps")
    for r in range(timing_rounds):
      first = config.steps + r * timing_steps
      batches = [sampler(first + k) for k in range(timing_steps)]
      for o in timed:
        try:
          o.step_times += train_lib.time_train_steps(o.result.model, o.result.optimizer,
                                                     batches)
        except Exception as e:  # pylint: disable=broad-except
          o.error = f"timing failed: {_first_line(e)}"
  for o in outcomes:
    o.result = None  # free the models
  return outcomes, dataset


def _parser() -> argparse.ArgumentParser:
  p = train_lib._Parser(  # pylint: disable=protected-access
      prog="python -m examples.compare", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  train_lib.add_common_args(p)
  p.set_defaults(**DEFAULTS)
  p.add_argument("--optimizers", default=None,
                 help="comma-separated name[:lr] entries, e.g. adamw:3e-3,galore_adamw "
                      "(default: every available one of "
                      f"{', '.join(optimizers_lib.REGISTRY)}, at its default learning rate)")
  p.add_argument("--out", default=os.path.join("runs", "compare"),
                 help="output folder: compare.md/.png/.json and one workdir per optimizer")
  p.add_argument("--results", action="store_true",
                 help=f"also write {os.path.relpath(RESULTS_DIR, REPO_ROOT)}/"
                      f"{RESULTS_NAME}.md and .png (the README's results)")
  p.add_argument("--timing-rounds", type=int, default=3)
  p.add_argument("--timing-steps", type=int, default=5)
  return p


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  started = datetime.datetime.now(datetime.timezone.utc)
  t0 = time.perf_counter()
  try:
    if args.timing_rounds < 0 or args.timing_steps < 0:
      raise ExampleError("--timing-rounds and --timing-steps must be >= 0")
    try:
      import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise ExampleError("the loss-curve plot needs matplotlib (pip install matplotlib)") from None
    out_dir = os.path.abspath(args.out)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
      raise ExampleError(f"--out {args.out} exists and is not a folder")
    specs = parse_optimizers(args.optimizers)
    config = train_lib.config_from_args(args)
    outcomes, dataset = run_comparison(config, specs, out_dir,
                                       timing_rounds=args.timing_rounds,
                                       timing_steps=args.timing_steps)
  except ExampleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130

  baseline = next((o for o in outcomes if o.spec.optimizer == "adamw" and o.error is None),
                  next((o for o in outcomes if o.error is None), None))
  command = "python -m examples.compare" + ("" if not argv else " " + shlex.join(argv))
  title = (f"LLaMA {config.model}, {dataset.corpus_name}: {config.steps} steps of "
           f"{config.batch_size}×{dataset.seq_len} tokens")
  wall_s = time.perf_counter() - t0
  targets = [(out_dir, "compare")]
  if args.results:
    targets.append((RESULTS_DIR, RESULTS_NAME))
  for folder, stem in targets:
    render_plot(outcomes, os.path.join(folder, stem + ".png"), title,
                warmup_steps=int(config.warmup_fraction * config.steps))
    fileio.write_text(os.path.join(folder, stem + ".md"), render_markdown(
        outcomes, baseline, command=command, plot_name=stem + ".png", config=config,
        dataset=dataset, started=started, wall_s=wall_s, timing_rounds=args.timing_rounds,
        timing_steps=args.timing_steps))
  fileio.write_json(os.path.join(out_dir, "compare.json"), {
      "command": command, "date": started.isoformat(), "data": dataset.describe(),
      "config": dataclasses.asdict(config),
      "runs": [{"label": o.name, "optimizer": o.spec.optimizer, "error": o.error,
                "summary": o.summary,
                "side_by_side_step_times_s": o.step_times} for o in outcomes]})
  print(_table(outcomes, baseline))
  for folder, stem in targets:
    print(f"wrote {os.path.join(folder, stem)}.md and .png")
  failed = [o.name for o in outcomes if o.error is not None]
  if failed:
    print(f"error: {len(failed)} of {len(outcomes)} runs failed: {', '.join(failed)}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
