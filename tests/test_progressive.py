"""FPT (Huang et al. 2022) mechanics: the authors' layer choice, FFN neurons
kept by score (a partial model computes what the full one computes with the
other neurons silenced), the schedule, and a progressive `t5x train` run:
cheaper steps in early stages, cumulative FLOPs, eval on the full and the
stage's model, cached neuron scores, a resume mid-stage that ends where an
uninterrupted run ends, and a last stage that is the full model."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from prompt_transfer import progressive
from prompt_transfer.model.config import get_config
from prompt_transfer.model.models import build_model
from prompt_transfer.prompts import files
from prompt_transfer.training import stages as stages_lib
from tests.in_process import t5x_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layer_indices_are_the_authors():
  # thunlp/FastPromptTuning's evenly_select_layers on T5-Large's 24 layers.
  assert progressive.layer_indices(24, 6) == [0, 4, 8, 13, 18, 23]
  assert progressive.layer_indices(24, 12) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]
  assert progressive.layer_indices(24, 18) == list(range(12)) + [13, 15, 17, 19, 21, 23]
  for n in range(2, 30):
    for k in range(2, n + 1):
      kept = progressive.layer_indices(n, k)
      assert len(kept) == k and kept[0] == 0 and kept[-1] == n - 1
      assert kept == sorted(set(kept))
      gaps = np.diff(kept)
      assert gaps.max() - gaps.min() <= 1 and list(gaps) == sorted(gaps)  # wider gaps last
  with pytest.raises(stages_lib.StageError, match='Cannot keep 7 of 6'):
    progressive.layer_indices(6, 7)


def _model(variant, layers=4):
  config = get_config(variant, 'tiny', vocab_size=64, dropout_rate=0.0,
                      num_encoder_layers=layers, num_decoder_layers=layers)
  model = build_model(config)
  return config, model, jax.tree_util.tree_map(np.asarray, model.init_params(jax.random.PRNGKey(0)))


BATCH = (np.array([[5, 6, 7, 1, 0], [9, 3, 1, 0, 0]]), np.array([[0, 4, 8], [0, 2, 0]]),
         np.array([[4, 8, 1], [2, 1, 0]]))


def _logits(config, params):
  return np.asarray(build_model(config).module.apply({'params': params}, *BATCH))


@pytest.mark.parametrize('variant', ['t5_1_1', 't5_1_0'])
def test_a_partial_model_is_the_full_one_with_neurons_and_layers_removed(variant):
  config, _, params = _model(variant)
  rng = np.random.default_rng(0)
  scores = {f'{s}/layers_{i}': rng.random(config.mlp_dim) for s in ('encoder', 'decoder')
            for i in range(4)}
  part_config, part = progressive.PartialModel(width=0.5, drop_decoder=False, scores=scores)(
      config, params)
  assert part_config.mlp_dim == config.mlp_dim // 2
  kept = progressive.top_neurons(scores['decoder/layers_2'], config.mlp_dim // 2)
  assert set(kept) == set(np.argsort(-scores['decoder/layers_2'])[:config.mlp_dim // 2])
  mlp = part['decoder']['layers_2']['mlp']
  names = ['wi_0', 'wi_1'] if variant == 't5_1_1' else ['wi']
  for n in names:
    np.testing.assert_array_equal(
        mlp[n]['kernel'], params['decoder']['layers_2']['mlp'][n]['kernel'][:, kept])
  np.testing.assert_array_equal(mlp['wo']['kernel'],
                                params['decoder']['layers_2']['mlp']['wo']['kernel'][kept])
  # Same output as the full model whose other neurons write nothing (wo rows 0).
  silenced = jax.tree_util.tree_map(np.copy, params)
  for key, s in scores.items():
    stack, layer = key.split('/')
    drop = np.setdiff1d(np.arange(config.mlp_dim), progressive.top_neurons(s, len(kept)))
    silenced[stack][layer]['mlp']['wo']['kernel'][drop] = 0.0
  np.testing.assert_allclose(_logits(part_config, part), _logits(config, silenced),
                             rtol=1e-4, atol=1e-5)
  # Compound: half the encoder's layers too (0 and 3 of 4); the decoder kept
  # whole (a classification task's setting).
  cr_config, cr = progressive.PartialModel(layers=0.5, width=0.5, drop_decoder=False,
                                           scores=scores)(config, params)
  assert (cr_config.num_encoder_layers, cr_config.num_decoder_layers) == (2, 4)
  np.testing.assert_array_equal(cr['encoder']['layers_1']['mlp']['wo']['kernel'],
                                part['encoder']['layers_3']['mlp']['wo']['kernel'])
  ld_config, ld = stages_lib.keep_layers([0, 3], None)(part_config, part)
  np.testing.assert_allclose(_logits(cr_config, cr), _logits(ld_config, ld), rtol=1e-5)
  both, _ = progressive.PartialModel(layers=0.5, drop_decoder=True)(config, params)
  assert (both.num_encoder_layers, both.num_decoder_layers, both.mlp_dim) == (2, 2, config.mlp_dim)
  with pytest.raises(stages_lib.StageError, match='no neuron scores'):
    progressive.PartialModel(width=0.5)(config, params)
  with pytest.raises(stages_lib.StageError, match='have shape'):
    progressive.keep_neurons({k: v[:3] for k, v in scores.items()}, 0.5)(config, params)


def test_schedule():
  stages = progressive.fpt_stages([(10, 0.25, 0.5), (10, 0.5, 1.0), (None, 1.0, 1.0)])
  plan = stages_lib.plan(stages, 30)
  assert plan.bounds == ((0, 10), (10, 20), (20, 30))
  assert stages[0].transform == progressive.PartialModel(0.25, 0.5)
  assert stages[2].transform is None and stages[2].name == 'full model'
  assert progressive.needs_scores(stages) and not progressive.needs_scores(stages[1:])
  bound = progressive.bind(stages, generation=True, scores={'x': 1})
  assert bound[0].transform.drop_decoder and bound[0].transform.scores == {'x': 1}
  assert bound[1].transform.scores is None  # full width: no scores needed
  assert not progressive.bind(stages, generation=False)[0].transform.drop_decoder
  with pytest.raises(stages_lib.StageError, match='ends on the full'):
    progressive.fpt_stages([(10, 0.5, 0.5), (None, 0.5, 1.0)])
  with pytest.raises(stages_lib.StageError, match=r'must be in \(0, 1\]'):
    progressive.fpt_stages([(10, 0.0, 0.5), (None, 1.0, 1.0)])
  with pytest.raises(stages_lib.StageError, match='expected'):
    progressive.fpt_stages([(10, 0.5), (None, 1.0, 1.0)])


def _t5x(*args, devices=None):
  env = dict(os.environ)
  if devices:
    env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'prompt_transfer.cli', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


# A random 4+4-layer tiny model (mechanics, not quality) on a generation task:
# layers are dropped from both stacks.
RUN = ['--gin_file=models/t5_1_1_tiny.gin', '--gin_file=runs/prompt_tune.gin',
       '--gin.model_config.num_encoder_layers=4', '--gin.model_config.num_decoder_layers=4',
       '--gin.model_config.vocab_size=384',
       '--gin.MIXTURE_OR_TASK_NAME="synthetic_copy_echo"',
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", '--gin.TRAIN_STEPS=8',
       '--gin.BATCH_SIZE=8', '--gin.PROMPT_LENGTH=4', '--gin.train.log_period=1',
       '--gin.train.checkpoint_period=2', '--gin.train.keep_checkpoints=None',
       '--gin.train.tensorboard=False',
       '--gin.LENGTH_BUCKETS=None']   # one batch shape: step FLOPs compare the models alone
FPT = ['--gin_file=runs/fpt.gin', '--gin.FPT_SCHEDULE=[(4, 0.5, 0.5), (None, 1.0, 1.0)]',
       '--gin.FPT_SCORE_EXAMPLES=16', '--gin.train.eval_period=4',
       '--gin.train.eval_num_examples=8']


def _records(run):
  return [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]


def test_a_progressive_run(tmp_path):
  run = str(tmp_path / 'fpt')
  out = t5x_here('train', *RUN, *FPT, f'--gin.MODEL_DIR={run}')
  assert 'FPT: scoring FFN neurons on 16 validation examples' in out.stdout
  recs = [r for r in _records(run) if 'loss' in r]
  flops = {r['step']: r['train_step_flops'] for r in recs}
  # 2 of 4 layers in both stacks, half the FFN: a much cheaper step.
  assert flops[1] == flops[4] < 0.6 * flops[5] and flops[5] == flops[8]
  totals = [r['train_flops_total'] for r in recs]
  assert totals[-1] == pytest.approx(4 * flops[1] + 4 * flops[5], rel=1e-6)
  assert all(b > a for a, b in zip(totals, totals[1:]))
  partial_eval = next(r for r in _records(run) if r['step'] == 4)
  assert 'eval/synthetic_copy_echo/sequence_accuracy' in partial_eval  # the full model
  assert 'eval_stage/synthetic_copy_echo/sequence_accuracy' in partial_eval  # the partial one
  final_eval = next(r for r in _records(run) if r['step'] == 8)
  assert not any(k.startswith('eval_stage/') for k in final_eval)
  scores_file = os.path.join(run, progressive.SCORES_FILE)
  with np.load(scores_file) as scores:
    assert sorted(scores.files) == sorted(f'{s}__layers_{i}' for s in ('encoder', 'decoder')
                                          for i in range(4))
    assert scores['encoder__layers_0'].shape == (64,)  # tiny's d_ff
  # The last stage is the full model: a plain run's step costs the same.
  plain = str(tmp_path / 'plain')
  t5x_here('train', *RUN, '--gin.TRAIN_STEPS=1', '--gin.train.eval_period=None',
           f'--gin.MODEL_DIR={plain}')
  assert _records(plain)[-1]['train_step_flops'] == flops[8]
  # Killed mid-stage (after step 2) and resumed on a model-parallel mesh of 2
  # devices (the partial models' parameters sharded by their own logical
  # axes): the cached scores are reused and the run ends with the
  # uninterrupted run's prompt and FLOPs count (evaluation, checked above,
  # is left out: it does not touch the training state).
  resumed = str(tmp_path / 'resumed')
  os.makedirs(os.path.join(resumed, 'checkpoints'))
  shutil.copytree(os.path.join(run, 'checkpoints', '2'), os.path.join(resumed, 'checkpoints', '2'))
  shutil.copy(scores_file, resumed)
  with open(os.path.join(run, 'metrics.jsonl')) as f, \
      open(os.path.join(resumed, 'metrics.jsonl'), 'w') as g:
    g.writelines(l for l in f if json.loads(l)['step'] <= 2)
  out = _t5x('train', *RUN, *FPT, f'--gin.MODEL_DIR={resumed}', '--gin.train.mesh_shape=(1, 2)',
             '--gin.train.eval_period=None', devices=2)
  assert 'resumed from' in out.stdout and 'scoring FFN neurons' not in out.stdout
  assert "mesh {'data': 1, 'model': 2} over 2 devices" in out.stdout
  ref = np.load(files.prompt_file(run, 8))
  np.testing.assert_allclose(np.load(files.prompt_file(resumed, 8)), ref, rtol=0,
                             atol=1e-5 * np.abs(ref).max())
  assert _records(resumed)[-1]['train_flops_total'] == pytest.approx(totals[-1], rel=1e-6)
  # `t5x curves --x flops` draws score against training FLOPs.
  png = str(tmp_path / 'curves.png')
  out = t5x_here('curves', run, plain, '--x', 'flops', '--png', png)
  assert os.path.getsize(png) > 0 and 'FLOPs by then' in out.stdout
