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
