"""The T5X-style trainer: task -> features -> batch -> model with prompt -> loss
-> prompt update -> numpy file, all visible in `train()`.

Only the parameters matching `trainable_params` (a regex over '/'-joined
paths; `encoder/prompt/.*` for prompt tuning, `.*` for model tuning) are
differentiated and given optimizer state; the rest is frozen and passed to the
jitted step as a constant argument.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Optional, Tuple

import gin
import jax
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from prompt_transfer import checkpoints as ckpt_lib
from prompt_transfer import evaluation
from prompt_transfer import partitioning
from prompt_transfer import perf
from prompt_transfer import prompts as prompts_lib
from prompt_transfer.config import T5Config, get_config
from prompt_transfer.models import EncoderDecoderModel, Params, build_model, frozen_storage_dtype

PROMPT_PARAMS = 'encoder/prompt/.*'
RNG_IMPLS = ('threefry', 'rbg', 'unsafe_rbg')


class TrainingError(RuntimeError):
  """A run that cannot go on (NaN loss, inconsistent restore, ...)."""


# ---------------------------------------------------------------------------
# Top-level objects gin configures.
# ---------------------------------------------------------------------------
@gin.configurable
def model_config(variant: str = 't5_1_1', size: str = 'small', **overrides: Any) -> T5Config:
  """The frozen model's T5Config (see config.get_config)."""
  return get_config(variant, size, **overrides)


@dataclasses.dataclass(frozen=True)
class ClassLabelInit:
  """Placeholder resolved by the trainer: label words come from the task."""
  labels: Optional[Tuple[str, ...]] = None
  population_size: int = prompts_lib.DEFAULT_POPULATION


@gin.configurable
def class_label_init(labels: Optional[Tuple[str, ...]] = None,
                     population_size: int = prompts_lib.DEFAULT_POPULATION) -> ClassLabelInit:
  """Class-label init; labels default to the task's label words."""
  return ClassLabelInit(tuple(labels) if labels else None, population_size)


@gin.configurable
def prompt_config(length: int = 100, init: Any = None) -> Tuple[int, Any]:
  """(prompt length, initialiser). length 0: no prompt (model tuning)."""
  return length, init or prompts_lib.random_uniform()


def resolve_prompt_init(init: Any, task: Any) -> prompts_lib.PromptInit:
  if not isinstance(init, ClassLabelInit):
    return init
  labels = init.labels
  if labels is None:
    import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
    labels = tasks_lib.get_label_words(task.name)
  vocab = task.output_features['targets'].vocabulary
  return prompts_lib.from_class_labels(prompts_lib.class_label_ids(labels, vocab),
                                       prompts_lib.from_sampled_vocab(init.population_size))


