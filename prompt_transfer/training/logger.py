"""Step logging: metrics.jsonl, TensorBoard and the progress line.

`StepLogger` is what the trainer reports through: loss and the step's other
metrics, learning rate, examples/s, the compiled step's FLOPs and MFU, and the
compile counter (one compile of the train step per stage and length bucket is
expected; any other is a bug, a shape or dtype that changed, logged as
`recompilations`).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
from etils import epath

from prompt_transfer import fileio
from prompt_transfer.training import partitioning
from prompt_transfer.training import perf


def log(message: str) -> None:
  """Progress lines from process 0 only (the others would repeat them)."""
  if jax.process_index() == 0:
    print(f'[prompt-transfer] {message}', flush=True)


class MetricsWriter:
  """One JSON object per logged step in metrics.jsonl, plus TensorBoard.

  The file is rewritten whole (atomically) at each write: it stays small, and
  object stores such as GCS cannot append.
  """

  def __init__(self, model_dir: str, resume_step: int, tensorboard: bool = True):
    self.path = epath.Path(model_dir) / 'metrics.jsonl'
    self.enabled = jax.process_index() == 0
    self.lines: list = []
    self._tb = None
    if not self.enabled:
      return
    if self.path.exists():
      # Drop lines of steps after the restored checkpoint: they will be redone.
      self.lines = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get('step', 0) <= resume_step]
      self._flush()
    # The step of each line, parsed once (write() replaces a redone step's line).
    self.steps = [json.loads(l).get('step', 0) for l in self.lines]
    if not tensorboard:
      return
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(os.fspath(epath.Path(model_dir) / 'train'))
    except Exception:  # TensorBoard is optional
      self._tb = None

  def _flush(self) -> None:
    fileio.atomic_write_text(self.path, ''.join(l + '\n' for l in self.lines))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    # One line per step: a step redone after a resume (e.g. the step-0 eval of
    # a run killed before its first checkpoint) replaces its earlier line.
    if int(step) in self.steps:
      del self.lines[self.steps.index(int(step))]
      self.steps.remove(int(step))
    self.steps.append(int(step))
    self.lines.append(json.dumps({'step': int(step), **{k: float(v) for k, v in metrics.items()}}))
    self._flush()
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default():
        for k, v in metrics.items():
          tf.summary.scalar(k, float(v), step=int(step))
      self._tb.flush()


def progress_line(step: int, total: int, loss: float, lr: float, ex_per_s: float,
                  elapsed: float, start_step: int) -> str:
  done = step - start_step
  eta = (total - step) * elapsed / done if done else float('nan')
  eta_s = time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta) else '?'
  return (f'step {step}/{total}  loss {loss:.4f}  lr {lr:.3g}  '
          f'{ex_per_s:.1f} examples/s  ETA {eta_s}')


class StepLogger:
  """Throughput, FLOPs, MFU, compile count and the loss of logged steps.

      with StepLogger(model_dir, start_step, train_steps, batch_size, lr_fn) as logger:
        logger.new_stage(step_flops)      # before each stage's first step
        ...
        record = logger.record(done, device_metrics)   # on logged steps
        logger.write(done, record)
  """

  def __init__(self, model_dir: str, start_step: int, train_steps: int, batch_size: int,
               lr_fn: Callable[[int], Any], tensorboard: bool = True):
    self.writer = MetricsWriter(model_dir, start_step, tensorboard)
    self.model_dir = model_dir
    self.start_step, self.train_steps, self.batch_size = start_step, train_steps, batch_size
    self.lr_fn = lr_fn
    self.peak = perf.peak_flops_per_device()
    self.compiles = perf.CompileCounter(match='train_step')
    self.stages_started = 0
    self.step_flops: Optional[float] = None
    # Training FLOPs (the compiled step's count, summed over steps) and wall
    # clock since step 0, continued from metrics.jsonl on resume, so runs of
    # different cost (FPT's stages, plain prompt tuning) compare on one axis.
    previous = next((json.loads(l) for l in reversed(self.writer.lines)
                     if '"train_seconds_total"' in l), {})
    self.total_flops: Optional[float] = (previous.get('train_flops_total') if previous
                                         else 0.0 if start_step == 0 else None)
    self._seconds_before = previous.get('train_seconds_total', 0.0)
    self._t0 = self._t_log = time.time()
    self._examples = 0
    self._window_flops: Optional[float] = 0.0   # FLOPs of the steps since the last record
    self._warned = 0

  def __enter__(self) -> 'StepLogger':
    self.compiles.__enter__()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.compiles.__exit__(*exc)

  def new_stage(self, step_flops: Optional[float]) -> None:
    """A new train step is about to compile (expected: one per stage)."""
    self.stages_started += 1
    self.step_flops = step_flops

  def new_shape(self, step_flops: Optional[float]) -> None:
    """Another length bucket's batch shape: one more expected compile, its own FLOPs."""
    self.stages_started += 1
    self.step_flops = step_flops

  def use_shape(self, step_flops: Optional[float]) -> None:
    """A batch shape seen before (its compiled step and FLOPs are known)."""
    self.step_flops = step_flops

  @property
  def recompilations(self) -> int:
    return max(0, self.compiles.count - self.stages_started)

  def step_done(self) -> None:
    self._examples += self.batch_size
    # Summed per step: with length buckets the steps of one window differ in cost.
    self._window_flops = (self._window_flops + self.step_flops
                          if self._window_flops is not None and self.step_flops else None)
    if self.total_flops is not None:  # unknown once a stage's count is
      self.total_flops = self.total_flops + self.step_flops if self.step_flops else None

  def record(self, done: int, metrics: Mapping[str, Any], checkpointed_step: Optional[int]
             ) -> dict:
    """The logged record of step `done` from the step's device metrics."""
    metrics = jax.tree_util.tree_map(partitioning.to_host, dict(metrics))
    loss = float(metrics['loss'])
    if not math.isfinite(loss):
      from prompt_transfer.training.state import TrainingError  # pylint: disable=g-import-not-at-top
      raise TrainingError(
          f'Loss is {loss} at step {done}; stopping. The last good checkpoint '
          f'(step {checkpointed_step}) is kept in {self.model_dir}. Lower the '
          'learning rate or check the data.')
    now = time.time()
    window_s = max(now - self._t_log, 1e-9)
    ex_per_s = self._examples / window_s
    window_flops = self._window_flops
    self._t_log, self._examples, self._window_flops = now, 0, 0.0
    out = {'loss': loss, 'learning_rate': float(self.lr_fn(done)),
           'examples_per_second': ex_per_s, 'elapsed_seconds': now - self._t0,
           **{k: float(v) for k, v in metrics.items() if k != 'loss'}}
    if self.step_flops:
      out['train_step_flops'] = self.step_flops   # the last step's (its bucket's)
    if window_flops:
      # The window's FLOPs over its time (one 'step' of them per window).
      util = perf.mfu(window_flops, 1.0 / window_s, jax.device_count(), self.peak)
      if util is not None:  # accelerators only: CPUs have no peak in the table
        out['mfu'] = util
    if self.total_flops is not None:
      out['train_flops_total'] = self.total_flops
    out['train_seconds_total'] = self._seconds_before + now - self._t0
    out['recompilations'] = self.recompilations
    if self.recompilations > self._warned:
      self._warned = self.recompilations
      log(f'warning: the train step was recompiled {self.recompilations} time(s) '
          'beyond one compile per stage and length bucket')
    log(progress_line(done, self.train_steps, loss, out['learning_rate'], ex_per_s,
                      now - self._t0, self.start_step))
    return out

  def write(self, step: int, record: Mapping[str, float]) -> None:
    self.writer.write(step, record)
