"""Optimizers side by side, each at its own tuned learning rate: a markdown table and loss curves.

    python -m examples.compare                    # small LLaMA on the embedded corpus (CPU)
    python -m examples.compare --results          # also write benchmarks/results/llama.{md,png}
    python -m examples.compare --optimizers adamw,galore_adamw --config 60m \\
        --data /usr/share/doc/python3.11/html/_sources --steps 2000 --tune-steps 500 \\
        --batch-size 32 --seq-len 256 --seeds 0,1,2 --json runs/60m.json

For each optimizer of ``--optimizers`` (``NAME:fused``: NAME with scanned layers and its update
inside the backward scan, ``--fused`` of ``examples.main``):

1. Tuning. Its peak learning rate is chosen from a grid: its default (``OptimizerSpec.default_lr``,
   the paper's recipe) times each ``--lr-grid`` factor. Each value trains ``--tune-steps`` steps
   (same schedule shape, first seed of ``--seeds``), and the lowest loss on the *tuning* split
   wins. That split is held out from training and is not the reported one (see
   ``examples.tuning``). ``--lr NAME=VALUE`` pins an optimizer's learning rate and skips its
   tuning.
2. Training. At the chosen learning rate, ``--steps`` steps once per seed. Every optimizer
   sees the same initial weights and batches for a given seed. The final loss on the
   *validation* split is reported as mean ± standard deviation over seeds. The perplexity gap
   to AdamW is computed per seed (paired) and summarised the same way; a gap smaller than its
   spread is called a tie.
3. Timing. The trained models then run ``--timing-rounds`` × ``--timing-steps`` more steps
   side by side (optimizers interleaved), and the table shows median step times, so that
   load from other processes hits every optimizer alike.

Outputs under ``--out`` (default ``runs/compare``): ``compare.md``, ``compare.png``,
``compare.json`` (with the loss curves) and one workdir per run with its log. ``--json PATH``
writes the per-optimizer results (grid, tuning losses, chosen learning rate, final loss per
seed, mean, std, wall time, state bytes, step time) to PATH as well.
"""

import argparse
import dataclasses
import datetime
import math
import os
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from examples import configs as configs_lib
from examples import fileio
from examples import input_pipeline
from examples import main as main_lib
from examples import optimizers as optimizers_lib
from examples import report
from examples import train as train_lib
from examples import tuning as tuning_lib
from examples.errors import DivergenceError, ExampleError

RESULTS_DIR = os.path.join(report.REPO_ROOT, "benchmarks", "results")
RESULTS_NAME = "llama"

