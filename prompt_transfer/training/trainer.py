"""The T5X-style trainer: task -> features -> batch -> model with prompt -> loss
-> prompt update -> numpy file, all visible in `train()`.

The parts it wires are one module each: data.py (task, features, batches),
state.py (frozen weights and train state on a mesh), step.py (the jitted
step), checkpoints.py (orbax + numpy prompt + sidecar), logger.py
(metrics.jsonl, throughput, FLOPs, MFU, compile counter), stages.py (staged
training) and evaluation.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import gin
import jax
import optax
from etils import epath

from prompt_transfer import fileio
from prompt_transfer import progressive
from prompt_transfer.model.config import T5Config
from prompt_transfer.model.models import build_model
from prompt_transfer.model.pretrained import load_frozen_params
from prompt_transfer.prompts import files
from prompt_transfer.prompts.slot import PromptModuleFactory
from prompt_transfer.training import checkpoints as ckpt_lib
from prompt_transfer.training import configurables
from prompt_transfer.training import data
from prompt_transfer.training import evaluation
from prompt_transfer.training import partitioning
from prompt_transfer.training import perf
from prompt_transfer.training import stages as stages_lib
from prompt_transfer.training import step as step_lib
from prompt_transfer.training.logger import StepLogger, log
from prompt_transfer.training.preemption import Preempted, PreemptionWatch
from prompt_transfer.training.run_lock import RunLock
from prompt_transfer.training.state import (PROMPT_PARAMS, TrainingError, TrainSetup,
                                            prompt_tuning_optimizer, set_up)

__all__ = ['train', 'TrainingError']


@gin.configurable
def train(
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = 32,
    config: Optional[T5Config] = None,
    prompt_module: Optional[PromptModuleFactory] = None,
    stages: Optional[Sequence[stages_lib.Stage]] = None,
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
    tensorboard: bool = True,
    task_loss_weight: float = 1.0,
    length_buckets: Any = None,
    length_grouping: bool = False,
) -> dict:
  """Trains the prompt module (or any parameters matching `trainable_params`).

  prompt_module: the prompt module factory (prompts/slot.py has the contract;
  runs/prompt_tune.gin binds `@prompt_config()`, a free [PROMPT_LENGTH,
  d_model] prompt); None: no prompt (model tuning). Its parameters live under
  encoder/prompt/ and are what `trainable_params` selects. stages: a staged run (stages.py); default one stage, the model of
  `config`. Writes orbax train-state checkpoints and numpy prompts every
  `checkpoint_period` steps, at each stage's end and at the end; resumes from
  MODEL_DIR when it holds a checkpoint; logs to metrics.jsonl and
  TensorBoard. Returns the last logged metrics (with eval metrics if any).

  rng_impl: the dropout key's PRNG (see step.dropout_key). tensorboard: also
  write TensorBoard events to MODEL_DIR/train (through TensorFlow's own
  filesystems; metrics.jsonl is always written). task_loss_weight: the task
  loss's weight beside the prompt module's sown losses (0: a projector's
  distance minimisation). length_buckets: None (every batch padded to
  TASK_FEATURE_LENGTHS, T5X's one shape), 'pow2' or {'inputs': [...],
  'targets': [...]}: each batch is cut to the smallest bucket its longest row
  fits in (data.bucket_batch; one compile per bucket shape, same loss).
  length_grouping: batches drawn from one bucket each (data.group_by_length,
  like HF's group_by_length): far less padding on tasks of mixed lengths, at
  the price of batches of similar examples; needs length_buckets.
  """
  for name, value, least in (('TRAIN_STEPS', train_steps, 0), ('BATCH_SIZE', batch_size, 1),
                             ('train.checkpoint_period', checkpoint_period, 1),
                             ('train.log_period', log_period, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise TrainingError(f'{name} must be a whole number >= {least}; got {value!r}.')
  model_dir = fileio.normalize_dir(model_dir)  # local or gs://
  if epath.Path(model_dir).exists() and not epath.Path(model_dir).is_dir():
    raise TrainingError(f'MODEL_DIR {model_dir} is a file, not a folder.')

  # Task -> vocabulary -> the stages' models, each with the prompt module.
  task = data.get_task(mixture_or_task_name)
  data.check_target_length(mixture_or_task_name, task_feature_lengths)
  buckets = data.resolve_buckets(length_buckets, task_feature_lengths)
  if length_grouping and not buckets:
    raise TrainingError('LENGTH_GROUPING = True groups batches by length bucket; give '
                        "LENGTH_BUCKETS too (e.g. --gin.LENGTH_BUCKETS=\"'pow2'\").")
  try:
    epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise TrainingError(f'MODEL_DIR {model_dir} cannot be created ({e.strerror}: '
                        f'{e.filename or model_dir}).') from None
  vocab = task.output_features['targets'].vocabulary
  config = config or configurables.model_config()
  if vocab.vocab_size > config.vocab_size:
    raise TrainingError(f'Task {task.name!r} has a vocabulary of {vocab.vocab_size} ids but '
                        f'the model {config.name} only {config.vocab_size}.')
  prompt_module = configurables.bind_task(prompt_module, task)
  passthrough = _prompt_feature_names(prompt_module)
  if passthrough:
    data.check_features(mixture_or_task_name, passthrough, type(prompt_module()).__name__)
  # FPT's partial stages (progressive.py) drop decoder layers only for
  # generation tasks unless told otherwise.
  generation = _is_generation(mixture_or_task_name)
  stages = progressive.bind(stages, generation=generation)
  plan = stages_lib.plan(stages, train_steps)
  model = build_model(config, prompt_module, vocabulary=vocab,  # the full model
                      task_loss_weight=task_loss_weight)

  tx = optimizer or prompt_tuning_optimizer(learning_rate)
  lr_fn = learning_rate if callable(learning_rate) else (lambda step: learning_rate)
  mesh = partitioning.make_mesh(num_partitions, mesh_shape)
  # Dropout keys: one per step, folded from the seed (a resume sees the same keys).
  dropout_rng = step_lib.dropout_key(seed, rng_impl)
  init_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)

  def stage_setup(i: int, carry: Optional[dict] = None) -> TrainSetup:
    stage_config, frozen = plan.stages[i].build(
        config, load_frozen_params(config, checkpoint_path, model_seed))
    stage_model = model.with_config(**_changed_fields(config, stage_config))
    setup = set_up(stage_model, frozen, tx, mesh, init_rng, trainable_params, carry)
    log(f'{plan.label(i) + ": " if len(plan.stages) > 1 else ""}model {stage_config.name}: '
        f'{setup.num_frozen + setup.num_trainable:,} parameters, '
        f'{setup.num_trainable:,} trainable ({trainable_params}); mesh {dict(mesh.shape)} '
        f'over {jax.device_count()} devices, {jax.process_count()} process(es)')
    return setup

  def next_stage(i: int, previous: TrainSetup) -> TrainSetup:
    """Stage i's set-up carrying `previous`'s train state; the previous
    stage's frozen weights are dropped before the next ones load."""
    state, previous.state, previous.frozen = previous.state, None, None
    return stage_setup(i, carry=state)

  info = ckpt_lib.prompt_info(model, mixture_or_task_name, vocab)
  # One writer per MODEL_DIR: process 0 holds its lock for the whole run.
  with RunLock(model_dir, enabled=jax.process_index() == 0), \
      ckpt_lib.PromptCheckpointer(model_dir, info, keep_checkpoints) as checkpointer:
    if jax.process_index() == 0:
      fileio.atomic_write_text(epath.Path(model_dir) / 'config.gin', gin.operative_config_str())
    if progressive.needs_scores(stages):
      # FFN-reduced stages keep each layer's top neurons by FPT's score on the
      # full model with the untrained prompt: computed once, cached.
      scores = progressive.load_or_compute_scores(
          model_dir, lambda: _neuron_scores(model, config, checkpoint_path, model_seed, init_rng,
                                            mixture_or_task_name, task_feature_lengths,
                                            eval_split, progressive.score_examples(stages),
                                            eval_batch_size or batch_size),
          write=jax.process_index() == 0)
      stages = progressive.bind(stages, generation=generation, scores=scores)
      plan = stages_lib.plan(stages, train_steps)
    # Restore: the train state of the newest good checkpoint, in its stage.
    stage_i = plan.index_at(checkpointer.latest_step() or 0)
    setup = stage_setup(stage_i)
    start_step, setup.state = checkpointer.restore_latest(setup.state)
    if start_step:
      log(f'resumed from {checkpointer.directory}/{start_step}')
      if plan.index_at(start_step) != stage_i:  # fell back past a stage boundary
        stage_i = plan.index_at(start_step)
        setup = next_stage(stage_i, setup)
    if start_step == 0:
      _warn_if_other_weights(prompt_module, setup, config)
    # A run killed between the orbax and the numpy write (or a damaged export)
    # leaves no usable numpy prompt of the resumed step: it is written again.
    if start_step == 0 or not checkpointer.has_numpy(start_step):
      checkpointer.save(start_step, setup.state, setup.model, setup.frozen)  # 0: the init

    evaluator = evaluation.StepEvaluator.create(
        eval_period, mixture_or_task_name, task_feature_lengths, eval_split,
        eval_num_examples, eval_batch_size or batch_size, passthrough, buckets)
    last: dict = {}
    full_for_eval: Optional[TrainSetup] = None  # the full model's, during partial stages

    def evaluate_now(setup: TrainSetup, step: int) -> dict:
      """eval/ on the full model; during a partial stage also eval_stage/
      on the stage's own model."""
      nonlocal full_for_eval
      if not progressive.is_partial(plan.stages[stage_i]):
        full_for_eval = None
        return evaluator(setup, step)
      if full_for_eval is None:  # full frozen weights, held while partial stages last
        full_for_eval = set_up(model, load_frozen_params(config, checkpoint_path, model_seed),
                               tx, mesh, init_rng, trainable_params, carry=setup.state)
      out = evaluator(dataclasses.replace(full_for_eval, state=setup.state), step)
      out.update(evaluator(setup, step, prefix='eval_stage', label=plan.label(stage_i)))
      return out

    with StepLogger(model_dir, start_step, train_steps, batch_size, lr_fn,
                    tensorboard) as logger, PreemptionWatch() as preemption:
      if eval_at_start and evaluator and start_step == 0 and train_steps > 0:
        logger.write(0, evaluate_now(setup, 0))  # how good the initial prompt already is
      batches = data.train_dataset(mixture_or_task_name, task_feature_lengths, batch_size,
                                   seed, start_step, host_data_sharding=host_data_sharding,
                                   passthrough=passthrough,
                                   group_buckets=buckets if length_grouping else None
                                   ) if start_step < train_steps else None
      p_train_step = None
      flops_by_shape: dict = {}  # batch shape -> the compiled step's FLOPs (length buckets)
      for step in range(start_step, train_steps):
        if plan.index_at(step) != stage_i:  # a stage boundary: new model, same state
          stage_i = plan.index_at(step)
          setup = next_stage(stage_i, setup)
          p_train_step = None
        host_batch = next(batches)
        if buckets:  # padded to the batch's bucket, not to TASK_FEATURE_LENGTHS
          host_batch = data.bucket_batch(host_batch, buckets)
        batch = partitioning.global_batch(host_batch, mesh)
        shape = tuple(sorted((k, v.shape) for k, v in batch.items()))
        with partitioning.mesh_context(mesh):
          if p_train_step is None:  # compiles on its first call: one per stage
            p_train_step = step_lib.compile_train_step(setup, use_dropout)
            logger.new_stage(perf_flops(setup, use_dropout, p_train_step, batch, dropout_rng))
            flops_by_shape = {shape: logger.step_flops}
          elif shape not in flops_by_shape:  # a new bucket: jit compiles it on this call
            flops_by_shape[shape] = perf_flops(setup, use_dropout, p_train_step, batch,
                                               dropout_rng)
            logger.new_shape(flops_by_shape[shape])
          else:
            logger.use_shape(flops_by_shape[shape])
          setup.state, metrics = p_train_step(setup.state, setup.frozen, batch,
                                              jax.random.fold_in(dropout_rng, step))
        if step == start_step or step == plan.bounds[stage_i][0]:
          partitioning.release_host_memory()  # what the compiler freed
        logger.step_done()
        done = step + 1
        stage_end = done == plan.bounds[stage_i][1]
        eval_now = evaluator and (done % eval_period == 0 or done == train_steps)
        # The first step is logged too: the loss before the prompt has moved.
        if done % log_period == 0 or done == train_steps or done % checkpoint_period == 0 or \
            done == 1 or stage_end or eval_now:
          last = logger.record(done, metrics, checkpointer.latest_step())
          if eval_now:
            last.update(evaluate_now(setup, done))
          logger.write(done, last)
        if done % checkpoint_period == 0 or done == train_steps or stage_end:
          checkpointer.save(done, setup.state, setup.model, setup.frozen, last)
        # Asked on every process after every step (JAX's sync point needs it).
        if preemption.reached(done) and done < train_steps:
          if checkpointer.latest_step() != done:
            last = logger.record(done, metrics, checkpointer.latest_step())
            logger.write(done, last)
            checkpointer.save(done, setup.state, setup.model, setup.frozen, last)
          raise Preempted(done, model_dir)
      if start_step >= train_steps and evaluator:
        last = evaluator(setup, start_step)
  return last


def perf_flops(setup: TrainSetup, use_dropout: bool, jitted: Callable, *args: Any
               ) -> Optional[float]:
  """Model FLOPs of one step (XLA's count of the lowered step, remat excluded)."""
  return perf.lowered_flops(step_lib.model_flops_step(setup, use_dropout, jitted),
                            setup.state, setup.frozen, *args)


def _warn_if_other_weights(prompt_module: Optional[PromptModuleFactory],
                           setup: TrainSetup, config: T5Config) -> None:
  """A prompt started from a file (prompts/from_file.gin) whose sidecar names
  other frozen weights of the same shape loads fine: say so once. A prompt
  module bound to one model's weights (`check_frozen_weights`) refuses others."""
  from prompt_transfer.analysis import library  # pylint: disable=g-import-not-at-top
  module = prompt_module() if prompt_module is not None else None
  if hasattr(module, 'check_frozen_weights'):  # e.g. an IPT subspace found on a model
    module.check_frozen_weights(config, files.weights_fingerprint(
        partitioning.to_host(setup.frozen['token_embedder']['embedding'])))
  init = getattr(prompt_module, 'keywords', {}).get('init')
  path = getattr(init, 'prompt_file', None)
  info = files.load_prompt_info(path) if path else None
  if info is None:
    return
  weights = files.weights_fingerprint(
      partitioning.to_host(setup.frozen['token_embedder']['embedding']))
  warning = library.other_weights_warning(info, config, weights, path)
  if warning:
    ckpt_lib.log_warning(warning)


def _is_generation(task_name: str) -> bool:
  """A generation task (FPT drops decoder layers too), by the task
  catalogue; tasks outside it keep their decoder (PartialModel.drop_decoder
  decides for them)."""
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  for leaf in data.leaf_tasks(task_name):
    try:
      if tasks_lib.get_task_info(data.original_name(leaf.name)).kind == 'generation':
        return True
    except ValueError:
      continue
  return False


def _neuron_scores(model: Any, config: T5Config, checkpoint_path: Optional[str],
                   model_seed: int, init_rng: Any, task_name: str,
                   task_feature_lengths: Mapping[str, int], split: str, num_examples: int,
                   batch_size: int) -> dict:
  """FPT's FFN neuron scores of the full model with the untrained prompt on
  `num_examples` examples of `split` (analysis.neurons.ffn_importance)."""
  from prompt_transfer.analysis import neurons  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  log(f'FPT: scoring FFN neurons on {num_examples} {split} examples of {task_name}')
  params = load_frozen_params(config, checkpoint_path, model_seed)
  if model.prompt_module is not None:
    params = model.init_prompt(init_rng, params)
  rows = data.first_examples(task_name, task_feature_lengths, num_examples, split)
  n = len(rows['encoder_input_tokens'])
  batches = [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]
  scores = neurons.ffn_importance(model, params, batches, 'both')
  return {k: np.asarray(v) for k, v in scores.items()}


def _prompt_feature_names(prompt_module: Optional[PromptModuleFactory]) -> Tuple[str, ...]:
  """The per-example features the prompt module reads (carried by the data)."""
  if prompt_module is None:
    return ()
  return tuple(getattr(prompt_module(), 'per_example_features', ()))


def _changed_fields(base: T5Config, other: T5Config) -> dict:
  return {f.name: getattr(other, f.name) for f in dataclasses.fields(base)
          if getattr(other, f.name) != getattr(base, f.name)}

