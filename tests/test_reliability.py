"""Nothing lost, nothing silent: one run per MODEL_DIR, one metrics line per
step, tables whose rows stay apart (issue 'nothing lost, nothing silent')."""
import contextlib
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


def _t5x_error(capsys, *argv):
  """(exit code, stderr) of an in-process `t5x` call that must fail."""
  import gin  # pylint: disable=g-import-not-at-top
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
  gin.clear_config()
  err = capsys.readouterr().err
  assert 'Traceback' not in err and 'In call to configurable' not in err, err
  return e.value.code, err.strip()


QUICK = ['train', '--gin_file=runs/quickstart.gin']


def test_user_errors_are_one_line(tmp_path, capsys):
  d = str(tmp_path / 'run')
  code, err = _t5x_error(capsys, *QUICK, '--gin.TRAIN_STEPZ=0', f'--gin.MODEL_DIR={d}')
  assert code == 2 and 'no gin file given uses the macro TRAIN_STEPZ' in err
  assert 'Did you mean TRAIN_STEPS' in err and not os.path.exists(d)
  for value, shown in (('"ten"', "'ten'"), ('2.5', '2.5'), ('-5', '-5')):
    code, err = _t5x_error(capsys, *QUICK, f'--gin.TRAIN_STEPS={value}', f'--gin.MODEL_DIR={d}')
    assert code == 1 and err == (f't5x: error: TRAIN_STEPS must be a whole number >= 0; '
                                 f'got {shown}.'), err
  assert not os.path.exists(d)
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  code, err = _t5x_error(capsys, *QUICK, f'--gin.MODEL_DIR={a_file}')
  assert code == 1 and err == f't5x: error: MODEL_DIR {a_file} is a file, not a folder.'
  code, err = _t5x_error(capsys, *QUICK, f'--gin.MODEL_DIR={a_file}/run')
  assert code == 1 and err.startswith('t5x: error: ') and f'{a_file}' in err
  assert len(err.splitlines()) == 1
  evaluate = ['eval', '--gin_file=runs/eval.gin', '--gin_file=models/t5_1_1_tiny_synthetic.gin',
              '--gin.MIXTURE_OR_TASK_NAME=synthetic_majority_yesno']
  code, err = _t5x_error(capsys, *evaluate)
  assert code == 1 and 't5x eval needs a prompt' in err
  code, err = _t5x_error(capsys, *evaluate, '--gin.PROMPT_LENGTH=6', f'--gin.MODEL_DIR={d}')
  assert code == 2 and "reads the prompt's length from its file" in err


# ---------------------------------------------------------------------------
# Checkpoint integrity: corrupted or unreadable train state -> the previous
# good checkpoint; a damaged numpy export -> rewritten.
# ---------------------------------------------------------------------------
def _train_run(model_dir, steps):
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from prompt_transfer.model.config import get_config  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts import initializers  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.free import free_prompt  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import trainer  # pylint: disable=g-import-not-at-top
  return trainer.train(
      model_dir=str(model_dir), mixture_or_task_name='synthetic_majority_yesno',
      task_feature_lengths={'inputs': 48, 'targets': 4}, train_steps=steps, batch_size=16,
      config=get_config('t5_1_1', 'tiny', vocab_size=384),
      prompt_module=free_prompt(6, initializers.from_sampled_vocab()), checkpoint_period=5,
      log_period=5, seed=3, tensorboard=False)


def _numpy_prompt(model_dir, step):
  from prompt_transfer.prompts import files  # pylint: disable=g-import-not-at-top
  return np.load(os.path.join(files.numpy_checkpoint_dir(str(model_dir), step),
                              files.PROMPT_FILE))


@pytest.fixture(scope='module')
def ten_steps(tmp_path_factory):
  """A run to step 10 (checkpoints 0, 5, 10) and an uninterrupted run to 15."""
  root = tmp_path_factory.mktemp('integrity')
  _train_run(root / 'ten', 10)
  _train_run(root / 'ref', 15)
  return root


def _copy(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns('.run.lock'))
  return dst


