"""A MODEL_DIR and a PROMPT_FILE on gs://, through the real client libraries
(epath over gcsfs, TensorStore and orbax) against a local GCS emulator: train,
resume, start a run from a gs:// prompt file (prompts/from_file.gin), eval."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('gcp_storage_emulator', reason='test extra gcp-storage-emulator not installed')
pytest.importorskip('gcsfs', reason='test extra gcsfs not installed')

from tests import gcs_emulator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = 'encoder.prompt.prompt.prompt'
TRAIN = ['train', '--gin_file=runs/quickstart.gin', '--gin.BATCH_SIZE=8',
         '--gin.train.checkpoint_period=2', '--gin.train.log_period=2',
         '--gin.train.eval_period=None', '--gin.PROMPT_LENGTH=4',
         # TensorBoard writes through TensorFlow's own GCS client, which
         # cannot be pointed at an emulator; metrics.jsonl goes through epath.
         '--gin.train.tensorboard=False']


@pytest.fixture(scope='module')
def gcs():
  port = gcs_emulator.free_port()
  server = gcs_emulator.start(port)
  yield gcs_emulator.environment(port), port
  server.stop()


def t5x(env, *args):
  proc = subprocess.run([sys.executable, '-m', 'prompt_transfer.cli', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
  return proc.stdout


def _npy(port, path):
  return np.load(io.BytesIO(gcs_emulator.read(port, path)))


def test_train_resume_from_file_and_eval_on_gcs(gcs):
  env, port = gcs
  src = 'gs://bucket/runs/source'
  t5x(env, *TRAIN, '--gin.TRAIN_STEPS=4', f'--gin.MODEL_DIR={src}')
  assert gcs_emulator.exists(port, f'runs/source/numpy_checkpoints/checkpoint_4/{PROMPT}')
  assert gcs_emulator.exists(port, 'runs/source/checkpoints/4')
  # A restarted run resumes from the orbax checkpoint on gs://.
  out = t5x(env, *TRAIN, '--gin.TRAIN_STEPS=6', f'--gin.MODEL_DIR={src}')
  assert f'resumed from {src}/checkpoints/4' in out
  steps = [json.loads(l)['step'] for l in gcs_emulator.read(port, 'runs/source/metrics.jsonl').decode().splitlines()]
  assert steps == [1, 2, 4, 6]
  info = json.loads(gcs_emulator.read(port, 'runs/source/numpy_checkpoints/checkpoint_6/prompt_info.json'))
  assert info['step'] == 6 and info['module'] == 'Prompt' and info['prompt_length'] == 4
  # prompts/from_file.gin with a gs:// PROMPT_FILE; TRAIN_STEPS=0 writes the initial prompt.
  prompt_file = f'{src}/numpy_checkpoints/checkpoint_6/{PROMPT}'
  t5x(env, *TRAIN, '--gin_file=prompts/from_file.gin', f'--gin.PROMPT_FILE={prompt_file}',
      '--gin.TRAIN_STEPS=0', '--gin.MIXTURE_OR_TASK_NAME=synthetic_majority_truefalse',
      '--gin.MODEL_DIR=gs://bucket/runs/target')
  np.testing.assert_array_equal(
      _npy(port, f'runs/target/numpy_checkpoints/checkpoint_0/{PROMPT}'),
      _npy(port, f'runs/source/numpy_checkpoints/checkpoint_6/{PROMPT}'))
  # eval reads MODEL_DIR's latest prompt and writes its result there.
  t5x(env, 'eval', '--gin_file=runs/eval.gin', '--gin_file=models/t5_1_1_tiny_synthetic.gin',
      '--gin.MIXTURE_OR_TASK_NAME=synthetic_majority_yesno', '--gin.EVAL_SPLIT="validation"',
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 4}", '--gin.evaluate.num_examples=16',
      f'--gin.MODEL_DIR={src}')
  result = json.loads(gcs_emulator.read(port, 'runs/source/eval_validation.json'))
  assert result['prompt'] == prompt_file
  assert 0.0 <= result['metrics']['synthetic_majority_yesno/accuracy'] <= 100.0


def test_a_gs_checkpoint_path_is_copied_once_and_loads_like_the_local_one(gcs, tmp_path):
  """CHECKPOINT_PATH on gs://: copied into the local cache (reused while the
  remote files are unchanged), weights equal to the packaged local copy."""
  env, _ = gcs
  env = dict(env, PROMPT_TRANSFER_CHECKPOINT_CACHE=str(tmp_path / 'cache'))
  script = '''
import numpy as np
from etils import epath
from prompt_transfer.model import pretrained
from prompt_transfer.model.checkpoint_import import flatten_params
local = pretrained.resolve_checkpoint_path('pkg://assets/t5_1_1_tiny_synthetic')
for f in epath.Path(local).iterdir():
  (epath.Path('gs://bucket/models/tiny') / f.name).write_bytes(f.read_bytes())
for _ in range(2):  # the second load uses the cache
  _, remote = pretrained.load_pretrained('gs://bucket/models/tiny')
_, ref = pretrained.load_pretrained(local)
a, b = flatten_params(remote), flatten_params(ref)
assert sorted(a) == sorted(b)
assert all(np.array_equal(a[k], b[k]) for k in a)
print('EQUAL')
'''
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert 'EQUAL' in proc.stdout and proc.stdout.count('copying gs://bucket/models/tiny') == 1
  (cached,) = os.listdir(tmp_path / 'cache')
  assert cached.startswith('tiny-') and 'model.safetensors' in os.listdir(tmp_path / 'cache' / cached)
