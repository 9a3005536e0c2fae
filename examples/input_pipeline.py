"""Input pipeline: corpora, tokenizers, packed sequences, deterministic batches.

Corpora (``load_documents(spec)``):
  * ``None`` / ``"stdlib"``: the embedded offline default, English text from the docstrings of
    the installed Python standard library (parsed with ``ast``, never imported; ~1.7 MB).
  * a folder of C4 shards as distributed (``c4-train.*.json.gz``, optionally
    ``c4-validation.*.json.gz``): JSON lines with a ``"text"`` field.
  * a ``.txt``/``.rst``/``.md``/``.jsonl``/``.json.gz``/``.jsonl.gz`` file, or a folder of them.
  * ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face dataset, only when ``datasets`` is importable
    and the hub (or its cache) is reachable; never required.

Tokenizers: a ``tokenizer.json`` (``tokenizers``) or a sentencepiece ``.model`` when given,
else a byte-level BPE trained on the training documents and cached under a key made of a
hash of the corpus and the vocabulary size.

Documents are split into three disjoint sets by a hash of their text (stable, independent of
order): train, *tuning* (the held-out loss that ``examples.compare`` selects learning rates by)
and *validation* (the held-out loss that is reported, never used for a choice). A corpus with
its own validation split (C4) keeps it, and the tuning documents come out of its training set.
Each set is tokenized, joined with EOS and cut into rows of ``seq_len + 1`` tokens (inputs are
``row[:-1]``, targets ``row[1:]``). ``BatchSampler(rows, batch_size, seed)(step)`` is a pure
function of the step, so a resumed run sees exactly the batches an uninterrupted run sees.
"""

import ast
import dataclasses
import functools
import glob
import gzip
import hashlib
import io
import json
import os
import sys
import sysconfig
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

from examples import fileio
from examples.errors import ExampleError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
BPE_EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".rst", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
C4_DEFAULT_MAX_DOCS = 20000
_CACHE_VERSION = "1"


# ----------------------------------------------------------------------------- corpora


@dataclasses.dataclass
class Corpus:
  """Documents of one source; ``validation`` is set when the source has its own split."""

  name: str
  documents: List[str]
  validation: Optional[List[str]] = None


def default_cache_dir() -> str:
  env = os.environ.get("GALORE_EXAMPLES_CACHE")
  if env:
    return env
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "galore-optax-examples")


def _cache_path(cache_dir: Optional[str], stem: str, *depends_on) -> str:
  """The cache file ``<stem>-<key>.json``: the key hashes the cache format and everything the
  cached content ``depends_on``, so a change of any of them misses the old file."""
  key = hashlib.sha256("|".join(map(str, (_CACHE_VERSION, *depends_on))).encode()).hexdigest()
  return os.path.join(cache_dir or default_cache_dir(), f"{stem}-{key[:16]}.json")


_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "turtledemo", "ensurepip"}
_MIN_DOCSTRING_CHARS = 40


def _stdlib_docstrings(stdlib: str) -> List[str]:
  """Docstrings (module, class, function) of every stdlib .py file, deduplicated, in a fixed
  order: sorted directory walk, and within a file ``ast.walk`` order."""
  seen = set()
  docs = []
  for directory, dirnames, filenames in os.walk(stdlib):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")
                         and not d.startswith("config-"))
    for filename in sorted(filenames):
      if not filename.endswith(".py"):
        continue
      try:
        with open(os.path.join(directory, filename), "rb") as f:
          tree = ast.parse(f.read())
      except (SyntaxError, ValueError, OSError):
        continue
      for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
          text = ast.get_docstring(node, clean=True)
          if text and len(text) >= _MIN_DOCSTRING_CHARS and text not in seen:
            seen.add(text)
            docs.append(text)
  return docs


