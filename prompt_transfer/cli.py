"""The `t5x` / `prompt-transfer` command line, with T5X's flags.

  t5x train --gin_file=models/t5_1_1_tiny.gin --gin_file=runs/prompt_tune.gin \\
      --gin.MODEL_DIR=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"glue_sst2\\"

Gin files are looked up in the current folder, in --gin_search_paths and in
the packaged gin library (so `prompts/from_file.gin` works anywhere).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import tempfile
from typing import Callable, List, Optional, Sequence

# Before JAX or TensorFlow are imported: keep TensorFlow off accelerators (it
# only feeds data) and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REQUIRED_MACROS = {
    'train': ('MODEL_DIR', 'MIXTURE_OR_TASK_NAME', 'TASK_FEATURE_LENGTHS', 'TRAIN_STEPS'),
    'eval': ('MIXTURE_OR_TASK_NAME', 'TASK_FEATURE_LENGTHS'),
    'infer': ('MIXTURE_OR_TASK_NAME', 'TASK_FEATURE_LENGTHS'),
}
MACRO_HINTS = {
    'MODEL_DIR': '--gin.MODEL_DIR=\\"/path/to/run\\"',
    'MIXTURE_OR_TASK_NAME': '--gin.MIXTURE_OR_TASK_NAME=\\"task_name\\" (see `t5x list-tasks`)',
    'TASK_FEATURE_LENGTHS': "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 512, 'targets': 8}\"",
    'TRAIN_STEPS': '--gin.TRAIN_STEPS=1000',
    'PROMPT_FILE': '--gin.PROMPT_FILE=\\"/path/to/numpy_checkpoints/checkpoint_N/'
                   'encoder.prompt.prompt.prompt\\"',
    'CHECKPOINT_PATH': '--gin.CHECKPOINT_PATH=\\"/path/to/checkpoint\\"',
}


class UsageError(Exception):
  """A command-line problem a person can fix; printed without a traceback."""


def packaged_gin_dir() -> str:
  """The gin library: the repo's gin/ in a checkout, prompt_transfer/gin installed."""
  here = os.path.dirname(os.path.abspath(__file__))
  for candidate in (os.path.join(os.path.dirname(here), 'gin'), os.path.join(here, 'gin')):
    if os.path.isdir(os.path.join(candidate, 'runs')):
      return candidate
  try:
    import prompt_transfer.gin as pkg  # pylint: disable=g-import-not-at-top
    return list(pkg.__path__)[0]
  except ImportError:
    raise UsageError('The packaged gin library was not found; reinstall prompt-transfer.')


# Where `t5x` keeps compiled XLA programs between runs: a restarted or resumed
# run, and every later run of the same shapes, skips compilation (the tiny
# train step: ~6 s and ~350 MB of compiler memory).
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'prompt_transfer',
                                         'xla')