# ---------------------------------------------------------------------------
# Parameter partition: trainable vs frozen.
# ---------------------------------------------------------------------------
def partition_params(params: Params, pattern: str) -> Tuple[dict, dict]:
  """Splits a tree into (trainable, frozen) nested dicts by a path regex."""
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  regex = re.compile(pattern)
  trainable = {k: v for k, v in flat.items() if regex.fullmatch(k)}
  if not trainable:
    raise TrainingError(f'No parameter matches trainable_params={pattern!r}; '
                        f'parameters are e.g. {sorted(flat)[:5]}.')
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return (traverse_util.unflatten_dict(trainable, sep='/'),
          traverse_util.unflatten_dict(frozen, sep='/'))


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
  flat = traverse_util.flatten_dict(dict(frozen), sep='/')
  flat.update(traverse_util.flatten_dict(dict(trainable), sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')


def prompt_tuning_optimizer(learning_rate: Any = 0.3) -> optax.GradientTransformation:
  """Google's prompt-tuning Adafactor: second-moment decay 0.8, no parameter
  scaling, weight decay 1e-5, update clipping 1.0 (runs/prompt_tune.gin)."""
  return optax.adafactor(learning_rate=learning_rate, decay_rate=0.8,
                         multiply_by_parameter_scale=False, weight_decay_rate=1e-5,
                         clipping_threshold=1.0)


def dropout_key(seed: int, rng_impl: str = 'threefry') -> Any:
  """The run's dropout key (step keys are fold_in(key, step)); see train's rng_impl."""
  if rng_impl not in RNG_IMPLS:
    raise TrainingError(f'rng_impl must be one of {RNG_IMPLS}; got {rng_impl!r}.')
  if rng_impl == 'threefry':
    return jax.random.PRNGKey(seed)
  return jax.random.key(seed, impl=rng_impl)


def make_train_step(model: EncoderDecoderModel, tx: optax.GradientTransformation,
                    use_dropout: bool = True) -> Callable:
  """(state, frozen, batch, dropout_rng) -> (state, metrics), not yet jitted.

  The gradient is taken w.r.t. state['trainable'] only: the frozen weights get
  neither gradients nor optimizer state.
  """
  def train_step(state, frozen, batch, dropout_rng):
    def loss_fn(trainable):
      return model.loss_fn(merge_params(trainable, frozen), batch,
                           dropout_rng if use_dropout else None)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['trainable'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['trainable'])
    trainable = optax.apply_updates(state['trainable'], updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return {'step': state['step'] + 1, 'trainable': trainable, 'opt_state': opt_state}, metrics
  return train_step


def _model_flops_step(model: EncoderDecoderModel, tx: optax.GradientTransformation,
                      use_dropout: bool, jitted_step: Callable) -> Callable:
  """The step whose FLOPs count as model FLOPs: with remat, the same step
  without it (rematerialised forward passes are not useful work, so MFU
  does not count them); otherwise the jitted step itself."""
  if not model.config.remat:
    return jitted_step
  return jax.jit(make_train_step(model.with_config(remat=False), tx, use_dropout))


# ---------------------------------------------------------------------------
# Model and data set-up.
# ---------------------------------------------------------------------------
def load_frozen_params(model: EncoderDecoderModel, checkpoint_path: Optional[str],
                       seed: int) -> Params:
  """Pretrained weights from checkpoint_path, else a seeded random model.

  A checkpoint whose shapes do not fit the configured model is refused with
  both descriptions (checkpoint_import.CheckpointMismatchError).
  """
  if not checkpoint_path:
    # Deterministic from `seed`: every run (and every resume) gets the same
    # frozen model, which is what makes prompts of tiny demo models reusable.
    plain = build_model(model.config)
    return plain.init_params(jax.random.PRNGKey(seed))
  from prompt_transfer import pretrained  # pylint: disable=g-import-not-at-top
  _, params = pretrained.load_pretrained(checkpoint_path, config=model.config)
  return params


def get_task(name: str) -> Any:
  """The seqio task or mixture; an unknown name lists the close ones."""
  import difflib  # pylint: disable=g-import-not-at-top
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


def train_dataset(task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
                  seed: int, start_step: int, split: str = 'train',
                  host_data_sharding: str = 'seqio') -> Any:
  """This host's rows of each global batch, in a fixed order from `seed`.

  Resuming at step n skips the n batches already seen, so a resumed run trains
  on exactly the batches an uninterrupted one would.
  host_data_sharding: 'seqio' (T5X's way: each host reads its own shard of the
  data) or 'slice' (every host reads the whole stream and keeps its rows of
  each global batch: the batches do not depend on the number of hosts, at the
  cost of reading everything everywhere).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n_hosts, host = jax.process_count(), jax.process_index()
  if batch_size % n_hosts:
    raise TrainingError(f'BATCH_SIZE={batch_size} is not divisible by {n_hosts} processes.')
  per_host = batch_size // n_hosts
  if host_data_sharding not in ('seqio', 'slice'):
    raise ValueError(f"host_data_sharding must be 'seqio' or 'slice', got {host_data_sharding!r}")
  seqio_shard = host_data_sharding == 'seqio'
  ds = seqio.get_dataset(
      task_name, task_feature_lengths, dataset_split=split, shuffle=True, num_epochs=None,
      shard_info=seqio.ShardInfo(index=host if seqio_shard else 0,
                                 num_shards=n_hosts if seqio_shard else 1),
      seed=seed, use_cached=False, feature_converter=seqio.EncDecFeatureConverter(pack=False))
  if seqio_shard:
    ds = ds.batch(per_host, drop_remainder=True)
  else:
    ds = ds.batch(batch_size, drop_remainder=True).map(
        lambda b: {k: v[host * per_host:(host + 1) * per_host] for k, v in b.items()})
  ds = ds.skip(start_step)
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


# ---------------------------------------------------------------------------
# Logging.
# ---------------------------------------------------------------------------
class MetricsWriter:
  """One JSON object per logged step in metrics.jsonl, plus TensorBoard.

  The file is rewritten whole (atomically) at each write: it stays small, and
  object stores such as GCS cannot append.
  """

  def __init__(self, model_dir: str, resume_step: int):
    self.path = epath.Path(model_dir) / 'metrics.jsonl'
    self.enabled = jax.process_index() == 0
    self.lines: list = []
    if not self.enabled:
      return
    if self.path.exists():
      # Drop lines of steps after the restored checkpoint: they will be redone.
      self.lines = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get('step', 0) <= resume_step]
      self._flush()
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(os.fspath(epath.Path(model_dir) / 'train'))
    except Exception:  # TensorBoard is optional
      self._tb = None

  def _flush(self) -> None:
    ckpt_lib.atomic_write_bytes(os.fspath(self.path),
                                ''.join(l + '\n' for l in self.lines).encode())

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self.lines.append(json.dumps({'step': int(step), **{k: float(v) for k, v in metrics.items()}}))
    self._flush()
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default():
        for k, v in metrics.items():
          tf.summary.scalar(k, float(v), step=int(step))
      self._tb.flush()


def log(message: str) -> None:
  """Progress lines from process 0 only (the others would repeat them)."""
  if jax.process_index() == 0:
    print(f'[prompt-transfer] {message}')


def _progress(step: int, total: int, loss: float, lr: float, ex_per_s: float,
              elapsed: float, start_step: int) -> str:
  done = step - start_step
  eta = (total - step) * elapsed / done if done else float('nan')
  eta_s = time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta) else '?'
  return (f'step {step}/{total}  loss {loss:.4f}  lr {lr:.3g}  '
          f'{ex_per_s:.1f} examples/s  ETA {eta_s}')


# ---------------------------------------------------------------------------
# The training entry point.
# ---------------------------------------------------------------------------
@gin.configurable
def train(
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = 32,
    config: Optional[T5Config] = None,
    prompt: Tuple[int, Any] = None,
    prompt_module: Optional[Callable[..., Any]] = None,
    checkpoint_path: Optional[str] = None,
    optimizer: Optional[optax.GradientTransformation] = None,
    learning_rate: Any = 0.3,
    trainable_params: str = PROMPT_PARAMS,
    checkpoint_period: int = 1000,
    keep_checkpoints: Optional[int] = 3,
    eval_period: Optional[int] = None,
    eval_split: str = 'validation',
    eval_num_examples: Optional[int] = None,
    eval_batch_size: Optional[int] = None,
    eval_at_start: bool = False,
    log_period: int = 10,
    seed: int = 0,
    model_seed: int = 0,
    use_dropout: bool = True,
    num_partitions: int = 1,
    mesh_shape: Optional[Tuple[int, int]] = None,
    host_data_sharding: str = 'seqio',
    rng_impl: str = 'threefry',
) -> dict:
  """Trains the prompt (or any parameters matching `trainable_params`).

  The prompt comes from one prompt-producing module: by default a free
  [PROMPT_LENGTH, d_model] array initialised by `prompt` (see prompt_config);
  `prompt_module` (a factory called with name='prompt', returning a module
  that maps the embedding table to a [l, d_model] prompt: a projector of
  another model's prompt, an intrinsic-subspace decoder, ...) replaces it.
  Either way its free parameters live under encoder/prompt/ and are exactly
  what `trainable_params` selects for training.

  Writes orbax train-state checkpoints and numpy prompts every
  `checkpoint_period` steps and at the end, resumes from MODEL_DIR when it
  holds a checkpoint, logs to metrics.jsonl and TensorBoard. Returns the last
  logged metrics (with eval metrics if any).

  rng_impl: the dropout key's PRNG ('threefry', JAX's default and the same on
  every backend and mesh; 'rbg' or 'unsafe_rbg': XLA's RngBitGenerator, T5X's
  `use_hardware_rng`, cheaper to compile and run but its bits may differ
  between backends and shardings). With model_config.dropout_mask='hash' (the
  default) the key only draws two words per dropout layer and the masks are
  hashed from them; with 'prng' it draws every mask bit.
  """
  model_dir = ckpt_lib.normalize_dir(model_dir)  # local or gs://
  epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    ckpt_lib.atomic_write_bytes(os.fspath(epath.Path(model_dir) / 'config.gin'),
                                gin.operative_config_str().encode())

  # Task -> vocabulary -> model with prompt.
  task = get_task(mixture_or_task_name)
  vocab = task.output_features['targets'].vocabulary
  config = config or model_config()
  if vocab.vocab_size > config.vocab_size:
    raise TrainingError(f'Task {task.name!r} has a vocabulary of {vocab.vocab_size} ids but '
                        f'the model {config.name} only {config.vocab_size}.')
  prompt_length, prompt_init = prompt if prompt is not None else prompt_config()
  model = build_model(config, prompt_length=prompt_length,
                      prompt_init=resolve_prompt_init(prompt_init, task),
                      prompt_factory=prompt_module, vocabulary=vocab)

  # Frozen weights, then the prompt initialised against them (a from_file
  # prompt of the wrong shape fails here, before any training).
  # Dropout keys: one per step, folded from the seed (a resume sees the same keys).
  dropout_rng = dropout_key(seed, rng_impl)
  rng = jax.random.PRNGKey(seed)
  params = load_frozen_params(model, checkpoint_path, model_seed)
  if prompt_length > 0 or prompt_module is not None:
    params = model.init_prompt(jax.random.fold_in(rng, 1), params)
  trainable, frozen = partition_params(params, trainable_params)
  n_train = sum(np.size(x) for x in jax.tree_util.tree_leaves(trainable))
  n_all = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  log(f'model {config.name}: {n_all:,} parameters, '
        f'{n_train:,} trainable ({trainable_params})')
  del params

  # Partitioning: frozen weights split over 'model' by their logical axes,
  # the trainable prompt (and its optimizer state) replicated, batches over 'data'.
  mesh = partitioning.make_mesh(num_partitions, mesh_shape)
  axes = model.param_logical_axes()
  train_axes, frozen_axes = partition_params(axes, trainable_params)
  frozen_sharding = partitioning.logical_shardings(mesh, frozen_axes)
  # One array at a time; kernels and embeddings in config.dtype (bfloat16
  # activations: stored once in bf16 instead of converted in every step).
  frozen = partitioning.put_consuming(
      frozen, frozen_sharding, functools.partial(frozen_storage_dtype, config))
  partitioning.release_host_memory()
  trainable_sharding = partitioning.logical_shardings(mesh, train_axes)
  trainable = partitioning.put(trainable, trainable_sharding)
  log(f'mesh {dict(mesh.shape)} over {jax.device_count()} devices, '
        f'{jax.process_count()} process(es)')

  # Optimizer: state only for the trainable subtree.
  tx = optimizer or prompt_tuning_optimizer(learning_rate)
  lr_fn = learning_rate if callable(learning_rate) else (lambda step: learning_rate)
  replicated = partitioning.replicated(mesh)
  opt_state = tx.init(trainable)
  # Optimizer slots follow their parameter's sharding when shaped like it
  # (Adafactor's factored rows/columns and scalars are replicated).
  state_sharding = {'step': replicated, 'trainable': trainable_sharding,
                    'opt_state': jax.tree_util.tree_map(lambda _: replicated, opt_state)}
  state = partitioning.put({'step': np.zeros((), np.int32), 'trainable': trainable,
                            'opt_state': opt_state}, state_sharding)

  # Restore: the train state of the last complete checkpoint.
  checkpointer = ckpt_lib.TrainStateCheckpointer(model_dir, keep_checkpoints)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    state = checkpointer.restore(start_step, state)
    log(f'resumed from {checkpointer.directory}/{start_step}')
  metrics_writer = MetricsWriter(model_dir, start_step)
  info = ckpt_lib.PromptInfo(task=mixture_or_task_name, model=config.describe(),
                             vocabulary=_describe_vocab(vocab), prompt_length=prompt_length)

  def save(step: int, state: dict, metrics: Optional[dict] = None) -> None:
    # Every process gathers (collective); process 0 writes the numpy files.
    host_trainable = jax.tree_util.tree_map(partitioning.to_host, state['trainable'])
    if not all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(host_trainable)):
      raise TrainingError(f'Trainable parameters are not finite at step {step}; '
                          'not saving. The last good checkpoint is kept.')
    if checkpointer.latest_step() != step:
      checkpointer.save(step, state)
    info.step, info.metrics = step, dict(metrics or {})
    ckpt_lib.save_numpy_prompt(model_dir, step, host_trainable, info)

  # A run killed between the orbax and the numpy write left no numpy file.
  if start_step and ckpt_lib.latest_numpy_step(model_dir) != start_step:
    save(start_step, state)
  if train_steps == 0 or start_step == 0:
    save(0, state)  # the initial prompt: checkpoint_0

  # The step: gradient of the loss w.r.t. the trainable subtree only.
  train_step = make_train_step(model, tx, use_dropout)
  # Donating the state lets XLA update the prompt and its slots in place.
  p_train_step = jax.jit(
      train_step, in_shardings=(state_sharding, frozen_sharding,
                                partitioning.batch_sharding(mesh), replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,))

  evaluator = None
  if eval_period:
    evaluator = evaluation.build_evaluator(mixture_or_task_name, task_feature_lengths,
                                           eval_split, eval_num_examples)

  def evaluate(step: int) -> dict:
    if evaluator is None:
      return {}
    full = merge_params(state['trainable'], frozen)
    results = evaluation.run_evaluation(evaluator, model, full,
                                        eval_batch_size or batch_size, step)
    log(f'eval at step {step}: '
          + ', '.join(f'{k} {v:.4g}' for k, v in sorted(results.items())))
    return {f'eval/{k}': v for k, v in results.items()}

  last: dict = {}
  if eval_at_start and evaluator is not None and start_step == 0 and train_steps > 0:
    metrics_writer.write(0, evaluate(0))  # how good the initial prompt already is
  if start_step < train_steps:
    batches = train_dataset(mixture_or_task_name, task_feature_lengths, batch_size, seed,
                            start_step, host_data_sharding=host_data_sharding)
    t0 = t_log = time.time()
    examples_since_log = 0
    step_flops, peak = None, perf.peak_flops_per_device()
    # After the first (compiling) step, any compilation of the step is a bug
    # (a shape or dtype changed): counted and logged as `recompilations`.
    compiles = perf.CompileCounter(match='train_step')
    for step in range(start_step, train_steps):
      batch = next(batches)
      batch = partitioning.global_batch({k: batch[k] for k in evaluation.MODEL_KEYS}, mesh)
      with partitioning.mesh_context(mesh):
        if step == start_step:
          step_flops = perf.lowered_flops(_model_flops_step(model, tx, use_dropout, p_train_step),
                                          state, frozen, batch, dropout_rng)
        state, metrics = p_train_step(state, frozen, batch,
                                      jax.random.fold_in(dropout_rng, step))
      if step == start_step:
        compiles.__enter__()
        partitioning.release_host_memory()  # what the compiler freed
      examples_since_log += batch_size
      done = step + 1
      # The first step is logged too: the loss before the prompt has moved.
      if (done % log_period == 0 or done == train_steps or done % checkpoint_period == 0 or
          done == 1):
        metrics = jax.tree_util.tree_map(partitioning.to_host, metrics)
        loss = float(metrics['loss'])
        if not math.isfinite(loss):
          raise TrainingError(
              f'Loss is {loss} at step {done}; stopping. The last good checkpoint '
              f'(step {checkpointer.latest_step()}) is kept in {model_dir}. Lower the '
              'learning rate or check the data.')
        now = time.time()
        ex_per_s = examples_since_log / max(now - t_log, 1e-9)
        t_log, examples_since_log = now, 0
        last = {'loss': loss, 'learning_rate': float(lr_fn(done)),
                'examples_per_second': ex_per_s, 'elapsed_seconds': now - t0,
                **{k: float(v) for k, v in metrics.items() if k != 'loss'}}
        if step_flops:
          last['train_step_flops'] = step_flops
          util = perf.mfu(step_flops, ex_per_s / batch_size, jax.device_count(), peak)
          if util is not None:  # accelerators only: CPUs have no peak in the table
            last['mfu'] = util
        last['recompilations'] = compiles.count
        if compiles.count:
          log(f'warning: the train step was recompiled {compiles.count} time(s) after step 1')
        log(_progress(done, train_steps, loss, last['learning_rate'],
                                               ex_per_s, now - t0, start_step))
        if eval_period and (done % eval_period == 0 or done == train_steps):
          last.update(evaluate(done))
        metrics_writer.write(done, last)
      if done % checkpoint_period == 0 or done == train_steps:
        save(done, state, last)
    compiles.__exit__(None, None, None)
  elif evaluator is not None:
    last = evaluate(start_step)
  checkpointer.close()
  return last


def _describe_vocab(vocab: Any) -> str:
  path = getattr(vocab, 'sentencepiece_model_file', None) or getattr(vocab, '_sentencepiece_model_file', None)
  return f'{type(vocab).__name__}({path or ""}, size={vocab.vocab_size})'
