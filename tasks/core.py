"""Shared machinery of the task catalogue: options, vocabulary, sources, metadata.

Everything here is independent of any single data set:

* Module-level options: the TFDS data dir (`set_tfds_data_dir`, env
  `TFDS_DATA_DIR`), the folder of file-based data sets (`set_data_dir`, env
  `PROMPT_TRANSFER_DATA_DIR`) and the default vocabulary (`set_default_vocabulary`,
  env `T5_VOCAB`). All are read when data is used, not when tasks are registered,
  so they may be set after `import tasks`.
* `DefaultVocabulary`: the one vocabulary object every real task is registered
  with. It resolves to the current default (the T5 SentencePiece model, or an
  override such as `seqio.ByteVocabulary()` in tests) on each use, so swapping
  the vocabulary needs no re-registration and registering reads no file.
* `TfdsSource` / `FileSource`: seqio data sources that turn "data not there" into
  a `DataUnavailableError` naming the task, the folder and how to get the data.
* Task metadata (`TaskInfo`), `get_label_words`, `check_available`, `list_tasks`.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

DEFAULT_VOCAB_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
# T5 checkpoints were trained with 100 sentinel ids on top of the 32,000 pieces.
DEFAULT_EXTRA_IDS = 100

TFDS_DATA_DIR_ENV = 'TFDS_DATA_DIR'
DATA_DIR_ENV = 'PROMPT_TRANSFER_DATA_DIR'
VOCAB_ENV = 'T5_VOCAB'
DEFAULT_DATA_DIR = os.path.join('~', 'prompt_transfer_data')

# SPoT: examples-proportional mixing with each task's count capped at K = 2^19.
MIXING_RATE_CAP = 2**19


class DataUnavailableError(FileNotFoundError):
  """The data (or vocabulary) a task needs is not on this machine."""


# ------------------------------------------------------------------ options ---

_tfds_data_dir: Optional[str] = None
_data_dir: Optional[str] = None
_vocab_override: Union[None, str, seqio.Vocabulary] = None
_vocab_cache: dict[str, seqio.Vocabulary] = {}
_vocab_lock = threading.Lock()


def set_tfds_data_dir(path: Optional[str]) -> None:
  """Sets where TFDS data sets are read from (None: env TFDS_DATA_DIR / TFDS default)."""
  global _tfds_data_dir
  _tfds_data_dir = os.path.expanduser(path) if path else None


def get_tfds_data_dir() -> Optional[str]:
  """The TFDS data dir set here or by env TFDS_DATA_DIR; None means TFDS's default."""
  return _tfds_data_dir or os.environ.get(TFDS_DATA_DIR_ENV) or None


def _effective_tfds_data_dir() -> str:
  """The folder TFDS actually reads, for messages."""
  d = get_tfds_data_dir()
  if d:
    return d
  try:
    return tfds.core.constants.DATA_DIR
  except AttributeError:  # Older/newer TFDS layouts.
    return os.path.expanduser('~/tensorflow_datasets')


def set_data_dir(path: Optional[str]) -> None:
  """Sets the folder holding file-based data sets (SemEval-2014, FewRel)."""
  global _data_dir
  _data_dir = os.path.expanduser(path) if path else None


