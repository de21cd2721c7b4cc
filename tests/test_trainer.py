"""The trainer, called directly: prompt-only updates, numpy prompt files,
resume equality, NaN handling."""
import json
import os

import numpy as np
import pytest

import tasks  # noqa: F401  (registers the synthetic tasks)
from prompt_transfer.prompts import files as prompt_files
from prompt_transfer.prompts.free import free_prompt
from prompt_transfer.training import trainer
from prompt_transfer.prompts import initializers
from prompt_transfer.model.config import get_config

TASK = 'synthetic_majority_yesno'
CONFIG = get_config('t5_1_1', 'tiny', vocab_size=384)
PROMPT_FILE = 'encoder.prompt.prompt.prompt'


def _train(model_dir, steps, **kw):
  args = dict(model_dir=str(model_dir), mixture_or_task_name=TASK,
              task_feature_lengths={'inputs': 48, 'targets': 4}, train_steps=steps,
              batch_size=16, config=CONFIG, prompt_module=free_prompt(6, initializers.from_sampled_vocab()),
              checkpoint_period=10, log_period=5, seed=3)
  args.update(kw)
  return trainer.train(**args)


def _prompt(model_dir, step):
  with open(os.path.join(prompt_files.numpy_checkpoint_dir(str(model_dir), step),
                         PROMPT_FILE), 'rb') as f:
    return np.load(f)


def _losses(model_dir):
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [json.loads(l)['loss'] for l in f]


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  d = tmp_path_factory.mktemp('straight')
  _train(d, 20)
  return d


def test_prompt_tuning_writes_google_layout_and_learns(straight_run):
  d = str(straight_run)
  steps = sorted(os.listdir(os.path.join(d, 'numpy_checkpoints')))
  assert steps == ['checkpoint_0', 'checkpoint_10', 'checkpoint_20']
  p0, p20 = _prompt(d, 0), _prompt(d, 20)
  assert p0.shape == (6, CONFIG.emb_dim) and p0.dtype == np.float32
  assert not np.allclose(p0, p20)
  # Only the prompt is in the train state: the frozen model is not checkpointed.
  files = os.listdir(prompt_files.numpy_checkpoint_dir(d, 20))
  assert sorted(files) == [PROMPT_FILE, 'prompt_info.json']
  info = prompt_files.load_prompt_info(os.path.join(prompt_files.numpy_checkpoint_dir(d, 20),
                                                   PROMPT_FILE))
  assert info.task == TASK and info.step == 20 and info.prompt_length == 6
  assert info.model['emb_dim'] == CONFIG.emb_dim
  losses = _losses(d)
  assert len(losses) == 5 and losses[-1] < losses[0]
  assert os.path.exists(os.path.join(d, 'config.gin'))
  assert any(f.startswith('events') for f in os.listdir(os.path.join(d, 'train')))


def test_resume_gives_the_same_prompt_as_a_straight_run(straight_run, tmp_path):
  _train(tmp_path, 10)
  _train(tmp_path, 20)  # resumes from step 10, sees batches 10..19
  np.testing.assert_allclose(_prompt(tmp_path, 20), _prompt(straight_run, 20), rtol=1e-6,
                             atol=1e-7)
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [1, 5, 10, 15, 20]


def test_rbg_dropout_keys_train_resume_and_differ_from_threefry(straight_run, tmp_path):
  """rng_impl='rbg' (T5X's hardware RNG): same initial prompt, other dropout
  masks, still learns, and a resumed run equals a straight one."""
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  _train(straight, 20, rng_impl='rbg')
  _train(resumed, 10, rng_impl='rbg')
  _train(resumed, 20, rng_impl='rbg')
  np.testing.assert_array_equal(_prompt(straight, 0), _prompt(straight_run, 0))
  assert not np.allclose(_prompt(straight, 20), _prompt(straight_run, 20))
  np.testing.assert_allclose(_prompt(resumed, 20), _prompt(straight, 20), rtol=1e-6, atol=1e-7)
  losses = _losses(straight)
  assert losses[-1] < losses[0]
  with pytest.raises(trainer.TrainingError, match='rng_impl must be one of'):
    _train(tmp_path / 'bad', 1, rng_impl='philox')


