"""Data for training and evaluation: seqio task -> features -> batches.

One place for the task lookup, the feature converter (T5X's unpacked
encoder-decoder features, plus the per-example features a prompt module reads,
such as `task_ids`), the training stream and the evaluator's data.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np

from prompt_transfer.model.models import MODEL_FEATURES, PROMPT_FEATURES

TASK_IDS = 'task_ids'


class DataError(ValueError):
  """A data set-up that cannot work (unknown task, batch not divisible, ...)."""


def get_task(name: str) -> Any:
  """The seqio task or mixture; an unknown name lists the close ones."""
  import seqio  # pylint: disable=g-import-not-at-top
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f' Did you mean: {", ".join(close)}?' if close else ''
    raise ValueError(f'Task or mixture {name!r} is not registered.{hint} '
                     '`t5x list-tasks` lists them; register your own with '
                     '--module_import=my.tasks.module.') from None


def leaf_tasks(name: str) -> list:
  """The seqio tasks behind a task or mixture name (a task: itself)."""
  import seqio  # pylint: disable=g-import-not-at-top
  task = get_task(name)
  return list(task.tasks) if isinstance(task, seqio.Mixture) else [task]


def original_name(task_name: str) -> str:
  """The task a register_with_task_ids copy (`<task>:<mixture>`) was made
  from, as the task catalogue knows it; other names unchanged."""
  return task_name.split(':')[0]


def check_target_length(name: str, task_feature_lengths: Mapping[str, int]) -> None:
  """Refuses a targets length that cuts a classification task's label words.

  append_eos_after_trim would silently train the model to answer 'positiv'
  for 'positive' and every decoded prediction would then be wrong (accuracy
  0 with a falling loss), so this is checked before anything is built.
  """
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  length = task_feature_lengths.get('targets')
  for leaf in leaf_tasks(name):
    try:
      words = tasks_lib.get_label_words(original_name(leaf.name))
    except ValueError:
      continue  # not a classification task of the catalogue
    feature = leaf.output_features['targets']
    need = {w: len(feature.vocabulary.encode(w)) + int(feature.add_eos) for w in words}
    word, longest = max(need.items(), key=lambda kv: kv[1])
    if length is not None and longest > length:
      raise DataError(
          f"TASK_FEATURE_LENGTHS['targets'] is {length} but task {leaf.name!r} needs "
          f'{longest} for its label word {word!r} (with EOS); the model would learn the '
          f"cut word and no prediction would match. Give 'targets': {longest} or more.")


def check_features(name: str, features: Sequence[str], who: str) -> None:
  """Refuses a task whose examples lack a per-example feature the prompt
  module reads (e.g. `task_ids` for a prompt bank or a K-prompt projector)."""
  leaves = leaf_tasks(name)
  for feature in features:
    missing = [leaf.name for leaf in leaves if feature not in leaf.output_features]
    if missing:
      raise DataError(
          f'The prompt module {who} reads the per-example feature {feature!r}, which '
          f'{", ".join(missing)} does not carry. Train on a mixture whose examples carry it: '
          f'MIXTURE_OR_TASK_NAME = @task_ids_mixture() with task_ids_mixture.task_names '
          f'(projectors/task_tuning_multi.gin sets both from TASKS; do not also set '
          f'--gin.MIXTURE_OR_TASK_NAME).')


def feature_converter(passthrough: Sequence[str] = ()) -> Any:
  """T5X's encoder-decoder features, unpacked (a prompt is prepended to each
  example, so examples cannot share a row); `passthrough` per-example features
  (each a length-1 int32 sequence, e.g. task_ids) are carried to the batch."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  unknown = set(passthrough) - set(PROMPT_FEATURES)
  if unknown:
    raise DataError(f'Unknown per-example features {sorted(unknown)}; the model reads '
                    f'{PROMPT_FEATURES}.')
  spec = {k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for k in passthrough}
  return seqio.EncDecFeatureConverter(pack=False, passthrough_features=spec or None)


def sequence_lengths(task_feature_lengths: Mapping[str, int],
                     passthrough: Sequence[str] = ()) -> dict:
  """Task feature lengths plus length 1 for each passthrough feature."""
  return {**dict(task_feature_lengths), **{k: 1 for k in passthrough}}


