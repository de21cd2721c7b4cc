"""Preemption checkpoints: keep the steps a preemption would take away.

A spot TPU reclaim or a SLURM preemption sends SIGTERM; SLURM's time-limit
warning (`--signal=USR1@...`, forwarded to the tasks by launch/slurm_gpu.sh)
sends SIGUSR1. Either way every process agrees on one step, the trainer
writes a full checkpoint (orbax state + numpy prompt) at that step and exits
with PREEMPTED_EXIT_CODE, which the launchers read as "run again"; the rerun
resumes from that step instead of the last periodic checkpoint.

How the step is agreed:
- one process: our own handler sets a flag; the step after it is the one;
- several processes (jax.distributed): JAX's preemption service (on by
  default) already catches SIGTERM on any process, spreads the notice and
  picks the first step every process can reach
  (`multihost_utils.reached_preemption_sync_point`, what T5X uses). We leave
  its SIGTERM handler alone and turn SIGUSR1 into a SIGTERM to ourselves.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

# EX_TEMPFAIL (sysexits.h): "temporary failure, try again".
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """The run stopped at `step` after writing its checkpoint there."""

  def __init__(self, step: int, model_dir: str):
    super().__init__(f'preempted: checkpoint written at step {step} in {model_dir}; the same '
                     f'command resumes from it (exit code {PREEMPTED_EXIT_CODE}).')
    self.step = step


def _distributed() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return jax.process_count() > 1 and distributed.global_state.client is not None


class PreemptionWatch:
  """Installs the signal handlers for a run (main thread only; elsewhere,
  e.g. a run started from a worker thread, it watches nothing) and answers
  `reached(step)` after every step, on every process."""

  def __init__(self) -> None:
    self.signal_name: Optional[str] = None
    self._previous: dict = {}
    self._multi = False

  def __enter__(self) -> 'PreemptionWatch':
    self._multi = _distributed()
    if threading.current_thread() is not threading.main_thread():
      return self
    if self._multi:  # JAX owns SIGTERM; USR1 goes the same way
      self._install(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    else:
      for sig in (signal.SIGTERM, signal.SIGUSR1):
        self._install(sig, self._note)
    return self

  def _install(self, sig: int, handler: Any) -> None:
    self._previous[sig] = signal.signal(sig, handler)

  def _note(self, signum: int, _frame: Any) -> None:
    if self.signal_name is None:
      from prompt_transfer.training.logger import log  # pylint: disable=g-import-not-at-top
      self.signal_name = signal.Signals(signum).name
      log(f'{self.signal_name} received: checkpointing after the current step, then exiting')

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def reached(self, step: int) -> bool:
    """True on every process at the same step once a preemption was signalled."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal_name is not None
