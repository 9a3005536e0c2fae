"""The XLA flag every test process compiles with.

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
