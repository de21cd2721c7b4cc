"""The prompt-module contract and staged training (the seam every method builds on).

* a per-example module (a prompt bank) gives each example of a mixed batch
  exactly what its own prompt alone gives;
* an auxiliary loss sown by a prompt module changes the gradient and reaches
  metrics.jsonl by name;
* a two-stage run (fewer layers, then the full model) carries the prompt and
  its Adafactor state bit for bit across the boundary, compiles once per
  stage, and a run killed inside stage 2 resumes to the same final prompt;
* a run with a non-default prompt module is evaluated and compared through the
  prompt it writes in Google's layout.
"""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_transfer.model.config import get_config
from prompt_transfer.model.models import build_model, merge_prompt
from prompt_transfer.prompts import files
from prompt_transfer.prompts.bank import PromptBank, bank_params
from prompt_transfer.prompts.free import free_prompt
from prompt_transfer.training import data, stages, state as state_lib
from tests.in_process import t5x_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = files.PROMPT_FILE
CONFIG = get_config('t5_1_1', 'tiny', vocab_size=384, dropout_rate=0.0)


@pytest.fixture(scope='module')
def frozen():
  return build_model(CONFIG).init_params(jax.random.PRNGKey(0))


def _batch(rs, b, s=7, t=3):
  enc = rs.randint(2, 384, (b, s)).astype(np.int32)
  for i in range(b):  # varied padding
    enc[i, s - (i % 3):] = 0
  tgt = rs.randint(2, 384, (b, t)).astype(np.int32)
  dec = np.zeros_like(tgt)
  dec[:, 1:] = tgt[:, :-1]
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec, 'decoder_target_tokens': tgt}


def test_a_prompt_bank_gives_each_example_what_its_own_prompt_gives(frozen):
  rs = np.random.RandomState(0)
  own = [rs.uniform(-0.5, 0.5, (n, CONFIG.emb_dim)).astype(np.float32) for n in (4, 2, 3)]
  bank_p, lengths = bank_params(own)
  bank = build_model(CONFIG, functools.partial(PromptBank, num_prompts=3, length=4,
                                               lengths=lengths))
  params = merge_prompt({'prompt': bank_p}, frozen)
  ids = np.array([0, 1, 2, 1, 0, 2], np.int32)
  batch = {**_batch(rs, len(ids)), 'task_ids': ids}
  logits = bank.module.apply({'params': params}, batch['encoder_input_tokens'],
                             batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                             prompt_features={'task_ids': ids})
  scores = np.asarray(bank.score_batch(params, batch))
  tokens = np.asarray(bank.predict_batch(params, {**batch, 'decoder_input_tokens':
                                                  np.zeros((len(ids), 5), np.int32)}))
  for i, k in enumerate(ids):
    alone = build_model(CONFIG, free_prompt(own[k].shape[0]))
    p = merge_prompt({'prompt': {'prompt': own[k]}}, frozen)
    one = {key: v[i:i + 1] for key, v in batch.items() if key != 'task_ids'}
    ref = alone.module.apply({'params': p}, one['encoder_input_tokens'],
                             one['decoder_input_tokens'], one['decoder_target_tokens'])
    np.testing.assert_allclose(logits[i], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores[i], np.asarray(alone.score_batch(p, one))[0], rtol=1e-5)
    ref_tokens = alone.predict_batch(p, {**one, 'decoder_input_tokens': np.zeros((1, 5), np.int32)})
    np.testing.assert_array_equal(tokens[i], np.asarray(ref_tokens)[0])
  # Reading the prompts back: each at its own length, exactly.
  out = bank.materialize_prompt(params)
  assert len(out) == 3
  for got, want in zip(out, own):
    np.testing.assert_array_equal(got, want)
  mixed = bank.materialize_prompt(params, {'task_ids': ids})
  assert [m.shape[0] for m in mixed] == [own[k].shape[0] for k in ids]


class _Penalised(nn.Module):
  """A free prompt with a sown auxiliary loss: weight * mean(prompt^2)."""
  length: int = 4
  weight: float = 1.0

  @nn.compact
  def __call__(self, embedding, features):
    p = self.param('prompt', nn.initializers.normal(0.5), (self.length, embedding.shape[-1]))
    self.sow('losses', 'norm_penalty', self.weight * jnp.mean(jnp.square(p)))
    return p