def get_dataset(task_name: str, task_feature_lengths: Mapping[str, int], split: str,
                passthrough: Sequence[str] = (), in_memory_cache: bool = True,
                **kwargs: Any) -> Any:
  """What seqio.get_dataset does (the task's dataset, then our feature
  converter), with no offline cache; `in_memory_cache=False` also turns off
  seqio's in-memory cache of small datasets (the endless training stream: a
  run shorter than one epoch would drop the half-filled cache at exit, which
  TensorFlow reports with a C++ warning on the user's terminal)."""
  lengths = sequence_lengths(task_feature_lengths, passthrough)
  ds = get_task(task_name).get_dataset(lengths, split=split, use_cached=False,
                                       try_in_mem_cache=in_memory_cache, **kwargs)
  return feature_converter(passthrough)(ds, task_feature_lengths=lengths)


def model_batch(batch: Mapping[str, Any]) -> dict:
  """The arrays of a converted batch the model reads (task_ids flattened to [b])."""
  out = {k: batch[k] for k in MODEL_FEATURES if k in batch}
  for k in PROMPT_FEATURES:
    if k in batch:
      out[k] = np.asarray(batch[k]).reshape(np.shape(batch[k])[0], -1)[:, 0]
  return out


def train_dataset(task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
                  seed: int, start_step: int, split: str = 'train',
                  host_data_sharding: str = 'seqio',
                  passthrough: Sequence[str] = (),
                  group_buckets: Optional[Mapping[str, Sequence[int]]] = None
                  ) -> Iterator[dict]:
  """This host's rows of each global batch, in a fixed order from `seed`.

  Resuming at step n skips the n batches already seen, so a resumed run trains
  on exactly the batches an uninterrupted one would.
  host_data_sharding: 'seqio' (T5X's way: each host reads its own shard of the
  data) or 'slice' (every host reads the whole stream and keeps its rows of
  each global batch: the batches do not depend on the number of hosts, at the
  cost of reading everything everywhere).
  group_buckets: length buckets (resolve_buckets) to group the shuffled stream
  by (group_by_length): each batch then holds examples of one bucket. With
  'seqio' sharding each host groups its own shard, so hosts may bring rows of
  different buckets to one step (bucket_batch then takes the longest); 'slice'
  groups the global stream and keeps every global batch in one bucket.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n_hosts, host = jax.process_count(), jax.process_index()
  if batch_size % n_hosts:
    raise DataError(f'BATCH_SIZE={batch_size} is not divisible by {n_hosts} processes.')
  per_host = batch_size // n_hosts
  if host_data_sharding not in ('seqio', 'slice'):
    raise DataError(f"host_data_sharding must be 'seqio' or 'slice', got {host_data_sharding!r}")
  seqio_shard = host_data_sharding == 'seqio'
  ds = get_dataset(
      task_name, task_feature_lengths, split, passthrough, in_memory_cache=False,
      shuffle=True, num_epochs=None,
      shard_info=seqio.ShardInfo(index=host if seqio_shard else 0,
                                 num_shards=n_hosts if seqio_shard else 1),
      seed=seed)
  batch = group_by_length(group_buckets) if group_buckets else (
      lambda d, n: d.batch(n, drop_remainder=True))
  if seqio_shard:
    ds = batch(ds, per_host)
  else:
    ds = batch(ds, batch_size).map(
        lambda b: {k: v[host * per_host:(host + 1) * per_host] for k, v in b.items()})
  ds = ds.skip(start_step)
  return map(model_batch, ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator())


# ---------------------------------------------------------------------------
# Length buckets: each batch padded to the smallest bucket its rows fit in.
# ---------------------------------------------------------------------------
def resolve_buckets(length_buckets: Any, task_feature_lengths: Mapping[str, int]
                    ) -> Optional[dict]:
  """{'inputs': [lengths...], 'targets': [...]}, each ending at the feature
  length, from `train.length_buckets`: None (one shape, T5X's), 'pow2'
  (powers of two up to each feature length, from 8 for inputs and from 2
  for targets: a label word and EOS), 'pow2/N' (N buckets per doubling,
  evenly spaced: 'pow2/2' = 8, 12, 16, 24, 32, ...; 'pow2/4' = 8, 10, 12,
  14, 16, 20, ...: at most 1/(N+1) of a row is padding instead of a half,
  N times the compiles) or {'inputs': [...], 'targets': [...]} (a spec or
  a list per feature; a feature left out keeps its one length)."""
  if length_buckets is None:
    return None
  out = {}
  for feature in ('inputs', 'targets'):
    full = int(task_feature_lengths[feature])
    spec = length_buckets if isinstance(length_buckets, str) else dict(length_buckets).get(feature)
    first = 3 if feature == 'inputs' else 1   # log2 of the smallest bucket
    if spec is None:
      sizes = []
    elif isinstance(spec, str):
      per_doubling = _pow2_steps(spec)
      sizes = sorted({int(round(2 ** k * (1 + j / per_doubling)))
                      for k in range(first, 31) for j in range(per_doubling)})
      sizes = [n for n in sizes if n < full]
    else:
      sizes = sorted({int(n) for n in spec})
      if sizes and sizes[0] < 1:
        raise DataError(f'train.length_buckets[{feature!r}] has a length < 1: {sizes}.')
      sizes = [n for n in sizes if n < full]
    out[feature] = sizes + [full]
  return out


def _pow2_steps(spec: str) -> int:
  """Buckets per doubling of a 'pow2' / 'pow2/N' spec."""
  head, _, steps = spec.partition('/')
  if head == 'pow2' and (not steps or (steps.isdigit() and 1 <= int(steps) <= 16)):
    return int(steps or 1)
  raise DataError(f"train.length_buckets: {spec!r} is not a bucket spec; use 'pow2', "
                  "'pow2/N' (N buckets per doubling, 1-16) or a list of lengths, e.g. "
                  "{'inputs': [64, 128, 256]}.")


def _row_lengths(tokens: np.ndarray) -> np.ndarray:
  """Each row's columns up to its last non-padding token (0 for an empty row)."""
  nonzero = np.asarray(tokens) != 0
  last = nonzero.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
  return np.where(nonzero.any(axis=1), last, 0)


def _used_length(tokens: np.ndarray) -> int:
  """Columns up to the last non-padding token of any row (at least 1)."""
  return max(1, int(_row_lengths(tokens).max(initial=0)))


def bucket_batch(batch: Mapping[str, np.ndarray], buckets: Mapping[str, Sequence[int]],
                 cut_targets: bool = True) -> dict:
  """The batch cut to the smallest buckets that hold its longest input and
  target: only padding columns are dropped, so the loss is the same. All
  processes call it for every global batch and agree on the lengths (the
  longest row of any host's share decides), so one program runs everywhere.
  cut_targets=False keeps the decoder features whole (decoding: their length
  is how many tokens may be generated)."""
  need = np.array([_used_length(batch['encoder_input_tokens']),
                   _used_length(batch['decoder_target_tokens'])], np.int32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    need = np.asarray(multihost_utils.process_allgather(need)).reshape(-1, 2).max(axis=0)
  inputs = next(n for n in buckets['inputs'] if n >= need[0])
  targets = next(n for n in buckets['targets'] if n >= need[1])
  out = dict(batch)
  out['encoder_input_tokens'] = batch['encoder_input_tokens'][:, :inputs]
  for k in ('decoder_input_tokens', 'decoder_target_tokens') if cut_targets else ():
    out[k] = batch[k][:, :targets]
  return out


def length_order(tokens: np.ndarray, sizes: Sequence[int],
                 order: Optional[np.ndarray] = None) -> np.ndarray:
  """`order` (default: every row) stably sorted by the length bucket (one of
  `sizes`) of each row of `tokens`: batches cut from it hold rows of one
  bucket, so few are padded far (offline evaluation and inference, where the
  order of the rows does not matter)."""
  order = np.arange(len(tokens)) if order is None else np.asarray(order)
  # The smallest size >= each row's length (an empty row: the first).
  bucket = np.searchsorted(np.asarray(sizes), _row_lengths(tokens))
  return order[np.argsort(bucket[order], kind='stable')]


def group_by_length(buckets: Mapping[str, Sequence[int]]) -> Any:
  """A batching function (dataset, batch size) -> batches whose examples all
  fall in one length bucket of inputs and of targets, so bucket_batch cuts
  them to that bucket (what HF's group_by_length does with sorted mega-
  batches, here with tf.data's group_by_window, the op behind its
  bucket_by_sequence_length; that op pads, and our rows are already padded).
  Deterministic for a deterministic input, so resume-by-skip stays exact.
  A finite input's last partial batch of each bucket is dropped."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  bounds = {f: tf.constant(list(buckets[f])[:-1], tf.int32) for f in ('inputs', 'targets')}
  n_targets = len(buckets['targets'])

  def used(tokens: Any) -> Any:  # columns up to the last non-padding token
    n = tf.shape(tokens)[0] - tf.argmax(tf.cast(tf.reverse(tokens, [0]) != 0, tf.int32),
                                        output_type=tf.int32)
    return tf.where(tf.reduce_any(tokens != 0), n, 1)

  def key(ex: Any) -> Any:  # the bucket index of the inputs, then of the targets
    i = tf.reduce_sum(tf.cast(used(ex['encoder_input_tokens']) > bounds['inputs'], tf.int32))
    t = tf.reduce_sum(tf.cast(used(ex['decoder_target_tokens']) > bounds['targets'], tf.int32))
    return tf.cast(i * n_targets + t, tf.int64)

  def batch(ds: Any, size: int) -> Any:
    return ds.group_by_window(key_func=key, window_size=size,
                              reduce_func=lambda _, w: w.batch(size, drop_remainder=True))
  return batch


def first_examples(task_name: str, task_feature_lengths: Mapping[str, int],
                   num_examples: int, split: str = 'validation') -> dict:
  """The first examples of a split as one batch of model features."""
  ds = get_dataset(task_name, task_feature_lengths, split, shuffle=False, num_epochs=1)
  rows = list(ds.take(num_examples).as_numpy_iterator())
  if not rows:
    raise DataError(f'Task {task_name!r} has no {split} examples.')
  return {k: np.stack([r[k] for r in rows]) for k in MODEL_FEATURES}


def build_evaluator(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                    split: str = 'validation', num_examples: Optional[int] = None,
                    seed: int = 42, passthrough: Sequence[str] = ()) -> Any:
  """seqio's Evaluator over the task (or every task of a mixture)."""
  import seqio  # pylint: disable=g-import-not-at-top
  check_target_length(mixture_or_task_name, task_feature_lengths)
  return seqio.Evaluator(
      mixture_or_task_name=mixture_or_task_name,
      feature_converter=feature_converter(passthrough),
      eval_split=split, sequence_length=sequence_lengths(task_feature_lengths, passthrough),
      num_examples=num_examples, seed=seed, logger_cls=(),
      async_compute_metrics=False)


# ---------------------------------------------------------------------------
# Per-example task ids.
# ---------------------------------------------------------------------------
def add_task_id(task_id: int) -> Any:
  """A seqio preprocessor adding `task_ids` = [task_id] to every example."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def preprocess(dataset: Any) -> Any:
    return dataset.map(lambda ex: {**ex, TASK_IDS: tf.constant([task_id], tf.int32)},
                       num_parallel_calls=tf.data.AUTOTUNE)
  return preprocess


def register_with_task_ids(name: str, task_names: Sequence[str],
                           rates: Optional[Sequence[float]] = None) -> str:
  """Registers a mixture `name` of copies of `task_names` whose examples carry
  `task_ids` = the task's position in the list (for a prompt bank or any
  per-example prompt module). The copies are named `<task>:<name>`. Returns
  the mixture's name; registering the same name again is a no-op.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  if name in seqio.MixtureRegistry.names():
    return name
  # An output feature, so mixtures keep it (they drop every other key); no
  # vocabulary or EOS: the id passes through as a length-1 int32 sequence.
  id_feature = seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False,
                             required=False)
  copies = []
  for k, task_name in enumerate(task_names):
    task = get_task(task_name)
    if isinstance(task, seqio.Mixture):
      raise DataError(f'{task_name!r} is a mixture; give its tasks.')
    copy = f'{task_name}:{name}'
    if copy not in seqio.TaskRegistry.names():
      seqio.TaskRegistry.add(
          copy, source=task.source,
          output_features={**task.output_features, TASK_IDS: id_feature},
          preprocessors=list(task.preprocessors) + [add_task_id(k)],
          postprocess_fn=task.postprocessor, metric_objs=list(task.metric_objs),
          shuffle_buffer_size=task.shuffle_buffer_size)
    copies.append(copy)
  rates = list(rates) if rates is not None else [1.0] * len(copies)
  seqio.MixtureRegistry.add(name, list(zip(copies, rates)))
  _TASK_ID_ORDER[name] = list(task_names)
  return name


# Mixture name -> its tasks by id (seqio lists a mixture's tasks sorted by name).
_TASK_ID_ORDER: dict = {}


def tasks_by_id(name: str) -> Optional[list]:
  """The tasks of a register_with_task_ids mixture, task id K at position K;
  None for any other name."""
  return _TASK_ID_ORDER.get(name)