def _data_files(step_dir):
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.join(root, n) for n in names if n != 'state.sha256']
  return out


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(ten_steps, tmp_path,
                                                                      capsys):
  d = _copy(ten_steps / 'ten', tmp_path / 'run')
  # 64 flipped bytes in the largest data file of the latest train state.
  data = max(_data_files(d / 'checkpoints' / '10'), key=os.path.getsize)
  raw = bytearray(open(data, 'rb').read())
  for i in range(min(64, len(raw))):
    raw[len(raw) // 2 + i - 32] ^= 0xFF
  open(data, 'wb').write(bytes(raw))
  _train_run(d, 15)
  out = capsys.readouterr().out
  assert f'warning: checkpoint {d}/checkpoints/10 is' in out
  assert f'resumed from {d}/checkpoints/5' in out
  assert os.listdir(d / 'corrupt_checkpoints')[0].startswith('10-')
  np.testing.assert_array_equal(_numpy_prompt(d, 15), _numpy_prompt(ten_steps / 'ref', 15))


def test_an_emptied_latest_checkpoint_falls_back_and_none_good_is_one_error(ten_steps, tmp_path,
                                                                            capsys):
  from prompt_transfer.training.state import TrainingError  # pylint: disable=g-import-not-at-top
  d = _copy(ten_steps / 'ten', tmp_path / 'run')
  for f in _data_files(d / 'checkpoints' / '10'):
    open(f, 'wb').close()  # truncated to nothing
  _train_run(d, 15)
  assert f'resumed from {d}/checkpoints/5' in capsys.readouterr().out
  np.testing.assert_array_equal(_numpy_prompt(d, 15), _numpy_prompt(ten_steps / 'ref', 15))
  # Every checkpoint damaged: one error naming them, nothing trained.
  d2 = _copy(ten_steps / 'ten', tmp_path / 'run2')
  for step in ('0', '5', '10'):
    for f in _data_files(d2 / 'checkpoints' / step):
      open(f, 'wb').close()
  with pytest.raises(TrainingError, match='No usable train-state checkpoint in .*checkpoints/10.*'
                                          'checkpoints/5.*checkpoints/0'):
    _train_run(d2, 15)


def test_a_truncated_numpy_export_of_the_resumed_step_is_rewritten(ten_steps, tmp_path):
  d = _copy(ten_steps / 'ten', tmp_path / 'run')
  good = _numpy_prompt(d, 10)
  path = os.path.join(d, 'numpy_checkpoints', 'checkpoint_10', 'encoder.prompt.prompt.prompt')
  with open(path, 'r+b') as f:
    f.truncate(40)
  _train_run(d, 10)  # nothing left to train: only the check
  np.testing.assert_array_equal(_numpy_prompt(d, 10), good)


def test_malformed_prompt_files_are_named_before_anything_is_allocated(tmp_path):
  """.npz archives, text files, truncated files and huge-shape headers get one
  PromptFileError naming the file, the expected and the actual."""
  from prompt_transfer.prompts.files import PromptFileError, load_prompt_file  # pylint: disable=g-import-not-at-top
  np.savez(tmp_path / 'a.npz', x=np.ones((4, 8), np.float32))
  (tmp_path / 'notes.txt').write_text('not a prompt')
  np.save(tmp_path / 'good.npy', np.ones((4, 8), np.float32))
  (tmp_path / 'cut.npy').write_bytes((tmp_path / 'good.npy').read_bytes()[:60])
  header = np.lib.format.header_data_from_array_1_0(np.ones((2, 2), np.float32))
  header['shape'] = (10 ** 12, 10 ** 6)  # 4 exabytes if numpy allocated it
  with open(tmp_path / 'huge.npy', 'wb') as f:
    np.lib.format.write_array_header_1_0(f, header)
  cases = {'a.npz': 'is an .npz archive', 'notes.txt': "is not a numpy .npy file .*b'not a '",
           'cut.npy': 'has a damaged .npy header',
           'huge.npy': r'has shape \(1000000000000, 1000000\); the model expects \(4, 8\)'}
  for name, message in cases.items():
    with pytest.raises(PromptFileError, match=rf"'{tmp_path / name}' {message}"):
      load_prompt_file(tmp_path / name, (4, 8))
  assert load_prompt_file(tmp_path / 'good.npy', (4, 8)).shape == (4, 8)


# ---------------------------------------------------------------------------
# Unreadable model files, label words cut by the targets length, full disks,
# read-only folders, prompts of other weights of the same shape.
# ---------------------------------------------------------------------------
ASSET = os.path.join(ROOT, 'prompt_transfer', 'assets', 't5_1_1_tiny_synthetic')


def test_unreadable_model_checkpoint_files_are_one_line(tmp_path, capsys):
  import shutil  # pylint: disable=g-import-not-at-top
  cut, bad_json = str(tmp_path / 'cut'), str(tmp_path / 'bad_json')
  shutil.copytree(ASSET, cut)
  shutil.copytree(ASSET, bad_json)
  with open(os.path.join(cut, 'model.safetensors'), 'r+b') as f:
    f.truncate(os.path.getsize(os.path.join(ASSET, 'model.safetensors')) // 2)
  with open(os.path.join(bad_json, 'config.json'), 'w') as f:
    f.write('{"d_model": 64,')
  d = str(tmp_path / 'run')
  code, err = _t5x_error(capsys, *QUICK, f'--gin.CHECKPOINT_PATH={cut}', f'--gin.MODEL_DIR={d}')
  assert code == 1 and len(err.splitlines()) == 1, err
  assert f'{cut}/model.safetensors (' in err and 'cannot be read as safetensors' in err
  assert 'Is it truncated?' in err
  code, err = _t5x_error(capsys, *QUICK, f'--gin.CHECKPOINT_PATH={bad_json}',
                         f'--gin.MODEL_DIR={d}')
  assert code == 1 and err.startswith(f't5x: error: {bad_json}/config.json is not valid JSON')


def test_a_targets_length_that_cuts_label_words_is_refused(tmp_path, capsys):
  """'negative' + EOS is 9 bytes: with 'targets': 8 the model would learn
  'positiv' and score 0 with a falling loss. Refused before anything runs."""
  d = str(tmp_path / 'run')
  code, err = _t5x_error(capsys, *QUICK, '--gin.MIXTURE_OR_TASK_NAME=synthetic_majority_posneg',
                         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
                         f'--gin.MODEL_DIR={d}')
  assert code == 1 and "TASK_FEATURE_LENGTHS['targets'] is 8 but task " in err, err
  assert "needs 9 for its label word 'negative'" in err and "'targets': 9 or more" in err
  assert not os.path.exists(d)


def test_write_failure_messages_name_the_path():
  from prompt_transfer.training.checkpoints import write_failure  # pylint: disable=g-import-not-at-top
  orbax = ValueError('RESOURCE_EXHAUSTED: Failed writing: "/r/checkpoints/10.orbax-checkpoint-tmp'
                     '/d/33c2": Failed to write 410 bytes to file 8: No space left on device '
                     "[os_error_code='28']")
  assert write_failure(orbax) == ('No space left on device while writing '
                                  '/r/checkpoints/10.orbax-checkpoint-tmp/d/33c2')
  assert write_failure(OSError(13, 'Permission denied', '/r/config.gin')) == (
      'Permission denied while writing /r/config.gin')
  assert write_failure(OSError(28, 'No space left on device'), '/r') == (
      'No space left on device while writing under /r')
  assert write_failure(ValueError('shape mismatch')) is None


def test_the_closed_loop_report_of_a_failed_save_is_held_back(monkeypatch):
  """TensorStore reports a write that completes after orbax closed its event
  loop as unraisable (a bare traceback, seen around the full-disk error under
  load); the hook a failed save installs drops exactly that report and
  passes others on."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import checkpoints  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  monkeypatch.delenv('PROMPT_TRANSFER_DEBUG', raising=False)

  def late_write():
    promise, future = ts.Promise.new()
    loop = asyncio.new_event_loop()

    async def wait():
      await future
    task = loop.create_task(wait())
    loop.run_until_complete(asyncio.sleep(0.01))  # awaiting: a callback to the loop
    loop.close()
    promise.set_result(1)  # TensorStore calls back into the closed loop
    task._log_destroy_pending = False  # pylint: disable=protected-access

  late_write()
  assert [str(u.exc_value) for u in seen] == ['Event loop is closed']
  checkpoints.drop_closed_loop_reports()
  checkpoints.drop_closed_loop_reports()  # once
  late_write()
  import types  # pylint: disable=g-import-not-at-top
  sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError('other')))
  assert [str(u.exc_value) for u in seen] == ['Event loop is closed', 'other']


@contextlib.contextmanager
def _tmpfs(path, size='3m'):
  """A small tmpfs at path (root only: skipped elsewhere)."""
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f'cannot mount a tmpfs here (needs root): {proc.stderr.strip()}')
  try:
    yield str(path)
  finally:
    subprocess.run(['umount', '-l', str(path)], capture_output=True)


def _t5x_train(*argv):
  return subprocess.run([sys.executable, '-m', 'prompt_transfer.cli', *QUICK, *argv],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_full_disk_says_what_was_kept_and_the_rerun_resumes(tmp_path):
  with _tmpfs(tmp_path / 'small') as small:
    filler = os.path.join(small, 'filler')
    free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
    with open(filler, 'wb') as f:
      f.write(b'\0' * (free - 150 * 1024))  # room for a checkpoint or two
    d = os.path.join(small, 'run')
    argv = ['--gin.TRAIN_STEPS=30', '--gin.train.checkpoint_period=5',
            '--gin.train.eval_period=None', '--gin.train.tensorboard=False', f'--gin.MODEL_DIR={d}']
    proc = _t5x_train(*argv)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert 'Traceback' not in err and len(err.splitlines()) == 1, err
    assert err.startswith('t5x: error: No space left on device while writing ') and \
        'Kept: ' in err and 'run the same command again' in err, err
    kept = [int(w.strip('step-')) for w in err.split() if w.startswith('step-')]
    if kept:  # the named checkpoint (and its numpy prompt, if said) are there
      assert os.path.isdir(os.path.join(d, 'checkpoints', str(kept[0])))
      numpy_dir = os.path.join(d, 'numpy_checkpoints', f'checkpoint_{kept[0]}')
      if 'and its numpy prompt' in err:
        assert os.path.isdir(numpy_dir)
      else:  # the disk filled between the orbax and the numpy write
        assert 'its numpy prompt is rewritten on resume' in err and not os.path.isdir(numpy_dir)
    os.remove(filler)
    proc = _t5x_train(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isdir(os.path.join(d, 'numpy_checkpoints', 'checkpoint_30'))
    steps = [json.loads(l)['step'] for l in open(os.path.join(d, 'metrics.jsonl'))]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_a_read_only_model_dir_is_one_line_and_left_as_it_was(tmp_path, capsys):
  with _tmpfs(tmp_path / 'ro') as ro:
    os.makedirs(os.path.join(ro, 'run'))
    subprocess.run(['mount', '-o', 'remount,ro', ro], check=True)
    code, err = _t5x_error(capsys, *QUICK, f'--gin.MODEL_DIR={ro}/run')
    assert code == 1 and err == (f't5x: error: MODEL_DIR {ro}/run cannot be written '
                                 f'(Read-only file system: {ro}/run/.run.lock); nothing in it '
                                 'was changed.'), err
    code, err = _t5x_error(capsys, *QUICK, f'--gin.MODEL_DIR={ro}/new')
    assert code == 1 and err == (f't5x: error: MODEL_DIR {ro}/new cannot be created '
                                 f'(Read-only file system: {ro}/new).'), err
    assert os.listdir(ro) == ['run'] and os.listdir(os.path.join(ro, 'run')) == []


def test_a_prompt_of_other_weights_of_the_same_shape_gets_a_warning(ten_steps, capsys):
  """The sidecar records the frozen embedding's fingerprint: evaluating on a
  model of the same dimensions but other weights (model_seed 1) warns."""
  import gin  # pylint: disable=g-import-not-at-top
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  info = json.load(open(os.path.join(ten_steps / 'ten', 'numpy_checkpoints', 'checkpoint_10',
                                     'prompt_info.json')))
  assert len(info['weights']) == 16
  outs = {}
  for seed in (0, 1):
    gin.clear_config()
    with pytest.raises(SystemExit) as e:
      cli.main(['eval', '--gin_file=runs/eval.gin', '--gin_file=models/t5_1_1_tiny.gin',
                '--gin.MIXTURE_OR_TASK_NAME=synthetic_majority_yesno',
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 4}",
                '--gin.evaluate.num_examples=8', f'--gin.evaluate.model_seed={seed}',
                f'--gin.MODEL_DIR={ten_steps / "ten"}'])
    gin.clear_config()
    assert e.value.code == 0
    outs[seed] = capsys.readouterr().out
  assert 'warning' not in outs[0]
  assert 'was trained on other frozen weights, t5_1_1_tiny (weights ' + info['weights'] in outs[1]