def test_zero_steps_writes_the_initial_prompt(tmp_path):
  init = np.random.RandomState(0).randn(6, CONFIG.emb_dim).astype(np.float32)
  _train(tmp_path, 0, prompt_module=free_prompt(6, initializers.from_array(init)))
  np.testing.assert_array_equal(_prompt(tmp_path, 0), init)


def test_from_file_prompt_of_wrong_shape_is_refused_before_training(tmp_path):
  bad = tmp_path / 'prompt'
  with open(bad, 'wb') as f:
    np.save(f, np.zeros((5, 7), np.float32))
  with pytest.raises(prompt_files.PromptFileError, match=r'shape \(5, 7\).*expects \(6, 32\)'):
    _train(tmp_path / 'run', 5, prompt_module=free_prompt(6, initializers.from_file(str(bad))))
  assert not os.path.exists(tmp_path / 'run' / 'numpy_checkpoints')


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # A NaN learning rate poisons the prompt after the first update.
  with pytest.raises(trainer.TrainingError, match='Loss is nan at step 5'):
    _train(tmp_path, 10, learning_rate=float('nan'))
  assert prompt_files.latest_numpy_step(str(tmp_path)) == 0


def test_model_tuning_trains_everything(tmp_path):
  out = _train(tmp_path, 5, prompt_module=None, trainable_params='.*', checkpoint_period=5,
               learning_rate=1e-3, optimizer=None)
  assert np.isfinite(out['loss'])
  files = os.listdir(prompt_files.numpy_checkpoint_dir(str(tmp_path), 5))
  assert 'token_embedder.embedding' in files and 'decoder.layers_0.mlp.wo.kernel' in files


def test_checkpoint_for_another_model_is_refused(tmp_path):
  from prompt_transfer.model.checkpoint_import import CheckpointMismatchError
  fixture = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf_t5_1_0_tiny')
  with pytest.raises(CheckpointMismatchError) as e:
    _train(tmp_path, 5, checkpoint_path=fixture)
  msg = str(e.value)
  assert 'hf_t5_1_0_tiny' in msg and 'token_embedder/embedding' in msg
  assert '(384, 32)' in msg  # what the configured model expects


SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'shared', 'data', 'google_prompt_tuning', 'test_data')


@pytest.mark.skipif(not os.path.isdir(SHARED), reason='../shared/data (real T5X checkpoint and '
                    'T5 vocabulary) is not present beside the checkout')
def test_prompt_tuning_on_a_real_t5x_checkpoint(tmp_path):
  """Google's T5X-written tiny T5 1.1 + the real T5 SentencePiece vocabulary."""
  import tasks as tasks_lib
  tasks_lib.set_default_vocabulary(os.path.join(SHARED, 't5_vocab'))
  try:
    config = get_config('t5_1_1', 'tiny', emb_dim=4, num_heads=2, head_dim=2, mlp_dim=8,
                        relative_attention_num_buckets=4, relative_attention_max_distance=8,
                        dropout_rate=0.0)
    out = _train(tmp_path, 6, config=config, mixture_or_task_name='synthetic_majority_yesno_t5',
                 checkpoint_path=os.path.join(SHARED, 'test_t5_1_1_tiny', 'checkpoint_3'),
                 prompt_module=free_prompt(3, initializers.from_sampled_vocab()), checkpoint_period=6,
                 task_feature_lengths={'inputs': 32, 'targets': 4})
  finally:
    tasks_lib.set_default_vocabulary(None)
  assert np.isfinite(out['loss'])
  p = _prompt(tmp_path, 6)
  assert p.shape == (3, 4)
  # Sampled-vocab init: checkpoint_0 rows are rows of the real embedding table.
  emb = np.load(os.path.join(SHARED, 'tiny_embeddings_32128x4.npy'))
  p0 = _prompt(tmp_path, 0)
  assert all(np.any(np.all(np.isclose(emb[:5000], row), axis=1)) for row in p0)


