"""Many prompts, one frozen model: a prompt bank built from a prompt library,
and evaluation / inference whose batches mix tasks.

Prompt tuning's practical promise (Lester et al. 2021, section 5): the frozen
model is shared, each example carries its own small prompt, so one batch can
serve several tasks. `load_bank` turns a prompt library (run folders, numpy
files, sidecars) into one model whose `PromptBank` (prompts/bank.py) holds K
prompts [K, L, d]; each example selects its prompt by `task_ids`.
`mixed_outputs` runs every task of a seqio Evaluator through that model in
batches that mix tasks (one compiled program per batch shape, not per task)
and hands each task's outputs back to seqio, so metrics and predictions are
those of running each task alone with its own prompt.

Entry points: `t5x eval` / `t5x infer` with PROMPT_LIBRARY (training/
evaluation.py) and `t5x serve` (serve.py).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from prompt_transfer.analysis import library
from prompt_transfer.model.models import EncoderDecoderModel, Params, build_model
from prompt_transfer.prompts import files
from prompt_transfer.prompts.bank import TASK_IDS, PromptBank, bank_params
from prompt_transfer.training import data

RANK_SUFFIX = '_rank'  # tasks.rank's twins score label words with the base task's prompt


@dataclasses.dataclass
class Bank:
  """A frozen model with K prompts; prompt id k is `names[k]`.

  capacity >= K rows are compiled for (spare rows are 1-row zero prompts), so
  adding prompts up to capacity does not change any shape.
  """
  model: EncoderDecoderModel
  params: Params  # frozen weights + the bank, on the device
  names: List[str]
  infos: List[files.PromptInfo]
  sources: List[str]
  weights: str  # fingerprint of the frozen weights

  def id_of(self, name: str) -> int:
    try:
      return self.names.index(name)
    except ValueError:
      raise KeyError(f'No prompt named {name!r}; the bank has {self.names}.') from None

  def prompt_for_task(self, task_name: str) -> int:
    """The id of the prompt whose sidecar names `task_name` (or the task a
    rank twin or task-id copy was made from)."""
    base = data.original_name(task_name)
    wanted = [base, base[:-len(RANK_SUFFIX)] if base.endswith(RANK_SUFFIX) else None]
    for want in filter(None, wanted):
      hits = [k for k, info in enumerate(self.infos) if info.task == want]
      if len(hits) > 1:
        raise library.IncompatiblePromptError(
            f'Several prompts are for task {want}: '
            f'{[self.sources[k] for k in hits]}; keep one in the library.')
      if hits:
        return hits[0]
    raise KeyError(task_name)


def _capacity(k: int) -> int:
  return 1 << max(0, (k - 1).bit_length())


def bank_model(config: Any, prompts: Sequence[np.ndarray], frozen: Params,
               vocabulary: Any = None, capacity: Optional[int] = None
               ) -> Tuple[EncoderDecoderModel, Params]:
  """(model with a PromptBank, params on the device) for prompts [l_k, d]."""
  capacity = max(capacity or _capacity(len(prompts)), len(prompts))
  width = config.emb_dim
  spare = [np.zeros((1, width), np.float32)] * (capacity - len(prompts))
  bank, lengths = bank_params(list(prompts) + spare)
  factory = functools.partial(PromptBank, num_prompts=capacity,
                              length=bank['prompts'].shape[1], lengths=lengths)
  model = build_model(config, factory, vocabulary=vocabulary)
  params = {**frozen, 'encoder': {**frozen['encoder'], 'prompt': {'prompt': bank}}}
  return model, jax.device_put(params)


def load_bank(prompts: Any, config: Any, frozen: Params, vocabulary: Any = None,
              step: Optional[int] = None, capacity: Optional[int] = None) -> Bank:
  """A Bank of every prompt found in `prompts` (paths, or a {name: (array,
  PromptInfo)} library), each checked against the model: dimensions and
  vocabulary (library.check_compatible) and frozen weights (a prompt trained
  on another checkpoint of the same shape is refused: serving it would be
  silently wrong)."""
  lib = prompts if isinstance(prompts, Mapping) else library.load_library(prompts, step)
  paths = ({} if isinstance(prompts, Mapping)
           else library.find_prompt_files(prompts, step))
  weights = files.weights_fingerprint(frozen['token_embedder']['embedding'])
  names, arrays, infos, sources = [], [], [], []
  for name, (array, info) in lib.items():
    source = paths.get(name, name)
    check_prompt(name, array, info, config, weights, vocabulary, source)
    names.append(name)
    arrays.append(array)
    infos.append(info)
    sources.append(os.fspath(source))
  model, params = bank_model(config, arrays, frozen, vocabulary, capacity)
  return Bank(model, params, names, infos, sources, weights)


def check_prompt(name: str, array: np.ndarray, info: files.PromptInfo, config: Any,
                 weights: str, vocabulary: Any = None, source: str = '') -> None:
  """Raises IncompatiblePromptError if the prompt was made for another model."""
  library.check_compatible(info, config, vocabulary, array, name=source or name)
  if info.weights and info.weights != weights:
    raise library.IncompatiblePromptError(
        f'Prompt {source or name!r} was trained on frozen weights {info.weights}; this '
        f'model has weights {weights} (same dimensions, another checkpoint).')


# ---------------------------------------------------------------------------
# Mixed-task batches.
# ---------------------------------------------------------------------------
def _task_rows(ds: Any, task_id: int) -> Dict[str, np.ndarray]:
  """Every example of an enumerated converted dataset as arrays, with its
  seqio index (`_idx`) and its prompt id."""
  parts: Dict[str, list] = {}
  for idx, ex in ds.batch(1024).as_numpy_iterator():
    batch = data.model_batch(ex)
    batch['_idx'] = np.asarray(idx)
    for k, v in batch.items():
      parts.setdefault(k, []).append(v)
  rows = {k: np.concatenate(v) for k, v in parts.items()}
  rows[TASK_IDS] = np.full(len(rows['_idx']), task_id, np.int32)
  return rows


def run_mixed(fn: Callable[[dict], np.ndarray], tasks: Mapping[str, Dict[str, np.ndarray]],
              batch_size: int, seed: int = 0, buckets: Optional[Mapping[str, Any]] = None,
              cut_targets: bool = True) -> Dict[str, list]:
  """fn over the rows of all tasks shuffled together in batches of
  `batch_size` (the last one padded) -> {task: [(idx, output), ...]} in seqio
  index order. Shuffling makes every batch a mix of tasks, as a server sees.
  With length buckets the shuffled rows are grouped by bucket (tasks still
  mix within one) and each batch is cut to its bucket (cut_targets: as
  data.bucket_batch; False when decoding)."""
  names = list(tasks)
  keys = sorted({k for rows in tasks.values() for k in rows})
  merged = {k: np.concatenate([tasks[n][k] for n in names]) for k in keys}
  owner = np.concatenate([np.full(len(tasks[n]['_idx']), i) for i, n in enumerate(names)])
  order = np.random.RandomState(seed).permutation(len(owner))
  if buckets:
    order = data.length_order(merged['encoder_input_tokens'], buckets['inputs'], order)
  out: Dict[str, list] = {n: [] for n in names}
  for start in range(0, len(order), batch_size):
    take = order[start:start + batch_size]
    n = len(take)
    if n < batch_size:  # one shape for every batch: pad with copies of the first row
      take = np.concatenate([take, np.repeat(take[:1], batch_size - n)])
    batch = {k: v[take] for k, v in merged.items() if k != '_idx'}
    if buckets:
      batch = data.bucket_batch(batch, buckets, cut_targets)
    result = np.asarray(fn(batch))
    for row, i in enumerate(take[:n]):
      out[names[owner[i]]].append((int(merged['_idx'][i]), result[row]))
  return {n: sorted(v, key=lambda p: p[0]) for n, v in out.items()}


def _needs(task: Any) -> Tuple[bool, bool]:
  """(decoded predictions, scores) the task's metrics need."""
  return bool(task.predict_metric_fns) or not task.score_metric_fns, bool(
      task.score_metric_fns)


