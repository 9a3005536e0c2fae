"""The Flax NNX LLaMA example (examples/): model, input pipeline, optimizers, training loop,
checkpoints and resume, skipped steps, command line. examples.compare: tests/test_compare.py."""

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import galore_optax as go
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples import configs
from examples import input_pipeline
from examples import main
from examples import models
from examples import optimizers
from examples import train
from examples.errors import DivergenceError, ExampleError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Models small enough that compiling a training step is the main cost of a test: two
# layers where layer stacking matters, one for the end-to-end runs.
NANO = configs.LlamaConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2,
                           vocab_size=None, max_seq_len=64)
NANO_1 = dataclasses.replace(NANO, num_layers=1)
# 131 x 32 embeddings: one leaf above the 4096 elements from which 8-bit states quantize.
VOCAB = 131

WORDS = ("the optimizer projects each gradient matrix onto a low rank subspace and keeps "
         "its moments there while the weights stay full rank so memory drops but the model "
         "still learns every parameter").split()

# Registers NANO_1 as "nano" (GaLore rank 4) in a subprocess before running a CLI.
NANO_PRELUDE = textwrap.dedent("""
    import sys
    from examples import configs
    configs.MODEL_CONFIGS["nano"] = configs.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_heads=2, num_layers=1, vocab_size=None,
        max_seq_len=64)
    configs.DEFAULT_RANKS["nano"] = 4
""")


def text_docs(num_docs: int, seed: int = 0, words_per_doc: int = 60):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, words_per_doc)) + f" document {i}."
          for i in range(num_docs)]


@pytest.fixture
def nano(monkeypatch):
  """Registers the one-layer NANO config as 'nano' with GaLore rank 4."""
  monkeypatch.setitem(configs.MODEL_CONFIGS, "nano", NANO_1)
  monkeypatch.setitem(configs.DEFAULT_RANKS, "nano", 4)
  return "nano"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "corpus.txt"
  path.write_text("\n\n".join(text_docs(120)), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def small_dataset(text_file, cache_dir):
  return input_pipeline.build_dataset(text_file, 16, vocab_size=300, cache_dir=cache_dir)


def quiet(*_):
  pass


# ----------------------------------------------------------------------------- model


def _model(**overrides):
  cfg = dataclasses.replace(NANO, vocab_size=VOCAB, **overrides)
  return models.Llama(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def test_forward_shapes_and_causal_masking():
  model = _model()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, VOCAB)
  logits = _forward(model, tokens)
  assert logits.shape == (2, 12, VOCAB)
  assert logits.dtype == jnp.float32
  changed = _forward(model, tokens.at[:, 7].set((tokens[:, 7] + 1) % VOCAB))
  # Positions before the changed token cannot see it; the changed one and later ones do.
  np.testing.assert_array_equal(np.asarray(changed[:, :7]), np.asarray(logits[:, :7]))
  assert not np.allclose(changed[:, 7:], logits[:, 7:])


def test_projected_kernels_are_2d_and_selected_by_path():
  model = _model()
  params = nnx.state(model, nnx.Param)
  mask = go.path_mask(r"attn|mlp")(params)
  flat_mask = dict(jax.tree_util.tree_flatten_with_path(mask)[0])
  selected = {jax.tree_util.keystr(p, simple=True, separator="/"): leaf.shape
              for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if flat_mask[p]}
  # Seven projections per layer, nothing else (norms, embeddings and the LM head stay out).
  assert len(selected) == 7 * NANO.num_layers
  assert all(len(shape) == 2 for shape in selected.values())
  assert any("attn/q_proj/kernel" in k for k in selected)
  assert not any("norm" in k or "embed" in k or "lm_head" in k for k in selected)


def test_scanned_layers_equal_unrolled_layers():
  unrolled = _model()
  scanned = models.Llama(dataclasses.replace(NANO, vocab_size=VOCAB, scan_layers=True,
                                             remat="full"), rngs=nnx.Rngs(7))  # other weights
  kernel = scanned.layers.attn.q_proj.kernel
  assert kernel.shape == (NANO.num_layers, NANO.hidden_size, NANO.hidden_size)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, VOCAB)
  before = _forward(scanned, tokens)
  models.copy_weights(unrolled, scanned)
  expected = _forward(unrolled, tokens)
  assert not np.allclose(before, expected)  # the copy is what makes them agree
  np.testing.assert_allclose(_forward(scanned, tokens), expected, rtol=1e-5, atol=1e-5)
  # And back: a scanned model's weights drive an unrolled one.
  other = models.Llama(dataclasses.replace(NANO, vocab_size=VOCAB), rngs=nnx.Rngs(7))
  models.copy_weights(scanned, other)
  np.testing.assert_allclose(_forward(other, tokens), expected, rtol=1e-5, atol=1e-5)
  assert models.param_count(scanned) == models.param_count(unrolled)