def _add_common_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument('--gin_file', action='append', default=[], metavar='FILE',
                 help='A gin file (repeatable), e.g. models/t5_1_1_base.gin, '
                      'prompts/from_file.gin, runs/prompt_tune.gin.')
  p.add_argument('--gin_bindings', action='append', default=[], metavar='BINDING',
                 help="A gin binding (repeatable), e.g. \"MODEL_DIR='/tmp/run'\".")
  p.add_argument('--gin_search_paths', default='', metavar='DIRS',
                 help='Comma-separated folders to look for gin files in (before the '
                      'packaged library).')
  p.add_argument('--module_import', action='append', default=[], metavar='MODULE',
                 help='A Python module to import first, e.g. one registering seqio tasks '
                      '(repeatable). The bundled `tasks` catalogue is always imported.')
  p.add_argument('--tfds_data_dir', default=None, help='TFDS data folder (same as '
                 '--gin.TFDS_DATA_DIR).')
  p.add_argument('--compilation_cache_dir',
                 default=os.environ.get('PROMPT_TRANSFER_COMPILATION_CACHE',
                                        DEFAULT_COMPILATION_CACHE),
                 help="Keep compiled XLA programs here, so restarts and repeated runs skip "
                      "compilation ('' turns it off; JAX_COMPILATION_CACHE_DIR wins). "
                      'Default: %(default)s.')
  g = p.add_argument_group('multi-process (JAX distributed runtime; automatic on Cloud TPU)')
  g.add_argument('--multiprocess_gpu', action='store_true',
                 help='Start the distributed runtime for a GPU cluster (T5X flag).')
  g.add_argument('--coordinator_address', default=None, help='host:port of process 0.')
  g.add_argument('--process_count', type=int, default=None, help='Number of processes.')
  g.add_argument('--process_index', type=int, default=None, help='This process (0-based).')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='t5x', description='prompt-transfer: prompt tuning and prompt transfer on frozen '
      'T5 models, with T5X flags. Any --gin.NAME=VALUE is a gin binding NAME=VALUE, e.g. '
      '--gin.MODEL_DIR=\\"/tmp/run\\" --gin.TRAIN_STEPS=1000.')
  sub = parser.add_subparsers(dest='command', metavar='COMMAND')
  helps = {
      'train': 'Train a prompt (or a model) on a seqio task or mixture.',
      'eval': "Evaluate a prompt with the task's metrics.",
      'infer': 'Decode a split to JSON lines.',
  }
  for name, text in helps.items():
    p = sub.add_parser(name, help=text, description=text + ' Flags as in T5X; any '
                       '--gin.NAME=VALUE becomes the gin binding NAME=VALUE (strings need '
                       'quotes: --gin.MODEL_DIR=\\"/tmp/run\\"). Required macros: ' +
                       ', '.join(REQUIRED_MACROS[name]) + '.')
    _add_common_flags(p)
  p = sub.add_parser('list-tasks', help='List registered tasks and mixtures.')
  p.add_argument('--module_import', action='append', default=[])
  p.add_argument('--filter', default='', help='Only names containing this text.')
  for name, module in EXTRA_COMMANDS.items():
    mod = importlib.import_module(module)
    # A module serving several commands gives each its own help and flags.
    text = getattr(mod, 'HELPS', {}).get(name, mod.HELP)
    getattr(mod, 'ARGUMENTS', {}).get(name, mod.add_arguments)(
        sub.add_parser(name, help=text, description=text))
  return parser


# Commands implemented in their method's module (added as issues land).
EXTRA_COMMANDS = {'curves': 'prompt_transfer.analysis.curves',
                  'similarity': 'prompt_transfer.analysis.transfer_cli',
                  'transfer-matrix': 'prompt_transfer.analysis.transfer_cli',
                  'project': 'prompt_transfer.analysis.project_cli',
                  'zoo': 'prompt_transfer.zoo',
                  'serve': 'prompt_transfer.serve',
                  'export-prompt': 'prompt_transfer.analysis.interchange_cli',
                  'import-prompt': 'prompt_transfer.analysis.interchange_cli'}


def gin_value(text: str) -> str:
  """A --gin.NAME value as gin source; bare paths and words become strings.

  T5X needs --gin.MODEL_DIR=\\"'/x'\\"; we also accept --gin.MODEL_DIR=/x.
  """
  text = text.strip()
  if re.fullmatch(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?|True|False|None|"
                  r"[\[\(\{@%'\"].*", text, flags=re.S):
    return text
  return repr(text)


def split_gin_overrides(argv: Sequence[str]) -> tuple[list, list]:
  """Separates --gin.NAME=VALUE flags (-> bindings) from the other arguments."""
  rest, bindings = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith('--gin.'):
      body = arg[len('--gin.'):]
      if '=' in body:
        name, value = body.split('=', 1)
      else:
        name, value = body, next(it, '')
      bindings.append(f'{name} = {gin_value(value)}')
    else:
      rest.append(arg)
  return rest, bindings


