"""examples.compare and examples.tuning: each optimizer at its own tuned learning rate,
chosen on the tuning split, reported on the validation split."""

import json
import math
import os
import types

import pytest

from examples import compare
from examples import configs
from examples import tuning
from examples.errors import DivergenceError, ExampleError

# pylint: disable=wrong-import-order
from test_examples import NANO_1, _assert_one_error_line, text_docs


# ----------------------------------------------------------------------------- tuning


def _bowl(best):
  """A tuning loss with its minimum at learning rate ``best``."""
  return lambda lr: (math.log10(lr) - math.log10(best)) ** 2 + 1.0


def test_tune_picks_the_lowest_tuning_loss():
  tried = []
  def trial(lr):
    tried.append(lr)
    return _bowl(1e-3)(lr)
  result = tuning.tune(tuning.lr_grid(1e-3, tuning.DEFAULT_FACTORS), trial)
  assert tried == result.grid == [3.33e-4, 1e-3, 3e-3]
  assert result.chosen_lr == 1e-3 and result.losses == [_bowl(1e-3)(x) for x in result.grid]
  assert not result.at_edge and not result.pinned and result.extended == 0


def test_tune_grows_the_grid_past_an_edge_winner():
  # Best at 10**-2.5: 3e-3 wins the first grid, 9e-3 is tried and loses.
  up = tuning.tune([3.33e-4, 1e-3, 3e-3], _bowl(10 ** -2.5))
  assert up.grid == [3.33e-4, 1e-3, 3e-3, 9e-3] and up.chosen_lr == 3e-3
  assert up.extended == 1 and not up.at_edge
  # Best far below: two values are added downwards, and the winner is still at the edge.
  down = tuning.tune([1e-3, 3e-3], _bowl(1e-6))
  assert down.grid == [1.11e-4, 3.33e-4, 1e-3, 3e-3] and down.chosen_lr == 1.11e-4
  assert down.extended == tuning.MAX_EXTENSIONS and down.at_edge
  # A diverged top value is not a winner: no extension past it.
  capped = tuning.tune([1e-3, 3e-3], lambda lr: math.inf if lr > 2e-3 else _bowl(1e-3)(lr))
  assert capped.grid == [3.33e-4, 1e-3, 3e-3] and capped.chosen_lr == 1e-3


def test_diverged_trials_lose_and_all_diverged_is_an_error():
  assert tuning.choose([1e-3, 3e-3, 1e-2], [5.0, math.nan, math.inf]) == 1e-3
  assert tuning.choose([1e-3, 3e-3], [4.0, 4.0]) == 1e-3  # a tie goes to the smaller
  with pytest.raises(DivergenceError, match="every learning rate of the grid 0.001, 0.003"):
    tuning.choose([1e-3, 3e-3], [math.inf, math.nan])


@pytest.mark.parametrize("text,fragment", [
    ("", "--lr-grid '' is empty"),
    (" , ", "is empty"),
    ("0,1", "--lr-grid entry '0' must be a positive factor"),
    ("-1,1", "must be a positive factor"),
    ("1,x", "--lr-grid entry 'x' is not a number"),
    ("1,1", "lists 1 twice"),
])
def test_bad_grid_factors(text, fragment):
  with pytest.raises(ExampleError, match=fragment.replace("(", r"\(")):
    tuning.parse_factors(text)


def test_grid_factors_and_pinned():
  assert tuning.parse_factors("3, 0.333,1") == [0.333, 1.0, 3.0]
  assert tuning.lr_grid(1e-2, [0.333, 1, 3]) == [3.33e-3, 1e-2, 3e-2]
  assert tuning.pinned(2e-3).grid == [2e-3] and not tuning.pinned(2e-3).at_edge
  with pytest.raises(ExampleError, match="must be positive"):
    tuning.pinned(0.0)


# ----------------------------------------------------------------------------- protocol


class FakeTrainer:
  """Records every run; its losses make the tuning and validation splits disagree.

  Tuning-split loss is lowest at 3x the default learning rate, validation loss at 1/3x:
  an implementation that chose on validation would pick another value.
  """

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    default = {"adamw": 1e-3, "galore_adamw": 1e-2}[config.optimizer]
    ratio = config.learning_rate / default
    best = 3.0 if config.eval_split == "tuning" else 1 / 3
    loss = 4.0 + abs(math.log(ratio / best)) + 0.01 * config.seed
    if config.optimizer == "galore_adamw" and ratio > 2 and config.eval_split == "tuning":
      raise DivergenceError("the loss became nan at step 3")
    self.calls.append(dict(optimizer=config.optimizer, lr=config.learning_rate,
                           split=config.eval_split, steps=config.steps, seed=config.seed,
                           workdir=workdir))
    summary = {"final_eval_loss": loss, "final_eval_perplexity": math.exp(loss),
               "eval_split": config.eval_split, "seed": config.seed, "steps": config.steps,
               "opt_state_bytes": 100, "params": 10, "seq_len": 16, "tokens": 1}
    return types.SimpleNamespace(summary=summary, history=[], model=None, optimizer=None)


