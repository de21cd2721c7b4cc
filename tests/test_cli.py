"""The real `t5x` command on the tiny config: flags, gin library, errors,
train -> eval -> infer, and SIGKILL-then-resume."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from prompt_transfer import cli
from tests.in_process import t5x_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = 'encoder.prompt.prompt.prompt'
# A short quick-start: 40 steps, checkpoints every 10.
QUICK = ['--gin_file=runs/quickstart.gin', '--gin.TRAIN_STEPS=40', '--gin.BATCH_SIZE=16',
         '--gin.train.checkpoint_period=10', '--gin.train.log_period=10',
         '--gin.train.eval_period=None', '--gin.PROMPT_LENGTH=6']


def t5x(*args, cwd=None, check=True, timeout=300):
  proc = subprocess.run([sys.executable, '-m', 'prompt_transfer.cli', *args], cwd=cwd or ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
  return proc


def _prompt(model_dir, step):
  with open(os.path.join(model_dir, 'numpy_checkpoints', f'checkpoint_{step}', PROMPT), 'rb') as f:
    return np.load(f)


def test_gin_override_values():
  assert cli.gin_value('/tmp/run') == "'/tmp/run'"
  assert cli.gin_value('"/tmp/run"') == '"/tmp/run"'
  assert cli.gin_value('100') == '100'
  assert cli.gin_value("{'inputs': 4}") == "{'inputs': 4}"
  rest, bindings = cli.split_gin_overrides(['train', '--gin.MODEL_DIR=/x', '--gin_file=a.gin'])
  assert rest == ['train', '--gin_file=a.gin'] and bindings == ["MODEL_DIR = '/x'"]


def test_gin_library_resolves_packaged_files():
  gin_dir = cli.packaged_gin_dir()
  for f in ('prompts/from_file.gin', 'prompts/random_uniform.gin', 'prompts/from_sampled_vocab.gin',
            'prompts/from_class_labels.gin', 'runs/prompt_tune.gin', 'runs/model_tune.gin',
            'runs/eval.gin', 'runs/infer.gin', 'runs/quickstart.gin', 'models/t5_1_1_xxl.gin',
            'models/lm_adapted_base.gin', 'models/mt5_small.gin', 'models/flan_large.gin',
            'models/t5_1_0_tiny.gin'):
    assert os.path.exists(os.path.join(gin_dir, f)), f


def test_help_explains_flags():
  out = t5x('train', '--help').stdout
  for flag in ('--gin_file', '--gin_bindings', '--gin_search_paths', '--module_import',
               '--gin.NAME=VALUE'):
    assert flag in out


def _in_process(capsys, *args):
  """The CLI's error paths run in-process: they stop before any training."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  with pytest.raises(SystemExit) as e:
    cli.main(list(args))
  return e.value.code, capsys.readouterr().err


def test_errors_a_person_can_act_on(tmp_path, capsys):
  # Missing PROMPT_FILE with from_file.gin: names the flag to add.
  code, err = _in_process(capsys, 'train', *QUICK, '--gin_file=prompts/from_file.gin',
                          f'--gin.MODEL_DIR={tmp_path}/a')
  assert code != 0 and 'PROMPT_FILE' in err and '--gin.PROMPT_FILE' in err
  # A gin typo names the file and the line.
  bad = tmp_path / 'bad.gin'
  bad.write_text("include 'runs/quickstart.gin'\ntrain.trian_steps = 3\n")
  code, err = _in_process(capsys, 'train', f'--gin_file={bad}', f'--gin.MODEL_DIR={tmp_path}/b')
  assert code != 0 and 'bad.gin' in err and 'line 2' in err
  assert 'Traceback' not in err
  # An unknown task lists close names.
  code, err = _in_process(capsys, 'train', *QUICK, f'--gin.MODEL_DIR={tmp_path}/c',
                          '--gin.MIXTURE_OR_TASK_NAME=synthetic_majority_yesn')
  assert code != 0 and 'synthetic_majority_yesno' in err and 'not registered' in err
  # A model_config value that does not exist names the field and the choices.
  code, err = _in_process(capsys, 'train', *QUICK, f'--gin.MODEL_DIR={tmp_path}/d',
                          '--gin.model_config.dropout_mask="bernoulli"')
  assert code == 1 and "dropout_mask must be one of ('hash', 'prng'); got 'bernoulli'" in err
  assert 'model_config' in err and 'Traceback' not in err
  # Missing MODEL_DIR.
  code, err = _in_process(capsys, 'train', '--gin_file=runs/quickstart.gin')
  assert code != 0 and '--gin.MODEL_DIR' in err
  # The same errors from the installed command, once, without a traceback.
  p = t5x('train', '--gin_file=runs/quickstart.gin', check=False)
  assert p.returncode == 2 and '--gin.MODEL_DIR' in p.stderr and 'Traceback' not in p.stderr


