"""What a results file says about where it came from, and the loss-curve plot.

Used by ``examples.compare`` and ``benchmarks/quality.py``: the machine, the package
versions and git commit, seed statistics and loss curves with a band over seeds.
"""

import math
import os
import platform
import statistics
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

from examples import fileio

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def versions() -> Dict[str, str]:
  """Versions of Python, the JAX stack and this repository's git commit."""
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
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            "examples", "galore_optax", "benchmarks/quality.py"],
                           cwd=REPO_ROOT, text=True, capture_output=True, check=True,
                           timeout=10).stdout.strip()
    out["git commit"] = commit + (" (with uncommitted changes)" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return out


def machine() -> str:
  """CPU model and core count, and the accelerator JAX uses if any."""
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


def load_average() -> Optional[Tuple[float, float, float]]:
  """The 1/5/15-minute load averages (other work on a shared machine), or None."""
  try:
    return os.getloadavg()
  except OSError:
    return None


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
  """Mean and sample standard deviation (None for fewer than two values)."""
  values = list(values)
  mean = statistics.fmean(values) if values else math.nan
  return mean, (statistics.stdev(values) if len(values) > 1 else None)


def plus_minus(mean: float, std: Optional[float], fmt: str = ".4f") -> str:
  return f"{mean:{fmt}}" if std is None else f"{mean:{fmt}} ± {std:{fmt}}"


def curve_band(histories: Sequence[List[dict]], split: str):
  """(steps, mean, low, high) of the loss records of ``split`` over runs (seeds).

  The band is mean ± one standard deviation at each step that every run recorded.
  """
  by_step: Dict[int, List[float]] = {}
  for history in histories:
    for r in history:
      if r["split"] == split and math.isfinite(r["loss"]):
        by_step.setdefault(r["step"], []).append(r["loss"])
  steps = sorted(s for s, v in by_step.items() if len(v) == len(histories))
  means, lows, highs = [], [], []
  for s in steps:
    mean, std = mean_std(by_step[s])
    means.append(mean)
    lows.append(mean - (std or 0.0))
    highs.append(mean + (std or 0.0))
  return steps, means, lows, highs


def plot_loss_curves(panels, path: str, title: str) -> None:
  """One row of panels, each with one line (+ band over seeds) per optimizer.

  Args:
    panels: a list of (panel title, split, [(label, [history per seed])], ylim or None),
      where split is the metric record's "split" ("train", "eval", "tuning").
    path: the PNG to write (atomically).
    title: the figure title.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.3),
                           constrained_layout=True, squeeze=False)
  for ax, (name, split, lines, ylim) in zip(axes[0], panels):
    for i, (label, histories) in enumerate(lines):
      steps, mean, low, high = curve_band(histories, split)
      if not steps:
        continue
      # Past ten lines the colours repeat: the repeats are dashed, so no two lines look alike.
      color = f"C{i % 10}"
      ax.plot(steps, mean, color=color, linewidth=1.3, label=label,
              linestyle="-" if i < 10 else "--",
              marker="o" if split != "train" else None, markersize=2.5)
      if len(histories) > 1:
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if ylim is not None:
      ax.set_ylim(*ylim)
  fig.suptitle(title, fontsize=11)
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)


def zoom(histories: Sequence[List[dict]], split: str, after_step: int):
  """A y-range showing the losses of ``split`` after ``after_step`` (the loss at
  initialisation, ~ln vocab, would squash the curves that matter); None if none."""
  later = [r["loss"] for h in histories for r in h
           if r["split"] == split and r["step"] > after_step and math.isfinite(r["loss"])]
  if not later:
    return None
  low, high = min(later), max(later)
  pad = 0.05 * (high - low) or 0.05
  return low - pad, high + pad
