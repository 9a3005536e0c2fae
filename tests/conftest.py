import os
import sys

# Before jax starts: a CPU thread pool large enough that two batched LAPACK
# kernels running at once cannot deadlock it on a 2-core machine (see
# examples/__init__.py).
os.environ.setdefault("NPROC", str(max(8, os.cpu_count() or 1)))

# The parity helpers in tests/reference.py are imported as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
