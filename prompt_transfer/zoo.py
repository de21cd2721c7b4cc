"""`t5x zoo`: a prompt zoo, one prompt trained per task on one frozen model.

The first step of intrinsic prompt tuning (intrinsic.py) and a library for
SPoT-style source selection: for each task of a list (or of a mixture), a
`t5x train` run in ZOO/<task>/ with the gin files and flags given, e.g.

  t5x zoo --output_dir /runs/zoo --tasks ipt_pool_train \\
    --gin_file=models/t5_1_1_tiny_synthetic.gin --gin_file=prompts/from_sampled_vocab.gin \\
    --gin_file=runs/prompt_tune.gin --gin.TRAIN_STEPS=400 --gin.PROMPT_LENGTH=20

* Resumable: a finished task has ZOO/<task>/zoo_entry.json (its prompt file
  and the settings it was trained with) and is skipped; an interrupted one
  resumes from its last checkpoint (the trainer's own resume).
* Parallel-safe: each run holds its MODEL_DIR's run lock, so several `t5x
  zoo` commands on one ZOO (other terminals or machines on a shared disk)
  split the tasks; one that finds a task locked skips it and says so.
* The same ZOO with other settings is refused (one zoo, one recipe).
* `--jobs N` trains N tasks at once in subprocesses; with 1 (default) the
  runs share this process (its imports and compiled programs).

ZOO/zoo.json indexes the finished tasks; `prompt_files(ZOO, tasks)` gives
their prompt files in order (what MSF reads).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

from etils import epath

from prompt_transfer import fileio
from prompt_transfer.prompts import files

HELP = ('Train one prompt per task (a prompt zoo) with the same gin files and flags: '
        'ZOO/<task>/ each, resumable, several commands may share one ZOO. --gin.NAME=VALUE '
        'flags go to every run (MODEL_DIR and MIXTURE_OR_TASK_NAME are set per task).')
ENTRY_FILE = 'zoo_entry.json'
INDEX_FILE = 'zoo.json'
# Set per task by the zoo; the user's flags must not set them.
OWN_MACROS = ('MODEL_DIR', 'MIXTURE_OR_TASK_NAME')


class ZooError(ValueError):
  """A zoo that cannot be built or read as asked."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--output_dir', required=True, help='The zoo folder (ZOO).')
  parser.add_argument('--tasks', nargs='+', required=True,
                      help='Task names; a mixture name stands for its tasks.')
  parser.add_argument('--gin_file', action='append', default=[],
                      help='Gin files of each run (model, prompt init, runs/prompt_tune.gin).')
  parser.add_argument('--gin_search_paths', default='', help='As in t5x train.')
  parser.add_argument('--module_import', action='append', default=[],
                      help='Modules registering tasks, as in t5x train.')
  parser.add_argument('--jobs', type=int, default=1, help='Tasks trained at once.')


def expand_tasks(names: Sequence[str]) -> List[str]:
  """Task names, mixtures replaced by their tasks (order kept, no repeats)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  importlib.import_module('tasks')  # registers the catalogue
  out: List[str] = []
  for name in names:
    if name in seqio.MixtureRegistry.names():
      leaves = [t.name for t in seqio.get_mixture_or_task(name).tasks]
    elif name in seqio.TaskRegistry.names():
      leaves = [name]
    else:
      raise ZooError(f'--tasks: {name!r} is neither a registered task nor a mixture '
                     '(t5x list-tasks shows them).')
    out += [t for t in leaves if t not in out]
  return out


def _entry_path(zoo_dir: str, task: str) -> epath.Path:
  return epath.Path(zoo_dir) / task / ENTRY_FILE


def read_entry(zoo_dir: str, task: str) -> Optional[dict]:
  path = _entry_path(zoo_dir, task)
  return json.loads(path.read_text()) if path.exists() else None


def prompt_files(zoo_dir: fileio.PathLike, tasks: Sequence[str]) -> List[str]:
  """The zoo's prompt file of each task, in order; refuses missing tasks."""
  zoo_dir = fileio.normalize_dir(zoo_dir)
  tasks = [tasks] if isinstance(tasks, str) else list(tasks)
  entries = {t: read_entry(zoo_dir, t) for t in tasks}
  missing = [t for t, e in entries.items() if e is None]
  if missing:
    have = sorted(p.parent.name for p in epath.Path(zoo_dir).glob(f'*/{ENTRY_FILE}'))
    raise ZooError(f'The zoo {zoo_dir} has no finished prompt for {len(missing)} of the '
                   f'{len(tasks)} tasks: {", ".join(missing[:8])}'
                   f'{" ..." if len(missing) > 8 else ""} (it has {len(have)}: '
                   f'{", ".join(have[:8])}{" ..." if len(have) > 8 else ""}). Build them '
                   'with t5x zoo.')
  return [os.path.join(zoo_dir, t, entries[t]['prompt_file']) for t in tasks]


def _train_argv(args: argparse.Namespace, bindings: Sequence[str], run_dir: str,
                task: str) -> List[str]:
  return (['train'] + [f'--gin_file={f}' for f in args.gin_file]
          + ([f'--gin_search_paths={args.gin_search_paths}'] if args.gin_search_paths else [])
          + [f'--module_import={m}' for m in args.module_import]
          + [f'--gin_bindings=MODEL_DIR = {run_dir!r}',
             f'--gin_bindings=MIXTURE_OR_TASK_NAME = {task!r}']
          + [f'--gin_bindings={b}' for b in bindings])


