"""Old name of ``examples.models`` (the same module object), for existing imports."""

import sys

from examples import models

sys.modules[__name__] = models
