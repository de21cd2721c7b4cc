"""Evaluation and inference over seqio tasks with the task's own metrics.

seqio's `Evaluator` owns the data and the metrics (decode-mode `metric_fns`
and rank-classification `score_metric_fns`); this module supplies the model
functions it calls, batched at one fixed shape so nothing recompiles (or,
with LENGTH_BUCKETS, rows grouped by length and one compile per bucket).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple

import gin
import jax
import numpy as np
from etils import epath

from prompt_transfer import fileio
from prompt_transfer.model.config import ConfigError
from prompt_transfer.model.models import EncoderDecoderModel, Params
from prompt_transfer.training import data


def _by_length(ds: Any, batch_size: int, buckets: Mapping[str, Any]
               ) -> Iterable[Tuple[np.ndarray, dict]]:
  """The enumerated dataset's rows in batches of one length bucket each (the
  Evaluator holds its datasets in memory already; outputs go by index)."""
  parts: dict = {}
  for idx, ex in ds.batch(1024).as_numpy_iterator():
    for k, v in {'_idx': idx, **data.model_batch(ex)}.items():
      parts.setdefault(k, []).append(np.asarray(v))
  rows = {k: np.concatenate(v) for k, v in parts.items()}
  if not parts:
    return
  order = data.length_order(rows['encoder_input_tokens'], buckets['inputs'])
  for start in range(0, len(order), batch_size):
    take = order[start:start + batch_size]
    yield rows['_idx'][take], {k: v[take] for k, v in rows.items() if k != '_idx'}


def iterate_padded_batches(ds: Any, batch_size: int,
                           buckets: Optional[Mapping[str, Any]] = None
                           ) -> Iterable[Tuple[np.ndarray, dict, int]]:
  """(indices, numpy batch, number of real rows) from an enumerated tf.data set.

  The last batch is padded with copies of its first row so every batch has the
  same shape (one compilation); padded rows are dropped by the caller. With
  length buckets the rows come grouped by bucket (then cut by the caller).
  """
  batches = _by_length(ds, batch_size, buckets) if buckets else (
      (idx, data.model_batch(ex)) for idx, ex in ds.batch(batch_size).as_numpy_iterator())
  for idx, batch in batches:
    n = len(idx)
    if n < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, 0)]) for k, v in
               batch.items()}
    yield idx, batch, n


def _eval_buckets(buckets: Optional[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
  """Length buckets for evaluation: one process only (several processes
  would have to agree on every batch's bucket in lockstep; they keep one shape)."""
  return buckets if buckets and jax.process_count() == 1 else None


def make_predict_fn(model: EncoderDecoderModel, params: Params, batch_size: int,
                    num_decodes: int = 1, buckets: Optional[Mapping[str, Any]] = None
                    ) -> Callable[[Any], list]:
  """Greedy / beam decoding of an enumerated dataset; with length buckets the
  encoder input is cut to its bucket (one compile per bucket), the decoding
  length stays the targets length."""
  buckets = _eval_buckets(buckets)

  def predict_fn(ds: Any) -> list:
    out = []
    for idx, batch, n in iterate_padded_batches(ds, batch_size, buckets):
      if buckets:
        batch = data.bucket_batch(batch, buckets, cut_targets=False)
      tokens = np.asarray(model.predict_batch(params, batch, num_decodes=num_decodes))
      out.extend((int(i), [int(t) for t in row]) for i, row in zip(idx, tokens[:n]))
    return out
  return predict_fn


def make_score_fn(model: EncoderDecoderModel, params: Params, batch_size: int,
                  buckets: Optional[Mapping[str, Any]] = None) -> Callable[[Any], list]:
  buckets = _eval_buckets(buckets)

  def score_fn(ds: Any) -> list:
    out = []
    for idx, batch, n in iterate_padded_batches(ds, batch_size, buckets):
      if buckets:
        batch = data.bucket_batch(batch, buckets)
      scores = np.asarray(model.score_batch(params, batch))
      out.extend((int(i), float(s)) for i, s in zip(idx, scores[:n]))
    return out
  return score_fn


def run_evaluation(evaluator: Any, model: EncoderDecoderModel, params: Params,
                   batch_size: int, step: Optional[int] = None, outputs: Any = None,
                   buckets: Optional[Mapping[str, Any]] = None) -> dict:
  """Runs the task metrics -> {'task/metric': value} (floats). outputs: the
  model outputs already computed (many_prompts.MixedOutputs), else the model
  runs task by task."""
  future, _ = evaluator.evaluate(
      compute_metrics=True, step=step,
      predict_fn=outputs.predict_fn if outputs else make_predict_fn(model, params, batch_size,
                                                                    buckets=buckets),
      score_fn=outputs.score_fn if outputs else make_score_fn(model, params, batch_size, buckets))
  results = future.result() if hasattr(future, 'result') else future
  flat = {}
  for task, metrics in (results or {}).items():
    for name, value in metrics.items():
      value = getattr(value, 'value', value)  # seqio.metrics.Scalar
      try:
        flat[f'{task}/{name}'] = float(value)
      except (TypeError, ValueError):
        continue
  return flat


def _is_rank_task(task: Any) -> bool:
  """A rank-classification twin: scored candidates, nothing to decode."""
  return bool(getattr(task, 'score_metric_fns', None)) and not task.predict_metric_fns


def write_predictions(path: str, evaluator: Any, model: EncoderDecoderModel,
                      params: Params, batch_size: int, num_decodes: int = 1,
                      outputs: Any = None, buckets: Optional[Mapping[str, Any]] = None) -> int:
  """Writes JSON lines {task, inputs, targets, prediction}, one per example.

  Generation tasks are decoded. Rank twins (`<task>_rank`) are scored instead:
  one line per original example (not per candidate row) whose prediction is
  the best-scoring label word, with every candidate's log-likelihood.
  outputs: precomputed model outputs (many_prompts.MixedOutputs).
  """
  predict_fn = outputs.predict_fn if outputs else make_predict_fn(model, params, batch_size,
                                                                  num_decodes, buckets)
  score_fn = outputs.score_fn if outputs else make_score_fn(model, params, batch_size, buckets)
  lines = []
  for task in evaluator.eval_tasks:
    ds = evaluator.cached_model_datasets[task.name]
    vocab = task.output_features['targets'].vocabulary
    inputs_vocab = task.output_features['inputs'].vocabulary
    rows = evaluator.cached_task_datasets[task.name].as_numpy_iterator()
    if _is_rank_task(task):
      scores = dict(score_fn(ds))
      examples: dict = {}  # idx -> line, in first-seen order
      for i, ex in enumerate(rows):
        line = examples.setdefault(int(ex['idx']), {
            'task': task.name, 'inputs': inputs_vocab.decode(_strip(ex['inputs'])),
            'targets': _text(ex['gold_targets']), 'prediction': None, 'scores': {}})
        word = vocab.decode(_strip(ex['targets']))
        line['scores'][word] = scores[i]
        if line['prediction'] is None or scores[i] > line['scores'][line['prediction']]:
          line['prediction'] = word  # ties: the first candidate, as the metric does
      for line in examples.values():
        lines.append(json.dumps(line))
      continue
    preds = dict(predict_fn(ds))
    for i, ex in enumerate(rows):
      lines.append(json.dumps({
          'task': task.name,
          'inputs': inputs_vocab.decode(_strip(ex['inputs'])),
          'targets': vocab.decode(_strip(ex['targets'])),
          'prediction': vocab.decode(_strip(preds[i])),
      }))
  fileio.makedirs_for(path)
  fileio.atomic_write_text(path, ''.join(l + '\n' for l in lines))
  return len(lines)


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _strip(tokens: Sequence[int]) -> list:
  """Tokens before the first EOS, without padding."""
  out = []
  for t in tokens:
    t = int(t)
    if t == 1:
      break
    if t:
      out.append(t)
  return out


@dataclasses.dataclass
class StepEvaluator:
  """Evaluation during training: the task's metrics on the stage's model."""
  evaluator: Any
  batch_size: int
  buckets: Optional[Mapping[str, Any]] = None   # the run's length buckets

  @classmethod
  def create(cls, eval_period: Optional[int], task_name: str,
             task_feature_lengths: Mapping[str, int], split: str,
             num_examples: Optional[int], batch_size: int,
             passthrough: Sequence[str] = (),
             buckets: Optional[Mapping[str, Any]] = None) -> Optional['StepEvaluator']:
    if not eval_period:
      return None
    return cls(data.build_evaluator(task_name, task_feature_lengths, split, num_examples,
                                    passthrough=passthrough), batch_size, buckets)

  def __call__(self, setup: Any, step: int, prefix: str = 'eval', label: str = '') -> dict:
    """{'eval/task/metric': value} of the set-up's model and state at `step`
    (`prefix` instead of 'eval'; `label` names the model in the log line)."""
    from prompt_transfer.training.logger import log  # pylint: disable=g-import-not-at-top
    from prompt_transfer.training.state import merge_params  # pylint: disable=g-import-not-at-top
    params = merge_params(setup.state['trainable'], setup.frozen)
    results = run_evaluation(self.evaluator, setup.model, params, self.batch_size, step,
                             buckets=self.buckets)
    log(f'eval at step {step}{" on the " + label if label else ""}: ' +
        ', '.join(f'{k} {v:.4g}' for k, v in sorted(results.items())))
    return {f'{prefix}/{k}': v for k, v in results.items()}


# ---------------------------------------------------------------------------
# Entry points of `t5x eval` and `t5x infer`.
# ---------------------------------------------------------------------------
def load_prompted_model(prompt_file: Optional[str], model_dir: Optional[str] = None,
                        checkpoint_path: Optional[str] = None, model_seed: int = 0,
                        config: Any = None, vocabulary: Any = None
                        ) -> Tuple[EncoderDecoderModel, Params, str]:
  """(model, full params on the device, where the prompt came from).

  The prompt is read as the encoder sees it: PROMPT_FILE, else MODEL_DIR's
  latest `encoder.prompt.prompt.prompt` (which every run writes, whatever its
  prompt module), as a free prompt of the file's length; its sidecar must
  name a model of the configured dimensions. Neither: the plain model.
  """
  from prompt_transfer.analysis import library  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.models import build_model  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.pretrained import load_frozen_params  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts import files  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.free import free_prompt  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.initializers import from_array  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import configurables  # pylint: disable=g-import-not-at-top
  config = config or configurables.model_config()
  if not prompt_file and model_dir:
    prompt_file = files.prompt_file(model_dir)
  prompt_module = None
  info = None
  if prompt_file:
    array = files.load_prompt_file(prompt_file)
    info = files.load_prompt_info(prompt_file) or files.PromptInfo(prompt_length=array.shape[0])
    library.check_compatible(info, config, vocabulary, array, name=os.fspath(prompt_file))
    prompt_module = free_prompt(array.shape[0], from_array(array))
  model = build_model(config, prompt_module, vocabulary=vocabulary)
  params = load_frozen_params(config, checkpoint_path, model_seed)
  if info is not None:
    warning = library.other_weights_warning(
        info, config, files.weights_fingerprint(params['token_embedder']['embedding']),
        os.fspath(prompt_file))
    if warning:
      from prompt_transfer.training.checkpoints import log_warning  # pylint: disable=g-import-not-at-top
      log_warning(warning)
  if prompt_module is not None:
    params = model.init_prompt(jax.random.PRNGKey(0), params)
  # On the device once, not re-sent with every batch.
  return model, jax.device_put(params), os.fspath(prompt_file) if prompt_file else '(no prompt)'


@gin.configurable
def evaluate(model_dir: Optional[str] = None, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
             prompt_file: Optional[str] = None, checkpoint_path: Optional[str] = None,
             split: str = 'validation', batch_size: int = 32,
             num_examples: Optional[int] = None, model_seed: int = 0,
             output_file: Optional[str] = None, allow_no_prompt: bool = False,
             prompt_library: Any = None, length_buckets: Any = None) -> dict:
  """Evaluates a prompt (PROMPT_FILE, or MODEL_DIR's latest numpy checkpoint;
  neither: an error unless allow_no_prompt, the frozen model's zero-shot score).
  With PROMPT_LIBRARY (folders or files of prompts), every task of the mixture
  is evaluated with the library's prompt for it, in batches mixing the tasks.

  Prints and returns {'task/metric': value}; writes it as JSON to output_file
  (default MODEL_DIR/eval_<split>.json).
  """
  if prompt_library:
    return _evaluate_library(prompt_library, mixture_or_task_name, task_feature_lengths,
                             checkpoint_path, split, batch_size, num_examples, model_seed,
                             output_file, model_dir or prompt_file,
                             data.resolve_buckets(length_buckets, task_feature_lengths))
  if not (model_dir or prompt_file or allow_no_prompt):
    raise FileNotFoundError(
        't5x eval needs a prompt: --gin.MODEL_DIR=\\"/run\\" (its latest numpy checkpoint) or '
        '--gin.PROMPT_FILE=\\"/path/encoder.prompt.prompt.prompt\\"; '
        '--gin.evaluate.allow_no_prompt=True evaluates the frozen model alone.')
  task = data.get_task(mixture_or_task_name)
  model, params, source = load_prompted_model(
      prompt_file, model_dir, checkpoint_path, model_seed,
      vocabulary=task.output_features['targets'].vocabulary)
  evaluator = data.build_evaluator(task.name, task_feature_lengths, split, num_examples)
  results = run_evaluation(evaluator, model, params, batch_size,
                           buckets=data.resolve_buckets(length_buckets, task_feature_lengths))
  print(f'[prompt-transfer] eval of {source} on {task.name} ({split}): ' +
        ', '.join(f'{k} {v:.4g}' for k, v in sorted(results.items())), flush=True)
  output_file = output_file or (os.fspath(epath.Path(model_dir) / f'eval_{split}.json')
                                if model_dir else None)
  if output_file:
    fileio.makedirs_for(output_file)
    fileio.atomic_write_text(output_file, json.dumps(
        {'prompt': source, 'task': task.name, 'split': split, 'metrics': results}, indent=1))
  return results


@gin.configurable
def infer(model_dir: Optional[str] = None, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          prompt_file: Optional[str] = None, checkpoint_path: Optional[str] = None,
          split: str = 'validation', batch_size: int = 32, num_decodes: int = 1,
          num_examples: Optional[int] = None, model_seed: int = 0,
          output_file: Optional[str] = None, prompt_library: Any = None,
          length_buckets: Any = None) -> str:
  """Decodes a split and writes JSON lines {task, inputs, targets, prediction}.
  With PROMPT_LIBRARY: every task of the mixture with its own prompt from the
  library, in batches mixing the tasks."""
  if prompt_library:
    if model_dir or prompt_file:
      raise ConfigError('PROMPT_LIBRARY names the prompts; leave MODEL_DIR and PROMPT_FILE unset.')
    task = data.get_task(mixture_or_task_name)
    bank = _library_bank(prompt_library, checkpoint_path, model_seed,
                         task.output_features['targets'].vocabulary)
    evaluator = data.build_evaluator(task.name, task_feature_lengths, split, num_examples)
    from prompt_transfer import many_prompts  # pylint: disable=g-import-not-at-top
    outputs = many_prompts.mixed_outputs(
        evaluator, bank, batch_size, num_decodes,
        buckets=_eval_buckets(data.resolve_buckets(length_buckets, task_feature_lengths)))
    output_file = output_file or f'predictions_{split}.jsonl'
    n = write_predictions(output_file, evaluator, bank.model, bank.params, batch_size,
                          num_decodes, outputs)
    print(f'[prompt-transfer] wrote {n} predictions of {len(evaluator.eval_tasks)} tasks '
          f'({len(bank.names)} prompts, mixed batches) to {output_file}', flush=True)
    return output_file
  task = data.get_task(mixture_or_task_name)
  model, params, _ = load_prompted_model(
      prompt_file, model_dir, checkpoint_path, model_seed,
      vocabulary=task.output_features['targets'].vocabulary)
  evaluator = data.build_evaluator(task.name, task_feature_lengths, split, num_examples)
  output_file = output_file or os.fspath(epath.Path(model_dir or '.') /
                                         f'predictions_{split}.jsonl')
  n = write_predictions(output_file, evaluator, model, params, batch_size, num_decodes,
                        buckets=data.resolve_buckets(length_buckets, task_feature_lengths))
  print(f'[prompt-transfer] wrote {n} predictions to {output_file}', flush=True)
  return output_file


def _library_bank(prompt_library: Any, checkpoint_path: Optional[str], model_seed: int,
                  vocabulary: Any) -> Any:
  from prompt_transfer import many_prompts  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.pretrained import load_frozen_params  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import configurables  # pylint: disable=g-import-not-at-top
  config = configurables.model_config()
  paths = [prompt_library] if isinstance(prompt_library, str) else list(prompt_library)
  frozen = load_frozen_params(config, checkpoint_path, model_seed)
  return many_prompts.load_bank(paths, config, frozen, vocabulary)


def _evaluate_library(prompt_library: Any, mixture_or_task_name: str,
                      task_feature_lengths: Mapping[str, int], checkpoint_path: Optional[str],
                      split: str, batch_size: int, num_examples: Optional[int],
                      model_seed: int, output_file: Optional[str], single: Any,
                      buckets: Optional[Mapping[str, Any]] = None) -> dict:
  """`t5x eval` with PROMPT_LIBRARY: each task with its own prompt, mixed batches."""
  if single:
    raise ConfigError('PROMPT_LIBRARY names the prompts; leave MODEL_DIR and PROMPT_FILE unset.')
  from prompt_transfer import many_prompts  # pylint: disable=g-import-not-at-top
  task = data.get_task(mixture_or_task_name)
  bank = _library_bank(prompt_library, checkpoint_path, model_seed,
                       task.output_features['targets'].vocabulary)
  evaluator = data.build_evaluator(task.name, task_feature_lengths, split, num_examples)
  outputs = many_prompts.mixed_outputs(evaluator, bank, batch_size,
                                       buckets=_eval_buckets(buckets))
  results = run_evaluation(evaluator, bank.model, bank.params, batch_size, outputs=outputs)
  used = {t.name: bank.sources[bank.prompt_for_task(t.name)] for t in evaluator.eval_tasks}
  print(f'[prompt-transfer] eval of {len(used)} tasks, each with its own prompt, in mixed '
        f'batches ({split}): ' + ', '.join(f'{k} {v:.4g}' for k, v in sorted(results.items())),
        flush=True)
  if output_file:
    fileio.makedirs_for(output_file)
    fileio.atomic_write_text(output_file, json.dumps(
        {'prompts': used, 'task': task.name, 'split': split, 'metrics': results}, indent=1))
  return results
