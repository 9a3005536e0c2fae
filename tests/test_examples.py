"""The Flax NNX LLaMA example (examples/): model, data pipeline, training, checkpoints, CLIs."""

import dataclasses
import gzip
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples import compare
from examples import configs
from examples import data
from examples import llama
from examples import optimizers
from examples import train
from examples.errors import ExampleError
from galore_optax.masking import path_mask

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


def _text(num_docs: int, seed: int = 0, words_per_doc: int = 60):
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
  path.write_text("\n\n".join(_text(120)), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def small_dataset(text_file, cache_dir):
  return data.build_dataset(text_file, 16, vocab_size=300, cache_dir=cache_dir)


# ----------------------------------------------------------------------------- model


def _model(**overrides):
  cfg = dataclasses.replace(NANO, vocab_size=VOCAB, **overrides)
  return llama.Llama(cfg, rngs=nnx.Rngs(0))


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
  mask = path_mask(r"attn|mlp")(params)
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
  scanned = _model(scan_layers=True, remat="full")
  kernel = scanned.layers.attn.q_proj.kernel
  assert kernel.shape == (NANO.num_layers, NANO.hidden_size, NANO.hidden_size)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, VOCAB)
  before = _forward(scanned, tokens)
  llama.copy_weights(unrolled, scanned)
  expected = _forward(unrolled, tokens)
  assert not np.allclose(before, expected)  # the copy is what makes them agree
  np.testing.assert_allclose(_forward(scanned, tokens), expected, rtol=1e-5, atol=1e-5)
  # And back: a scanned model's weights drive an unrolled one.
  other = llama.Llama(dataclasses.replace(NANO, vocab_size=VOCAB), rngs=nnx.Rngs(7))
  llama.copy_weights(scanned, other)
  np.testing.assert_allclose(_forward(other, tokens), expected, rtol=1e-5, atol=1e-5)
  assert llama.param_count(scanned) == llama.param_count(unrolled)


# ----------------------------------------------------------------------------- training


TRAIN_CASES = [(name, False, "svd") for name in optimizers.available_optimizers()]
TRAIN_CASES.append(("galore_adamw", True, "svd"))  # stacked (layers, in, out) kernels
TRAIN_CASES += [("galore_adamw", True, r) for r in ("randomized", "power")]


@pytest.mark.parametrize(
    "name,scan,refresh", TRAIN_CASES,
    ids=[n + ("-scan" if s else "") + ("" if r == "svd" else "-" + r) for n, s, r in TRAIN_CASES])
def test_a_few_steps_lower_the_loss(name, scan, refresh):
  model = _model(scan_layers=scan, num_layers=2 if scan else 1)
  cfg = optimizers.OptimizerConfig(total_steps=8, warmup_fraction=0.0, rank=4,
                                   update_proj_gap=3, refresh=refresh)
  tx, _, _ = optimizers.build_optimizer(name, cfg)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batch = jax.random.randint(jax.random.key(3), (4, 17), 0, VOCAB)
  metrics = train.make_train_metrics()
  losses = [float(train.train_step(model, optimizer, metrics, batch)) for _ in range(8)]
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0] - 0.05, losses


def _flat_state(result):
  state = {"model": nnx.state(result.model, nnx.Param),
           "optimizer": nnx.state(result.optimizer)}
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_resume_continues_bit_for_bit(nano, small_dataset, tmp_path):
  # The subspace refreshes at steps 2 and 4 fall on both sides of the interruption at step 3.
  config = configs.get_config(model=nano, optimizer="galore_adamw", steps=5, batch_size=2, seq_len=16,
                              update_proj_gap=2, eval_every=100, eval_batches=1,
                              log_every=1, progress=False)
  quiet = lambda *_: None
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
  # The metrics file of the resumed run has the same training losses, step by step.
  def train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}
  assert train_losses(part) == train_losses(str(tmp_path / "whole"))
  assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["3", "5"]