DEFAULT_CONFIG = "small"
DEFAULT_OPTIMIZERS = ("adamw", "galore_adamw", "galore_adamw8bit", "galore_adamw:fused")
# "NAME:fused": NAME with scanned layers and its update inside the backward scan
# (TrainConfig.fused; go.fused_scan_step).
FUSED_SUFFIX = ":fused"
DEFAULT_SEEDS = (0,)
# Long enough to get past the loss plateau of the first ~60 steps (the unigram statistics),
# where every learning rate looks alike.
DEFAULT_TUNE_STEPS = 100
# TrainConfig fields of the default run: the small config on the embedded corpus, under
# 10 minutes on two CPU cores with tuning. The refresh gap is 50 (200 in the paper and in
# examples.main) so that a short run still refreshes its subspaces a few times.
DEFAULTS = dict(steps=240, batch_size=8, seq_len=64, update_proj_gap=50, eval_every=40,
                log_every=10, eval_batches=16)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the comparison: an optimizer, optionally with settings of its own.

  Attributes:
    label: the row's name (the optimizer's name on the command line).
    optimizer: a key of ``examples.optimizers.REGISTRY``.
    overrides: TrainConfig fields set for this row only, e.g. (("refresh", "randomized"),).
  """

  label: str
  optimizer: str
  overrides: Tuple[Tuple[str, Any], ...] = ()

  @property
  def folder(self) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in self.label)


@dataclasses.dataclass
class Outcome:
  """What happened to one entry: its tuning, its runs (one per seed) and their timing."""

  entry: Entry
  tuning: Optional[tuning_lib.Tuning] = None
  summaries: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  histories: List[List[Dict[str, Any]]] = dataclasses.field(default_factory=list)
  step_times: List[float] = dataclasses.field(default_factory=list)
  step_peak: Optional[int] = None  # XLA's planned peak of one compiled train step, bytes
  wall_s: float = 0.0
  error: Optional[str] = None
  result: Any = None  # the last seed's TrainResult while the timing phase needs its model

  @property
  def name(self) -> str:
    return self.entry.label

  @property
  def losses(self) -> List[float]:
    return [s["final_eval_loss"] for s in self.summaries]

  @property
  def step_time(self) -> Optional[float]:
    return statistics.median(self.step_times) if self.step_times else None


Trainer = Callable[[configs_lib.TrainConfig, str], Any]


# ------------------------------------------------------------------------------ arguments


def parse_optimizers(text: Optional[str]) -> List[Entry]:
  """``a,b,...`` -> entries; None: ``DEFAULT_OPTIMIZERS``."""
  names = list(DEFAULT_OPTIMIZERS) if text is None else [
      n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise ExampleError("--optimizers is empty (give names separated by commas)")
  entries = []
  for label in names:
    name = label[: -len(FUSED_SUFFIX)] if label.endswith(FUSED_SUFFIX) else label
    if ":" in name or "=" in name:
      raise ExampleError(f"--optimizers takes names (NAME or NAME{FUSED_SUFFIX}), got "
                         f"{label!r}; pin a learning rate with --lr NAME=VALUE")
    optimizers_lib.get_spec(name)  # unknown: error naming the known ones
    if any(e.label == label for e in entries):
      raise ExampleError(f"{label} is listed twice in --optimizers")
    overrides = (("scan_layers", True), ("fused", True)) if name != label else ()
    entries.append(Entry(label, name, overrides))
  return entries


def parse_pinned(items: Optional[Sequence[str]], entries: Sequence[Entry]) -> Dict[str, float]:
  """``--lr NAME=VALUE`` items -> {label: learning rate}, for labels in ``entries``."""
  pinned: Dict[str, float] = {}
  labels = [e.label for e in entries]
  for item in items or []:
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or not name:
      raise ExampleError(f"--lr {item!r}: write NAME=VALUE, e.g. --lr adamw=3e-3")
    if name not in labels:
      raise ExampleError(f"--lr {item!r}: {name} is not in --optimizers "
                         f"({', '.join(labels)}); add it there or drop this --lr")
    lr = tuning_lib.parse_positive(value, f"--lr {item!r}: {value!r} is not a number",
                                   f"--lr {item!r}: the learning rate must be positive")
    if name in pinned:
      raise ExampleError(f"--lr gives {name} twice")
    pinned[name] = lr
  return pinned


def parse_seeds(text: str) -> List[int]:
  """``"0,1,2"`` -> [0, 1, 2]: integers >= 0, distinct, at least one."""
  items = [s.strip() for s in text.split(",") if s.strip()]
  if not items:
    raise ExampleError(f"--seeds {text!r} is empty (e.g. --seeds 0,1,2)")
  seeds = []
  for item in items:
    if not item.isdigit():
      raise ExampleError(f"--seeds entry {item!r} is not a non-negative integer")
    if int(item) in seeds:
      raise ExampleError(f"--seeds lists {item} twice")
    seeds.append(int(item))
  return seeds


# ------------------------------------------------------------------------------ running


def run_config(base: configs_lib.TrainConfig, entry: Entry, *, learning_rate: float,
               steps: int, seed: int, split: str) -> configs_lib.TrainConfig:
  """The TrainConfig of one run of ``entry``: tuning (split "tuning") or reported."""
  config = dataclasses.replace(base, **dict(entry.overrides))
  tuning_run = split == "tuning"  # evaluated once, at the end
  return dataclasses.replace(config, optimizer=entry.optimizer, learning_rate=learning_rate,
                             steps=steps, seed=seed, eval_split=split,
                             eval_every=steps if tuning_run else config.eval_every,
                             eval_at_start=not tuning_run, save_checkpoints=False,
                             resume=False, stop_after=None, progress=False)


def grid_of(entry: Entry, factors: Sequence[float]) -> List[float]:
  return tuning_lib.lr_grid(optimizers_lib.get_spec(entry.optimizer).default_lr, factors)


def validate(base: configs_lib.TrainConfig, entries: Sequence[Entry], *, seeds: Sequence[int],
             factors: Sequence[float], tune_steps: int, pinned: Dict[str, float]) -> None:
  """Checks every run's configuration before any data is read or run started."""
  if tune_steps < 1:
    raise ExampleError(f"--tune-steps must be positive, got {tune_steps}")
  if not seeds:
    raise ExampleError("--seeds is empty")
  for entry in entries:
    grid = [pinned[entry.label]] if entry.label in pinned else grid_of(entry, factors)
    for lr in grid:
      train_lib.validate_config(run_config(base, entry, learning_rate=lr, steps=base.steps,
                                           seed=seeds[0], split="validation"))