def test_list_tasks():
  out = t5x_here('list-tasks', '--filter', 'synthetic_majority').stdout
  assert 'synthetic_majority_yesno' in out and 'accuracy' in out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('cli') / 'run')
  proc = t5x('train', *QUICK, f'--gin.MODEL_DIR={d}')
  # Nothing but our own lines: no TensorFlow/absl/seqio noise (the run stops
  # inside its first epoch, where TF used to warn about a dropped cache).
  assert proc.stderr == '', proc.stderr
  return d


def test_train_eval_infer_and_from_file(trained, tmp_path):
  recs = [json.loads(l) for l in open(os.path.join(trained, 'metrics.jsonl'))]
  assert [r['step'] for r in recs] == [1, 10, 20, 30, 40]
  assert recs[-1]['loss'] < recs[0]['loss']
  for key in ('loss', 'learning_rate', 'examples_per_second'):
    assert key in recs[-1]
  assert _prompt(trained, 40).shape == (6, 64)
  # eval and infer read the latest numpy prompt of MODEL_DIR.
  common = ['--gin_file=models/t5_1_1_tiny_synthetic.gin',
            '--gin.MIXTURE_OR_TASK_NAME=synthetic_majority_yesno',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 4}", f'--gin.MODEL_DIR={trained}']
  proc = t5x('eval', '--gin_file=runs/eval.gin', *common)
  assert 'synthetic_majority_yesno/accuracy' in proc.stdout
  # seqio's warnings about how our pipelines are built stay off the terminal.
  for noise in ('longer than necessary', 'logger_cls', 'FunctionDataset'):
    assert noise not in proc.stderr, proc.stderr
  result = json.load(open(os.path.join(trained, 'eval_validation.json')))
  assert 0.0 <= result['metrics']['synthetic_majority_yesno/accuracy'] <= 100.0
  t5x_here('infer', '--gin_file=runs/infer.gin', *common)
  lines = [json.loads(l) for l in open(os.path.join(trained, 'predictions_validation.jsonl'))]
  assert len(lines) == 200 and {'inputs', 'targets', 'prediction'} <= set(lines[0])
  # A second task started from the first task's prompt (SPoT transfer).
  target = str(tmp_path / 'target')
  src = os.path.join(trained, 'numpy_checkpoints', 'checkpoint_40', PROMPT)
  t5x_here('train', *QUICK, '--gin_file=prompts/from_file.gin', f'--gin.PROMPT_FILE={src}',
           '--gin.TRAIN_STEPS=0', '--gin.MIXTURE_OR_TASK_NAME=synthetic_majority_truefalse',
           f'--gin.MODEL_DIR={target}')
  np.testing.assert_array_equal(_prompt(target, 0), _prompt(trained, 40))


