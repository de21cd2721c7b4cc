"""Meshes and multiple processes give the same training as one device.

Each run is a real `t5x train` subprocess (XLA device counts and the JAX
distributed runtime are per process)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = 'encoder.prompt.prompt.prompt'
STEPS = 10
ARGS = ['train', '--gin_file=runs/quickstart.gin', f'--gin.TRAIN_STEPS={STEPS}',
        '--gin.BATCH_SIZE=16', '--gin.PROMPT_LENGTH=6', '--gin.train.log_period=1',
        '--gin.train.checkpoint_period=5', '--gin.train.eval_period=None',
        "--gin.train.host_data_sharding='slice'"]
T5X = [sys.executable, '-m', 'prompt_transfer.cli']


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _run(model_dir, *extra, devices=1):
  proc = subprocess.run(T5X + ARGS + [f'--gin.MODEL_DIR={model_dir}', *extra], cwd=ROOT,
                        env=_env(devices), capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout


def _launch_local(n, model_dir):
  env = _env(1)
  env['T5X'] = ' '.join(T5X)
  return subprocess.Popen(['bash', os.path.join(ROOT, 'launch', 'local.sh'), str(n), '--'] + ARGS
                          + [f'--gin.MODEL_DIR={model_dir}'], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)


def _losses(model_dir):
  return [json.loads(l)['loss'] for l in open(os.path.join(model_dir, 'metrics.jsonl'))]


def assert_same_prompt(got, ref):
  """Equal to 1e-5 relative to the prompt's size (element-wise relative error
  is ill-posed for entries near zero; float sums over 8 devices reorder)."""
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert rel < 1e-5, f'relative difference {rel:.2e}'
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _prompt(model_dir, step=STEPS):
  with open(os.path.join(model_dir, 'numpy_checkpoints', f'checkpoint_{step}', PROMPT), 'rb') as f:
    return np.load(f)


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('one') / 'run')
  _run(d)
  return d


def test_4x2_mesh_matches_one_device(one_device, tmp_path):
  d = str(tmp_path / 'mesh')
  out = _run(d, '--gin.train.mesh_shape=(4, 2)', devices=8)
  assert "mesh {'data': 4, 'model': 2} over 8 devices" in out
  ref, got = _losses(one_device), _losses(d)
  assert len(ref) == STEPS
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert_same_prompt(_prompt(d), _prompt(one_device))


def test_two_processes_match_one_process(one_device, tmp_path):
  d = str(tmp_path / 'two')
  proc = _launch_local(2, d)
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, out[-4000:]
  assert '2 process(es)' in out
  np.testing.assert_allclose(_losses(d), _losses(one_device), rtol=1e-5)
  assert_same_prompt(_prompt(d), _prompt(one_device))


def test_two_process_run_killed_and_restarted_resumes(one_device, tmp_path):
  d = str(tmp_path / 'killed')
  proc = _launch_local(2, d)
  first = os.path.join(d, 'numpy_checkpoints', 'checkpoint_5')
  deadline = time.time() + 300
  while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert os.path.exists(first), 'the two-process run never reached its first checkpoint'
  proc = _launch_local(2, d)
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, out[-4000:]
  assert_same_prompt(_prompt(d), _prompt(one_device))


def test_make_mesh_shapes():
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import partitioning  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(1)
  assert dict(mesh.shape) == {'data': jax.device_count(), 'model': 1}
  with pytest.raises(ValueError, match='needs 6 devices'):
    partitioning.make_mesh(mesh_shape=(3, 2))
