"""Subprocess checks that start with the session and are collected by their tests.

The slowest checks run in child processes (the 8-device sharding checks, the
two-process multi-host run, gpu.py's smoke run) and spend most of their time
compiling on one thread. Started when the tests begin to run (never at
collection), for the selected tests only, they run beside the in-process tests
instead of after them: the suite's wall time, not its work, is what shrinks.

A test module registers a job under the name of the fixture that reads it;
conftest starts the jobs of the selected tests' fixtures as the run begins
(`pytest_runtestloop`), and the fixture calls ``result(name)``, which starts the job if
nothing did. A job lives in a folder shared by the session's pytest-xdist
workers (every worker collects every test): the first worker to create the
folder starts it, and whichever worker runs the test reads its output files.
Each command runs under ``timeout``, so a job nobody reads ends on its own.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import tempfile
import time
import uuid
from typing import Callable, Dict, List, Optional, Sequence


@dataclasses.dataclass
class Command:
  argv: Sequence[str]
  cwd: Optional[str] = None
  env: Optional[Dict[str, str]] = None


@dataclasses.dataclass
class Finished:
  """What each process of a job returned, in the order of its commands."""
  returncodes: List[int]
  stdouts: List[str]
  stderrs: List[str]
  timed_out: bool


# name -> (commands factory, timeout); the factory gets the job's folder for its files.
_REGISTERED: Dict[str, tuple] = {}
_TIMED_OUT = 124  # timeout(1)'s status


def register(name: str, commands: Callable[[str], Sequence[Command]], timeout_s: float) -> None:
  _REGISTERED[name] = (commands, timeout_s)


def is_registered(name: str) -> bool:
  return name in _REGISTERED


# The same for every worker of one pytest-xdist run; new for each run without xdist (a
# reused pid must not find an earlier run's outputs).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex


def _session_dir() -> str:
  return os.path.join(tempfile.gettempdir(), f"galore-optax-tests-{_RUN}")


def scratch(name: str) -> str:
  """The job's folder: its commands' files and their outputs."""
  return os.path.join(_session_dir(), name)


def start(name: str) -> None:
  """Starts the job unless this session already did (in any worker)."""
  folder = scratch(name)
  os.makedirs(_session_dir(), exist_ok=True)
  try:
    os.mkdir(folder)  # atomic: one worker wins
  except FileExistsError:
    return
  commands, timeout_s = _REGISTERED[name]
  for i, c in enumerate(commands(folder)):
    out = lambda kind, i=i: os.path.join(folder, f"{i}.{kind}")
    # The status file appears only when the command has ended.
    script = (f"timeout -k 5 {int(timeout_s)} {shlex.join(c.argv)} "
              f"> {shlex.quote(out('stdout'))} 2> {shlex.quote(out('stderr'))}; "
              f"echo $? > {shlex.quote(out('tmp'))} && mv {shlex.quote(out('tmp'))} "
              f"{shlex.quote(out('status'))}")
    subprocess.Popen(["/bin/sh", "-c", script], cwd=c.cwd, env=c.env,
                     stdin=subprocess.DEVNULL, start_new_session=True)
  with open(os.path.join(folder, "count.tmp"), "w") as f:
    f.write(str(i + 1))
  os.replace(os.path.join(folder, "count.tmp"), os.path.join(folder, "count"))


def result(name: str) -> Finished:
  """The finished job (started now if it was not)."""
  start(name)
  folder = scratch(name)
  _, timeout_s = _REGISTERED[name]
  deadline = time.monotonic() + timeout_s + 30  # its own timeout ends it before this
  path = lambda i, kind: os.path.join(folder, f"{i}.{kind}")
  while not os.path.exists(os.path.join(folder, "count")):
    time.sleep(0.1)
  with open(os.path.join(folder, "count")) as f:
    count = int(f.read())
  while not all(os.path.exists(path(i, "status")) for i in range(count)):
    if time.monotonic() > deadline:
      raise RuntimeError(f"background job {name!r} left no status in {folder}")
    time.sleep(0.5)
  read = lambda p: open(p, encoding="utf-8", errors="replace").read()
  codes = [int(read(path(i, "status"))) for i in range(count)]
  return Finished(codes, [read(path(i, "stdout")) for i in range(count)],
                  [read(path(i, "stderr")) for i in range(count)],
                  any(c in (_TIMED_OUT, 128 + 9) for c in codes))