def test_small_config_is_dominated_by_projected_kernels_and_trains():
  """`small` (the comparison's model): attention + MLP hold most parameters, and a few
  GaLore steps lower the loss."""
  cfg = configs.get_model_config("small")
  assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (256, 688, 4)
  vocab = configs.bpe_vocab_size("small")
  # Scanned layers: one layer body to compile, one projector per layer slice.
  model = models.Llama(dataclasses.replace(cfg, vocab_size=vocab, max_seq_len=32,
                                           scan_layers=True), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  mask = jax.tree.leaves(go.path_mask(r"attn|mlp")(params))
  sizes = [x.size for x in jax.tree.leaves(params)]
  projected = sum(s for s, m in zip(sizes, mask) if m) / sum(sizes)
  assert 0.85 < projected < 0.86, projected
  cfg_opt = optimizers.OptimizerConfig(total_steps=4, warmup_fraction=0.0, rank=64)
  tx, schedule, _ = optimizers.build_optimizer("galore_adamw", cfg_opt)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # Learnable text: a repeated token pattern.
  batch = jnp.tile(jnp.arange(33) % 17, (4, 1))
  metrics = train.make_train_metrics()
  losses = [float(train.train_step(model, optimizer, metrics, batch, np.float32(schedule(step))))
            for step in range(4)]
  assert abs(losses[0] - np.log(vocab)) < 0.2, losses  # starts near uniform
  assert losses[-1] < losses[0] - 1.0, losses


# ----------------------------------------------------------------------------- optimizers


# One builder of each kind (every library optimizer also goes through tests/test_contract.py
# and, built by the example, through test_checkpoint_round_trip_of_every_optimizer).
TRAIN_CASES = [(name, False, "svd") for name in (
    "adamw", "galore_adamw", "galore_adamw8bit", "apollo_mini", "gradnorm_lorp",
    "optax_contrib_galore")]
TRAIN_CASES.append(("galore_adamw", True, "svd"))  # stacked (layers, in, out) kernels
TRAIN_CASES.append(("galore_adamw", True, "randomized"))


_TRACES = []


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def _counted_train_step(model, optimizer, metrics, batch, learning_rate):
  _TRACES.append(1)  # runs only while tracing
  return train.train_step.fun(model, optimizer, metrics, batch, learning_rate)


@pytest.mark.parametrize(
    "name,scan,refresh", TRAIN_CASES,
    ids=[n + ("-scan" if s else "") + ("" if r == "svd" else "-" + r) for n, s, r in TRAIN_CASES])
def test_a_few_steps_lower_the_loss_and_compile_once(name, scan, refresh):
  model = _model(scan_layers=scan, num_layers=2 if scan else 1)
  cfg = optimizers.OptimizerConfig(total_steps=8, warmup_fraction=0.0, rank=4,
                                   update_proj_gap=3, refresh=refresh)
  tx, schedule, _ = optimizers.build_optimizer(name, cfg)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batch = jax.random.randint(jax.random.key(3), (4, 17), 0, VOCAB)
  metrics = train.make_train_metrics()
  del _TRACES[:]
  losses = [float(_counted_train_step(model, optimizer, metrics, batch,
                                      np.float32(schedule(step))))
            for step in range(8)]
  assert len(_TRACES) == 1
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0] - 0.05, losses