def test_sigkill_and_resume_finishes_with_the_same_prompt(trained, tmp_path):
  d = str(tmp_path / 'killed')
  proc = subprocess.Popen([sys.executable, '-m', 'prompt_transfer.cli', 'train', *QUICK,
                           f'--gin.MODEL_DIR={d}'], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  ckpt10 = os.path.join(d, 'numpy_checkpoints', 'checkpoint_10')
  while not os.path.exists(ckpt10) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(ckpt10), 'the run never reached its first checkpoint'
  assert not os.path.exists(os.path.join(d, 'numpy_checkpoints', 'checkpoint_40'))
  out = t5x_here('train', *QUICK, f'--gin.MODEL_DIR={d}').stdout
  assert 'resumed from' in out
  np.testing.assert_allclose(_prompt(d, 40), _prompt(trained, 40), rtol=1e-6, atol=1e-7)


def test_remat_binding_sets_the_cpu_scheduler_flag_before_training(tmp_path, monkeypatch):
  """--gin.model_config.remat=True adds perf.CPU_REMAT_XLA_FLAG to XLA_FLAGS
  before the entry point runs (XLA reads it when the backend starts)."""
  import gin  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import perf, trainer  # pylint: disable=g-import-not-at-top
  seen = {}
  monkeypatch.setattr(trainer, 'train', lambda: seen.setdefault('flags', os.environ['XLA_FLAGS']))
  for remat in (False, True):
    monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
    seen.clear()
    gin.clear_config()
    try:
      assert cli.run(['train', *QUICK, f'--gin.MODEL_DIR={str(tmp_path)!r}',
                      f'--gin.model_config.remat={remat}']) == 0
    finally:
      gin.clear_config()
    assert (perf.CPU_REMAT_XLA_FLAG in seen['flags']) == remat


def test_spot_source_gin_trains_on_a_mixture_and_the_target_starts_from_it(tmp_path):
  """runs/spot_source.gin (a mixture, Google's numpy layout) -> prompts/from_file.gin."""
  import gin  # pylint: disable=g-import-not-at-top
  source, target = str(tmp_path / 'source'), str(tmp_path / 'target')
  model = ['--gin_file=models/t5_1_1_tiny_synthetic.gin', '--gin.PROMPT_LENGTH=6',
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 12}", '--gin.BATCH_SIZE=8',
           '--gin.train.eval_period=None', '--gin.train.log_period=5']
  try:
    gin.clear_config()
    assert cli.run(['train', '--gin_file=prompts/random_uniform.gin',
                    '--gin_file=runs/spot_source.gin', *model, '--gin.TRAIN_STEPS=10',
                    '--gin.train.checkpoint_period=5', f'--gin.MODEL_DIR={source!r}',
                    "--gin.MIXTURE_OR_TASK_NAME='synthetic_mixture'"]) == 0
    gin.clear_config()
    src = os.path.join(source, 'numpy_checkpoints', 'checkpoint_10', PROMPT)
    assert cli.run(['train', '--gin_file=prompts/from_file.gin', '--gin_file=runs/prompt_tune.gin',
                    *model, '--gin.TRAIN_STEPS=0', f'--gin.PROMPT_FILE={src!r}',
                    f'--gin.MODEL_DIR={target!r}',
                    "--gin.MIXTURE_OR_TASK_NAME='synthetic_majority_truefalse'"]) == 0
  finally:
    gin.clear_config()
  info = json.load(open(os.path.join(source, 'numpy_checkpoints', 'checkpoint_10',
                                     'prompt_info.json')))
  assert info['task'] == 'synthetic_mixture' and info['step'] == 10
  # Every numpy checkpoint stays (a candidate source prompt).
  assert sorted(os.listdir(os.path.join(source, 'numpy_checkpoints'))) == [
      'checkpoint_0', 'checkpoint_10', 'checkpoint_5']
  np.testing.assert_array_equal(_prompt(target, 0), _prompt(source, 10))
  assert not np.array_equal(_prompt(source, 0), _prompt(source, 10))


def test_train_fills_the_compilation_cache(tmp_path):
  """`--compilation_cache_dir`: compiled programs are kept for the next run."""
  cache = tmp_path / 'xla'
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  proc = subprocess.run(
      [sys.executable, '-m', 'prompt_transfer.cli', 'train', *QUICK, '--gin.TRAIN_STEPS=2',
       f'--gin.MODEL_DIR={str(tmp_path / "run")!r}', f'--compilation_cache_dir={cache}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any('train_step' in name for name in os.listdir(cache)), os.listdir(cache)


def test_startup_noise_of_native_libraries_is_held_back():
  """TensorFlow's C++ start-up lines (absl pre-init warning, oneDNN, CUDA stubs)
  do not reach the terminal; PROMPT_TRANSFER_DEBUG=1 lets them through."""
  err = t5x('list-tasks', '--filter', 'synthetic_majority_yesno').stderr
  for noise in ('absl::InitializeLog', 'oneDNN custom operations', 'cudart_stub'):
    assert noise not in err, err
  env = dict(os.environ, PROMPT_TRANSFER_DEBUG='1')
  proc = subprocess.run([sys.executable, '-m', 'prompt_transfer.cli', 'list-tasks', '--filter',
                         'synthetic_majority_yesno'], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and 'synthetic_majority_yesno' in proc.stdout
  assert 'absl::InitializeLog' in proc.stderr or 'oneDNN' in proc.stderr


def test_local_vocabulary_replaces_the_gs_default(monkeypatch):
  """models/*.gin name the public gs:// SentencePiece file; env T5_VOCAB (an
  offline copy) replaces that default, an explicit --gin.VOCABULARY_PATH wins."""
  import gin  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('T5_VOCAB', '/data/t5/spm.model')
  try:
    for given, expected in ((tasks.core.DEFAULT_VOCAB_PATH, '/data/t5/spm.model'),
                            ('/mine/spm.model', '/mine/spm.model')):
      gin.clear_config()
      gin.parse_config(f'VOCABULARY_PATH = {given!r}')
      cli._configure_tasks()  # pylint: disable=protected-access
      assert tasks.core.default_vocabulary_path() == expected
  finally:
    gin.clear_config()
    tasks.set_default_vocabulary(None)