def test_an_auxiliary_loss_changes_the_gradient_and_is_reported(frozen, tmp_path):
  rs = np.random.RandomState(1)
  batch = _batch(rs, 4)
  grads, metrics = {}, {}
  for w in (0.0, 3.0):
    model = build_model(CONFIG, functools.partial(_Penalised, weight=w))
    params = model.init_prompt(jax.random.PRNGKey(0), frozen)
    prompt, rest = state_lib.partition_params(params, state_lib.PROMPT_PARAMS)
    fn = lambda t: model.loss_fn(state_lib.merge_params(t, rest), batch, None)  # noqa: E731,B023
    (loss, metrics[w]), g = jax.value_and_grad(fn, has_aux=True)(prompt)
    grads[w] = g['encoder']['prompt']['prompt']['prompt']
    p = prompt['encoder']['prompt']['prompt']['prompt']
    assert float(loss) == pytest.approx(float(metrics[w]['cross_entropy'] + metrics[w]['z_loss']
                                              + w * jnp.mean(p ** 2)), rel=1e-6)
  assert float(metrics[3.0]['losses/norm_penalty']) > 0
  assert float(metrics[0.0]['losses/norm_penalty']) == 0
  # d/dp of 3 * mean(p^2) = 6 p / size: exactly what the term adds.
  np.testing.assert_allclose(grads[3.0] - grads[0.0], 6 * p / p.size, rtol=1e-4, atol=1e-7)

  # Through the trainer: the term is logged by name in metrics.jsonl.
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from prompt_transfer.training import trainer  # pylint: disable=g-import-not-at-top
  trainer.train(model_dir=str(tmp_path), mixture_or_task_name='synthetic_majority_yesno',
                task_feature_lengths={'inputs': 32, 'targets': 4}, train_steps=4, batch_size=8,
                config=CONFIG, prompt_module=functools.partial(_Penalised, weight=3.0),
                checkpoint_period=4, log_period=2)
  recs = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert all(r['losses/norm_penalty'] > 0 for r in recs)


def test_stage_plan_and_layer_transform():
  plan = stages.plan([stages.Stage(steps=4), stages.Stage()], 10)
  assert plan.bounds == ((0, 4), (4, 10)) and [plan.index_at(s) for s in (0, 3, 4, 9)] == [0, 0, 1, 1]
  with pytest.raises(stages.StageError, match='add up to 7'):
    stages.plan([stages.Stage(steps=4), stages.Stage(steps=3)], 10)
  with pytest.raises(stages.StageError, match='only the last'):
    stages.plan([stages.Stage(), stages.Stage()], 10)
  cfg = get_config('t5_1_1', 'tiny', vocab_size=384, num_encoder_layers=3)
  params = build_model(cfg).init_params(jax.random.PRNGKey(0))
  new_cfg, kept = stages.keep_layers(encoder=[0, 2])(cfg, params)
  assert new_cfg.num_encoder_layers == 2 and new_cfg.num_decoder_layers == cfg.num_decoder_layers
  assert sorted(k for k in kept['encoder'] if k.startswith('layers_')) == ['layers_0', 'layers_1']
  np.testing.assert_array_equal(kept['encoder']['layers_1']['mlp']['wo']['kernel'],
                                params['encoder']['layers_2']['mlp']['wo']['kernel'])
  assert 'encoder_norm' in kept['encoder']
  with pytest.raises(stages.StageError, match=r'in \[0, 3\)'):
    stages.keep_layers(encoder=[0, 3])(cfg, params)


def test_set_up_carries_a_train_state_bit_for_bit(frozen):
  """At a stage boundary only the frozen model changes: the carried state
  (prompt, Adafactor slots, step) is placed as it is."""
  from prompt_transfer.training import partitioning  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh()
  model = build_model(CONFIG, free_prompt(4))
  tx = state_lib.prompt_tuning_optimizer(0.3)
  first = state_lib.set_up(model, dict(frozen), tx, mesh, jax.random.PRNGKey(0))
  trained = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.25, first.state)  # any values
  cfg2, frozen2 = stages.keep_layers(encoder=[1])(CONFIG, dict(frozen))
  second = state_lib.set_up(model.with_config(num_encoder_layers=1), frozen2, tx, mesh,
                            jax.random.PRNGKey(1), carry=trained)
  assert cfg2.num_encoder_layers == 1 and 'layers_1' not in second.frozen['encoder']
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         second.state, trained)


