"""Training quality of every optimizer at its own tuned learning rate, over seeds and corpora.

  python -m benchmarks.quality                     # both corpora, all optimizers (hours on CPU)
  python -m benchmarks.quality --corpora stdlib --optimizers adamw,galore_adamw --steps 200
  python -m benchmarks.quality --report-only       # re-render from the saved runs

Setup: the second corpus is the Python documentation's reStructuredText sources, which
Debian's `python3.11-doc` package installs::

  apt-get install -y python3.11-doc        # -> /usr/share/doc/python3.11/html/_sources

For each corpus and optimizer this is `examples.compare`'s protocol (see its docstring): the
peak learning rate is tuned on a grid of factors of the optimizer's default with short runs,
chosen by the loss on the tuning split, and the optimizer then trains `--steps` steps once
per seed at that learning rate; the final loss on the validation split (never used for a
choice) is reported as mean ± standard deviation over seeds, and the perplexity gap to AdamW
per seed (paired), with "tie" when the mean gap is within one standard deviation.

Every finished optimizer is saved to `<out>/<corpus>.json`, so an interrupted run continues
where it stopped (with the same settings). Writes benchmarks/results/quality.md and .png.
"""

import argparse
import datetime
import json
import os
import shlex
import sys
import time

from examples import compare  # (sets the CPU thread-pool defaults first)
from examples import configs
from examples import fileio
from examples import optimizers
from examples import report
from examples import train
from examples import tuning
from examples.errors import ExampleError


_HERE = os.path.dirname(os.path.abspath(__file__))

RESULTS_DIR = os.path.join(_HERE, "results")
PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources"
CORPORA = {"stdlib": None, "pydocs": PYTHON_DOCS}
CORPUS_NAMES = {"stdlib": "Python standard library docstrings (embedded corpus)",
                "pydocs": "Python 3.11 documentation sources (python3.11-doc)"}
# Issue 15's target, after the paper (Zhao et al. 2024: +2.4% perplexity at 60M on C4):
# galore_adamw within +3% of tuned AdamW at 1,000 steps or more.
TARGET_GAP = 0.03
TARGET_STEPS = 1000


# The optimizers of issue 15, plus any added to the registry since (fira, apollo, ...).
DEFAULT_OPTIMIZERS = ("adamw", "adamw_8bit", "galore_adamw", "galore_adamw8bit",
                      "galore_adafactor", "gradnorm_lorp", "optax_contrib_galore")
KNOWN_BEFORE = DEFAULT_OPTIMIZERS + ("gradnorm_lorp8bit",)
SCALED_ADAMW = "adamw_scaled"  # the registry's diagnostic row: AdamW with GaLore's step sizes


def entries_for(names):
  """One entry per name; galore_adamw also with the randomized refresh."""
  entries = []
  for name in names:
    label = "adamw, attn/mlp steps × 0.25" if name == SCALED_ADAMW else name
    entries.append(compare.Entry(label, name))
    if name == "galore_adamw":
      entries.append(compare.Entry("galore_adamw (randomized)", name, (("refresh", "randomized"),)))
  return entries


def default_optimizers():
  added = [n for n in optimizers.REGISTRY if n not in KNOWN_BEFORE and n != SCALED_ADAMW]
  return ",".join(list(DEFAULT_OPTIMIZERS) + added + [SCALED_ADAMW])


def settings_of(args, corpus):
  return {"corpus": corpus, "config": args.config, "steps": args.steps,
          "tune_steps": args.tune_steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
          "seeds": args.seeds, "lr_grid": args.lr_grid, "update_proj_gap": args.update_proj_gap,
          "eval_every": args.eval_every}


