"""benchmarks/gpu.py keeps working on a CPU: its smoke run, its report logic, its errors.

The smoke run is the same code as the GPU run with tiny sizes; it writes to a temporary
folder, never over benchmarks/results/gpu.md.
"""

import json
import math
import os
import subprocess
import sys

import pytest

import background

from benchmarks import gpu
from benchmarks import gpu_report
from benchmarks import gpu_spec as spec

import galore_optax as go

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = ["-m", "benchmarks.gpu"]  # run from ROOT


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, *SCRIPT, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def _smoke_command(scratch):
  out = os.path.join(scratch, "gpu.md")
  return [background.Command([sys.executable, *SCRIPT, "--smoke", "--part", "refresh,step,memory",
                              "--out", out], cwd=ROOT)]


background.register("smoke", _smoke_command, 600)


@pytest.fixture(scope="module")
def smoke():
  """One smoke run of the parts that need no example code: (report json, markdown)."""
  done = background.result("smoke")
  assert not done.timed_out and done.returncodes[0] == 0, done.stderrs[0][-3000:]
  out = os.path.join(background.scratch("smoke"), "gpu.md")
  with open(out[:-3] + ".json") as f:
    report = json.load(f)
  assert os.path.getsize(out[:-3] + ".png") > 0
  with open(out) as f:
    return report, f.read()


def test_smoke_refresh_energies(smoke):
  report, markdown = smoke
  part = report["parts"]["refresh"]
  assert part["status"] == "ok"
  shapes = {(r["m"], r["n"], r["rank"]) for r in part["rows"]}
  assert shapes == set(spec.SMOKE.refresh_shapes)
  for r in part["rows"]:
    assert 0.0 < r["energy"] <= 1.0 + 1e-6
    assert 0.0 < r["energy_vs_exact"] <= 1.0 + 1e-6
    assert 0.0 < r["min_s"] <= r["median_s"] <= r["max_s"] and r["rounds"] >= 1
    if r["method"] == spec.EXACT:
      assert r["energy_vs_exact"] == 1.0
      # Singular values 1/i: the exact rank-r basis keeps sum_{i<=r} 1/i² of sum_{i<=k} 1/i²
      # (bf16 rounding of the matrix moves it slightly).
      k = min(r["m"], r["n"])
      expected = sum(1 / i**2 for i in range(1, r["rank"] + 1)) / sum(
          1 / i**2 for i in range(1, k + 1))
      assert r["energy"] == pytest.approx(expected, abs=5e-3)
    else:  # the fast methods work: within 5% of the exact energy on these small matrices
      assert r["energy_vs_exact"] >= 0.95
  for method in spec.REFRESH_METHODS:
    assert f"| {method} |" in markdown


def test_smoke_step_table(smoke):
  report, markdown = smoke
  part = report["parts"]["step"]
  assert part["status"] == "ok", part.get("error")
  rows = {r["name"]: r for r in part["rows"]}
  assert set(rows) == set(spec.SMOKE.step_rows)  # none skipped for time
  adamw = rows[spec.ADAMW]["plain_s"]
  for r in rows.values():
    assert r["refresh_s"] > 0 and r["plain_s"] > 0 and r["plain_s"] / adamw > 0
    low, high = sorted((r["refresh_s"], r["plain_s"]))
    assert low <= r["amortized_s"] <= high
    assert r["state_bytes"] > 0
  # GaLore's state is smaller than AdamW's.
  assert rows["galore_adamw, randomized"]["state_bytes"] < rows[spec.ADAMW]["state_bytes"]
  # Every step optimizer of the registry is in the report: measured, or named as left out.
  for name, o in spec.OPTIMIZERS.items():
    if o.step:
      assert name in part["left_out"] or f"| {name} |" in markdown
      assert f"`{name}`" in markdown or f"| {name} |" in markdown