def parse_gin(args: argparse.Namespace, bindings: List[str], command: str) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  # Registers every configurable the gin files bind (entry points included).
  from prompt_transfer.training import configurables, evaluation, trainer  # noqa: F401  pylint: disable=g-import-not-at-top
  paths = [os.getcwd()] + [p for p in args.gin_search_paths.split(',') if p] + [
      packaged_gin_dir()]
  for path in paths:
    gin.add_config_file_search_path(path)
  files = []
  for f in args.gin_file:
    found = f if os.path.exists(f) else next(
        (os.path.join(p, f) for p in paths if os.path.exists(os.path.join(p, f))), None)
    if found is None:
      raise UsageError(f'gin file {f!r} not found in {paths}.')
    files.append(found)
  all_bindings = list(args.gin_bindings) + bindings
  if args.tfds_data_dir:
    all_bindings.append(f'TFDS_DATA_DIR = {args.tfds_data_dir!r}')
  # gin logs an ERROR for every search path an include is not in; only the
  # final failure matters, and it is raised below.
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)
  try:
    gin.parse_config_files_and_bindings(files, all_bindings, finalize_config=False)
  except Exception as e:  # gin raises several types; its message has file and line
    raise UsageError(f'gin configuration error: {e}') from None
  finally:
    root.setLevel(level)
  for macro in REQUIRED_MACROS.get(command, ()) + ('PROMPT_FILE',):
    _check_macro(macro, required=macro != 'PROMPT_FILE')
  _check_unknown_macros(bindings, files, paths, command)


# Macros the code reads itself (cli._macro), whatever the gin files say.
CODE_MACROS = ('TASK_FEATURE_LENGTHS', 'CHECKPOINT_PATH', 'TFDS_DATA_DIR', 'VOCABULARY_PATH')
_MACRO_NAME = r'[A-Z][A-Z0-9_]*'
_INCLUDE = re.compile(r"""^include\s+['"]([^'"]+)['"]""", flags=re.M)


def _gin_macros(files: Sequence[str], paths: Sequence[str]) -> set:
  """Macro names the gin files (and the files they include) define or use."""
  seen, names, todo = set(), set(), list(files)
  while todo:
    path = todo.pop()
    if path in seen or not os.path.exists(path):
      continue
    seen.add(path)
    with open(path) as f:
      text = re.sub(r'#.*', '', f.read())
    names |= set(re.findall(rf'%({_MACRO_NAME})\b', text))
    names |= set(re.findall(rf'^({_MACRO_NAME})\s*=', text, flags=re.M))
    for inc in _INCLUDE.findall(text):
      todo.extend(os.path.join(p, inc) for p in [os.path.dirname(path), *paths])
  return names


def _check_unknown_macros(bindings: Sequence[str], files: Sequence[str],
                          paths: Sequence[str], command: str) -> None:
  """A --gin.MACRO=... that no loaded gin file uses is a typo (gin would
  silently define a new macro): refused, with the close names."""
  import difflib  # pylint: disable=g-import-not-at-top
  given = [m.group(1) for b in bindings if (m := re.match(rf'({_MACRO_NAME})\s*=', b))]
  if not given:
    return
  known = _gin_macros(files, paths) | set(CODE_MACROS)
  for name in given:
    if name in known:
      continue
    if name == 'PROMPT_LENGTH' and command in ('eval', 'infer'):
      raise UsageError(f"--gin.PROMPT_LENGTH: t5x {command} reads the prompt's length from "
                       'its file; leave it out.')
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise UsageError(f'--gin.{name}: no gin file given uses the macro {name}, so it would '
                     f'change nothing.{hint}')


def _check_macro(name: str, required: bool) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  try:
    value = gin.query_parameter(f'%{name}')
  except ValueError:
    if required:
      raise UsageError(f'{name} is not set: add {MACRO_HINTS.get(name, f"--gin.{name}=...")}.'
                       ) from None
    return
  if value is gin.REQUIRED or 'REQUIRED' in repr(value):
    raise UsageError(f'{name} is required by the gin files given: add '
                     f'{MACRO_HINTS.get(name, f"--gin.{name}=...")}.')


