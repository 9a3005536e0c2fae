import os
import sys

import pytest

# The helpers in tests/support/ (references, workers, background jobs) are imported as
# plain modules.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))

import background  # noqa: E402  (after the path above)
import compile_flags  # noqa: E402

# Before any test module imports jax.
compile_flags.set_in_environment()
compile_flags.share_compiled_programs(background.scratch("jax-compilation-cache"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
  """Starts, as the tests begin to run, the background job of every selected test's fixture
  that names one (nothing at collection: `--collect-only` starts nothing).

  First: a pytest-xdist worker's own loop (registered after this file) returns True, and
  the hook stops at the first result, so after it this would never run (the jobs then
  started only when a test asked for them).
  """
  if session.config.option.collectonly:
    return None
  names = (f for item in session.items for f in getattr(item, "fixturenames", ()))
  for name in dict.fromkeys(names):
    if background.is_registered(name):
      background.start(name)
  return None  # the usual loop runs the tests