def run_comparison(base: configs_lib.TrainConfig, entries: Sequence[Entry], out_dir: str, *,
                   seeds: Sequence[int] = DEFAULT_SEEDS,
                   factors: Sequence[float] = tuning_lib.DEFAULT_FACTORS,
                   tune_steps: int = DEFAULT_TUNE_STEPS,
                   pinned: Optional[Dict[str, float]] = None,
                   trainer: Optional[Trainer] = None,
                   dataset: Optional[input_pipeline.Dataset] = None,
                   timing_rounds: int = 3, timing_steps: int = 5,
                   progress: bool = True, log: Callable[[str], None] = print) -> List[Outcome]:
  """Tunes and trains every entry; returns one Outcome per entry, in order.

  Args:
    base: the shared training configuration (model, data, steps, batch, schedule shape).
    entries: the rows.
    out_dir: one workdir per run goes under ``out_dir/runs``.
    seeds: the reported runs' seeds; tuning uses the first.
    factors: the learning-rate grid as factors of each optimizer's default.
    tune_steps: steps of each tuning run.
    pinned: {label: learning rate} not to tune.
    trainer: ``trainer(config, workdir) -> TrainResult``; default
      ``train.train_and_evaluate`` on one shared dataset, logging into each workdir.
    dataset: the shared dataset (built from ``base`` when None).
    timing_rounds, timing_steps: the side-by-side timing after training (0: none).
    progress: show one progress bar over all runs.
    log: where the few lines of the comparison itself go.

  Raises:
    ExampleError: a bad configuration (checked before anything runs).
  """
  pinned = dict(pinned or {})
  validate(base, entries, seeds=seeds, factors=factors, tune_steps=tune_steps, pinned=pinned)
  bar = _Progress(sum((0 if e.label in pinned else len(grid_of(e, factors)) * tune_steps)
                      + len(seeds) * base.steps for e in entries), enabled=progress)
  if trainer is None:
    if dataset is None:
      dataset = train_lib.load_dataset(base)
    trainer = _default_trainer(dataset, bar)

  def train(config, folder, planned=True):
    bar.begin(f"{config.optimizer} lr {config.learning_rate:g} seed {config.seed}",
              config.steps, planned)
    try:
      return trainer(config, os.path.join(out_dir, "runs", folder))
    finally:
      bar.end()

  outcomes = []
  try:
    for entry in entries:
      t0 = time.perf_counter()
      outcome = Outcome(entry)
      outcomes.append(outcome)
      try:
        if entry.label in pinned:
          outcome.tuning = tuning_lib.pinned(pinned[entry.label])
        else:
          grid = grid_of(entry, factors)
          def trial(lr, entry=entry, grid=grid):
            config = run_config(base, entry, learning_rate=lr, steps=tune_steps,
                                seed=seeds[0], split="tuning")
            try:
              result = train(config, f"{entry.folder}/tune_lr{lr:g}", planned=lr in grid)
            except DivergenceError:
              return math.inf
            assert result.summary["eval_split"] == "tuning"
            return result.summary["final_eval_loss"]
          outcome.tuning = tuning_lib.tune(grid, trial)
        for seed in seeds:
          config = run_config(base, entry, learning_rate=outcome.tuning.chosen_lr,
                              steps=base.steps, seed=seed, split="validation")
          result = train(config, f"{entry.folder}/seed{seed}")
          outcome.summaries.append(result.summary)
          outcome.histories.append(result.history)
          outcome.result = result
      except DivergenceError as e:  # at the chosen learning rate, or at every one
        outcome.error = f"diverged: {e}"
      except (KeyboardInterrupt, ExampleError):
        raise
      except Exception as e:  # pylint: disable=broad-except  (report it, compare the rest)
        outcome.error = train_lib.first_line(e)
      if outcome.error:
        log(f"warning: {entry.label} failed: {outcome.error}")
      outcome.wall_s = time.perf_counter() - t0
  finally:
    bar.close()
  if dataset is not None:
    _time_side_by_side(outcomes, dataset, base, timing_rounds, timing_steps, log)
  for o in outcomes:
    o.result = None  # free the models
  return outcomes


