import os
import sys

# The helpers in tests/support/ (references, workers, background jobs) are imported as
# plain modules.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))

import background  # noqa: E402  (after the path above)


def pytest_collection_modifyitems(config, items):
  """Starts the background job of every selected test's fixture that names one."""
  if config.option.collectonly:
    return
  for name in dict.fromkeys(f for item in items for f in getattr(item, "fixturenames", ())):
    if background.is_registered(name):
      background.start(name)
