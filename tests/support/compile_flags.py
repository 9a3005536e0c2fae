"""The XLA flags every test process compiles with, and the compilation cache they share.

The suite compiles hundreds of small programs on two CPU cores, and making
machine code of them is most of that work:

* LLVM's optimization of the code XLA:CPU generates was a third of it (the
  contract tests of one optimizer: 20.2 s of CPU time at the default level,
  13.5 s at level 0);
* XLA:CPU's MLIR fusion emitters take longer to generate a fusion's code than
  its element-wise emitters (COAP's contract step: 2.14 s of code generation
  with them, 0.36 s without; the suite's 20 donated-step contract tests: 67 s
  of CPU time, 35 s).

Neither changes what is computed: level 0 changes how fast the code runs (XLA:CPU
does not enable fast-math), and both emitters generate the same HLO's
element-wise arithmetic. Differently generated code may round a long fused
expression differently in the last bit: each comparison of two differently
compiled programs says what it allows, with the figure measured under these
flags. No test times anything. The flags are set for the tests' own processes
and their background jobs; a user's runs keep their own flags.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


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