# ---------------------------------------------------------------------------
# Through `t5x train`: a two-stage run, killed inside stage 2 and resumed.
# ---------------------------------------------------------------------------
TWO_STAGES = """
train.stages = [@partial/stages.Stage(), @full/stages.Stage()]
partial/stages.Stage.name = 'partial'
partial/stages.Stage.steps = 6
partial/stages.Stage.transform = @partial/stages.keep_layers()
partial/stages.keep_layers.encoder = [1]
partial/stages.keep_layers.decoder = [0]
full/stages.Stage.name = 'full'
"""
ARGS = ['train', '--gin_file=runs/quickstart.gin', '--gin.TRAIN_STEPS=12', '--gin.BATCH_SIZE=8',
        '--gin.PROMPT_LENGTH=4', '--gin.train.checkpoint_period=3', '--gin.train.log_period=3',
        '--gin.train.eval_period=None', '--gin.train.tensorboard=False']
T5X = [sys.executable, '-m', 'prompt_transfer.cli']


def _prompt(model_dir, step):
  return np.load(os.path.join(files.numpy_checkpoint_dir(model_dir, step), PROMPT))


@pytest.fixture(scope='module')
def staged(tmp_path_factory):
  root = tmp_path_factory.mktemp('staged')
  gin_file = root / 'two_stages.gin'
  gin_file.write_text(TWO_STAGES)
  run = str(root / 'uninterrupted')
  out = t5x_here(*ARGS, f'--gin_file={gin_file}', f'--gin.MODEL_DIR={run}').stdout
  return {'root': root, 'gin': str(gin_file), 'run': run, 'out': out}


def test_two_stage_run_changes_model_once_per_stage(staged):
  out, run = staged['out'], staged['run']
  assert 'partial: model' in out and 'full: model' in out
  recs = [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]
  assert [r['step'] for r in recs] == [1, 3, 6, 9, 12]
  assert all(r['recompilations'] == 0 for r in recs)  # one compile per stage, none more
  # The partial model's step costs fewer FLOPs than the full model's.
  assert recs[2]['train_step_flops'] < recs[3]['train_step_flops']
  # Stage 1 trained on the partial model: its prompt at the boundary equals a
  # one-stage run of that partial model, and differs from the full model's.
  partial_gin = os.path.join(staged['root'], 'partial.gin')
  with open(partial_gin, 'w') as f:
    f.write(TWO_STAGES.replace('@full/stages.Stage()', '').replace(
        'partial/stages.Stage.steps = 6', '').replace(', ]', ']'))
  only = str(staged['root'] / 'partial_only')
  t5x_here(*ARGS, f'--gin_file={partial_gin}', '--gin.TRAIN_STEPS=6', f'--gin.MODEL_DIR={only}')
  np.testing.assert_array_equal(_prompt(only, 6), _prompt(run, 6))
  assert not np.allclose(_prompt(run, 6), _prompt(run, 12))


def test_the_boundary_carries_prompt_and_adafactor_state_bit_for_bit(staged, tmp_path):
  """A run restarted from the boundary checkpoint (prompt + Adafactor state
  restored by orbax) ends exactly where the uninterrupted run, which carried
  its state in memory across the boundary, ends."""
  import shutil  # pylint: disable=g-import-not-at-top
  run, copy = staged['run'], str(tmp_path / 'from_boundary')
  os.makedirs(os.path.join(copy, 'checkpoints'))
  shutil.copytree(os.path.join(run, 'checkpoints', '6'), os.path.join(copy, 'checkpoints', '6'))
  out = t5x_here(*ARGS, f'--gin_file={staged["gin"]}', f'--gin.MODEL_DIR={copy}').stdout
  assert 'resumed from' in out and 'full: model' in out and 'partial: model' not in out
  np.testing.assert_array_equal(_prompt(copy, 12), _prompt(run, 12))