def run_corpus(args, corpus, entries, out_dir, log):
  """Runs the entries missing from ``<out>/<corpus>.json``; returns all outcomes in order."""
  path = os.path.join(out_dir, f"{corpus}.json")
  settings = settings_of(args, corpus)
  saved = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous["settings"] == settings:
      saved = {r["label"]: r for r in previous["outcomes"]}
    else:
      log(f"{path} holds runs with other settings; starting {corpus} again")
  base = configs.get_config(
      model=args.config, data=CORPORA[corpus], steps=args.steps, batch_size=args.batch_size,
      seq_len=args.seq_len, update_proj_gap=args.update_proj_gap, eval_every=args.eval_every,
      eval_batches=args.eval_batches, log_every=args.log_every, progress=False,
      seed=args.seeds[0])
  factors = tuning.parse_factors(args.lr_grid)
  dataset = None
  outcomes = []
  for entry in entries:
    if entry.label in saved and not saved[entry.label]["error"]:
      outcomes.append(compare.outcome_from_dict(saved[entry.label]))
      continue
    if dataset is None:
      dataset = train.load_dataset(base)
      log(f"{corpus}: {dataset.describe()}")
    t0 = time.perf_counter()
    outcome, = compare.run_comparison(
        base, [entry], os.path.join(out_dir, corpus), seeds=args.seeds, factors=factors,
        tune_steps=args.tune_steps, dataset=dataset, timing_rounds=0, progress=False, log=log)
    outcomes.append(outcome)
    losses = ", ".join(f"{x:.4f}" for x in outcome.losses)
    log(f"{corpus} {entry.label}: lr {outcome.tuning.chosen_lr if outcome.tuning else '-'}, "
        f"final eval loss {losses or outcome.error} ({(time.perf_counter() - t0) / 60:.1f} min)")
    saved[entry.label] = compare.outcome_to_dict(outcome)
    fileio.write_json(path, {"settings": settings, "data": dataset.describe(),
                             "command": args.command,
                             "outcomes": [saved[o.entry.label] for o in outcomes]})
  return outcomes, (dataset.describe() if dataset else json.load(open(path))["data"])


def findings(corpus, outcomes, baseline, steps):
  """Sentences stating what the numbers of one corpus show (generated, not written)."""
  lines = []
  if baseline is None:
    return ["No AdamW baseline finished."]
  base_state = baseline.summaries[0]["opt_state_bytes"]
  for o in outcomes:
    if o is baseline or o.error or not o.summaries:
      continue
    gaps = compare.ppl_gaps(o, baseline)
    mean, std = report.mean_std(gaps)
    state = o.summaries[0]["opt_state_bytes"] / base_state
    text = (f"`{o.name}`: perplexity {mean * 100:+.1f}%"
            + (f" ± {std * 100:.1f}%" if std is not None else "")
            + f" vs tuned AdamW ({compare.verdict(gaps)}), at {state:.0%} of AdamW's "
            "optimizer state")
    if o.entry.label == "galore_adamw":
      if steps < TARGET_STEPS:
        text += (f"; the target (within +{TARGET_GAP:.0%} at {TARGET_STEPS:,}+ steps) is not "
                 f"assessed by this {steps}-step run")
      else:
        met = mean <= TARGET_GAP
        text += (f"; the target (within +{TARGET_GAP:.0%}) is {'met' if met else 'not met'}")
    lines.append("- " + text + ".")
  return lines