def _default_trainer(dataset, bar) -> Trainer:
  def trainer(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "log.txt"), "w", encoding="utf-8") as log_file:
      def log(message):
        log_file.write(message + "\n")
      return train_lib.train_and_evaluate(config, workdir, dataset=dataset, log=log,
                                          on_step=bar.step)
  return trainer


class _Progress:
  """One tqdm bar over the steps of every run of the comparison (nothing when disabled)."""

  def __init__(self, total: int, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)
    self._expected = self._done = 0

  def begin(self, what: str, steps: int, planned: bool = True) -> None:
    """A run starts; ``planned=False`` for one the total did not count (a grid extension)."""
    self._expected, self._done = steps, 0
    if self._bar is not None:
      if not planned:
        self._bar.total += steps
        self._bar.refresh()
      self._bar.set_description(what)

  def step(self, step: int, loss: float) -> None:
    del step
    self._done += 1
    if self._bar is not None:
      self._bar.update(1)
      self._bar.set_postfix(loss=f"{loss:.3f}")

  def end(self) -> None:
    if self._bar is not None and self._done < self._expected:  # a run that stopped early
      self._bar.update(self._expected - self._done)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _time_side_by_side(outcomes, dataset, base, rounds, steps, log) -> None:
  """Median step times, the trained models interleaved round by round on the same batches;
  and each step's planned peak memory."""
  timed = [o for o in outcomes if o.error is None and o.result is not None]
  sampler = input_pipeline.BatchSampler(dataset.train, base.batch_size, base.seed)
  for o in timed:
    try:
      o.step_peak = train_lib.compiled_step_peak(o.result.model, o.result.optimizer,
                                                 sampler(base.steps))
    except Exception as e:  # pylint: disable=broad-except
      log(f"{o.name}: no compiled memory figure ({train_lib.first_line(e)})")
  if not (timed and rounds > 0 and steps > 0):
    return
  log(f"timing {len(timed)} optimizers side by side: {rounds} rounds x {steps} steps")
  for r in range(rounds):
    batches = [sampler(base.steps + r * steps + k) for k in range(steps)]
    for o in timed:
      try:
        o.step_times += train_lib.time_train_steps(
            o.result.model, o.result.optimizer, batches,
            learning_rate=o.tuning.chosen_lr * base.min_lr_ratio)  # where the schedule ended
      except Exception as e:  # pylint: disable=broad-except
        o.error = f"timing failed: {train_lib.first_line(e)}"


# ------------------------------------------------------------------------------ statistics


def baseline_of(outcomes: Sequence[Outcome]) -> Optional[Outcome]:
  """The AdamW row (plain, no overrides) if it succeeded, else the first that did."""
  ok = [o for o in outcomes if o.error is None and o.summaries]
  return next((o for o in ok if o.entry.optimizer == "adamw" and not o.entry.overrides),
              ok[0] if ok else None)


def ppl_gaps(outcome: Outcome, baseline: Outcome) -> List[float]:
  """Perplexity gap to ``baseline`` per seed (paired: same seed, same data and init)."""
  base = {s["seed"]: s["final_eval_loss"] for s in baseline.summaries}
  return [math.exp(s["final_eval_loss"] - base[s["seed"]]) - 1
          for s in outcome.summaries if s["seed"] in base]


def verdict(gaps: Sequence[float]) -> str:
  """"tie" when the mean gap is within one standard deviation of the seeds, else
  "better"/"worse"; "1 seed" when there is no spread to compare with."""
  mean, std = report.mean_std(gaps)
  if std is None:
    return "1 seed"
  if abs(mean) <= std:
    return "tie"
  return "better" if mean < 0 else "worse"