def get_data_dir() -> str:
  """Folder of file-based data sets: set_data_dir, env, or ~/prompt_transfer_data."""
  return os.path.expanduser(_data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def set_default_vocabulary(vocabulary: Union[None, str, seqio.Vocabulary]) -> None:
  """Sets the vocabulary of all real tasks: a SentencePiece path, a Vocabulary, or None.

  None restores the default (env T5_VOCAB, else the public T5 model on GCS).
  Takes effect for datasets built afterwards; registered tasks need no change.
  """
  global _vocab_override
  if isinstance(vocabulary, str):
    vocabulary = os.path.expanduser(vocabulary)
  _vocab_override = vocabulary


def default_vocabulary_path() -> str:
  """The SentencePiece file the default vocabulary reads (when no object override)."""
  if isinstance(_vocab_override, str):
    return _vocab_override
  return os.environ.get(VOCAB_ENV) or DEFAULT_VOCAB_PATH


def get_vocabulary() -> seqio.Vocabulary:
  """The concrete vocabulary real tasks use now (loads the SentencePiece model)."""
  if isinstance(_vocab_override, seqio.Vocabulary):
    return _vocab_override
  path = default_vocabulary_path()
  with _vocab_lock:
    if path in _vocab_cache:
      return _vocab_cache[path]
    # Only local paths can be checked cheaply; gs:// is left to TF's GCS client.
    if '://' not in path and not os.path.exists(path):
      raise DataUnavailableError(
          f'T5 SentencePiece vocabulary not found at {path!r}. Point env '
          f'{VOCAB_ENV} or tasks.set_default_vocabulary(path) at the T5 '
          'sentencepiece.model (cc_all.32000; public copy at '
          f'{DEFAULT_VOCAB_PATH}).')
    vocab = seqio.SentencePieceVocabulary(path, extra_ids=DEFAULT_EXTRA_IDS)
    try:
      vocab.sp_model  # pylint: disable=pointless-statement  # Load now, fail clearly.
    except Exception as e:  # pylint: disable=broad-except
      raise DataUnavailableError(
          f'Could not read the T5 SentencePiece vocabulary at {path!r} ({e}). '
          f'Set env {VOCAB_ENV} or call tasks.set_default_vocabulary(path) with a '
          'local copy of sentencepiece.model.') from e
    _vocab_cache[path] = vocab
    return vocab


class DefaultVocabulary(seqio.Vocabulary):
  """Stands for the current default vocabulary; resolved on every use.

  Tasks hold this one object, so `set_default_vocabulary` (or env T5_VOCAB) may
  change the vocabulary after registration, and registering reads no file.
  """

  def __init__(self):
    super().__init__(extra_ids=0)

  def resolve(self) -> seqio.Vocabulary:
    return get_vocabulary()

  @property
  def eos_id(self) -> Optional[int]:
    return self.resolve().eos_id

  @property
  def unk_id(self) -> Optional[int]:
    return self.resolve().unk_id

  @property
  def pad_id(self) -> int:
    return self.resolve().pad_id

  @property
  def bos_id(self) -> Optional[int]:
    return self.resolve().bos_id

  @property
  def extra_ids(self) -> int:
    return self.resolve().extra_ids

  @property
  def vocab_size(self) -> int:
    return self.resolve().vocab_size

  @property
  def _base_vocab_size(self) -> int:
    return self.resolve()._base_vocab_size  # pylint: disable=protected-access

  def _encode(self, s):
    return self.resolve()._encode(s)  # pylint: disable=protected-access

  def _decode(self, ids):
    return self.resolve()._decode(ids)  # pylint: disable=protected-access

  def _encode_tf(self, s):
    return self.resolve()._encode_tf(s)  # pylint: disable=protected-access

  def _decode_tf(self, ids):
    return self.resolve()._decode_tf(ids)  # pylint: disable=protected-access

  def encode(self, s):
    return self.resolve().encode(s)

  def decode(self, ids):
    return self.resolve().decode(ids)

  def encode_tf(self, s):
    return self.resolve().encode_tf(s)

  def decode_tf(self, ids):
    return self.resolve().decode_tf(ids)

  def __getattr__(self, name: str) -> Any:
    # Anything else (sp_model, tokenizer, ...) comes from the concrete vocabulary.
    if name.startswith('__'):
      raise AttributeError(name)
    return getattr(self.resolve(), name)

  def __eq__(self, other: Any) -> bool:
    if isinstance(other, DefaultVocabulary):
      return True
    if isinstance(other, seqio.Vocabulary):
      return self.resolve() == other
    return NotImplemented

  def __hash__(self) -> int:
    return hash(DefaultVocabulary)  # All instances stand for the same thing.

  def __repr__(self) -> str:
    current = (_vocab_override if isinstance(_vocab_override, seqio.Vocabulary)
               else default_vocabulary_path())
    return f'DefaultVocabulary(now={current!r})'

  __str__ = __repr__


DEFAULT_VOCABULARY = DefaultVocabulary()


def output_features(vocabulary: Optional[seqio.Vocabulary] = None
                    ) -> dict[str, seqio.Feature]:
  """T5 text-to-text features: 'inputs' and 'targets', EOS appended."""
  vocab = vocabulary if vocabulary is not None else DEFAULT_VOCABULARY
  return {
      'inputs': seqio.Feature(vocabulary=vocab, add_eos=True, required=False),
      'targets': seqio.Feature(vocabulary=vocab, add_eos=True),
  }


# --------------------------------------------------------------- metadata ---


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What the trainer and the transfer tools need to know about a task.

  Attributes:
    name: registered seqio task name.
    task_type: coarse type used to group tasks (sentiment, nli, paraphrase,
      similarity, acceptability, qa, extractive_qa, coreference, word_sense,
      causal_reasoning, relation_extraction, summarization, synthetic).
    kind: 'classification', 'regression' or 'generation'.
    label_words: the target word of each class, by class index (None when the
      task has no fixed label set).
    metric_names: keys of the metrics dict the task's metric_fns return.
    splits: canonical split names.
    source: where the data comes from, e.g. 'tfds:glue/sst2:2.0.0'.
    family: for synthetic tasks, the labelling rule they share.
    description: one line for listings.
  """
  name: str
  task_type: str
  kind: str
  label_words: Optional[tuple[str, ...]]
  metric_names: tuple[str, ...]
  splits: tuple[str, ...]
  source: str
  family: Optional[str] = None
  description: str = ''


_TASK_INFO: dict[str, TaskInfo] = {}
_MIXTURES: dict[str, tuple[str, ...]] = {}


class TaskRow(NamedTuple):
  """One row of `list_tasks()` (also for mixtures)."""
  name: str
  splits: tuple[str, ...]
  metrics: tuple[str, ...]


def add_task(
    name: str,
    source: seqio.DataSource,
    text_preprocessors: Sequence[Callable[..., tf.data.Dataset]],
    *,
    task_type: str,
    kind: str,
    label_words: Optional[Sequence[str]],
    metric_fns: Sequence[Callable[..., Mapping[str, float]]],
    metric_names: Sequence[str],
    postprocess_fn: Optional[Callable[..., Any]],
    splits: Sequence[str],
    source_desc: str,
    vocabulary: Optional[seqio.Vocabulary] = None,
    family: Optional[str] = None,
    description: str = '',
) -> seqio.Task:
  """Registers a text-to-text task (T5X preprocessing order) and its metadata.

  Re-registering a name replaces it, so re-importing a module is harmless.
  """
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          *text_preprocessors,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=output_features(vocabulary),
      postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns),
  )
  _TASK_INFO[name] = TaskInfo(
      name=name, task_type=task_type, kind=kind,
      label_words=tuple(label_words) if label_words is not None else None,
      metric_names=tuple(metric_names), splits=tuple(splits),
      source=source_desc, family=family, description=description)
  return task


def add_mixture(name: str, task_names: Sequence[str],
                maximum: Optional[int] = MIXING_RATE_CAP,
                temperature: float = 1.0) -> seqio.Mixture:
  """Registers an examples-proportional mixture (T5: rate = min(n, maximum)).

  Args:
    name: mixture name.
    task_names: registered task names.
    maximum: the cap K on each task's example count (SPoT: 2^19); None: no cap.
    temperature: T5's temperature scaling of the rates (1.0: none).
  """
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  rate = lambda task: seqio.mixing_rate_num_examples(  # pylint: disable=g-long-lambda
      task, maximum=maximum, temperature=temperature)
  mixture = seqio.MixtureRegistry.add(name, list(task_names), default_rate=rate)
  _MIXTURES[name] = tuple(task_names)
  return mixture


def get_task_info(name: str) -> TaskInfo:
  """Metadata of a registered task of this catalogue."""
  if name in _TASK_INFO:
    return _TASK_INFO[name]
  if name in _MIXTURES:
    raise ValueError(f'{name!r} is a mixture of {list(_MIXTURES[name])}; '
                     'ask about one of its tasks.')
  raise ValueError(f'Unknown task {name!r}. Known tasks: {sorted(_TASK_INFO)}')


def get_label_words(name: str) -> list[str]:
  """Target word of each class of a classification task, by class index."""
  info = get_task_info(name)
  if info.label_words is None:
    raise ValueError(
        f'Task {name!r} is a {info.kind} task ({info.task_type}); it has no '
        'fixed label words.')
  return list(info.label_words)


def task_names() -> list[str]:
  """Names of all tasks of this catalogue, sorted."""
  return sorted(_TASK_INFO)


def mixture_names() -> list[str]:
  """Names of all mixtures of this catalogue, sorted."""
  return sorted(_MIXTURES)


def mixture_tasks(name: str) -> list[str]:
  """Task names of one of this catalogue's mixtures."""
  if name not in _MIXTURES:
    raise ValueError(f'Unknown mixture {name!r}. Known: {sorted(_MIXTURES)}')
  return list(_MIXTURES[name])


def list_tasks(include_mixtures: bool = True) -> list[TaskRow]:
  """Rows (name, splits, metric names) for `t5x list-tasks`, sorted by name.

  A mixture's row lists the union of its tasks' splits and metric names.
  """
  rows = [TaskRow(i.name, i.splits, i.metric_names) for i in _TASK_INFO.values()]
  if include_mixtures:
    for name, members in _MIXTURES.items():
      splits: list[str] = []
      metrics: list[str] = []
      for m in members:
        info = _TASK_INFO[m]
        splits += [s for s in info.splits if s not in splits]
        metrics += [x for x in info.metric_names if x not in metrics]
      rows.append(TaskRow(name, tuple(splits), tuple(metrics)))
  return sorted(rows, key=lambda r: r.name)


# ------------------------------------------------------------------ sources ---


class TfdsSource(seqio.TfdsDataSource):
  """A read-only TFDS source that follows `set_tfds_data_dir` and fails clearly.

  It never downloads (offline machines must not hang on the network); a missing
  data set raises `DataUnavailableError` saying how to prepare it. Example
  counts come from a table of the published split sizes, so mixing rates need
  no data on disk.
  """

  def __init__(
      self,
      task_name: str,
      tfds_name: str,
      splits: Mapping[str, str],
      sizes: Optional[Mapping[str, int]] = None,
      filters: Optional[Mapping[str, Callable[[Mapping[str, tf.Tensor]], tf.Tensor]]] = None,
      instructions: str = '',
  ):
    super().__init__(tfds_name=tfds_name, splits=dict(splits), read_only=True)
    self._task_name = task_name
    self._tfds_name = tfds_name
    self._split_map = dict(splits)
    self._sizes = dict(sizes or {})
    self._filters = dict(filters or {})
    self._instructions = instructions
    self._loaders: dict[Optional[str], seqio.LazyTfdsLoader] = {}

  @property
  def tfds_name(self) -> str:
    return self._tfds_name

  @property
  def tfds_dataset(self) -> seqio.LazyTfdsLoader:
    # One loader per data dir, so changing the option later takes effect.
    data_dir = get_tfds_data_dir()
    if data_dir not in self._loaders:
      self._loaders[data_dir] = seqio.LazyTfdsLoader(
          self._tfds_name, data_dir=data_dir, split_map=self._split_map,
          read_only=True)
    return self._loaders[data_dir]

  def unavailable_message(self) -> str:
    try:
      data_dir = self.tfds_dataset.data_dir or _effective_tfds_data_dir()
    except Exception:  # pylint: disable=broad-except
      data_dir = _effective_tfds_data_dir()
    return (
        f"Task {self._task_name!r} needs the TFDS data set '{self._tfds_name}', "
        f"which is not prepared in the TFDS data dir {data_dir!r} (set it with "
        f'tasks.set_tfds_data_dir(path), env {TFDS_DATA_DIR_ENV} or '
        '--gin.TFDS_DATA_DIR). Prepare it on a machine with internet access: '
        f"`tfds build {self._tfds_name} --data_dir={data_dir}` (or "
        f"tfds.builder('{self._tfds_name}', data_dir='{data_dir}')"
        '.download_and_prepare()), then copy the folder '
        f"{os.path.join(data_dir, *self._tfds_name.replace(':', '/').split('/'))!r} "
        'here.' + (f' {self._instructions}' if self._instructions else ''))

  def get_dataset(self, split: Optional[str] = None, shuffle: bool = True,
                  seed: Optional[int] = None, shard_info=None, **kwargs
                  ) -> tf.data.Dataset:
    split = split or 'train'
    try:
      ds = super().get_dataset(split=split, shuffle=shuffle, seed=seed,
                               shard_info=shard_info, **kwargs)
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError,
            tfds.core.registered.DatasetNotFoundError) as e:
      raise DataUnavailableError(
          f'{self.unavailable_message()} [TFDS said: {str(e)[:300]}]') from e
    if split in self._filters:
      ds = ds.filter(self._filters[split])
    return ds

  def num_input_examples(self, split: str) -> Optional[int]:
    if split in self._sizes:
      return self._sizes[split]
    return super().num_input_examples(split)

  def check(self, splits: Optional[Iterable[str]] = None) -> None:
    """Raises DataUnavailableError unless every split can be opened."""
    for split in splits or self.splits:
      self.get_dataset(split=split, shuffle=False)


