"""Old name of ``examples.input_pipeline`` (the same module object), for existing imports."""

import sys

from examples import input_pipeline

sys.modules[__name__] = input_pipeline