def test_smoke_memory_rows(smoke):
  report, markdown = smoke
  part = report["parts"]["memory"]
  probe = report["probe"]
  assert part["status"] == "ok", part.get("error")
  names = [r["name"] for r in part["rows"]]
  # The fixed rows and the library's smallest-state optimizer, chosen from eval_shape sizes.
  smallest = min(probe["state_bytes"], key=probe["state_bytes"].get)
  assert part["smallest"] == smallest and names == list(spec.SMOKE.memory_rows) + [smallest]
  dims = spec.SMOKE.memory_dims
  for r in part["rows"]:
    assert r["status"] == "ok"
    assert r["param_bytes"] == probe["param_bytes"]
    if r["name"] in probe["state_bytes"]:
      assert r["state_bytes"] == probe["state_bytes"][r["name"]]
    # A real language-model loss: about log(vocab) at initialization, for every optimizer.
    assert len(r["losses"]) == 2
    assert abs(r["losses"][0] - math.log(dims.vocab)) < 0.5
    assert r["compiled"]["temp_size_in_bytes"] > 0
    # XLA's planned peak holds at least the parameters and the state, next to the real peak.
    planned = go.planned_peak_bytes(r["compiled"])
    assert planned >= r["param_bytes"] + r["state_bytes"]
    assert f"| {gpu_report.size(planned)} |" in markdown
  rows = {r["name"]: r for r in part["rows"]}
  assert rows[smallest]["state_bytes"] <= rows["galore_adamw8bit"]["state_bytes"] < \
      rows[spec.ADAMW]["state_bytes"]
  assert "n/a (cpu)" in markdown  # no peak statistics on a CPU: none invented


def test_smoke_report_header(smoke):
  report, markdown = smoke
  assert markdown.startswith("# GPU evidence")
  assert "**Smoke run**" in markdown
  assert report["probe"]["backend"] == "cpu"
  assert "| refresh | 60 s |" in markdown  # the budget table
  for line in ("- date:", "- command: `python ", "- versions:", "- galore-optax commit:"):
    assert line in markdown
  # No verdicts from a smoke run.
  assert "**met**" not in markdown and "**not met**" not in markdown


def test_merge_keeps_the_other_parts(smoke, tmp_path):
  report, _ = smoke
  out = tmp_path / "gpu.md"
  with open(tmp_path / "gpu.json", "w") as f:
    json.dump(report, f)
  proc = _run("--smoke", "--part", "refresh", "--merge", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "gpu.json") as f:
    merged = json.load(f)
  assert list(merged["parts"]) == ["refresh", "step", "memory"]
  assert merged["parts"]["step"] == report["parts"]["step"]
  assert merged["parts"]["memory"] == report["parts"]["memory"]
  assert merged["parts"]["refresh"]["call"].endswith("--merge --out " + str(out))
  markdown = out.read_text()
  assert "- step is from an earlier call: `python " in markdown
  assert "## 3. Peak memory" in markdown
  # Nothing to merge into, or a report of the other kind: clear errors, nothing run.
  proc = _run("--smoke", "--merge", "--out", str(tmp_path / "none.md"))
  assert proc.returncode == 2 and "--merge: no report" in proc.stderr
  proc = _run("--merge", "--out", str(out))
  assert proc.returncode == 2 and "comes from a smoke run" in proc.stderr


def test_rows_that_do_not_fit_the_budget_are_named(tmp_path):
  out = tmp_path / "gpu.md"
  proc = _run("--smoke", "--part", "step", "--budget", "step=1", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "gpu.json") as f:
    part = json.load(f)["parts"]["step"]
  assert part["rows"] == [] and part["skipped"] == list(spec.SMOKE.step_rows)
  assert "not measured (time budget)" in out.read_text()


def _contract_record(name, losses, lr, grid=None, wall=10.0):
  return dict(name=name, grid=grid or [lr], tuning_losses=[3.0] * len(grid or [lr]),
              chosen_lr=lr, final_eval_loss=losses, mean=sum(losses) / len(losses),
              std=None if len(losses) < 2 else 0.01, wall_s=wall, state_bytes=2**20,
              step_time_s=0.01)


def test_compare_records_follow_the_contract():
  data = [_contract_record("adamw", [1.00, 1.02], 3e-3, grid=[1e-3, 3e-3, 9e-3]),
          _contract_record("galore_adamw", [1.01, 1.03], 1e-2)]
  records = gpu.compare_records(data)
  assert [r["name"] for r in records] == ["adamw", "galore_adamw"]
  assert records[0]["losses"] == [1.00, 1.02] and records[0]["mean"] == pytest.approx(1.01)
  assert records[0]["grid"] == [1e-3, 3e-3, 9e-3]
  # The same records keyed by name, with per-seed losses as {seed: loss} and no mean/std.
  keyed = {"optimizers": {r["name"]: dict(r, final_eval_loss={0: r["final_eval_loss"][0],
                                                              1: r["final_eval_loss"][1]},
                                          mean=None, std=None) for r in data}}
  again = gpu.compare_records(keyed)
  assert again[1]["mean"] == pytest.approx(1.02)
  assert again[1]["std"] == pytest.approx(0.02 / math.sqrt(2))  # sample std of 1.01, 1.03
  # A failed optimizer is a row with its error, not a crash.
  failed = gpu.compare_records([dict(data[0], error="diverged", final_eval_loss=[], mean=None)])
  assert failed == [{"name": "adamw", "error": "diverged"}]
  with pytest.raises(ValueError, match="final_eval_loss"):
    gpu.compare_records([{"name": "adamw", "wall_s": 1.0}])
  with pytest.raises(ValueError, match="no per-optimizer records"):
    gpu.compare_records({"optimizers": []})


