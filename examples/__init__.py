"""Flax NNX LLaMA pretraining example for galore-optax, in the Flax examples' layout.

Run from the repository root::

    python -m examples.main --config small --optimizer galore_adamw --steps 200
    python -m examples.compare     # optimizers at their tuned learning rates, CPU, < 10 min

Modules:
  main            the command line for one training run
  configs         model sizes from the GaLore paper (60m ... 7b) plus ``small`` and ``tiny``
                  for CPU, and the training configuration
  input_pipeline  corpora (embedded stdlib docstrings, text/jsonl/rst files, C4 shards, HF
                  datasets), tokenizers, train/tuning/validation splits, packing, batching
  models          the LLaMA decoder in Flax NNX (RMSNorm, RoPE, SwiGLU, causal attention)
  optimizers      the optimizer registry (AdamW, the GaLore family, optax.contrib.galore)
  train           ``train_and_evaluate(config, workdir)``: the loop, checkpoints, resume
  tuning          the learning-rate grid and the choice on the tuning split
  compare         optimizers side by side at their tuned learning rates -> markdown + PNG
  report          machine, versions, seed statistics and loss-curve plots for results files
"""

import os as _os

# XLA already runs independent kernels in parallel; OpenBLAS threads inside each LAPACK
# call on top of that thrash a busy machine: on two loaded cores the first step of the
# `small` model (its exact-SVD refresh) took 97 s with OpenBLAS's default threads and 11 s
# with one (read once, when numpy loads OpenBLAS).
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