def test_runs_that_differ_in_schedule_share_one_transformation():
  """Learning rate and length live in the state: one compiled step for all tuning runs."""
  first = optimizers.build_optimizer("galore_adamw", optimizers.OptimizerConfig(
      learning_rate=1e-3, total_steps=100, rank=4))
  second = optimizers.build_optimizer("galore_adamw", optimizers.OptimizerConfig(
      learning_rate=3e-2, total_steps=7, warmup_fraction=0.5, rank=4))
  assert first[0] is second[0]
  assert (first[2], second[2]) == (1e-3, 3e-2)
  assert float(first[1](10)) == pytest.approx(1e-3) and float(second[1](2)) < 3e-2
  other = optimizers.build_optimizer("galore_adamw", optimizers.OptimizerConfig(rank=5))
  assert other[0] is not first[0]


def _state_shapes(name, **cfg):
  tx, _, _ = optimizers.build_optimizer(name, optimizers.OptimizerConfig(**cfg))
  params = nnx.state(_model(num_layers=1), nnx.Param)
  state = jax.eval_shape(tx.init, params)
  return {jax.tree_util.keystr(p): leaf.shape
          for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.parametrize("name", [n for n, s in optimizers.REGISTRY.items() if s.projects])
def test_options_reach_the_optimizer(name):
  """Rank and projection side change the state: no option is dropped on the way."""
  spec = optimizers.get_spec(name)
  rank3 = _state_shapes(name, rank=3)
  rank5 = _state_shapes(name, rank=5)
  assert rank3.keys() == rank5.keys()
  if spec.fixed_rank is None:
    assert any(3 in s for s in rank3.values()) and rank3 != rank5
  else:  # its own rank, whatever --rank says
    assert any(spec.fixed_rank in s for s in rank3.values()) and rank3 == rank5
  if spec.proj_types is None or "left" in spec.proj_types:
    assert _state_shapes(name, rank=3, proj_type="left") != rank3


def test_registry_refuses_what_a_builder_lacks_and_passes_on_the_library_refusals():
  for cfg, fragment in [
      (dict(proj_type="left"), "optax_contrib_galore does not support proj_type 'left'"),
      (dict(refresh="power"), "optax_contrib_galore does not support refresh 'power'"),
  ]:
    with pytest.raises(ExampleError, match=fragment):
      optimizers.build_optimizer("optax_contrib_galore", optimizers.OptimizerConfig(**cfg))
  # The library checks its own options: the example passes its message on.
  for name, cfg, fragment in [
      ("fira_adamw", dict(proj_type="full"), "fira_adamw does not support proj_type='full'"),
      ("galore_adamw", dict(refresh="qr"), "refresh='qr' is unknown; use one of svd, "),
      ("galore_adamw", dict(proj_type="wide"), "proj_type='wide' is unknown"),
  ]:
    with pytest.raises(ExampleError, match=re.escape(fragment)):
      optimizers.build_optimizer(name, optimizers.OptimizerConfig(**cfg))
  with pytest.raises(ExampleError, match="unknown optimizer 'lion'.*galore_adamw"):
    optimizers.get_spec("lion")
  with pytest.raises(ExampleError, match="learning rate must be a positive number"):
    optimizers.build_optimizer("adamw", optimizers.OptimizerConfig(learning_rate=0.0))


def test_a_misspelt_option_fails_at_build(monkeypatch):
  """Builders call the library with explicit keywords: nothing filters them."""
  spec = optimizers.get_spec("galore_adamw")
  broken = dataclasses.replace(spec, options=lambda c: dict(rnak=c.rank))  # the typo
  monkeypatch.setitem(optimizers.REGISTRY, "galore_adamw", broken)
  with pytest.raises(TypeError, match="rnak"):
    optimizers.build_optimizer("galore_adamw",
                               optimizers.OptimizerConfig(rank=7, update_proj_gap=13))


def test_nonfinite_gradients_skip_the_step():
  # The configuration and shapes of test_a_few_steps...[galore_adamw]: its compiled step.
  model = _model(num_layers=1)
  tx, _, _ = optimizers.build_optimizer("galore_adamw", optimizers.OptimizerConfig(
      total_steps=8, warmup_fraction=0.0, rank=4, update_proj_gap=3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = train.make_train_metrics()
  good = jax.random.randint(jax.random.key(3), (4, 17), 0, VOCAB)
  bad = good.at[0, 3].set(VOCAB)  # out of the vocabulary: the embedding lookup gives NaN
  lr = np.float32(1e-2)
  step = lambda batch: float(_counted_train_step(model, optimizer, metrics, batch, lr))
  step(good)
  before = jax.tree.map(np.asarray, (nnx.state(model, nnx.Param), nnx.state(optimizer)))
  assert not np.isfinite(step(bad))
  after = jax.tree.map(np.asarray, (nnx.state(model, nnx.Param), nnx.state(optimizer)))
  counts = optimizers.nonfinite_counts(optimizer.opt_state)
  assert (int(counts[0][...]), int(counts[1][...])) == (1, 1)
  changed = [k for k, (a, b) in enumerate(zip(jax.tree.leaves(before), jax.tree.leaves(after)))
             if not np.array_equal(a, b)]
  # Only nnx.Optimizer's own step and apply_if_finite's counters moved.
  assert len(changed) <= 4 and all(jax.tree.leaves(after)[k].size == 1 for k in changed)
  assert np.isfinite(step(good))
  assert int(optimizer.opt_state.notfinite_count[...]) == 0
  # The skipped step's NaN stays out of the logged average.
  assert np.isfinite(float(metrics.compute()["loss"]))


# ----------------------------------------------------------------------------- training loop


def _config(nano, **overrides):
  return configs.get_config(**{**dict(
      model=nano, optimizer="galore_adamw", steps=5, batch_size=2, seq_len=16,
      update_proj_gap=2, eval_every=100, eval_batches=1, log_every=1, progress=False),
      **overrides})


def _flat_state(result):
  state = {"model": nnx.state(result.model, nnx.Param),
           "optimizer": nnx.state(result.optimizer)}
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def test_resume_continues_bit_for_bit(nano, small_dataset, tmp_path):
  # The subspace refreshes at steps 2 and 4 fall on both sides of the interruption at step 3.
  config = _config(nano)
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"), dataset=small_dataset,
                                   log=quiet)
  part = str(tmp_path / "part")
  first = train.train_and_evaluate(dataclasses.replace(config, stop_after=3), part,
                                   dataset=small_dataset, log=quiet)
  assert first.summary["steps"] == 3
  resumed = train.train_and_evaluate(dataclasses.replace(config, resume=True), part,
                                     dataset=small_dataset, log=quiet)
  assert resumed.summary["steps"] == 5
  a, b = _flat_state(whole), _flat_state(resumed)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert resumed.summary["final_eval_loss"] == whole.summary["final_eval_loss"]
  assert _train_losses(part) == _train_losses(str(tmp_path / "whole"))
  assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["3", "5"]


def _snapshot(folder):
  """{relative path: sha256} of every file under ``folder``."""
  out = {}
  for directory, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture
def interrupted_run(nano, small_dataset, text_file, tmp_path):
  """A galore_adamw run (rank 4) stopped after 2 of 4 steps, with its checkpoint; the
  settings are those of test_resume_from_a_damaged_checkpoint_is_one_error_line's command."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_config(nano, steps=4, stop_after=2, data=text_file, vocab_size=300),
                           workdir, dataset=small_dataset, log=quiet)
  return workdir


@pytest.mark.parametrize("change,fragment", [
    (dict(rank=2), "was written by galore_adamw with rank 4; this run asks for rank 2"),
    (dict(optimizer="adamw"), "was written by galore_adamw with learning_rate 0.01; this run "
                              "asks for adamw with learning_rate 0.001"),
    (dict(proj_type="left", update_proj_gap=3),
     "with proj_type 'std', update_proj_gap 2; this run asks for proj_type 'left', "
     "update_proj_gap 3"),
])
def test_resume_refuses_another_configuration_and_changes_no_file(
    interrupted_run, small_dataset, text_file, nano, change, fragment):
  before = _snapshot(interrupted_run)
  with pytest.raises(ExampleError) as e:
    train.train_and_evaluate(
        _config(nano, steps=4, resume=True, data=text_file, vocab_size=300, **change),
        interrupted_run, dataset=small_dataset, log=quiet)
  assert fragment in str(e.value) and "\n" not in str(e.value)
  assert _snapshot(interrupted_run) == before


def _run_cli(module, *args, cwd, prelude=""):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  code = f"{prelude}\nimport runpy\nsys.argv = {[module, *args]!r}\n" \
         f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
  return subprocess.run([sys.executable, "-c", "import sys\n" + code], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_one_error_line(stderr, *fragments):
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_resume_from_a_damaged_checkpoint_is_one_error_line(interrupted_run, text_file,
                                                            cache_dir, tmp_path):
  """Through the real command (a subprocess: what orbax prints at exit counts too)."""
  data_dir = os.path.join(interrupted_run, "checkpoints", "2", "state", "ocdbt.process_0", "d")
  for name in os.listdir(data_dir):
    with open(os.path.join(data_dir, name), "r+b") as f:
      f.write(b"\0" * 64)
  before = _snapshot(interrupted_run)
  proc = _run_cli("examples.main", "--config", "nano", "--data", text_file, "--seq-len", "16",
                  "--vocab-size", "300", "--cache-dir", cache_dir, "--steps", "4",
                  "--batch-size", "2", "--update-proj-gap", "2", "--eval-batches", "1",
                  "--workdir", interrupted_run, "--resume", "--no-progress",
                  cwd=tmp_path, prelude=NANO_PRELUDE)
  assert proc.returncode == 2, proc.stderr
  _assert_one_error_line(proc.stderr, "cannot read the checkpoint of step 2")
  assert _snapshot(interrupted_run) == before


def test_checkpoint_round_trip_of_every_optimizer(tmp_path):
  # optax.contrib.galore keeps zero-size projectors, which orbax refuses to save.
  def make(name):
    model = _model(num_layers=1)
    tx, _, _ = optimizers.build_optimizer(name, optimizers.OptimizerConfig(rank=4))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return model, optimizer
  rng = np.random.default_rng(0)
  def fill(x):  # distinct values in every leaf, in its own dtype
    x = np.asarray(x)
    return jnp.asarray(rng.integers(0, 7, x.shape).astype(x.dtype)
                       if np.issubdtype(x.dtype, np.integer) else rng.normal(size=x.shape),
                       x.dtype)
  for name in optimizers.REGISTRY:
    model, optimizer = make(name)
    nnx.update(optimizer, jax.tree.map(fill, nnx.state(optimizer)))
    nnx.update(model, jax.tree.map(fill, nnx.state(model, nnx.Param)))
    ckpt = train.Checkpoints(str(tmp_path / name), keep=1)
    ckpt.save(7, model, optimizer, {"optimizer": name})
    ckpt.manager.wait_until_finished()
    fresh_model, fresh_optimizer = make(name)
    ckpt.restore(ckpt.latest_step(), fresh_model, fresh_optimizer, {"optimizer": name})
    ckpt.close()
    for a, b in zip(jax.tree.leaves((nnx.state(model), nnx.state(optimizer))),
                    jax.tree.leaves((nnx.state(fresh_model), nnx.state(fresh_optimizer)))):
      assert a.dtype == b.dtype, name
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _poisoned_dataset(dataset, bad_rows):
  """``dataset`` whose train rows ``bad_rows`` hold an out-of-vocabulary token (NaN loss)."""
  rows = dataset.train[:8].copy()
  rows[bad_rows, 5] = dataset.tokenizer.vocab_size
  return dataclasses.replace(dataset, train=rows)


@pytest.mark.parametrize("fused", [False, True], ids=["usual", "fused"])
def test_skipped_steps_are_counted_logged_and_training_goes_on(nano2, small_dataset, tmp_path,
                                                               fused):
  dataset = _poisoned_dataset(small_dataset, [3])
  config = _config(nano2, steps=12, save_checkpoints=False, scan_layers=fused, fused=fused)
  sampler = input_pipeline.BatchSampler(dataset.train, config.batch_size, config.seed)
  expected = sum(3 in sampler.indices(s) for s in range(config.steps))
  assert expected >= 1
  lines = []
  result = train.train_and_evaluate(config, str(tmp_path / "run"), dataset=dataset,
                                    log=lines.append)
  assert result.summary["skipped_steps"] == expected
  assert result.summary["steps"] == 12 and np.isfinite(result.summary["final_eval_loss"])
  assert sum("non-finite gradients, update skipped" in l for l in lines) == expected
  assert all(np.isfinite(x).all() for x in _flat_state(result))
  train_records = [r for r in result.history if r["split"] == "train"]
  assert train_records[-1]["skipped_steps"] == expected
  skipped = {s + 1 for s in range(config.steps) if 3 in sampler.indices(s)}
  for r in train_records:  # one step per record (log_every 1)
    assert (r["loss"] is None) if r["step"] in skipped else np.isfinite(r["loss"]), r


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(nano, small_dataset, tmp_path):
  dataset = _poisoned_dataset(small_dataset, list(range(8)))  # every batch
  with pytest.raises(DivergenceError, match="10 steps in a row up to step 10 had non-finite "
                     r"gradients \(--max-consecutive-nonfinite 10\)"):
    train.train_and_evaluate(_config(nano, steps=12, save_checkpoints=False),
                             str(tmp_path / "a"), dataset=dataset, log=quiet)
  with pytest.raises(DivergenceError, match="the loss became nan at step 1"):
    train.train_and_evaluate(_config(nano, optimizer="adamw", max_consecutive_nonfinite=0,
                                     save_checkpoints=False),
                             str(tmp_path / "b"), dataset=dataset, log=quiet)


# ----------------------------------------------------------------------------- fused step


@pytest.fixture
def nano2(monkeypatch):
  """The two-layer NANO config as 'nano2' (GaLore rank 4): a stack to scan over."""
  monkeypatch.setitem(configs.MODEL_CONFIGS, "nano2", NANO)
  monkeypatch.setitem(configs.DEFAULT_RANKS, "nano2", 4)
  return "nano2"


def test_scanned_model_starts_from_the_unrolled_models_weights():
  unrolled, scanned = _model(), _model(scan_layers=True)
  a = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  b = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  for i in range(NANO.num_layers):
    for x, y in zip(jax.tree.leaves(a["layers"][i]),
                    jax.tree.leaves(jax.tree.map(lambda t: t[i], b["layers"]))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(a["embed"]["embedding"]),
                                np.asarray(b["embed"]["embedding"]))


def test_fused_run_takes_the_steps_of_the_usual_run(nano2, small_dataset, tmp_path):
  # Refreshes at steps 0, 2 and 4; the default skip of non-finite steps (one more backward).
  # tests/test_fused.py compares the fused step with the usual one for every optimizer.
  name = "galore_adamw"
  config = _config(nano2, optimizer=name, scan_layers=True, save_checkpoints=False)
  usual = train.train_and_evaluate(config, str(tmp_path / "usual"), dataset=small_dataset,
                                   log=quiet)
  fused = train.train_and_evaluate(dataclasses.replace(config, fused=True),
                                   str(tmp_path / "fused"), dataset=small_dataset, log=quiet)
  assert isinstance(fused.optimizer, train.FusedOptimizer) and fused.summary["fused"]
  a = nnx.state(usual.model, nnx.Param)
  b = nnx.state(fused.model, nnx.Param)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.max(np.abs(x - y)) <= 1e-5 * max(1.0, np.max(np.abs(x))), name
  losses = [_train_losses(str(tmp_path / d)) for d in ("usual", "fused")]
  assert losses[0].keys() == losses[1].keys() == set(range(1, 6))
  for step, loss in losses[0].items():
    assert abs(loss - losses[1][step]) <= 1e-5 * abs(loss)
  assert losses[0][5] < losses[0][1] - 0.1  # it trains
  records = [r for r in fused.history if r["split"] == "train"]
  assert all(r["grad_norm"] is None for r in records)  # the whole gradient never exists
  # What the fused step saves shows in XLA's plan of the step (the same model and state).
  batch = small_dataset.train[:2]
  assert (train.compiled_step_peak(fused.model, fused.optimizer, batch)
          < train.compiled_step_peak(usual.model, usual.optimizer, batch))


def test_fused_resume_continues_bit_for_bit(nano2, small_dataset, tmp_path):
  config = _config(nano2, scan_layers=True, fused=True, grad_clip=0.5)
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"), dataset=small_dataset,
                                   log=quiet)
  part = str(tmp_path / "part")
  train.train_and_evaluate(dataclasses.replace(config, stop_after=3), part,
                           dataset=small_dataset, log=quiet)
  resumed = train.train_and_evaluate(dataclasses.replace(config, resume=True), part,
                                     dataset=small_dataset, log=quiet)
  assert resumed.summary["steps"] == 5
  a, b = _flat_state(whole), _flat_state(resumed)
  assert len(a) == len(b) and len(a) > 10
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert _train_losses(part) == _train_losses(str(tmp_path / "whole"))
  with pytest.raises(ExampleError, match="fused True"):  # the state has another layout
    train.train_and_evaluate(dataclasses.replace(config, resume=True, fused=False, steps=6),
                             part, dataset=small_dataset, log=quiet)


@pytest.mark.parametrize("overrides,fragment", [
    (dict(fused=True), "add --scan-layers"),
    (dict(fused=True, scan_layers=True, mesh="1,1,1"), "not implemented on a --mesh"),
    (dict(fused=True, scan_layers=True, optimizer="galore_adafactor"),
     "--fused: this optimizer's update of one layer depends on other layers"),
])
def test_fused_refusals_name_the_fix(nano2, small_dataset, tmp_path, overrides, fragment):
  with pytest.raises(ExampleError, match=fragment):
    train.train_and_evaluate(_config(nano2, **overrides), str(tmp_path / "run"),
                             dataset=small_dataset, log=quiet)
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- data


def test_pack_overlaps_rows_by_one_token():
  rows = input_pipeline.pack([[1, 2, 3], [4, 5]], eos_id=0, seq_len=2)
  np.testing.assert_array_equal(rows, [[1, 2, 3], [3, 0, 4], [4, 5, 0]])
  assert input_pipeline.pack([[1]], eos_id=0, seq_len=4).shape == (0, 5)


def test_c4_shard_folder(tmp_path, cache_dir):
  train_docs, val_docs = text_docs(50, seed=1), text_docs(6, seed=2)
  def write(name, docs):
    with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
      for i, doc in enumerate(docs):
        f.write(json.dumps({"text": doc, "timestamp": "2019-04-25T12:57:54Z",
                            "url": f"https://example.com/{i}"}) + "\n")
  write("c4-train.00000-of-01024.json.gz", train_docs)
  write("c4-validation.00000-of-00008.json.gz", val_docs)
  (tmp_path / "README.txt").write_text("not part of C4")

  corpus = input_pipeline.load_documents(str(tmp_path))
  assert corpus.documents == train_docs
  assert corpus.validation == val_docs
  assert input_pipeline.load_documents(str(tmp_path), max_docs=7).documents == train_docs[:7]

  ds = input_pipeline.build_dataset(str(tmp_path), 16, vocab_size=300, cache_dir=cache_dir,
                                    tuning_fraction=0.2)
  assert ds.train.shape[1] == ds.validation.shape[1] == ds.tuning.shape[1] == 17
  assert ds.train.dtype == np.int32
  assert 0 <= ds.train.min() and ds.train.max() < ds.tokenizer.vocab_size
  # Validation rows come from the validation shard only; tuning rows from train documents
  # that training does not see.
  decode = lambda rows: ds.tokenizer.decode(rows[:, :-1].reshape(-1).tolist())
  train_text, val_text, tuning_text = decode(ds.train), decode(ds.validation), decode(ds.tuning)
  assert val_docs[0][:40] in val_text and val_docs[0][:40] not in train_text
  _, tuning_docs, _ = input_pipeline.split_documents(train_docs, 0.0, 0.2)
  assert tuning_docs and tuning_docs[0][:40] in tuning_text
  assert tuning_docs[0][:40] not in train_text


def test_three_way_split_is_disjoint_and_stable(text_file, small_dataset):
  docs = input_pipeline.load_documents(text_file).documents
  assert len(docs) > 1
  train_docs, tuning_docs, val_docs = input_pipeline.split_documents(docs, 0.1, 0.1)
  assert val_docs and tuning_docs
  assert sorted(train_docs + tuning_docs + val_docs) == sorted(docs)
  assert not (set(train_docs) & set(tuning_docs) or set(train_docs) & set(val_docs)
              or set(tuning_docs) & set(val_docs))
  # Order-free, and the validation set does not depend on the tuning fraction.
  assert input_pipeline.split_documents(list(reversed(docs)), 0.1, 0.1)[2] == val_docs[::-1]
  assert input_pipeline.split_documents(docs, 0.1, 0.0)[2] == val_docs

  ds = small_dataset
  assert ds.seq_len == 16 and ds.tokenizer.vocab_size <= 300
  assert ds.train.shape[0] > 8 and ds.validation.shape[0] >= 1 and ds.tuning.shape[0] >= 1
  assert ds.split("tuning") is ds.tuning and ds.split("validation") is ds.validation
  np.testing.assert_array_equal(ds.train[:-1, -1], ds.train[1:, 0])  # packed stream
  # Batches are a pure function of (seed, step) and every epoch visits every row once.
  n = ds.train.shape[0]
  sampler = input_pipeline.BatchSampler(ds.train, 4, seed=5)
  again = input_pipeline.BatchSampler(ds.train, 4, seed=5)
  np.testing.assert_array_equal(sampler(3), again(3))
  first_epoch = np.concatenate([sampler.indices(s) for s in range(n // 4)])
  assert len(set(first_epoch.tolist())) == len(first_epoch)
  other = input_pipeline.BatchSampler(ds.train, 4, 6)
  assert not np.array_equal(sampler.indices(0), other.indices(0))


def test_embedded_corpus_builds_offline(tmp_path_factory, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("the embedded corpus must not use the network")
  monkeypatch.setattr(socket, "socket", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  before = set(sys.modules)
  cache = str(tmp_path_factory.mktemp("stdlib"))
  corpus = input_pipeline.embedded_corpus(cache)
  assert len(corpus.documents) > 2000
  assert sum(map(len, corpus.documents)) > 1_000_000
  assert any("Return" in d for d in corpus.documents[:500])
  # Parsed, never imported (importing `antigravity` would open a web browser).
  assert not {"antigravity", "this", "tkinter", "turtle"} & (set(sys.modules) - before)
  assert os.listdir(cache)
  assert input_pipeline.embedded_corpus(cache).documents == corpus.documents  # from the cache


# ----------------------------------------------------------------------------- command line


def test_cli_reports_bad_input_in_one_line(tmp_path):
  # The whole path from `python -m` to the exit status, with no traceback.
  out = tmp_path / "run"
  proc = _run_cli("examples.main", "--optimizer", "sgd", "--workdir", str(out), "--no-progress",
                  cwd=tmp_path)
  assert proc.returncode == 2
  _assert_one_error_line(proc.stderr, "unknown optimizer 'sgd'", "galore_adamw")
  assert not out.exists()


BAD_INPUTS = {
    "missing data path": (["--data", "{tmp}/no/such/folder"], "does not exist"),
    "empty corpus": (["--data", "{tmp}/empty.txt"], "is empty"),
    "seq len larger than data": (["--data", "{tmp}/small.txt", "--seq-len", "5000"],
                                 "larger than the data"),
    "unknown optimizer": (["--optimizer", "adamw9000"], "unknown optimizer 'adamw9000'"),
    "unknown config": (["--config", "13b"], "unknown config '13b'"),
    # The library's own message, passed on: which values there are.
    "bad proj type": (["--proj-type", "diagonal"],
                      "galore_adamw: proj_type='diagonal' is unknown; use one of std, "),
    "bad refresh": (["--refresh", "qr"], "galore_adamw: refresh='qr' is unknown; use one of "),
    "bad number": (["--steps", "ten"], "--steps"),
    "negative skip limit": (["--max-consecutive-nonfinite", "-1"],
                            "max-consecutive-nonfinite must be >= 0"),
    "bad tuning fraction": (["--data", "{tmp}/small.txt", "--tuning-fraction", "0.99"],
                            "tuning_fraction must be in"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_main_bad_input(case, tmp_path, capsys):
  (tmp_path / "empty.txt").write_text("\n\n   \n")
  (tmp_path / "small.txt").write_text("A short text.\n\nAnother paragraph of it.")
  args, fragment = BAD_INPUTS[case]
  args = [a.format(tmp=tmp_path) for a in args]
  workdir = tmp_path / "run"
  try:
    code = main.main(args + ["--workdir", str(workdir), "--no-progress", "--vocab-size", "300",
                             "--cache-dir", str(tmp_path / "cache")])
  except SystemExit as e:  # argparse
    code = e.code
  assert code == 2
  _assert_one_error_line(capsys.readouterr().err, fragment)
  assert not workdir.exists()