def test_compare_chooses_on_the_tuning_split_and_reports_the_validation_split(tmp_path):
  base = configs.get_config(model="tiny", steps=10, batch_size=2)
  entries = compare.parse_optimizers("adamw,galore_adamw")
  fake = FakeTrainer()
  outcomes = compare.run_comparison(base, entries, str(tmp_path), seeds=[4, 5],
                                    tune_steps=3, trainer=fake, timing_rounds=0,
                                    progress=False, log=lambda *_: None)
  adamw, galore = outcomes
  # 3e-3 won the first grid at its edge, so 9e-3 was tried too (and lost).
  assert adamw.tuning.grid == [3.33e-4, 1e-3, 3e-3, 9e-3] and adamw.tuning.chosen_lr == 3e-3
  # galore_adamw diverged at 3e-2 (infinite loss): the best remaining value wins.
  assert galore.tuning.losses[-1] == math.inf and galore.tuning.chosen_lr == 1e-2
  tuning_calls = [c for c in fake.calls if c["split"] == "tuning"]
  reported = [c for c in fake.calls if c["split"] == "validation"]
  # Tuning: short runs, first seed only, never the validation split.
  assert {(c["steps"], c["seed"]) for c in tuning_calls} == {(3, 4)}
  assert len(tuning_calls) == 4 + 2  # the diverged trial recorded nothing
  # Reported: the full budget at the chosen learning rate, once per seed.
  assert [(c["optimizer"], c["lr"], c["seed"], c["steps"]) for c in reported] == [
      ("adamw", 3e-3, 4, 10), ("adamw", 3e-3, 5, 10),
      ("galore_adamw", 1e-2, 4, 10), ("galore_adamw", 1e-2, 5, 10)]
  assert adamw.losses == pytest.approx([4 + math.log(9) + 0.04, 4 + math.log(9) + 0.05])
  md_table = compare.tuning_table(outcomes)
  header = "| optimizer | default lr | ×0.333 | ×1 | ×3 | ×9 | chosen |"
  assert md_table.splitlines()[0] == header
  assert "| `adamw` | 0.001 | 0.000333: " in md_table and "**0.003: " in md_table
  assert "0.03: diverged" in md_table
  assert len({c["workdir"] for c in fake.calls}) == len(fake.calls)


def test_pinned_learning_rate_skips_tuning(tmp_path):
  fake = FakeTrainer()
  entries = compare.parse_optimizers("adamw,galore_adamw")
  outcomes = compare.run_comparison(
      configs.get_config(model="tiny", steps=10), entries, str(tmp_path), seeds=[0],
      tune_steps=3, pinned=compare.parse_pinned(["adamw=5e-4"], entries), trainer=fake,
      timing_rounds=0, progress=False, log=lambda *_: None)
  assert outcomes[0].tuning.pinned and outcomes[0].tuning.chosen_lr == 5e-4
  assert not [c for c in fake.calls if c["optimizer"] == "adamw" and c["split"] == "tuning"]
  table = compare.results_table(outcomes, compare.baseline_of(outcomes))
  assert "| `adamw` | 0.0005 (pinned) |" in table
  assert "| `galore_adamw` | 0.01 (0.00333, 0.01, 0.03) |" in table


def test_gap_statistics_and_verdicts():
  def outcome(name, losses):
    o = compare.Outcome(compare.Entry(name, name))
    o.summaries = [{"final_eval_loss": l, "seed": s} for s, l in enumerate(losses)]
    return o
  base = outcome("adamw", [4.0, 4.1, 4.2])
  close = outcome("galore_adamw", [4.01, 4.09, 4.22])
  gaps = compare.ppl_gaps(close, base)
  assert gaps == pytest.approx([math.exp(0.01) - 1, math.exp(-0.01) - 1, math.exp(0.02) - 1])
  assert compare.verdict(gaps) == "tie"
  assert compare.verdict(compare.ppl_gaps(outcome("x", [4.3, 4.4, 4.5]), base)) == "worse"
  assert compare.verdict(compare.ppl_gaps(outcome("y", [3.7, 3.8, 3.9]), base)) == "better"
  assert compare.verdict([0.05]) == "1 seed"


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv,fragment", [
    (["--optimizers", "adamw", "--lr", "galore_adamw=1e-2"],
     "--lr 'galore_adamw=1e-2': galore_adamw is not in --optimizers (adamw)"),
    (["--lr-grid", ""], "--lr-grid '' is empty"),
    (["--lr-grid", "0.5,0"], "--lr-grid entry '0' must be a positive factor"),
    (["--optimizers", "adamw", "--lr", "adamw=0"], "the learning rate must be positive"),
    (["--optimizers", "adamw", "--lr", "adamw=-1e-3"], "the learning rate must be positive"),
    (["--optimizers", "adamw", "--lr", "adamw"], "write NAME=VALUE"),
    (["--optimizers", "adamw", "--lr", "adamw=fast"], "'fast' is not a number"),
    (["--optimizers", "adamw:3e-3"], "pin a learning rate with --lr NAME=VALUE"),
    (["--optimizers", "adamw,nope"], "unknown optimizer 'nope'"),
    (["--optimizers", "adamw,adamw"], "listed twice"),
    (["--optimizers", ""], "--optimizers is empty"),
    (["--seeds", ""], "--seeds '' is empty"),
    (["--seeds", "0,x"], "--seeds entry 'x'"),
    (["--tune-steps", "0"], "--tune-steps must be positive"),
    (["--data", "{tmp}/missing.jsonl"], "does not exist"),
    (["--config", "huge"], "unknown config 'huge'"),
])
def test_compare_bad_input_writes_nothing(argv, fragment, tmp_path, capsys):
  out = tmp_path / "cmp"
  argv = [a.format(tmp=tmp_path) for a in argv]
  assert compare.main(argv + ["--out", str(out), "--no-progress"]) == 2
  _assert_one_error_line(capsys.readouterr().err, fragment)
  assert not out.exists()