def test_quality_table():
  records = gpu.compare_records({"optimizers": [
      dict(_contract_record("adamw", [1.0], 3e-3, grid=[1e-3, 3e-3, 9e-3]),
           chosen_at_grid_edge=False),
      _contract_record("galore_adamw", [1.01], 1e-2),
      dict(name="optax_contrib_galore", error="diverged", final_eval_loss=[], wall_s=1.0)]})
  lines = "\n".join(gpu_report.render_quality(dict(rows=records, command="python -m examples.compare"),
                                        spec.FULL))
  assert "| adamw | 0.003 (0.001, 0.003, 0.009) | 1.0000 (1 seed) | 2.72 | baseline |" in lines
  # exp(0.01) - 1: galore_adamw's perplexity is 1.01% above tuned AdamW's.
  assert "| galore_adamw | 0.01 (pinned) | 1.0100 (1 seed) | 2.75 | +1.01% |" in lines
  assert "| optax_contrib_galore | failed: diverged |" in lines


def test_compare_cli_takes_what_gpu_py_passes():
  """The flags and optimizer names of part 4 exist in python -m examples.compare."""
  proc = subprocess.run([sys.executable, "-m", "examples.compare", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = " ".join(proc.stdout.split())
  for flag in spec.COMPARE_FLAGS + ("--update-proj-gap", "--no-progress", "--data"):
    assert flag in text
  for name in spec.QUALITY_OPTIMIZERS:
    assert name in text
  assert "repeatable" in text  # --lr NAME=VALUE is given once per pinned optimizer


def _report(contrib_refresh=60.0, galore_refresh=0.5, energy=0.995, plain=(10e-3, 10.5e-3),
            peak_gib=17.5, losses=(1.00, 1.02)):
  """A report as the parts write it, with chosen figures (to test the verdict logic)."""
  adamw_plain, galore_plain = plain
  amortized = lambda refresh, plain: (refresh + (spec.GAP - 1) * plain) / spec.GAP
  step_rows = [
      dict(name=spec.ADAMW, refresh_s=adamw_plain, plain_s=adamw_plain,
           amortized_s=adamw_plain),
      dict(name=spec.CONTRIB, refresh_s=contrib_refresh, plain_s=0.02,
           amortized_s=amortized(contrib_refresh, 0.02)),
      dict(name="galore_adamw, randomized", refresh_s=galore_refresh, plain_s=galore_plain,
           amortized_s=amortized(galore_refresh, galore_plain)),
  ]
  refresh_rows = [dict(method="randomized", energy_vs_exact=energy, shape=s)
                  for s in ("a", "b")]
  return {"parts": {
      "refresh": {"rows": refresh_rows}, "step": {"rows": step_rows},
      "memory": {"rows": [dict(name="galore_adamw8bit", peak_bytes=peak_gib * spec.GIB)]},
      "quality": {"rows": [dict(name="adamw", mean=losses[0]),
                           dict(name="galore_adamw", mean=losses[1])]}}}


def test_target_verdicts():
  rows = gpu_report.target_rows(_report())
  assert [r[2] for r in rows] == ["**met**"] * 5
  assert "120.0×" in rows[0][1]  # 60 s / 0.5 s
  assert "1.05×" in rows[1][1]  # 10.5 ms / 10 ms
  assert "1.29×" in rows[2][1]  # (0.5 s + 199 × 10.5 ms) / 200 = 12.95 ms
  worse = gpu_report.target_rows(_report(galore_refresh=1.0, energy=0.98, plain=(10e-3, 13e-3),
                                  peak_gib=18.5, losses=(1.00, 1.03)))
  assert [r[2] for r in worse] == ["**not met**"] * 5
  # exp(0.03) - 1 = +3.05% perplexity.
  assert "+3.05%" in worse[4][1]
  assert gpu_report.target_rows({"parts": {}})[0][1] == "not measured"


def test_bad_arguments_are_named():
  proc = _run("--part", "refresh,bogus")
  assert proc.returncode == 2 and "--part" in proc.stderr
  proc = _run("--smoke", "--budget", "step=soon")
  assert proc.returncode == 2 and "--budget" in proc.stderr and "number" in proc.stderr
  proc = _run("--smoke", "--budget", "warmup=10")
  assert proc.returncode == 2 and "unknown part 'warmup'" in proc.stderr