def _train_here(argv: Sequence[str]) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    code = cli.run(list(argv))
  finally:
    gin.clear_config()
  if code:
    raise ZooError(f't5x {" ".join(argv)} exited with {code}.')


def _train_subprocess(argv: Sequence[str], log: str) -> None:
  from prompt_transfer.training import run_lock  # pylint: disable=g-import-not-at-top
  with open(log, 'a') as f:
    code = subprocess.run([sys.executable, '-m', 'prompt_transfer.cli', *argv], stdout=f,
                          stderr=subprocess.STDOUT, check=False).returncode
  if code:
    last = _last_line(log)
    if 'is in use by' in last:
      raise run_lock.RunLockedError(last)
    raise ZooError(f'exit {code}: {last} (log: {log})')


def build_one(args: argparse.Namespace, bindings: Sequence[str], task: str,
              settings: dict) -> str:
  """Trains (or resumes) one task's prompt; returns 'trained', 'done' or 'locked'."""
  from prompt_transfer.training import run_lock  # pylint: disable=g-import-not-at-top
  zoo_dir = args.output_dir
  entry = read_entry(zoo_dir, task)
  if entry is not None:
    return 'done'
  run_dir = os.path.join(zoo_dir, task)
  epath.Path(run_dir).mkdir(parents=True, exist_ok=True)
  argv = _train_argv(args, bindings, run_dir, task)
  try:
    if args.jobs > 1:
      _train_subprocess(argv, os.path.join(run_dir, 'train.log'))
    else:
      _train_here(argv)
  except run_lock.RunLockedError:
    return 'locked'
  step = files.latest_numpy_step(run_dir)
  if step is None:
    raise ZooError(f'{task}: the run in {run_dir} wrote no numpy checkpoint.')
  prompt = os.path.relpath(files.prompt_file(run_dir, step), run_dir)
  info = files.load_prompt_info(files.prompt_file(run_dir, step))
  fileio.atomic_write_text(_entry_path(zoo_dir, task), json.dumps(
      {'task': task, 'prompt_file': prompt, 'step': step, 'settings': settings,
       'metrics': dict(info.metrics) if info else {}}, indent=1))
  return 'trained'


def _last_line(path: str) -> str:
  try:
    with open(path) as f:
      lines = f.read().strip().splitlines()
    return lines[-1] if lines else ''
  except OSError:
    return ''


def _check_settings(zoo_dir: str, settings: dict) -> None:
  """One zoo, one recipe: refuses flags other than those it was started with."""
  path = epath.Path(zoo_dir) / 'zoo_settings.json'
  if path.exists():
    old = json.loads(path.read_text())
    if old != settings:
      raise ZooError(f'The zoo {zoo_dir} was built with other settings: {old} (now '
                     f'{settings}); use another --output_dir.')
  else:
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(path, json.dumps(settings, indent=1))


def write_index(zoo_dir: str) -> dict:
  """ZOO/zoo.json: task -> entry, for every finished task."""
  index = {p.parent.name: json.loads(p.read_text())
           for p in sorted(epath.Path(zoo_dir).glob(f'*/{ENTRY_FILE}'))}
  fileio.atomic_write_text(epath.Path(zoo_dir) / INDEX_FILE, json.dumps(index, indent=1))
  return index


def run(args: argparse.Namespace, gin_bindings: Sequence[str]) -> int:
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  for b in gin_bindings:
    if b.split('=')[0].strip() in OWN_MACROS:
      raise cli.UsageError(f't5x zoo sets {" and ".join(OWN_MACROS)} for each task; drop '
                           f'--gin.{b.split("=")[0].strip()}.')
  if not args.gin_file:
    raise cli.UsageError('t5x zoo needs the gin files of the runs (--gin_file=models/...gin '
                         '--gin_file=runs/prompt_tune.gin ...).')
  args.output_dir = fileio.normalize_dir(args.output_dir)
  cli.import_modules(args.module_import)
  task_list = expand_tasks(args.tasks)
  settings = {'gin_files': list(args.gin_file), 'gin_bindings': list(gin_bindings)}
  _check_settings(args.output_dir, settings)
  t0 = time.time()
  status = {}
  print(f'[prompt-transfer] zoo {args.output_dir}: {len(task_list)} tasks, '
        f'{args.jobs} at a time', flush=True)

  lock = threading.Lock()

  def one(task: str) -> None:
    t = time.time()
    s = build_one(args, gin_bindings, task, settings)
    with lock:  # --jobs: tasks finish in any order
      status[task] = s
      n = len(status)
    print(f'[prompt-transfer] zoo {n}/{len(task_list)} {task}: {s} '
          f'({time.time() - t:.0f} s)', flush=True)

  if args.jobs > 1:
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      list(pool.map(one, task_list))
  else:
    for task in task_list:
      one(task)
  index = write_index(args.output_dir)
  locked = [t for t, s in status.items() if s == 'locked']
  print(f'[prompt-transfer] zoo {args.output_dir}: {len(index)} prompts '
        f'({sum(s == "trained" for s in status.values())} trained now) in '
        f'{time.time() - t0:.0f} s' + (f'; {len(locked)} being trained elsewhere: '
                                       f'{", ".join(locked)}' if locked else ''), flush=True)
  return 0
