"""What the benchmarks that drive `t5x` share: running a command the way a
user types it, several at once, and printing and writing the JSON result."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def t5x(*args: str) -> str:
  """`t5x ARGS` from the repository root; its stdout, or an error with its stderr's tail."""
  proc = subprocess.run([sys.executable, '-m', 'prompt_transfer.cli', *args], cwd=ROOT,
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f't5x {" ".join(args)}\n{proc.stderr[-3000:]}')
  return proc.stdout


def parallel(fn: Callable, items: Sequence, jobs: int) -> list:
  """fn over items, `jobs` at a time (each call runs t5x commands), in order."""
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    return list(pool.map(fn, items))


def print_and_write(result: dict, path: Optional[str]) -> None:
  text = json.dumps(result, indent=1)
  print(text)
  if path:
    with open(path, 'w') as f:
      f.write(text + '\n')
