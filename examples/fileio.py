"""Small helpers to write output files atomically (temp file in the same folder + rename)."""

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to ``path``; renames it onto ``path`` on success."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  base = os.path.basename(path)
  suffix = os.path.splitext(base)[1]
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=suffix + ".tmp", dir=directory)
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_json(path: str, obj: Any, sort_keys: bool = True) -> None:
  """Writes `obj` as JSON through a temporary file, so readers never see half of it; keys
  sorted unless their order is part of the record (`sort_keys=False`)."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