@dataclasses.dataclass
class MixedOutputs:
  """Each task's outputs, looked up by the dataset seqio passes to its model
  functions (seqio.Evaluator hands `cached_model_datasets[task]` itself)."""
  predictions: Dict[str, list]
  scores: Dict[str, list]
  by_dataset: Dict[int, str]

  def predict_fn(self, ds: Any) -> list:
    return [(i, [int(t) for t in row]) for i, row in self.predictions[self.by_dataset[id(ds)]]]

  def score_fn(self, ds: Any) -> list:
    return [(i, float(s)) for i, s in self.scores[self.by_dataset[id(ds)]]]


def mixed_outputs(evaluator: Any, bank: Bank, batch_size: int, num_decodes: int = 1,
                  seed: int = 0, buckets: Optional[Mapping[str, Any]] = None) -> MixedOutputs:
  """Decodes / scores every task of `evaluator` with its own prompt from
  `bank`, in batches that mix the tasks (grouped by length bucket if given)."""
  task_ids, missing = {}, []
  for task in evaluator.eval_tasks:
    try:
      task_ids[task.name] = bank.prompt_for_task(task.name)
    except KeyError:
      missing.append(task.name)
  if missing:
    have = ', '.join(f'{n} (task {i.task or "?"})' for n, i in zip(bank.names, bank.infos))
    raise library.IncompatiblePromptError(
        f'No prompt in the library is for {missing}; each task needs a prompt whose '
        f'prompt_info.json names it. The library has: {have}.')
  datasets = evaluator.cached_model_datasets
  to_predict, to_score = {}, {}
  for task in evaluator.eval_tasks:
    rows = _task_rows(datasets[task.name], task_ids[task.name])
    predict, score = _needs(task)
    if predict:
      to_predict[task.name] = rows
    if score:
      to_score[task.name] = rows
  model, params = bank.model, bank.params
  predictions = run_mixed(lambda b: model.predict_batch(params, b, num_decodes=num_decodes),
                          to_predict, batch_size, seed, buckets,
                          cut_targets=False) if to_predict else {}
  scores = run_mixed(lambda b: model.score_batch(params, b), to_score, batch_size,
                     seed, buckets) if to_score else {}
  by_dataset = {id(datasets[t.name]): t.name for t in evaluator.eval_tasks}
  return MixedOutputs(predictions, scores, by_dataset)
