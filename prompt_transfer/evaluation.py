"""Evaluation and inference over seqio tasks with the task's own metrics.

seqio's `Evaluator` owns the data and the metrics (decode-mode `metric_fns`
and rank-classification `score_metric_fns`); this module supplies the model
functions it calls, batched at one fixed shape so nothing recompiles.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple

import gin
import jax
import numpy as np

from prompt_transfer.models import EncoderDecoderModel, Params

MODEL_KEYS = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens')


def iterate_padded_batches(ds: Any, batch_size: int) -> Iterable[Tuple[np.ndarray, dict, int]]:
  """(indices, numpy batch, number of real rows) from an enumerated tf.data set.

  The last batch is padded with copies of its first row so every batch has the
  same shape (one compilation); padded rows are dropped by the caller.
  """
  for idx, ex in ds.batch(batch_size).as_numpy_iterator():
    n = len(idx)
    batch = {k: ex[k] for k in MODEL_KEYS if k in ex}
    if n < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, 0)]) for k, v in
               batch.items()}
    yield idx, batch, n


def make_predict_fn(model: EncoderDecoderModel, params: Params, batch_size: int,
                    num_decodes: int = 1) -> Callable[[Any], list]:
  def predict_fn(ds: Any) -> list:
    out = []
    for idx, batch, n in iterate_padded_batches(ds, batch_size):
      tokens = np.asarray(model.predict_batch(params, batch, num_decodes=num_decodes))
      out.extend((int(i), [int(t) for t in row]) for i, row in zip(idx, tokens[:n]))
    return out
  return predict_fn


def make_score_fn(model: EncoderDecoderModel, params: Params, batch_size: int
                  ) -> Callable[[Any], list]:
  def score_fn(ds: Any) -> list:
    out = []
    for idx, batch, n in iterate_padded_batches(ds, batch_size):
      scores = np.asarray(model.score_batch(params, batch))
      out.extend((int(i), float(s)) for i, s in zip(idx, scores[:n]))
    return out
  return score_fn


def build_evaluator(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                    split: str = 'validation', num_examples: Optional[int] = None,
                    seed: int = 42) -> Any:
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.Evaluator(
      mixture_or_task_name=mixture_or_task_name,
      feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split=split, sequence_length=dict(task_feature_lengths),
      num_examples=num_examples, seed=seed, logger_cls=(),
      async_compute_metrics=False)


def run_evaluation(evaluator: Any, model: EncoderDecoderModel, params: Params,
                   batch_size: int, step: Optional[int] = None) -> dict:
  """Runs the task metrics -> {'task/metric': value} (floats)."""
  future, _ = evaluator.evaluate(
      compute_metrics=True, step=step,
      predict_fn=make_predict_fn(model, params, batch_size),
      score_fn=make_score_fn(model, params, batch_size))
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
                      params: Params, batch_size: int, num_decodes: int = 1) -> int:
  """Writes JSON lines {task, inputs, targets, prediction}, one per example.

  Generation tasks are decoded. Rank twins (`<task>_rank`) are scored instead:
  one line per original example (not per candidate row) whose prediction is
  the best-scoring label word, with every candidate's log-likelihood.
  """
  written = 0
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    for task in evaluator.eval_tasks:
      ds = evaluator.cached_model_datasets[task.name]
      vocab = task.output_features['targets'].vocabulary
      inputs_vocab = task.output_features['inputs'].vocabulary
      rows = evaluator.cached_task_datasets[task.name].as_numpy_iterator()
      if _is_rank_task(task):
        scores = dict(make_score_fn(model, params, batch_size)(ds))
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
          f.write(json.dumps(line) + '\n')
        written += len(examples)
        continue
      preds = dict(make_predict_fn(model, params, batch_size, num_decodes)(ds))
      for i, ex in enumerate(rows):
        f.write(json.dumps({
            'task': task.name,
            'inputs': inputs_vocab.decode(_strip(ex['inputs'])),
            'targets': vocab.decode(_strip(ex['targets'])),
            'prediction': vocab.decode(_strip(preds[i])),
        }) + '\n')
        written += 1
  os.replace(tmp, path)
  return written


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


# ---------------------------------------------------------------------------
# Entry points of `t5x eval` and `t5x infer`.
# ---------------------------------------------------------------------------
def _load_for_eval(model_dir: Optional[str], prompt_file: Optional[str], task_name: str,
                   checkpoint_path: Optional[str], model_seed: int
                   ) -> Tuple[EncoderDecoderModel, Params, Any, str]:
  """(model, full params, task, where the prompt came from)."""
  from prompt_transfer import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from prompt_transfer import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  from prompt_transfer import trainer  # pylint: disable=g-import-not-at-top
  task = trainer.get_task(task_name)
  config = trainer.model_config()
  length, _ = trainer.prompt_config()
  if not prompt_file and model_dir and length:
    step = ckpt_lib.latest_numpy_step(model_dir)
    if step is None:
      raise FileNotFoundError(f'No numpy prompt checkpoint under {model_dir}/'
                              f'{ckpt_lib.NUMPY_DIR}; pass --gin.PROMPT_FILE=... instead.')
    prompt_file = os.path.join(ckpt_lib.numpy_checkpoint_dir(model_dir, step),
                               'encoder.prompt.prompt.prompt')
  init = prompts_lib.from_file(prompt_file) if (length and prompt_file) else None
  from prompt_transfer.models import build_model  # pylint: disable=g-import-not-at-top
  model = build_model(config, prompt_length=length if init else 0, prompt_init=init)
  params = trainer.load_frozen_params(model, checkpoint_path, model_seed)
  if init is not None:
    params = model.init_prompt(jax.random.PRNGKey(0), params)
  # On the device once, not re-sent with every batch.
  params = jax.device_put(params)
  return model, params, task, prompt_file or '(no prompt)'


@gin.configurable
def evaluate(model_dir: Optional[str] = None, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
             prompt_file: Optional[str] = None, checkpoint_path: Optional[str] = None,
             split: str = 'validation', batch_size: int = 32,
             num_examples: Optional[int] = None, model_seed: int = 0,
             output_file: Optional[str] = None) -> dict:
  """Evaluates a prompt (PROMPT_FILE, or MODEL_DIR's latest numpy checkpoint).

  Prints and returns {'task/metric': value}; writes it as JSON to output_file
  (default MODEL_DIR/eval_<split>.json).
  """
  model, params, task, source = _load_for_eval(model_dir, prompt_file, mixture_or_task_name,
                                               checkpoint_path, model_seed)
  evaluator = build_evaluator(task.name, task_feature_lengths, split, num_examples)
  results = run_evaluation(evaluator, model, params, batch_size)
  print(f'[prompt-transfer] eval of {source} on {task.name} ({split}): ' +
        ', '.join(f'{k} {v:.4g}' for k, v in sorted(results.items())), flush=True)
  output_file = output_file or (os.path.join(model_dir, f'eval_{split}.json') if model_dir
                                else None)
  if output_file:
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file + '.tmp', 'w') as f:
      json.dump({'prompt': source, 'task': task.name, 'split': split, 'metrics': results}, f,
                indent=1)
    os.replace(output_file + '.tmp', output_file)
  return results


@gin.configurable
def infer(model_dir: Optional[str] = None, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          prompt_file: Optional[str] = None, checkpoint_path: Optional[str] = None,
          split: str = 'validation', batch_size: int = 32, num_decodes: int = 1,
          num_examples: Optional[int] = None, model_seed: int = 0,
          output_file: Optional[str] = None) -> str:
  """Decodes a split and writes JSON lines {task, inputs, targets, prediction}."""
  model, params, task, _ = _load_for_eval(model_dir, prompt_file, mixture_or_task_name,
                                          checkpoint_path, model_seed)
  evaluator = build_evaluator(task.name, task_feature_lengths, split, num_examples)
  output_file = output_file or os.path.join(model_dir or '.', f'predictions_{split}.jsonl')
  os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
  n = write_predictions(output_file, evaluator, model, params, batch_size, num_decodes)
  print(f'[prompt-transfer] wrote {n} predictions to {output_file}', flush=True)
  return output_file