def summarize(outcome: Outcome, baseline: Optional[Outcome]) -> Dict[str, Any]:
  """The machine-readable record of one entry (``--json``)."""
  t = outcome.tuning
  losses = outcome.losses
  mean, std = report.mean_std(losses) if losses else (None, None)
  record = {
      "name": outcome.name, "optimizer": outcome.entry.optimizer,
      "overrides": dict(outcome.entry.overrides), "error": outcome.error,
      "grid": t.grid if t else None, "tuning_losses": t.losses if t else None,
      "chosen_lr": t.chosen_lr if t else None, "pinned": t.pinned if t else None,
      "chosen_at_grid_edge": t.at_edge if t else None,
      "seeds": [s["seed"] for s in outcome.summaries],
      "final_eval_loss": losses, "mean": mean, "std": std,
      "final_eval_perplexity": [s["final_eval_perplexity"] for s in outcome.summaries],
      "wall_s": outcome.wall_s,
      "state_bytes": outcome.summaries[0]["opt_state_bytes"] if outcome.summaries else None,
      "step_time_s": outcome.step_time,
      "step_peak_bytes": outcome.step_peak,
      "skipped_steps": [s.get("skipped_steps", 0) for s in outcome.summaries],
  }
  if baseline is not None and outcome.summaries and outcome.error is None:
    gaps = ppl_gaps(outcome, baseline)
    gap_mean, gap_std = report.mean_std(gaps)
    record.update(baseline=baseline.name, ppl_gap=gaps, ppl_gap_mean=gap_mean,
                  ppl_gap_std=gap_std, verdict=verdict(gaps) if outcome is not baseline
                  else "baseline")
  return record


def outcome_to_dict(outcome: Outcome) -> Dict[str, Any]:
  """Everything of an Outcome but its models, JSON-able (``outcome_from_dict`` inverts it)."""
  t = outcome.tuning
  return {"label": outcome.entry.label, "optimizer": outcome.entry.optimizer,
          "overrides": [list(kv) for kv in outcome.entry.overrides],
          "tuning": dataclasses.asdict(t) if t else None, "summaries": outcome.summaries,
          "histories": outcome.histories, "step_times": outcome.step_times,
          "step_peak": outcome.step_peak, "wall_s": outcome.wall_s, "error": outcome.error}


def outcome_from_dict(record: Dict[str, Any]) -> Outcome:
  entry = Entry(record["label"], record["optimizer"],
                tuple(tuple(kv) for kv in record["overrides"]))
  t = record["tuning"]
  return Outcome(entry, tuning_lib.Tuning(**t) if t else None, record["summaries"],
                 record["histories"], record["step_times"], record.get("step_peak"),
                 record["wall_s"], record["error"])


# ------------------------------------------------------------------------------ report


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


def _lr(x: float) -> str:
  return f"{x:.3g}"


def _cells(row: Sequence[str]) -> str:
  return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"


def results_table(outcomes: Sequence[Outcome], baseline: Optional[Outcome]) -> str:
  """The main table: chosen learning rate and grid, loss, gap with its spread, state, time."""
  base = f"`{baseline.name}`" if baseline else "baseline"
  header = ["optimizer", "peak lr: chosen (grid)", "final eval loss", "perplexity",
            f"ppl gap vs {base}", "optimizer state", f"state vs {base}",
            "step peak (XLA plan)", f"step time vs {base}"]
  rows = [_cells(header), "|" + "|".join("---" for _ in header) + "|"]
  for o in outcomes:
    t = o.tuning
    if t is None:
      lr_cell = "—"
    elif t.pinned:
      lr_cell = f"{_lr(t.chosen_lr)} (pinned)"
    else:
      lr_cell = (f"{_lr(t.chosen_lr)} ({', '.join(_lr(x) for x in t.grid)})"
                 + (" edge" if t.at_edge else ""))
    if o.error is not None or not o.summaries:
      rows.append(_cells([f"`{o.name}`", lr_cell, f"failed: {o.error}"] + [""] * 6))
      continue
    mean, std = report.mean_std(o.losses)
    ppl_mean, ppl_std = report.mean_std([s["final_eval_perplexity"] for s in o.summaries])
    s0 = o.summaries[0]
    gap = state = step = "—"
    if o is baseline:
      gap, state, step = "0 (baseline)", "100%", "1.00×" if o.step_time else "—"
    elif baseline is not None:
      gaps = ppl_gaps(o, baseline)
      g_mean, g_std = report.mean_std(gaps)
      gap = (f"{g_mean * 100:+.1f}%" + (f" ± {g_std * 100:.1f}%" if g_std is not None else "")
             + f" ({verdict(gaps)})")
      state = f"{s0['opt_state_bytes'] / baseline.summaries[0]['opt_state_bytes'] * 100:.0f}%"
      if o.step_time and baseline.step_time:
        step = f"{o.step_time / baseline.step_time:.2f}×"
    peak = "—" if o.step_peak is None else _mib(o.step_peak)
    rows.append(_cells([f"`{o.name}`", lr_cell, report.plus_minus(mean, std),
                        report.plus_minus(ppl_mean, ppl_std, ".2f"), gap,
                        _mib(s0["opt_state_bytes"]), state, peak, step]))
  return "\n".join(rows)