class FileSource(seqio.FunctionDataSource):
  """Reads data sets published as files (SemEval XML, FewRel JSON) from a folder.

  Args:
    task_name: for messages.
    subdir: folder under `get_data_dir()` holding the files.
    files: canonical split -> file names the split is read from.
    read_fn: (split, {file name: path}) -> list of example dicts with the keys
      and types of `columns`.
    columns: example key -> tf.DType.
    how_to_get: one or two sentences naming where the files are published.
  """

  def __init__(self, task_name: str, subdir: str,
               files: Mapping[str, Sequence[str]],
               read_fn: Callable[[str, Mapping[str, str]], list[dict[str, Any]]],
               columns: Mapping[str, tf.dtypes.DType], how_to_get: str):
    self._task_name = task_name
    self._subdir = subdir
    self._files = {k: tuple(v) for k, v in files.items()}
    self._read_fn = read_fn
    self._columns = dict(columns)
    self._how_to_get = how_to_get
    self._cache: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    super().__init__(dataset_fn=self._dataset_fn, splits=list(self._files),
                     caching_permitted=True)

  @property
  def folder(self) -> str:
    return os.path.join(get_data_dir(), self._subdir)

  def _paths(self, split: str) -> dict[str, str]:
    folder = self.folder
    needed = self._files[split]
    paths = {f: os.path.join(folder, f) for f in needed}
    missing = [f for f, p in paths.items() if not os.path.exists(p)]
    if missing:
      all_files = sorted({f for v in self._files.values() for f in v})
      raise DataUnavailableError(
          f'Task {self._task_name!r} (split {split!r}) needs {missing} in '
          f'{folder!r}, which are missing. Put the files {all_files} there '
          f'(the folder is <data dir>/{self._subdir}; the data dir is set with '
          f'tasks.set_data_dir(path) or env {DATA_DIR_ENV}). {self._how_to_get}')
    return paths

  def examples(self, split: str) -> list[dict[str, Any]]:
    """The split's examples as Python dicts (parsed once per file version)."""
    paths = self._paths(split)
    key = (split,) + tuple((p, os.path.getmtime(p)) for p in sorted(paths.values()))
    if key not in self._cache:
      self._cache[key] = self._read_fn(split, paths)
    return self._cache[key]

  def _dataset_fn(self, split: str, shuffle_files: bool,
                  seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed  # Order is fixed; seqio shuffles after preprocessing.
    rows = self.examples(split)
    columns = {
        k: tf.constant([r[k] for r in rows], dtype=dtype, shape=[len(rows)])
        for k, dtype in self._columns.items()
    }
    return tf.data.Dataset.from_tensor_slices(columns)

  def num_input_examples(self, split: str) -> Optional[int]:
    return len(self.examples(split))

  def check(self, splits: Optional[Iterable[str]] = None) -> None:
    for split in splits or self.splits:
      self.examples(split)


def check_available(name: str, splits: Optional[Sequence[str]] = None) -> None:
  """Raises DataUnavailableError unless the data of a task (or mixture) is here.

  Args:
    name: a task or mixture name.
    splits: splits to check (default: all the task declares).
  """
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    for task in provider.tasks:
      check_available(task.name, splits=[s for s in (splits or task.splits)
                                         if s in task.splits])
    return
  source = provider.source
  # TfdsSource, FileSource and rank twins' sources (which ask their base) can
  # check; other sources (synthetic functions) need no data.
  check = getattr(source, 'check', None)
  if callable(check):
    check(splits)


def is_available(name: str) -> bool:
  """True when `check_available(name)` passes."""
  try:
    check_available(name)
  except DataUnavailableError:
    return False
  return True
