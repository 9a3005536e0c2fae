"""The `>>>` examples in the library's docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import galore_optax

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples():
  names = []
  for info in pkgutil.iter_modules(galore_optax.__path__, "galore_optax."):
    module = importlib.import_module(info.name)
    if any(t.examples for t in doctest.DocTestFinder().find(module)):
      names.append(info.name)
  return names


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=FLAGS, verbose=False)
  assert result.attempted > 0
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