def _binding(name: str, default=None):
  """A gin binding's value ('scope.param' or '%MACRO'), or default when unbound."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def _macro(name: str, default=None):
  return _binding(f'%{name}', default)


# Start-up lines TensorFlow's C++ runtime writes straight to fd 2 while it is
# imported, before absl logging exists (so TF_CPP_MIN_LOG_LEVEL cannot stop
# them): informational, not a user's concern. Other lines are passed on.
_STARTUP_NOISE = re.compile(
    r'WARNING: All log messages before absl::InitializeLog\(\)|'
    r'^[IW]\d{4} [\d:. ]+\d+ (port|cudart_stub|cpu_feature_guard)\.cc:\d+\]|'
    r'cuda_platform\.cc:\d+\] failed call to cuInit')
# seqio warnings about how our own pipelines are built (not the user's data).
_SEQIO_NOISE = ('uncached FunctionDataset', 'sequence lengths are longer than necessary',
                'sequence lengths longer than necessary',
                "'logger_cls' is empty so seqio.Evaluator will not log")


@contextlib.contextmanager
def _quiet_native_startup():
  """Holds back fd-2 start-up noise of native libraries imported inside;
  PROMPT_TRANSFER_DEBUG=1 shows everything."""
  if os.environ.get('PROMPT_TRANSFER_DEBUG'):
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [l for l in captured.read().decode(errors='replace').splitlines(keepends=True)
              if not _STARTUP_NOISE.search(l)]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()


# orbax logs a failed write from each of its worker threads (with a traceback)
# before raising it; the raised error becomes our one line naming the path
# and what was kept.
_ORBAX_WRITE_FAILURE = re.compile(r'raised an exception: .*(No space left on device|Permission '
                                  r'denied|Read-only file system|Disk quota exceeded)')


class _NoiseFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (any(s in message for s in _SEQIO_NOISE) or
                _ORBAX_WRITE_FAILURE.search(message))


def import_modules(modules: Sequence[str]) -> None:
  with _quiet_native_startup():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    # TensorFlow only feeds data: keep it off accelerators (as T5X does), so
    # it neither takes GPU memory from JAX nor probes CUDA later.
    tf.config.set_visible_devices([], 'GPU')
  if not os.environ.get('PROMPT_TRANSFER_DEBUG'):
    logging.getLogger('absl').addFilter(_NoiseFilter())
  for name in ['tasks'] + list(modules):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise UsageError(f'--module_import={name}: cannot import it ({e}).') from None


def _configure_tasks() -> None:
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  tfds_dir = _macro('TFDS_DATA_DIR')
  if tfds_dir:
    tasks_lib.set_tfds_data_dir(tfds_dir)
  vocab = _macro('VOCABULARY_PATH')
  # models/*.gin name the public gs:// file; env T5_VOCAB (a local copy, for
  # offline machines) replaces that default, an explicit other path wins.
  if vocab == tasks_lib.core.DEFAULT_VOCAB_PATH and os.environ.get(tasks_lib.core.VOCAB_ENV):
    vocab = os.environ[tasks_lib.core.VOCAB_ENV]
  if vocab:
    tasks_lib.set_default_vocabulary(vocab)


def run(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = split_gin_overrides(argv)
  parser = build_parser()
  args = parser.parse_args(rest)
  if not args.command:
    parser.print_help()
    return 2
  if args.command == 'list-tasks':
    import_modules(args.module_import)
    return list_tasks(args.filter)
  if args.command in EXTRA_COMMANDS:
    return importlib.import_module(EXTRA_COMMANDS[args.command]).run(args, bindings)
  from prompt_transfer.training import partitioning  # pylint: disable=g-import-not-at-top
  # No coordinator: a single process, or a Cloud TPU VM that JAX discovers itself.
  partitioning.initialize_distributed(args.coordinator_address, args.process_count,
                                      args.process_index)
  check_platform()
  import_modules(args.module_import)
  parse_gin(args, bindings, args.command)
  _configure_tasks()
  import gin  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import perf  # pylint: disable=g-import-not-at-top
  if _binding('model_config.remat'):  # before the first computation starts the backend
    perf.use_remat_friendly_cpu_scheduler()
  perf.use_compilation_cache(args.compilation_cache_dir)
  from prompt_transfer.training import evaluation, trainer  # pylint: disable=g-import-not-at-top
  entry: Callable = {'train': trainer.train, 'eval': evaluation.evaluate,
                     'infer': evaluation.infer}[args.command]
  gin.finalize()
  entry()
  return 0


def list_tasks(filter_text: str = '') -> int:
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  rows = [r for r in tasks_lib.list_tasks() if filter_text in r.name]
  width = max([len(r.name) for r in rows] + [4])
  print(f'{"name":<{width}}  {"splits":<40}  metrics')
  for r in rows:
    print(f'{r.name:<{width}}  {",".join(r.splits):<40}  {",".join(r.metrics)}')
  print(f'{len(rows)} tasks and mixtures')
  return 0


PLATFORM_ENV = 'PROMPT_TRANSFER_PLATFORM'


def check_platform() -> None:
  """The launchers set PROMPT_TRANSFER_PLATFORM (tpu, gpu): a JAX without that
  backend (e.g. the CPU-only wheel) would otherwise train on the host's CPU
  without a word, for days."""
  want = os.environ.get(PLATFORM_ENV, '').strip().lower()
  if not want:
    return
  import jax  # pylint: disable=g-import-not-at-top
  have = jax.default_backend()
  if have != want:
    build = {'gpu': "jax[cuda12]", 'tpu': "jax[tpu]"}.get(want, f'the {want} build of JAX')
    raise UsageError(f'{PLATFORM_ENV}={want} (the launcher asked for {want}s) but JAX runs on '
                     f'{have}: install {build} in this environment (pip install -U "{build}"), '
                     f'or unset {PLATFORM_ENV} to run on {have}.')


def main(argv: Optional[Sequence[str]] = None) -> None:
  try:
    code = run(argv)
  except UsageError as e:
    print(f't5x: error: {e}', file=sys.stderr)
    code = 2
  except Exception as e:  # pylint: disable=broad-except  # sorted by _exit_code
    code = _exit_code(e)
  sys.exit(code)


def _exit_code(e: Exception) -> int:
  """A preempted run: its line, PREEMPTED_EXIT_CODE (the launchers run it again).
  Errors we raise on purpose: their own message on one line, exit 1. Anything
  else is a bug: re-raised with its traceback."""
  from prompt_transfer.training.preemption import PREEMPTED_EXIT_CODE, Preempted  # pylint: disable=g-import-not-at-top
  if isinstance(e, Preempted):
    print(f'[prompt-transfer] {e}', file=sys.stderr, flush=True)
    return PREEMPTED_EXIT_CODE
  from prompt_transfer.model.config import ConfigError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.files import PromptFileError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.data import DataError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.stages import StageError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.state import TrainingError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.analysis.library import IncompatiblePromptError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training.run_lock import RunLockedError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.projector import ProjectorError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.intrinsic import SubspaceError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.zoo import ZooError  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.peft_format import PeftAdapterError  # pylint: disable=g-import-not-at-top
  known = (PromptFileError, TrainingError, ConfigError, FileNotFoundError, DataError,
           StageError, IncompatiblePromptError, RunLockedError, ProjectorError,
           SubspaceError, ZooError, PeftAdapterError)
  try:
    from prompt_transfer.model.checkpoint_import import CheckpointMismatchError, CheckpointReadError  # pylint: disable=g-import-not-at-top
    known += (CheckpointMismatchError, CheckpointReadError)
  except ImportError:
    pass
  # OSError: a path that cannot be written or read (permissions, a file where
  # a folder should be, a full disk); its message names the path.
  if isinstance(e, known + (OSError,)) or (isinstance(e, ValueError) and
                                           'not registered' in str(e)):
    if os.environ.get('PROMPT_TRANSFER_DEBUG'):
      raise e
    print(f't5x: error: {one_line(e)}', file=sys.stderr)
    return 1
  raise e


def one_line(error: BaseException) -> str:
  """The error's own message on one line: gin's appended call-site lines
  ("In call to configurable 'x' (<function x at 0x...>)") become a short
  "(in gin's x)" naming the configurables below the entry point."""
  text = str(error)
  message = re.split(r"\n\s*In call to configurable '", text)[0].strip()
  where = [n for n in re.findall(r"In call to configurable '([^']+)'", text)
           if n not in ('train', 'evaluate', 'infer')]
  return f"{message} (in gin's {', '.join(dict.fromkeys(where))})" if where else message


if __name__ == '__main__':
  main()