def render(args, results, started, commands):
  load = report.load_average()
  hours = sum(o.wall_s for outcomes, _ in results.values() for o in outcomes) / 3600
  lines = ["# Training quality at tuned learning rates, over seeds", "",
           "Commands (from the repository root), one per corpus:", ""]
  lines += [f"- {CORPUS_NAMES[corpus]}: `{command}`" for corpus, command in commands.items()]
  lines += [
      "",
      f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; {hours:.1f} h of training in all"
      + (f"; load average when this file was written {load[0]:.1f} / {load[1]:.1f} / "
         f"{load[2]:.1f} (1 / 5 / 15 min; the machine was shared with other jobs)"
         if load else ""),
      f"- Machine: {report.machine()}",
      "- Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions().items()),
      f"- Setup: `apt-get install -y python3.11-doc` provides the second corpus "
      f"({PYTHON_DOCS}); the first is embedded (no download).",
      ""]
  panels = []
  for corpus, (outcomes, data) in results.items():
    baseline = compare.baseline_of(outcomes)
    base = configs.get_config(model=args.config, steps=args.steps, batch_size=args.batch_size,
                              seq_len=args.seq_len, update_proj_gap=args.update_proj_gap)
    lines += [f"## {CORPUS_NAMES[corpus]}", ""]
    lines += compare.describe_setup(base, outcomes, seeds=args.seeds,
                                    factors=tuning.parse_factors(args.lr_grid),
                                    tune_steps=args.tune_steps, data=data)
    lines += ["", "What the numbers show:", ""]
    lines += findings(corpus, outcomes, baseline, args.steps) + [""]
    lines += [compare.results_table(outcomes, baseline), "",
              f"Learning-rate tuning: loss on the tuning split after {args.tune_steps} steps, "
              f"seed {args.seeds[0]} (bold: chosen).", "",
              compare.tuning_table(outcomes), ""]
    failed = [o for o in outcomes if o.error]
    if failed:
      lines += ["Failed: " + "; ".join(f"`{o.name}`: {o.error}" for o in failed), ""]
    ok = [o for o in outcomes if not o.error and o.histories]
    histories = [h for o in ok for h in o.histories]
    panels.append((f"{CORPUS_NAMES[corpus]}: validation loss", "eval",
                   [(o.name, o.histories) for o in ok],
                   report.zoom(histories, "eval", args.steps // 4)))
  lines += [
      "Columns: final eval loss is the mean next-token cross entropy on the validation split "
      "after the last step (mean ± standard deviation over seeds); the gap is the perplexity "
      "relative to AdamW per seed (paired: same initial weights and batches), mean ± standard "
      "deviation; *tie* = the mean gap is within one standard deviation; *edge* = the chosen "
      "learning rate is at the end of its grid. Step times are not measured here (see "
      "benchmarks/results/llama.md for side-by-side timing).", "",
      "![validation loss, mean ± one standard deviation over seeds](quality.png)", ""]
  report.plot_loss_curves(panels, os.path.join(args.results_dir, "quality.png"),
                          f"LLaMA {args.config}: each optimizer at its tuned learning rate "
                          f"(band: ± 1 std over {len(args.seeds)} seeds)")
  fileio.write_text(os.path.join(args.results_dir, "quality.md"), "\n".join(lines))


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--corpora", default="stdlib,pydocs", help=f"from: {', '.join(CORPORA)}")
  p.add_argument("--optimizers", default=default_optimizers(),
                 help="registry names (galore_adamw also runs with the randomized refresh; "
                      f"{SCALED_ADAMW} is the diagnostic row)")
  p.add_argument("--config", default="small")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--tune-steps", type=int, default=250)
  p.add_argument("--lr-grid", default="0.333,1,3")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--update-proj-gap", type=int, default=200)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--eval-batches", type=int, default=16)
  p.add_argument("--log-every", type=int, default=25)
  p.add_argument("--out", default=os.path.join("runs", "quality"))
  p.add_argument("--results-dir", default=RESULTS_DIR,
                 help="where quality.md and quality.png go")
  p.add_argument("--report-only", action="store_true",
                 help="render the results files from the saved runs without training")
  args = p.parse_args(argv)
  started = datetime.datetime.now(datetime.timezone.utc)
  args.command = "python -m benchmarks.quality" + ("" if not argv else " " + shlex.join(argv))
  log = lambda message: print(message, flush=True)
  try:
    args.seeds = compare.parse_seeds(args.seeds)
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    for corpus in corpora:
      if corpus not in CORPORA:
        raise ExampleError(f"unknown corpus {corpus!r} (choose from: {', '.join(CORPORA)})")
    if "pydocs" in corpora and not os.path.isdir(PYTHON_DOCS):
      raise ExampleError(f"{PYTHON_DOCS} is missing: apt-get install -y python3.11-doc")
    entries = entries_for(e.label for e in compare.parse_optimizers(args.optimizers))
    out_dir = os.path.abspath(args.out)
    results, commands = {}, {}
    for corpus in corpora:
      if args.report_only:
        with open(os.path.join(out_dir, f"{corpus}.json"), encoding="utf-8") as f:
          saved = json.load(f)
        results[corpus] = ([compare.outcome_from_dict(r) for r in saved["outcomes"]],
                           saved["data"])
        commands[corpus] = saved.get("command", args.command)  # the command that trained them
      else:
        results[corpus] = run_corpus(args, corpus, entries, out_dir, log)
        commands[corpus] = args.command
  except ExampleError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  render(args, results, started, commands)
  log(f"wrote {os.path.join(args.results_dir, 'quality')}.md and .png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