def tuning_table(outcomes: Sequence[Outcome]) -> str:
  """Tuning-split loss of every learning rate tried, one column per factor of the default."""
  def factor(o, lr):
    return f"{lr / optimizers_lib.get_spec(o.entry.optimizer).default_lr:.3g}"
  tuned = [o for o in outcomes if o.tuning is not None]
  columns = sorted({factor(o, lr) for o in tuned for lr in o.tuning.grid if not o.tuning.pinned},
                   key=float)
  header = ["optimizer", "default lr"] + [f"×{c}" for c in columns] + ["chosen"]
  rows = [_cells(header), "|" + "|".join("---" for _ in header) + "|"]
  for o in tuned:
    t = o.tuning
    default = _lr(optimizers_lib.get_spec(o.entry.optimizer).default_lr)
    if t.pinned:
      rows.append(_cells([f"`{o.name}`", default] + ["—"] * len(columns)
                         + [f"{_lr(t.chosen_lr)} (pinned)"]))
      continue
    tried = {factor(o, lr): (lr, loss) for lr, loss in zip(t.grid, t.losses)}
    cells = []
    for column in columns:
      if column not in tried:
        cells.append("")
        continue
      lr, loss = tried[column]
      text = f"{_lr(lr)}: " + ("diverged" if not math.isfinite(loss) else f"{loss:.4f}")
      cells.append(f"**{text}**" if lr == t.chosen_lr else text)
    rows.append(_cells([f"`{o.name}`", default] + cells
                       + [_lr(t.chosen_lr) + (" (grid edge)" if t.at_edge else "")]))
  return "\n".join(rows)


def describe_setup(base: configs_lib.TrainConfig, outcomes: Sequence[Outcome], *,
                   seeds: Sequence[int], factors: Sequence[float], tune_steps: int,
                   data: str) -> List[str]:
  """Bullet lines: model, tokens, recipe, tuning protocol."""
  s0 = next((o.summaries[0] for o in outcomes if o.summaries), None)
  lines = [f"- Data: {data}"]
  if s0:
    lines.append(
        f"- Model `{base.model}`: {s0['params'] / 1e6:.2f}M parameters; {s0['steps']} steps of "
        f"{base.batch_size}×{s0['seq_len']} tokens = {s0['tokens']:,} tokens per run; seeds "
        f"{', '.join(map(str, seeds))} (each seed: its own initial weights and batch order, "
        "the same for every optimizer)")
  lines.append(
      f"- Tuning: peak learning rate = the optimizer's default × "
      f"{', '.join(f'{f:.3g}' for f in factors)}, and one more value beyond an end of the "
      f"grid while the best is at that end (at most {tuning_lib.MAX_EXTENSIONS}); one "
      f"{tune_steps}-step run per value (seed {seeds[0]}, same schedule shape), chosen by the "
      "loss on the *tuning* split (documents held out from training and from the validation "
      "split). The reported loss is on the validation split, which no choice used.")
  lines.append(
      f"- Recipe: linear warmup over {base.warmup_fraction:.0%} of the steps, cosine decay to "
      f"{base.min_lr_ratio:.0%} of the peak; GaLore rank {train_lib.optimizer_config(base).rank}, "
      f"scale {base.galore_scale}, refresh every {base.update_proj_gap} steps "
      f"({base.refresh} unless the row says otherwise), projected matrices: paths matching "
      f"`{base.galore_targets}` (embeddings, norms and LM head get full-rank Adam); weight "
      f"decay {base.weight_decay:g}")
  return lines