def test_killed_inside_stage_two_resumes_to_the_same_prompt(staged, tmp_path):
  d = str(tmp_path / 'killed')
  proc = subprocess.Popen(T5X + ARGS + [f'--gin_file={staged["gin"]}', f'--gin.MODEL_DIR={d}'],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt9 = files.numpy_checkpoint_dir(d, 9)
  deadline = time.time() + 300
  while not os.path.exists(ckpt9) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(ckpt9), 'the run never reached step 9 (inside stage 2)'
  assert not os.path.exists(files.numpy_checkpoint_dir(d, 12))
  out = t5x_here(*ARGS, f'--gin_file={staged["gin"]}', f'--gin.MODEL_DIR={d}').stdout
  assert 'resumed from' in out and 'partial: model' not in out
  np.testing.assert_array_equal(_prompt(d, 12), _prompt(staged['run'], 12))


def test_a_non_default_prompt_module_is_evaluated_and_compared(tmp_path):
  """A low-rank prompt run: its numpy checkpoint holds the materialised prompt
  at encoder.prompt.prompt.prompt, which `t5x eval` and `t5x similarity` read."""
  run = str(tmp_path / 'low_rank')
  t5x_here(*ARGS, '--gin.TRAIN_STEPS=3', '--gin.train.prompt_module=@low_rank_prompt()',
           '--gin.low_rank_prompt.length=5', '--gin.low_rank_prompt.rank=2',
           f'--gin.MODEL_DIR={run}')
  folder = files.numpy_checkpoint_dir(run, 3)
  assert sorted(os.listdir(folder)) == [PROMPT, 'encoder.prompt.prompt.u',
                                        'encoder.prompt.prompt.v', 'prompt_info.json']
  info = files.load_prompt_info(os.path.join(folder, PROMPT))
  assert info.module == 'LowRankPrompt' and info.prompt_length == 5
  np.testing.assert_allclose(_prompt(run, 3), np.load(os.path.join(folder, 'encoder.prompt.prompt.u'))
                             @ np.load(os.path.join(folder, 'encoder.prompt.prompt.v')),
                             rtol=1e-5, atol=1e-6)
  out = t5x_here('eval', '--gin_file=runs/eval.gin', '--gin_file=models/t5_1_1_tiny_synthetic.gin',
                 '--gin.MIXTURE_OR_TASK_NAME=synthetic_majority_yesno',
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 4}",
                 '--gin.evaluate.num_examples=16', f'--gin.MODEL_DIR={run}').stdout
  assert 'synthetic_majority_yesno/accuracy' in out
  free = str(tmp_path / 'free')
  t5x_here(*ARGS, '--gin.TRAIN_STEPS=0', f'--gin.MODEL_DIR={free}')
  sim = str(tmp_path / 'sim.json')
  t5x_here('similarity', run, free, '--json', sim)
  result = json.load(open(sim))
  assert sorted(result['prompts']) == sorted(['synthetic_majority_yesno',
                                              'synthetic_majority_yesno@free'])


def test_per_example_features_travel_through_the_data_pipeline():
  """`task_ids` from a registered mixture reach the model batch ([b] int32)."""
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  name = data.register_with_task_ids('seam_test_mixture', ['synthetic_majority_yesno',
                                                           'synthetic_majority_truefalse'])
  batches = data.train_dataset(name, {'inputs': 32, 'targets': 8}, batch_size=16, seed=0,
                               start_step=0, passthrough=('task_ids',))
  batch = next(batches)
  assert batch['task_ids'].shape == (16,) and set(batch['task_ids']) <= {0, 1}
  assert len(set(batch['task_ids'])) == 2  # a mixed batch
  # The task id says which task the example came from: its label words.
  words = {0: {b'yes', b'no'}, 1: {b'true', b'false'}}
  from seqio import ByteVocabulary  # pylint: disable=g-import-not-at-top
  vocab = ByteVocabulary()
  for tid, tgt in zip(batch['task_ids'], batch['decoder_target_tokens']):
    word = vocab.decode([int(t) for t in tgt if t > 1]).encode()
    assert word in words[int(tid)], (tid, word)