@pytest.mark.parametrize("name", optimizers.available_optimizers())
def test_checkpoint_round_trip(name, tmp_path):
  # optax.contrib.galore keeps zero-size projectors, which orbax refuses to save.
  def make():
    model = _model(num_layers=1)
    tx, _, _ = optimizers.build_optimizer(name, optimizers.OptimizerConfig(rank=4))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
  model, optimizer = make()
  rng = np.random.default_rng(0)
  def fill(x):  # distinct values in every leaf, in its own dtype
    x = np.asarray(x)
    return jnp.asarray(rng.integers(0, 7, x.shape).astype(x.dtype)
                       if np.issubdtype(x.dtype, np.integer) else rng.normal(size=x.shape),
                       x.dtype)
  nnx.update(optimizer, jax.tree.map(fill, nnx.state(optimizer)))
  nnx.update(model, jax.tree.map(fill, nnx.state(model, nnx.Param)))
  ckpt = train._Checkpoints(str(tmp_path / "ckpt"), keep=1)  # pylint: disable=protected-access
  ckpt.save(7, model, optimizer)
  ckpt.manager.wait_until_finished()
  fresh_model, fresh_optimizer = make()
  ckpt.restore(ckpt.latest_step(), fresh_model, fresh_optimizer)
  ckpt.close()
  for a, b in zip(jax.tree.leaves((nnx.state(model), nnx.state(optimizer))),
                  jax.tree.leaves((nnx.state(fresh_model), nnx.state(fresh_optimizer)))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- data


def test_pack_overlaps_rows_by_one_token():
  rows = data.pack([[1, 2, 3], [4, 5]], eos_id=0, seq_len=2)
  np.testing.assert_array_equal(rows, [[1, 2, 3], [3, 0, 4], [4, 5, 0]])
  assert data.pack([[1]], eos_id=0, seq_len=4).shape == (0, 5)


def test_c4_shard_folder(tmp_path, cache_dir):
  train_docs, val_docs = _text(50, seed=1), _text(6, seed=2)
  def write(name, docs):
    with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
      for i, doc in enumerate(docs):
        f.write(json.dumps({"text": doc, "timestamp": "2019-04-25T12:57:54Z",
                            "url": f"https://example.com/{i}"}) + "\n")
  write("c4-train.00000-of-01024.json.gz", train_docs)
  write("c4-validation.00000-of-00008.json.gz", val_docs)
  (tmp_path / "README.txt").write_text("not part of C4")

  corpus = data.load_documents(str(tmp_path))
  assert corpus.documents == train_docs
  assert corpus.validation == val_docs
  assert data.load_documents(str(tmp_path), max_docs=7).documents == train_docs[:7]

  ds = data.build_dataset(str(tmp_path), 16, vocab_size=300, cache_dir=cache_dir)
  assert ds.train.shape[1] == ds.validation.shape[1] == 17
  assert ds.train.dtype == np.int32
  assert 0 <= ds.train.min() and ds.train.max() < ds.tokenizer.vocab_size
  # Train rows come from the train shard only, validation rows from the validation shard.
  train_text = ds.tokenizer.decode(ds.train[:, :-1].reshape(-1).tolist())
  val_text = ds.tokenizer.decode(ds.validation[:, :-1].reshape(-1).tolist())
  assert train_docs[0][:40] in train_text and "document 0." in train_text
  assert val_docs[0][:40] in val_text and val_docs[0][:40] not in train_text


def test_text_file_split_and_batches(text_file, small_dataset):
  docs = data.load_documents(text_file).documents
  assert len(docs) > 1
  train_docs, val_docs = data.split_documents(docs, 0.05)
  assert val_docs and not set(train_docs) & set(val_docs)
  assert data.split_documents(list(reversed(docs)), 0.05)[1] == list(reversed(val_docs))

  ds = small_dataset
  assert ds.seq_len == 16 and ds.tokenizer.vocab_size <= 300
  assert ds.train.shape[0] > 8 and ds.validation.shape[0] >= 1
  np.testing.assert_array_equal(ds.train[:-1, -1], ds.train[1:, 0])  # packed stream
  # Batches are a pure function of (seed, step) and every epoch visits every row once.
  n = ds.train.shape[0]
  sampler = data.BatchSampler(ds.train, 4, seed=5)
  again = data.BatchSampler(ds.train, 4, seed=5)
  np.testing.assert_array_equal(sampler(3), again(3))
  first_epoch = np.concatenate([sampler.indices(s) for s in range(n // 4)])
  assert len(set(first_epoch.tolist())) == len(first_epoch)
  assert not np.array_equal(sampler.indices(0), data.BatchSampler(ds.train, 4, 6).indices(0))


def test_embedded_corpus_builds_offline(tmp_path_factory, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("the embedded corpus must not use the network")
  monkeypatch.setattr(socket, "socket", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  before = set(sys.modules)
  cache = str(tmp_path_factory.mktemp("stdlib"))
  corpus = data.embedded_corpus(cache)
  assert len(corpus.documents) > 2000
  assert sum(map(len, corpus.documents)) > 1_000_000
  assert any("Return" in d for d in corpus.documents[:500])
  # Parsed, never imported (importing `antigravity` would open a web browser).
  assert not {"antigravity", "this", "tkinter", "turtle"} & (set(sys.modules) - before)
  assert os.listdir(cache)
  assert data.embedded_corpus(cache).documents == corpus.documents  # from the cache


# ----------------------------------------------------------------------------- CLIs


def _run_cli(module, *args, cwd):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_one_error_line(stderr, *fragments):
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_cli_reports_bad_input_in_one_line(tmp_path):
  # One subprocess: the whole path from `python -m` to the exit status, with no traceback.
  out = tmp_path / "run"
  proc = _run_cli("examples.train", "--optimizer", "sgd", "--workdir", str(out), "--no-progress",
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
    "bad proj type": (["--proj-type", "diagonal"], "unknown proj_type 'diagonal'"),
    "bad refresh": (["--refresh", "qr"], "unknown refresh 'qr'"),
    "bad number": (["--steps", "ten"], "--steps"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_train_cli_bad_input(case, tmp_path, capsys):
  (tmp_path / "empty.txt").write_text("\n\n   \n")
  (tmp_path / "small.txt").write_text("A short text.\n\nAnother paragraph of it.")
  args, fragment = BAD_INPUTS[case]
  args = [a.format(tmp=tmp_path) for a in args]
  workdir = tmp_path / "run"
  try:
    code = train.main(args + ["--workdir", str(workdir), "--no-progress", "--vocab-size", "300",
                              "--cache-dir", str(tmp_path / "cache")])
  except SystemExit as e:  # argparse
    code = e.code
  assert code == 2
  _assert_one_error_line(capsys.readouterr().err, fragment)
  assert not workdir.exists()


def test_compare_bad_input_writes_nothing(tmp_path, capsys):
  for argv, fragment in [
      (["--optimizers", "adamw,nope"], "unknown optimizer 'nope'"),
      (["--optimizers", "adamw,adamw"], "listed twice"),
      (["--optimizers", "adamw:fast"], "bad learning rate 'fast'"),
      (["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
      (["--config", "huge"], "unknown config 'huge'"),
  ]:
    out = tmp_path / "cmp"
    assert compare.main(argv + ["--out", str(out), "--no-progress"]) == 2
    _assert_one_error_line(capsys.readouterr().err, fragment)
    assert not out.exists()


def test_compare_writes_table_and_plot(nano, text_file, cache_dir, tmp_path, capsys):
  out = tmp_path / "cmp"
  code = compare.main(["--config", nano, "--optimizers", "adamw,galore_adamw",
                       "--data", text_file, "--seq-len", "16", "--vocab-size", "300",
                       "--cache-dir", cache_dir, "--steps", "4", "--batch-size", "2",
                       "--eval-every", "2", "--eval-batches", "1", "--log-every", "1",
                       "--timing-rounds", "1", "--timing-steps", "1", "--no-progress",
                       "--out", str(out)])
  assert code == 0, capsys.readouterr().err
  md = (out / "compare.md").read_text()
  assert "python -m examples.compare --config nano" in md
  rows = [l for l in md.splitlines() if l.startswith("| `")]
  assert [r.split("|")[1].strip() for r in rows] == ["`adamw`", "`galore_adamw`"]
  assert "0 (baseline)" in rows[0] and "%" in rows[1].split("|")[4]
  assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  summary = json.loads((out / "compare.json").read_text())
  runs = {r["optimizer"]: r for r in summary["runs"]}
  assert runs["galore_adamw"]["summary"]["opt_state_bytes"] < \
      runs["adamw"]["summary"]["opt_state_bytes"]
  assert runs["adamw"]["summary"]["steps"] == 4
  assert len(runs["adamw"]["side_by_side_step_times_s"]) == 1
  assert not os.path.exists(os.path.join(out, "adamw", "checkpoints"))


def test_compare_optimizer_entries():
  specs = compare.parse_optimizers("adamw, adamw:3e-3,galore_adamw")
  assert [(s.label, s.optimizer, s.learning_rate) for s in specs] == [
      ("adamw", "adamw", None), ("adamw:3e-3", "adamw", 3e-3),
      ("galore_adamw", "galore_adamw", None)]
  assert specs[1].folder == "adamw_lr3e-3"
  assert [s.label for s in compare.parse_optimizers(None)] == optimizers.available_optimizers()


def test_unknown_optimizer_names_are_errors():
  with pytest.raises(ExampleError, match="unknown optimizer"):
    optimizers.get_spec("lion")
  assert "adamw" in optimizers.available_optimizers()
  assert set(optimizers.available_optimizers()) <= set(optimizers.REGISTRY)
