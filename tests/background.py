"""Subprocess checks that start with the session and are collected by their tests.

The slowest checks run in child processes (the 8-device sharding checks, the
two-process multi-host run, gpu.py's smoke run) and spend most of their time
compiling on one thread. Started as soon as collection shows their tests are
selected, they run beside the in-process tests instead of after them: the
suite's wall time, not its work, is what shrinks.

A test module registers a job under the name of the fixture that reads it;
conftest starts the jobs of the selected tests' fixtures right after
collection, and the fixture calls ``result(name)``, which starts the job if
nothing did.
"""

from __future__ import annotations

import dataclasses
import subprocess
import tempfile
import time
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


class _Job:

  def __init__(self, commands: Sequence[Command], timeout_s: float, scratch: str):
    self.deadline = time.monotonic() + timeout_s
    self.scratch = scratch
    self.procs = [
        subprocess.Popen(c.argv, cwd=c.cwd, env=c.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    self.finished: Optional[Finished] = None

  def wait(self) -> Finished:
    if self.finished is None:
      outs, timed_out = [], False
      for p in self.procs:
        try:
          outs.append(p.communicate(timeout=max(1.0, self.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
          timed_out = True
          for q in self.procs:
            q.kill()
          outs.append(p.communicate())
      self.finished = Finished([p.returncode for p in self.procs],
                               [o for o, _ in outs], [e for _, e in outs], timed_out)
    return self.finished

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.communicate()


# name -> (commands factory, timeout); the factory gets a fresh scratch folder.
_REGISTERED: Dict[str, tuple] = {}
_STARTED: Dict[str, _Job] = {}


def register(name: str, commands: Callable[[str], Sequence[Command]], timeout_s: float) -> None:
  _REGISTERED[name] = (commands, timeout_s)


def is_registered(name: str) -> bool:
  return name in _REGISTERED


def start(name: str) -> None:
  if name not in _STARTED:
    commands, timeout_s = _REGISTERED[name]
    scratch_dir = tempfile.mkdtemp(prefix=f"{name}-")
    _STARTED[name] = _Job(commands(scratch_dir), timeout_s, scratch_dir)


def result(name: str) -> Finished:
  """The finished job (started now if it was not); its timeout counts from its start."""
  start(name)
  return _STARTED[name].wait()


def scratch(name: str) -> str:
  """The scratch folder of a started job (its commands wrote their files there)."""
  return _STARTED[name].scratch


def kill_all() -> None:
  for job in _STARTED.values():
    job.kill()
