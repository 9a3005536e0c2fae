"""Flax NNX LLaMA pretraining example for galore-optax.

Run from the repository root::

    python -m examples.train --config tiny --optimizer galore_adamw --steps 200
    python -m examples.compare            # AdamW vs GaLore vs optax.contrib.galore on CPU

Modules:
  configs     model sizes from the GaLore paper (60m ... 7b) plus ``tiny`` for CPU, and
              the training configuration
  llama       the LLaMA decoder in Flax NNX (RMSNorm, RoPE, SwiGLU, causal attention)
  data        corpora (embedded stdlib docstrings, text/jsonl files, C4 shards, HF datasets),
              tokenizers, sequence packing and batching
  optimizers  optimizer registry by name (AdamW, GaLore variants, optax.contrib.galore)
  train       ``train_and_evaluate(config, workdir)`` and the training CLI
  compare     several optimizers on the same data/seed/token budget -> markdown + PNG
"""

import os as _os

# jaxlib's batched LAPACK kernels (the SVDs and QRs of the subspace refresh) hand
# their batch to XLA's intra-op thread pool and wait; with one thread per core,
# two such kernels running at once on a 2-core machine deadlocked. A pool of at
# least 8 threads avoids it (read once, when jax creates its CPU client).
_os.environ.setdefault("NPROC", str(max(8, _os.cpu_count() or 1)))