def render_markdown(outcomes, baseline, *, command: str, plot_name: str, base, seeds,
                    factors, tune_steps: int, data: str, started: datetime.datetime,
                    wall_s: float, timing: Tuple[int, int]) -> str:
  load = report.load_average()
  lines = [f"# LLaMA pretraining: optimizers at their tuned learning rates ({base.model} config)",
           "", f"Command (from the repository root): `{command}`", "",
           f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; the whole comparison took "
           f"{wall_s / 60:.1f} min"
           + (f" (load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} over "
              "1 / 5 / 15 min)" if load else ""),
           f"- Machine: {report.machine()}",
           "- Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions().items())]
  lines += describe_setup(base, outcomes, seeds=seeds, factors=factors, tune_steps=tune_steps,
                          data=data)
  lines += ["", results_table(outcomes, baseline), ""]
  lines += [
      "Final eval loss: mean next-token cross entropy on the validation split after the last "
      "step, mean ± standard deviation over seeds; perplexity = exp(loss). The gap is "
      f"perplexity relative to `{baseline.name if baseline else 'the baseline'}` per seed "
      "(paired by seed), mean ± standard deviation; *tie* means the mean gap is within one "
      "standard deviation. *edge* marks a learning rate at the end of its grid (the best one "
      "may lie beyond). Optimizer state: bytes of all arrays in the optimizer state "
      "(`galore_optax.tree_bytes`). Step peak: what XLA's buffer assignment plans for one "
      "compiled train step (parameters, state, batch, activations, gradients and every "
      "temporary; `galore_optax.planned_peak_bytes`). "
      f"`{FUSED_SUFFIX}` rows train the same optimizer with scanned layers and the update "
      "inside the backward scan (`go.fused_scan_step`), from the same initial weights; their "
      "skip of non-finite steps costs one more backward pass. "
      f"Step time: median of {timing[0]} × {timing[1]} compiled "
      "steps per optimizer, timed side by side after training.", "",
  ]
  if len(seeds) == 1:
    lines += [
        "With one seed the gaps carry no spread; benchmarks/results/quality.md repeats the "
        "comparison over three seeds.", ""]
  lines += [
      f"Learning-rate tuning: loss on the tuning split after {tune_steps} steps (bold: chosen).",
      "", tuning_table(outcomes), ""]
  failed = [o for o in outcomes if o.error is not None]
  if failed:
    lines += ["Failed: " + "; ".join(f"`{o.name}`: {o.error}" for o in failed), ""]
  lines += [f"![loss curves]({plot_name})", ""]
  return "\n".join(lines)


def render_plot(outcomes, path: str, title: str, warmup_steps: int) -> None:
  """Training loss (zoomed past the warmup) and validation loss, band over seeds."""
  ok = [o for o in outcomes if o.error is None and o.histories]
  lines = [(o.name, o.histories) for o in ok]
  train_zoom = report.zoom([h for o in ok for h in o.histories], "train", warmup_steps)
  report.plot_loss_curves(
      [("training loss (mean over each log window)", "train", lines, train_zoom),
       ("validation loss", "eval", lines,
        report.zoom([h for o in ok for h in o.histories], "eval", warmup_steps))],
      path, title)


# ------------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
  p = main_lib.Parser(prog="python -m examples.compare", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  main_lib.add_common_args(p)
  p.set_defaults(config=DEFAULT_CONFIG, **DEFAULTS)
  p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                 help=f"comma-separated names from: {', '.join(optimizers_lib.REGISTRY)}; "
                      f"NAME{FUSED_SUFFIX} trains NAME with scanned layers and its update "
                      "inside the backward scan")
  p.add_argument("--lr", action="append", default=None, metavar="NAME=VALUE",
                 help="pin an optimizer's peak learning rate (no tuning); repeatable")
  p.add_argument("--lr-grid", default=",".join(f"{f:.3g}" for f in tuning_lib.DEFAULT_FACTORS),
                 help="tuning grid: factors of each optimizer's default peak learning rate")
  p.add_argument("--tune-steps", type=int, default=DEFAULT_TUNE_STEPS,
                 help="steps of each tuning run")
  p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                 help="seeds of the reported runs (tuning uses the first)")
  p.add_argument("--out", default=os.path.join("runs", "compare"),
                 help="output folder: compare.md/.png/.json and one workdir per run")
  p.add_argument("--json", default=None, metavar="PATH",
                 help="also write the per-optimizer results as JSON to PATH")
  p.add_argument("--results", action="store_true",
                 help=f"also write {os.path.relpath(RESULTS_DIR, report.REPO_ROOT)}/"
                      f"{RESULTS_NAME}.md and .png (the README's results)")
  p.add_argument("--timing-rounds", type=int, default=5)
  p.add_argument("--timing-steps", type=int, default=5)
  return p


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  return main_lib.exit_status(lambda: _compare(args, argv))