def test_compare_end_to_end(monkeypatch, tmp_path, capsys):
  """Real runs on a one-layer model: tables, plot and JSON; tuning runs evaluate only on the
  tuning split."""
  monkeypatch.setitem(configs.MODEL_CONFIGS, "nano", NANO_1)
  monkeypatch.setitem(configs.DEFAULT_RANKS, "nano", 4)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(text_docs(120)), encoding="utf-8")
  out, json_path = tmp_path / "cmp", tmp_path / "results.json"
  argv = ["--config", "nano", "--optimizers", "adamw,galore_adamw", "--lr", "adamw=3e-3",
          "--lr-grid", "0.5,2", "--tune-steps", "2", "--seeds", "0,1", "--data", str(corpus),
          "--seq-len", "16", "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache"),
          "--steps", "3", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
          "--log-every", "1", "--timing-rounds", "1", "--timing-steps", "1", "--no-progress",
          "--out", str(out), "--json", str(json_path)]
  code = compare.main(argv)
  assert code == 0, capsys.readouterr().err
  md = (out / "compare.md").read_text()
  assert "python -m examples.compare --config nano" in md
  rows = [l for l in md.splitlines() if l.startswith("| `")]
  main_rows = rows[:2]
  assert main_rows[0].startswith("| `adamw` | 0.003 (pinned) |")
  assert main_rows[1].startswith("| `galore_adamw` | ")
  assert "0.005, 0.02" in main_rows[1] and "0 (baseline)" in main_rows[0]
  assert "%" in main_rows[1].split("|")[5]
  tuning_row = [l for l in md.splitlines() if l.startswith("| `galore_adamw` | 0.01 |")]
  assert len(tuning_row) == 1 and "0.005: " in tuning_row[0]  # the tuning table
  assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  results = json.loads(json_path.read_text())
  by_name = {r["name"]: r for r in results["optimizers"]}
  galore = by_name["galore_adamw"]
  # The grid, grown past an edge winner if that happened.
  assert {0.005, 0.02} <= set(galore["grid"]) and len(galore["grid"]) <= 4
  assert len(galore["tuning_losses"]) == len(galore["grid"])
  assert galore["chosen_lr"] == galore["grid"][galore["tuning_losses"].index(
      min(galore["tuning_losses"]))]
  assert galore["seeds"] == [0, 1] and len(galore["final_eval_loss"]) == 2
  assert galore["mean"] == pytest.approx(sum(galore["final_eval_loss"]) / 2)
  assert galore["std"] > 0 and galore["state_bytes"] < by_name["adamw"]["state_bytes"]
  assert galore["step_time_s"] > 0 and galore["wall_s"] > 0
  assert by_name["adamw"]["pinned"] and by_name["adamw"]["tuning_losses"] is None

  # What each run evaluated on, from its own metrics file.
  def splits(folder):
    with open(out / "runs" / folder / "metrics.jsonl", encoding="utf-8") as f:
      return {r["split"] for r in map(json.loads, f)} - {"train"}
  for lr in galore["grid"]:
    assert splits(f"galore_adamw/tune_lr{lr:g}") == {"tuning"}
  assert splits("galore_adamw/seed0") == splits("adamw/seed1") == {"eval"}
  assert not os.path.exists(out / "runs" / "adamw" / "seed0" / "checkpoints")


def test_fused_rows_are_the_optimizer_with_scanned_layers_and_a_fused_step():
  entries = compare.parse_optimizers("adamw,galore_adamw:fused")
  assert [e.label for e in entries] == ["adamw", "galore_adamw:fused"]
  fused = entries[1]
  assert fused.optimizer == "galore_adamw"
  config = compare.run_config(configs.get_config(model="tiny"), fused, learning_rate=1e-2,
                              steps=4, seed=0, split="validation")
  assert config.fused and config.scan_layers and config.optimizer == "galore_adamw"
  assert not compare.run_config(configs.get_config(model="tiny"), entries[0],
                                learning_rate=1e-3, steps=4, seed=0, split="validation").fused
  for bad in ("galore_adamw:fast", "galore_adamw=1e-3"):
    with pytest.raises(ExampleError, match="NAME:fused"):
      compare.parse_optimizers(bad)