def embedded_corpus(cache_dir: Optional[str] = None, use_cache: bool = True) -> Corpus:
  """The offline default corpus: docstrings of the installed Python standard library."""
  stdlib = sysconfig.get_paths()["stdlib"]
  if not os.path.isdir(stdlib):
    raise ExampleError(f"the Python standard library folder {stdlib} does not exist")
  path = _cache_path(cache_dir, "stdlib-docstrings", sys.version, stdlib, _MIN_DOCSTRING_CHARS)
  if use_cache and os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        docs = json.load(f)
      return Corpus("stdlib docstrings", docs)
    except (OSError, ValueError):
      pass  # unreadable cache: rebuild
  docs = _stdlib_docstrings(stdlib)
  if not docs:
    raise ExampleError(f"no docstrings found under {stdlib}")
  if use_cache:
    try:
      fileio.write_text(path, json.dumps(docs))
    except OSError:
      pass  # a read-only cache is not an error
  return Corpus("stdlib docstrings", docs)


def _split_text(text: str, min_chars: int = 2000) -> List[str]:
  """Splits text into documents of whole paragraphs (blank-line separated), >= min_chars."""
  docs, current, size = [], [], 0
  for para in text.replace("\r\n", "\n").split("\n\n"):
    para = para.strip()
    if not para:
      continue
    current.append(para)
    size += len(para)
    if size >= min_chars:
      docs.append("\n\n".join(current))
      current, size = [], 0
  if current:
    docs.append("\n\n".join(current))
  return docs


def _open_text(path: str) -> io.TextIOBase:
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
  return open(path, encoding="utf-8", errors="replace")


def _json_lines(path: str, limit: Optional[int]) -> Iterator[str]:
  with _open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if limit is not None and limit <= 0:
        return
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except ValueError:
        raise ExampleError(f"{path}:{lineno} is not a JSON line") from None
      text = record.get("text") if isinstance(record, dict) else None
      if not isinstance(text, str):
        raise ExampleError(f"{path}:{lineno} has no string field 'text'")
      if text.strip():
        if limit is not None:
          limit -= 1
        yield text


def _read_file(path: str, limit: Optional[int]) -> List[str]:
  try:
    if path.endswith(JSON_SUFFIXES):
      return list(_json_lines(path, limit))
    with _open_text(path) as f:
      docs = _split_text(f.read())
    return docs if limit is None else docs[:limit]
  except (OSError, EOFError, UnicodeError) as e:
    raise ExampleError(f"cannot read {path}: {e}") from None


def _read_files(paths: Sequence[str], max_docs: Optional[int]) -> List[str]:
  docs: List[str] = []
  for path in paths:
    remaining = None if max_docs is None else max_docs - len(docs)
    if remaining is not None and remaining <= 0:
      break
    docs.extend(_read_file(path, remaining))
  return docs


def _huggingface_corpus(spec: str, max_docs: Optional[int]) -> Corpus:
  parts = spec[len("hf:"):].split(":")
  name = parts[0]
  config = parts[1] if len(parts) > 1 and parts[1] else None
  split = parts[2] if len(parts) > 2 and parts[2] else "train"
  if not name:
    raise ExampleError("empty Hugging Face dataset name (use hf:NAME[:CONFIG[:SPLIT]])")
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ExampleError("the Hugging Face `datasets` package is not installed; "
                       "use a local folder or the embedded corpus instead") from None
  limit = max_docs or C4_DEFAULT_MAX_DOCS
  try:
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    docs = []
    for record in stream:
      text = record.get("text")
      if isinstance(text, str) and text.strip():
        docs.append(text)
      if len(docs) >= limit:
        break
  except Exception as e:  # pylint: disable=broad-except  (network, auth, unknown name, ...)
    first = (str(e).strip().splitlines() or [""])[0]
    raise ExampleError(f"could not load Hugging Face dataset {name!r}: "
                       f"{type(e).__name__}: {first}") from None
  return Corpus(f"hf:{name}", docs)