def _compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
  """Tunes, trains and writes the report; 1 when an optimizer failed, else 0."""
  started = datetime.datetime.now(datetime.timezone.utc)
  t0 = time.perf_counter()
  if args.timing_rounds < 0 or args.timing_steps < 0:
    raise ExampleError("--timing-rounds and --timing-steps must be >= 0")
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise ExampleError("the loss-curve plot needs matplotlib (pip install matplotlib)") from None
  out_dir = os.path.abspath(args.out)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ExampleError(f"--out {args.out} exists and is not a folder")
  entries = parse_optimizers(args.optimizers)
  pinned = parse_pinned(args.lr, entries)
  factors = tuning_lib.parse_factors(args.lr_grid)
  seeds = parse_seeds(args.seeds)
  base = main_lib.config_from_args(args, seed=seeds[0])
  validate(base, entries, seeds=seeds, factors=factors, tune_steps=args.tune_steps,
           pinned=pinned)
  dataset = train_lib.load_dataset(base)
  print(f"{len(entries)} optimizers on {base.model} ({dataset.describe()}): tuning "
        f"{args.tune_steps}-step runs at × {args.lr_grid} of each default peak learning "
        f"rate, then {base.steps} steps × seeds {args.seeds}; logs under {out_dir}",
        file=sys.stderr)
  outcomes = run_comparison(base, entries, out_dir, seeds=seeds, factors=factors,
                            tune_steps=args.tune_steps, pinned=pinned, dataset=dataset,
                            timing_rounds=args.timing_rounds,
                            timing_steps=args.timing_steps, progress=not args.no_progress,
                            log=lambda m: print(m, file=sys.stderr))

  baseline = baseline_of(outcomes)
  command = "python -m examples.compare" + ("" if not argv else " " + shlex.join(argv))
  wall_s = time.perf_counter() - t0
  title = (f"LLaMA {base.model}, {dataset.corpus_name}: {base.steps} steps of "
           f"{base.batch_size}×{dataset.seq_len} tokens, each optimizer at its tuned lr")
  targets = [(out_dir, "compare")]
  if args.results:
    targets.append((RESULTS_DIR, RESULTS_NAME))
  for folder, stem in targets:
    render_plot(outcomes, os.path.join(folder, stem + ".png"), title,
                warmup_steps=int(base.warmup_fraction * base.steps))
    fileio.write_text(os.path.join(folder, stem + ".md"), render_markdown(
        outcomes, baseline, command=command, plot_name=stem + ".png", base=base, seeds=seeds,
        factors=factors, tune_steps=args.tune_steps, data=dataset.describe(), started=started,
        wall_s=wall_s, timing=(args.timing_rounds, args.timing_steps)))
  records = [summarize(o, baseline) for o in outcomes]
  meta = {"command": command, "date": started.isoformat(), "data": dataset.describe(),
          "machine": report.machine(), "versions": report.versions(), "wall_s": wall_s,
          "config": dataclasses.asdict(base), "seeds": seeds, "lr_grid_factors": factors,
          "tune_steps": args.tune_steps, "baseline": baseline.name if baseline else None}
  fileio.write_json(os.path.join(out_dir, "compare.json"), {
      **meta, "optimizers": records,
      "histories": {o.name: o.histories for o in outcomes}})
  if args.json:
    fileio.write_json(os.path.abspath(args.json), {**meta, "optimizers": records})
  print(results_table(outcomes, baseline))
  for folder, stem in targets:
    print(f"wrote {os.path.join(folder, stem)}.md and .png")
  failed = [o.name for o in outcomes if o.error is not None]
  if failed:
    print(f"error: {len(failed)} of {len(outcomes)} optimizers failed: {', '.join(failed)}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
