"""One writer per MODEL_DIR: an exclusive lock held for a run's lifetime.

On a local (or any POSIX) filesystem the lock is `flock` on
`MODEL_DIR/.run.lock`: the kernel drops it when the holder exits in any way
(SIGKILL included), so a dead run's lock is taken over by the next one with
no clean-up. The file records the holder (pid, host, start time) for the
refusal message. Object stores (gs://) have no locks: there the file is only
a record of the last writer, and two runs started on one gs:// MODEL_DIR are
not kept apart (documented in the README). In multi-process runs only
process 0 takes the lock.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Optional

from etils import epath

from prompt_transfer import fileio

LOCK_FILE = '.run.lock'


class RunLockedError(RuntimeError):
  """MODEL_DIR is in use by another run."""


class RunLock:
  """`with RunLock(model_dir):` the run's body."""

  def __init__(self, model_dir: str, enabled: bool = True):
    self.path = epath.Path(model_dir) / LOCK_FILE
    self.enabled = enabled
    self._fd: Optional[int] = None

  def _holder(self) -> dict:
    return {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': time.strftime('%Y-%m-%d %H:%M:%S')}

  def __enter__(self) -> 'RunLock':
    if not self.enabled:
      return self
    if fileio.is_remote(self.path):
      fileio.atomic_write_text(self.path, json.dumps(self._holder()))
      return self
    import fcntl  # pylint: disable=g-import-not-at-top
    try:
      fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # read-only MODEL_DIR: nothing was written yet
      raise RunLockedError(
          f'MODEL_DIR {os.path.dirname(os.fspath(self.path))} cannot be written '
          f'({e.strerror}: {self.path}); nothing in it was changed.') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _read_holder(fd)
      os.close(fd)
      who = (f'pid {holder.get("pid", "?")} on {holder.get("host", "?")} (started '
             f'{holder.get("started", "?")})') if holder else 'another process'
      raise RunLockedError(
          f'MODEL_DIR {os.path.dirname(os.fspath(self.path))} is in use by {who}; wait for '
          'that run to end or use another MODEL_DIR.') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(self._holder()).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._fd is not None:
      import fcntl  # pylint: disable=g-import-not-at-top
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _read_holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode() or '{}')
  except (OSError, ValueError):
    return {}
