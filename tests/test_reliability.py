"""Nothing lost, nothing silent: one run per MODEL_DIR, one metrics line per
step, tables whose rows stay apart (issue 'nothing lost, nothing silent')."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from prompt_transfer.analysis import similarity as S
from prompt_transfer.training.logger import MetricsWriter
from prompt_transfer.training.run_lock import RunLock, RunLockedError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ('import sys, time; sys.path.insert(0, sys.argv[2]); '
        'from prompt_transfer.training.run_lock import RunLock; '
        'RunLock(sys.argv[1]).__enter__(); print("locked", flush=True); time.sleep(600)')


def test_a_second_run_on_a_busy_model_dir_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
  d = str(tmp_path / 'run')
  os.makedirs(d)
  holder = subprocess.Popen([sys.executable, '-c', HOLD, d, ROOT], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    # In-process: refused with the holder's pid.
    with pytest.raises(RunLockedError, match=rf'in use by pid {holder.pid} on '):
      RunLock(d).__enter__()
    # `t5x train` on the same MODEL_DIR: one error line, nothing written.
    proc = subprocess.run(
        [sys.executable, '-m', 'prompt_transfer.cli', 'train', '--gin_file=runs/quickstart.gin',
         '--gin.TRAIN_STEPS=5', f'--gin.MODEL_DIR={d}'],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f't5x: error: MODEL_DIR {d} is in use by pid {holder.pid}' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert sorted(os.listdir(d)) == ['.run.lock']
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The kernel released the dead holder's lock: the next run takes it.
  with RunLock(d):
    with pytest.raises(RunLockedError, match=rf'pid {os.getpid()}'):
      RunLock(d).__enter__()
  with RunLock(d):  # and released on exit
    pass


def test_metrics_keep_one_line_per_step_across_a_resume(tmp_path):
  """A run killed between its step-0 eval and its first checkpoint redoes that
  eval on resume: the line is replaced, not duplicated."""
  w = MetricsWriter(str(tmp_path), resume_step=0, tensorboard=False)
  w.write(0, {'eval/accuracy': 50.0})
  # Killed here; the resumed run starts again at step 0.
  w = MetricsWriter(str(tmp_path), resume_step=0, tensorboard=False)
  w.write(0, {'eval/accuracy': 50.0})
  w.write(1, {'loss': 2.0})
  w = MetricsWriter(str(tmp_path), resume_step=1, tensorboard=False)
  w.write(1, {'loss': 2.0})
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [0, 1]


def test_tables_keep_long_names_apart():
  names = ['synthetic_parity_yesno', 'synthetic_parity_truefalse', 'synthetic_majority_yesno']
  table = S.format_matrix(names, np.eye(3))
  rows = table.splitlines()[1:]
  assert len(set(r.split()[1] for r in rows)) == 3
  assert all(n in table for n in names)
  rect = S.format_matrix(names, np.ones((3, 2)), cols=['synthetic_parity_yesno_rank',
                                                       'synthetic_parity_yesno_t5'])
  assert 'synthetic_parity_yesno_rank' in rect and 'synthetic_parity_yesno_t5' in rect