def test_a_custom_prompt_module_is_what_gets_trained(tmp_path):
  """Any module under encoder/prompt: its free parameters are what trains, and
  the numpy checkpoint also holds the prompt it produces, in Google's layout."""
  import flax.linen as nn
  import jax.numpy as jnp

  class UV(nn.Module):  # prompt = u @ v, only u and v are free
    length: int = 6

    @nn.compact
    def __call__(self, embedding, features):
      u = self.param('u', nn.initializers.normal(1.0), (self.length, 2))
      v = self.param('v', nn.initializers.normal(1.0), (2, embedding.shape[-1]))
      return jnp.dot(u, v)

  _train(tmp_path, 10, prompt_module=UV)
  folder = prompt_files.numpy_checkpoint_dir(str(tmp_path), 10)
  assert sorted(os.listdir(folder)) == [PROMPT_FILE, 'encoder.prompt.prompt.u',
                                        'encoder.prompt.prompt.v', 'prompt_info.json']
  load = lambda name: np.load(os.path.join(folder, name))  # noqa: E731
  np.testing.assert_allclose(load(PROMPT_FILE), load('encoder.prompt.prompt.u') @
                             load('encoder.prompt.prompt.v'), rtol=1e-5, atol=1e-6)
  info = prompt_files.load_prompt_info(os.path.join(folder, PROMPT_FILE))
  assert info.module == 'UV' and info.prompt_length == 6
  assert info.param_shapes == {'encoder.prompt.prompt.u': [6, 2],
                               'encoder.prompt.prompt.v': [2, CONFIG.emb_dim]}
  assert not np.allclose(_prompt(tmp_path, 0), _prompt(tmp_path, 10))
  losses = _losses(tmp_path)
  assert np.isfinite(losses).all()


def test_metrics_report_flops_and_no_recompilation(straight_run):
  recs = [json.loads(l) for l in open(os.path.join(straight_run, 'metrics.jsonl'))]
  assert all(r['recompilations'] == 0 for r in recs)
  assert recs[-1]['train_step_flops'] > 1e6
  assert 'mfu' not in recs[-1]  # no peak FLOP/s is known for CPUs


def test_remat_trains_the_same_and_logs_model_flops_without_recomputation(straight_run, tmp_path):
  """model_config.remat=True: the same losses as without remat (same dropout
  masks, same numbers), and train_step_flops (what MFU divides) counts the
  model's FLOPs, not the rematerialised forward passes."""
  _train(tmp_path, 10, config=CONFIG.replace(remat=True), checkpoint_period=10)
  read = lambda d: {r['step']: r for r in map(json.loads, open(os.path.join(d, 'metrics.jsonl')))}  # noqa: E731
  remat, plain = read(tmp_path), read(straight_run)
  assert sorted(remat) == [1, 5, 10]
  for step in remat:
    assert remat[step]['loss'] == pytest.approx(plain[step]['loss'], rel=1e-5)
    assert remat[step]['train_step_flops'] == plain[step]['train_step_flops']


def test_bfloat16_activations_train_a_float32_prompt(tmp_path):
  """model_config.dtype='bfloat16': frozen kernels stored in bf16, the prompt and
  its optimizer state stay float32, and the loss goes down."""
  _train(tmp_path, 20, config=CONFIG.replace(dtype='bfloat16'), checkpoint_period=20)
  p20 = _prompt(tmp_path, 20)
  assert p20.dtype == np.float32 and not np.allclose(_prompt(tmp_path, 0), p20)
  losses = _losses(tmp_path)
  assert losses[-1] < losses[0], losses
