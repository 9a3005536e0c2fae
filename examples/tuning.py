"""Learning-rate tuning: every optimizer of a comparison at its own best peak learning rate.

An optimizer's grid is its default peak learning rate (``OptimizerSpec.default_lr``, the
paper's recipe) times a few factors, ``DEFAULT_FACTORS`` = 1/3, 1, 3. Each grid value trains
a short run, and the value with the lowest loss on the *tuning* split wins. That split is held
out from training and is never the reported validation split, so the reported loss has not
been used to make any choice. A trial whose loss stops being finite counts as diverged
(infinite loss). When the winner is the smallest or largest value, the best learning rate may
lie outside the grid, so the grid grows by one more value on that side (same spacing), at
most ``MAX_EXTENSIONS`` times.
"""

import dataclasses
import math
from typing import Callable, List, Optional, Sequence

from examples.errors import DivergenceError, ExampleError

DEFAULT_FACTORS = (1 / 3, 1.0, 3.0)
MAX_EXTENSIONS = 2


def parse_positive(text: str, not_a_number: str, not_positive: str) -> float:
  """``text`` as a positive, finite number: a learning rate, or a factor of one.

  Raises:
    ExampleError: with the message ``not_a_number`` or ``not_positive``, whichever applies.
  """
  try:
    value = float(text)
  except ValueError:
    raise ExampleError(not_a_number) from None
  if not (value > 0 and math.isfinite(value)):
    raise ExampleError(not_positive)
  return value


def parse_factors(text: str) -> List[float]:
  """Grid factors from ``"0.333,1,3"``: positive, finite, distinct, at least one.

  Raises:
    ExampleError: naming --lr-grid and the bad entry.
  """
  items = [item.strip() for item in text.split(",") if item.strip()]
  if not items:
    raise ExampleError(f"--lr-grid {text!r} is empty; give factors of the default learning "
                       "rate such as 0.333,1,3")
  factors = []
  for item in items:
    factor = parse_positive(item, f"--lr-grid entry {item!r} is not a number (e.g. 0.333,1,3)",
                            f"--lr-grid entry {item!r} must be a positive factor")
    if factor in factors:
      raise ExampleError(f"--lr-grid lists {item} twice")
    factors.append(factor)
  return sorted(factors)


def _round(lr: float) -> float:
  return float(f"{lr:.3g}")


def lr_grid(center: float, factors: Sequence[float]) -> List[float]:
  """``center * factor`` for each factor, ascending, rounded to 3 significant digits."""
  if not factors:
    raise ExampleError("the learning-rate grid is empty")
  return sorted(_round(center * f) for f in factors)


@dataclasses.dataclass
class Tuning:
  """The outcome of tuning one optimizer.

  Attributes:
    grid: the peak learning rates tried (ascending); ``[lr]`` when pinned.
    losses: tuning-split loss of each grid value (inf: diverged); None when pinned.
    chosen_lr: the value with the lowest loss, or the pinned one.
    pinned: True when the learning rate was given (``--lr name=value``) and not tuned.
    extended: how many values were added beyond the initial grid's edges.
  """

  grid: List[float]
  losses: Optional[List[float]]
  chosen_lr: float
  pinned: bool = False
  extended: int = 0

  @property
  def at_edge(self) -> bool:
    """True when the winner is the smallest or largest value of a grid of two or more
    (after the extensions): the best learning rate may lie outside the grid."""
    return (not self.pinned and len(self.grid) > 1
            and self.chosen_lr in (self.grid[0], self.grid[-1]))


def choose(grid: Sequence[float], losses: Sequence[float]) -> float:
  """The grid value with the lowest finite loss (the smaller learning rate on a tie).

  Raises:
    DivergenceError: when every trial diverged.
  """
  finite = [(loss, lr) for lr, loss in zip(grid, losses) if math.isfinite(loss)]
  if not finite:
    raise DivergenceError(f"every learning rate of the grid {', '.join(f'{lr:g}' for lr in grid)} "
                       "diverged; give a lower grid with --lr-grid or pin one with --lr")
  return min(finite)[1]


def tune(grid: Sequence[float], trial: Callable[[float], float],
         max_extensions: int = MAX_EXTENSIONS) -> Tuning:
  """Runs ``trial(lr) -> tuning-split loss`` for each grid value and keeps the best.

  While the best value is the smallest or largest of the grid, one more value is tried
  beyond it (the grid's spacing at that end), at most ``max_extensions`` times.

  Args:
    grid: peak learning rates, ascending.
    trial: trains a short run at ``lr`` and returns its final loss on the tuning split
      (``math.inf`` when it diverged).
    max_extensions: how many values may be added beyond the grid's edges.

  Returns:
    The Tuning record (the grid includes the added values).
  """
  grid = sorted(grid)
  if not grid:
    raise ExampleError("the learning-rate grid is empty")
  losses = [float(trial(lr)) for lr in grid]
  extended = 0
  while extended < max_extensions and len(grid) > 1:
    best = choose(grid, losses)
    if best == grid[-1]:
      lr = _round(grid[-1] * grid[-1] / grid[-2])
      grid.append(lr)
      losses.append(float(trial(lr)))
    elif best == grid[0]:
      lr = _round(grid[0] * grid[0] / grid[1])
      grid.insert(0, lr)
      losses.insert(0, float(trial(lr)))
    else:
      break
    extended += 1
  return Tuning(grid, losses, choose(grid, losses), extended=extended)


def pinned(lr: float) -> Tuning:
  """The Tuning record of a learning rate given on the command line."""
  if not (lr > 0 and math.isfinite(lr)):
    raise ExampleError(f"a pinned learning rate must be positive, got {lr}")
  return Tuning([lr], None, lr, pinned=True)
