"""The XLA flag every test process compiles with, and the compilation cache they share.

The suite compiles hundreds of small programs on two CPU cores, and LLVM's
optimization of the code XLA:CPU generates is a third of that work (the
contract tests of one optimizer: 20.2 s of CPU time at the default level,
13.5 s at level 0). Optimization level 0 changes how fast the code runs, not
what it computes (XLA:CPU does not enable fast-math), and no test times
anything. It is set for the tests' own processes and their background jobs;
a user's runs keep their own flags.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def with_fast_compile(flags: str = "") -> str:
  """`flags` (an XLA_FLAGS value) with FAST_COMPILE added."""
  return f"{flags} {FAST_COMPILE}".strip() if FAST_COMPILE not in flags else flags


def set_in_environment() -> None:
  os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))


def share_compiled_programs(folder: str) -> None:
  """Makes every test process of one run (both pytest-xdist workers, the background jobs,
  the CLI subprocesses) read and write one JAX compilation cache in `folder`.

  Many tests compile a program another test already compiled (the same optimizer on the
  same shapes in the contract suite, the fused tests and the examples): the second one is
  read back instead (tests/test_contract.py alone: 196 s -> 170 s). The folder is new for
  each run, so a run never reads what an earlier one compiled; what a compile returns is
  unchanged (memory_analysis and as_text() included).
  """
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