def load_documents(spec: Optional[str], *, max_docs: Optional[int] = None,
                   cache_dir: Optional[str] = None) -> Corpus:
  """Reads the documents named by ``spec`` (see the module docstring)."""
  if spec in (None, "", "stdlib", "embedded"):
    corpus = embedded_corpus(cache_dir)
    if max_docs is not None:
      corpus.documents = corpus.documents[:max_docs]
  elif spec.startswith("hf:"):
    corpus = _huggingface_corpus(spec, max_docs)
  else:
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
      raise ExampleError(f"data path {spec} does not exist")
    if os.path.isdir(path):
      c4_train = sorted(glob.glob(os.path.join(path, "c4-train.*.json*")))
      if c4_train:
        limit = max_docs or C4_DEFAULT_MAX_DOCS
        c4_val = sorted(glob.glob(os.path.join(path, "c4-validation.*.json*")))
        validation = _read_files(c4_val[:1], max(1, limit // 20)) if c4_val else None
        corpus = Corpus(f"C4 ({path})", _read_files(c4_train, limit), validation or None)
      else:
        files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names
            if f.endswith(TEXT_SUFFIXES + JSON_SUFFIXES) and not f.startswith("."))
        if not files:
          raise ExampleError(f"no c4-train.*.json.gz, .txt, .rst, .md or .jsonl files under {spec}")
        corpus = Corpus(path, _read_files(files, max_docs))
    else:
      if not path.endswith(TEXT_SUFFIXES + JSON_SUFFIXES):
        raise ExampleError(f"unsupported data file {spec} (use .txt, .rst, .md, .jsonl, .json.gz)")
      corpus = Corpus(path, _read_files([path], max_docs))
  corpus.documents = [d for d in corpus.documents if d.strip()]
  if not corpus.documents:
    raise ExampleError(f"the corpus {corpus.name} is empty (no text found)")
  return corpus


# ----------------------------------------------------------------------------- tokenizers


@dataclasses.dataclass
class TextTokenizer:
  """Minimal tokenizer interface used by the pipeline."""

  name: str
  vocab_size: int
  eos_id: int
  encode_batch: Callable[[List[str]], List[List[int]]]
  decode: Callable[[List[int]], str]


def _wrap_hf_tokenizer(tok, name: str) -> TextTokenizer:
  eos_id = None
  for candidate in EOS_CANDIDATES:
    eos_id = tok.token_to_id(candidate)
    if eos_id is not None:
      break
  if eos_id is None:
    raise ExampleError(f"tokenizer {name} has no end-of-text token "
                       f"(looked for {', '.join(EOS_CANDIDATES)})")

  def encode_batch(texts):
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

  return TextTokenizer(name, tok.get_vocab_size(), eos_id, encode_batch, tok.decode)


def load_tokenizer_file(path: str) -> TextTokenizer:
  """A ``tokenizer.json`` (Hugging Face tokenizers) or a sentencepiece ``.model``."""
  path = os.path.expanduser(path)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise ExampleError(f"tokenizer file {path} does not exist")
  if path.endswith(".model"):
    try:
      import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ExampleError("a sentencepiece .model needs the `sentencepiece` package "
                         "(not installed); pass a tokenizer.json instead") from None
    try:
      sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # pylint: disable=broad-except
      raise ExampleError(f"cannot load sentencepiece model {path}: {e}") from None
    if sp.eos_id() < 0:
      raise ExampleError(f"sentencepiece model {path} has no end-of-sequence token")
    return TextTokenizer(path, sp.get_piece_size(), sp.eos_id(),
                         lambda texts: sp.encode(list(texts)), sp.decode)
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ExampleError(f"cannot load tokenizer {path}: {str(e).splitlines()[0] if str(e) else e}"
                       ) from None
  return _wrap_hf_tokenizer(tok, path)


def corpus_hash(documents: Sequence[str]) -> str:
  h = hashlib.sha256()
  for doc in documents:
    h.update(doc.encode("utf-8", "replace"))
    h.update(b"\0")
  return h.hexdigest()


def train_bpe_tokenizer(documents: Sequence[str], vocab_size: int,
                        cache_dir: Optional[str] = None, use_cache: bool = True) -> TextTokenizer:
  """Byte-level BPE trained on ``documents``; cached by hash(corpus, vocab size)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  if vocab_size < 300:
    raise ExampleError(f"BPE vocabulary size {vocab_size} is too small (at least 300)")
  path = _cache_path(cache_dir, f"bpe-{vocab_size}", vocab_size, corpus_hash(documents))
  if use_cache and os.path.exists(path):
    try:
      return _wrap_hf_tokenizer(Tokenizer.from_file(path), f"byte-level BPE {vocab_size}")
    except Exception:  # pylint: disable=broad-except
      pass  # unreadable cache: retrain
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(documents, trainer)
  if use_cache:
    try:
      with fileio.atomic_path(path) as tmp:
        tok.save(tmp)
    except OSError:
      pass
  return _wrap_hf_tokenizer(tok, f"byte-level BPE {vocab_size}")


# ----------------------------------------------------------------------------- packing


def _hash_unit(doc: str) -> float:
  """A number in [0, 1) fixed by the document's text."""
  digest = hashlib.sha1(doc.encode("utf-8", "replace")).digest()
  return int.from_bytes(digest[:4], "big") / 2**32


def split_documents(documents: Sequence[str], val_fraction: float, tuning_fraction: float = 0.0):
  """(train, tuning, validation) by a hash of each document's text.

  A document whose hash falls below ``val_fraction`` is validation, the next
  ``tuning_fraction`` of the range is tuning, the rest train: deterministic, order-free and
  disjoint by construction.
  """
  train, tuning, val = [], [], []
  for doc in documents:
    u = _hash_unit(doc)
    if u < val_fraction:
      val.append(doc)
    elif u < val_fraction + tuning_fraction:
      tuning.append(doc)
    else:
      train.append(doc)
  return train, tuning, val


def pack(token_lists: Sequence[Sequence[int]], eos_id: int, seq_len: int) -> np.ndarray:
  """Concatenates documents (each followed by EOS) and cuts rows of seq_len + 1 tokens.

  Consecutive rows overlap by one token so that every token is a target exactly once.
  """
  lengths = [len(t) + 1 for t in token_lists]
  flat = np.empty(sum(lengths), dtype=np.int32)
  pos = 0
  for tokens, n in zip(token_lists, lengths):
    flat[pos:pos + n - 1] = tokens
    flat[pos + n - 1] = eos_id
    pos += n
  num_rows = (flat.size - 1) // seq_len if flat.size > seq_len else 0
  if num_rows == 0:
    return np.zeros((0, seq_len + 1), np.int32)
  starts = np.arange(num_rows) * seq_len
  return flat[starts[:, None] + np.arange(seq_len + 1)[None, :]]


@dataclasses.dataclass
class Dataset:
  """Packed rows of ``seq_len + 1`` tokens for each split."""

  train: np.ndarray  # (num_train_rows, seq_len + 1) int32
  validation: np.ndarray  # the reported held-out split
  tokenizer: TextTokenizer
  corpus_name: str
  num_documents: int
  num_chars: int
  tuning: Optional[np.ndarray] = None  # the held-out split for choices (learning rates)

  @property
  def seq_len(self) -> int:
    return self.train.shape[1] - 1

  def split(self, name: str) -> np.ndarray:
    """The rows of split ``name``: "train", "tuning" or "validation"."""
    if name not in SPLITS:
      raise ExampleError(f"unknown split {name!r} (choose from: {', '.join(SPLITS)})")
    rows = getattr(self, name)
    if rows is None:
      raise ExampleError(f"this dataset has no {name} split (build it with tuning_fraction > 0)")
    return rows

  def describe(self) -> str:
    tuning = "" if self.tuning is None else f"{self.tuning.shape[0]} tuning / "
    return (f"{self.corpus_name}: {self.num_documents} documents, {self.num_chars / 1e6:.2f} MB, "
            f"tokenizer {self.tokenizer.name} (vocab {self.tokenizer.vocab_size}); "
            f"{self.train.shape[0]} train / {tuning}{self.validation.shape[0]} validation rows "
            f"of {self.seq_len} tokens")


SPLITS = ("train", "tuning", "validation")


def build_dataset(data: Optional[str], seq_len: int, *, tokenizer: Optional[str] = None,
                  vocab_size: int = 4096, val_fraction: float = 0.05,
                  tuning_fraction: float = 0.05, max_docs: Optional[int] = None,
                  cache_dir: Optional[str] = None) -> Dataset:
  """Corpus -> tokenizer -> train/tuning/validation rows of ``seq_len + 1`` tokens.

  Args:
    data: the corpus (see ``load_documents``).
    seq_len: tokens per input row.
    tokenizer: a tokenizer file; None trains a byte-level BPE on the training documents.
    vocab_size: the vocabulary of that BPE.
    val_fraction: share of the documents held out for the reported validation loss (a
      corpus with its own validation split keeps it).
    tuning_fraction: share held out for the tuning loss; 0: no tuning split.
    max_docs: read at most this many documents.
    cache_dir: tokenizer and corpus cache.

  Returns:
    A Dataset; every split has at least one row.
  """
  if seq_len < 1:
    raise ExampleError(f"seq_len must be positive, got {seq_len}")
  if not 0.0 < val_fraction < 1.0:
    raise ExampleError(f"val_fraction must be in (0, 1), got {val_fraction}")
  if not 0.0 <= tuning_fraction < 1.0 or val_fraction + tuning_fraction >= 1.0:
    raise ExampleError(f"tuning_fraction must be in [0, 1 - val_fraction), got {tuning_fraction}")
  corpus = load_documents(data, max_docs=max_docs, cache_dir=cache_dir)
  if corpus.validation:
    train_docs, tuning_docs, _ = split_documents(corpus.documents, 0.0, tuning_fraction)
    val_docs = corpus.validation
  else:
    train_docs, tuning_docs, val_docs = split_documents(corpus.documents, val_fraction,
                                                        tuning_fraction)
  if tokenizer:
    tok = load_tokenizer_file(tokenizer)
  else:
    tok = train_bpe_tokenizer(train_docs or corpus.documents, vocab_size, cache_dir)
  train_tokens = tok.encode_batch(train_docs)
  held_out = {"validation": tok.encode_batch(val_docs)}
  if tuning_fraction:
    held_out["tuning"] = tok.encode_batch(tuning_docs)
  # A small corpus can leave the hash split without one full held-out row: move whole
  # documents from the end of the training set until each held-out split has one.
  for tokens in held_out.values():
    while sum(len(t) + 1 for t in tokens) < seq_len + 1 and len(train_tokens) > 1:
      tokens.insert(0, train_tokens.pop())
  train_rows = pack(train_tokens, tok.eos_id, seq_len)
  rows = {name: pack(tokens, tok.eos_id, seq_len) for name, tokens in held_out.items()}
  total = sum(len(t) + 1 for t in train_tokens) + sum(
      len(t) + 1 for tokens in held_out.values() for t in tokens)
  if train_rows.shape[0] == 0 or any(r.shape[0] == 0 for r in rows.values()):
    raise ExampleError(f"seq_len {seq_len} is larger than the data: {corpus.name} has "
                       f"{total} tokens, too few for one sequence in each of "
                       f"{', '.join(['train'] + list(rows))}")
  num_chars = sum(len(d) for d in corpus.documents) + sum(len(d) for d in corpus.validation or [])
  return Dataset(train_rows, rows["validation"], tok, corpus.name,
                 len(corpus.documents) + len(corpus.validation or []), num_chars,
                 tuning=rows.get("tuning"))


# ----------------------------------------------------------------------------- batching


class BatchSampler:
  """``sampler(step)`` -> (batch_size, seq_len + 1) int32 rows, a pure function of the step.

  The row order is an endless sequence of epochs, each a permutation drawn from
  ``(seed, epoch)``; step ``s`` takes positions ``[s*B, (s+1)*B)`` of that sequence.
  """

  def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
    if batch_size < 1:
      raise ExampleError(f"batch size must be positive, got {batch_size}")
    self.rows = rows
    self.batch_size = batch_size
    self.seed = seed

  @functools.lru_cache(maxsize=4)
  def _permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, epoch])
    return rng.permutation(self.rows.shape[0])

  def indices(self, step: int) -> np.ndarray:
    n = self.rows.shape[0]
    positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    epochs, offsets = np.divmod(positions, n)
    return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)])

  def __call__(self, step: int) -> np.ndarray:
    return self.rows[self.indices(step)]

  def iterate(self, start_step: int = 0) -> Iterator[np.ndarray]:
    step = start_step
    while True:
      yield self(step)
      step += 1


def eval_batches(rows: np.ndarray, batch_size: int, max_batches: int) -> List[np.ndarray]:
  """Fixed validation batches: the first rows in order (same for every run and optimizer)."""
  batch_size = max(1, min(batch_size, rows.shape[0]))
  count = max(1, min(max_batches, rows.shape[0] // batch_size))
  return [rows[i * batch_size:(i + 1) * batch_size] for i in range(count)]
