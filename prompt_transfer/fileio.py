"""File I/O for every path the product writes or reads: local or remote.

Everything goes through `etils.epath`, so MODEL_DIR, PROMPT_FILE and output
paths may be local paths or URLs of any filesystem epath knows (gs://,
TensorFlow's ram://, ...). Writers are atomic: the content goes to a unique
temporary name in the same folder, then is renamed over the final name, so a
reader (or a resumed run) never sees half a file.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]
TMP_MARKER = '.tmp-'


def is_remote(path: PathLike) -> bool:
  """True for URLs (gs://, ram://, ...): no fsync, renames may not be atomic."""
  return '://' in os.fspath(path)


def normalize_dir(path: PathLike) -> str:
  """Local paths made absolute; URLs such as gs://bucket/run kept as given."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def tmp_name(path: PathLike) -> epath.Path:
  """A temporary sibling of `path`, unique across processes and hosts."""
  path = epath.Path(path)
  return path.parent / f'{path.name}{TMP_MARKER}{os.getpid()}-{time.time_ns()}-{uuid.uuid4().hex[:8]}'


def is_tmp(name: str) -> bool:
  """Names of temporary files and folders (readers skip them)."""
  return TMP_MARKER in name


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old or the new content."""
  path = epath.Path(path)
  tmp = tmp_name(path)
  if is_remote(path):
    # Object stores have no atomic rename over an existing name: write, then
    # replace. Readers skip the temporary name either way.
    tmp.write_bytes(data)
    if path.exists():
      path.unlink()
    tmp.rename(path)
    return
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # the data is on disk before the name points at it
    os.replace(tmp, path)
  except OSError as e:
    # A full disk fails in write() with no file name: name the target, and
    # leave no half-written temporary behind.
    if os.path.exists(tmp):
      os.remove(tmp)
    raise OSError(e.errno, e.strerror, os.fspath(path)) from None


def atomic_write_text(path: PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def makedirs_for(path: PathLike) -> None:
  """Creates the parent folder of a file path."""
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)


def save_figure(fig, path: PathLike, **kwargs) -> None:
  """A matplotlib figure written as PNG (or the path's format), atomically."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fmt = os.fspath(path).rsplit('.', 1)[-1] if '.' in os.fspath(path) else 'png'
  fig.savefig(buf, format=fmt, **kwargs)
  atomic_write_bytes(path, buf.getvalue())
