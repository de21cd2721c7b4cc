"""Cross-model projection (Su et al. 2022) and prompt recycling (Lester et
al. 2022): the projector equals the authors' formula, trains through `t5x
train` (task tuning and distance minimisation), is saved with projector.json
and applied by `t5x project` and prompts/from_projector.gin; the recyclers
recover a known linear relation between two embedding tables."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_transfer import projector, recycling
from prompt_transfer.prompts import files
from tests.in_process import refused_here, t5x_here

PROMPT = files.PROMPT_FILE
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}"
# Copy with a phrasing neither stand-in was pretrained on: a random prompt
# scores 0, a prompt learns it in tens of steps.
TASK = 'synthetic_copy_echo'


def _layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize('activation,layer_norm', [('tanh', True), ('leaky_relu', False)])
def test_projector_is_the_authors_network(activation, layer_norm):
  rng = np.random.default_rng(0)
  sources = rng.normal(size=(2, 5, 8)).astype(np.float32)  # K=2 prompts [L=5, d_S=8]
  module = projector.ProjectedPrompt(sources=projector.Frozen(sources), hidden=16,
                                     activation=activation, layer_norm=layer_norm)
  embedding = jnp.zeros((10, 12))  # target d_T = 12
  features = {'task_ids': jnp.array([1, 0, 1])}
  params = module.init(jax.random.PRNGKey(0), embedding, features)['params']
  out = np.asarray(module.apply({'params': params}, embedding, features))
  assert out.shape == (3, 5, 12)
  p = jax.tree_util.tree_map(np.asarray, params)
  h = sources.reshape(2, -1) @ p['dense_in']['kernel'] + p['dense_in']['bias']
  h = np.tanh(h) if activation == 'tanh' else np.where(h > 0, h, 0.01 * h)
  y = (h @ p['dense_out']['kernel'] + p['dense_out']['bias']).reshape(2, 5, 12)
  if layer_norm:
    y = _layer_norm(y, p['layer_norm']['scale'], p['layer_norm']['bias'])
  np.testing.assert_allclose(out, y[[1, 0, 1]], rtol=1e-5, atol=1e-5)
  # K = 1: one shared prompt; the distance term is the mean squared error.
  single = projector.ProjectedPrompt(sources=projector.Frozen(sources[:1]), hidden=16,
                                     targets=projector.Frozen(np.ones((1, 5, 12), np.float32)))
  sp = single.init(jax.random.PRNGKey(1), embedding)['params']
  prompt, state = single.apply({'params': sp}, embedding, mutable=['losses'])
  assert prompt.shape == (5, 12)
  np.testing.assert_allclose(state['losses']['distance'][0],
                             np.mean((np.asarray(prompt) - 1.0) ** 2), rtol=1e-5)
  # project() applies saved weights the same way.
  info = projector.ProjectorInfo(source_model={}, target_model={}, length=5, source_dim=8,
                                 target_dim=12, hidden=16, activation=activation,
                                 layer_norm=layer_norm)
  np.testing.assert_allclose(projector.project(sources, info, params), y, rtol=1e-5, atol=1e-5)
  with pytest.raises(projector.ProjectorError, match=r'maps prompts of shape \[5, 8\]'):
    projector.project(np.zeros((4, 8)), info, params)


def test_recyclers_recover_a_linear_relation_between_embeddings():
  """Target embeddings = source embeddings @ A: v2v-lin and lin-comb map a
  prompt P to P @ A exactly; v2v-nn approximately."""
  rng = np.random.default_rng(0)
  src = rng.normal(size=(384, 16)).astype(np.float32)
  a = rng.normal(size=(16, 24)).astype(np.float32) / 4
  tgt = src @ a
  prompt = rng.normal(size=(6, 16)).astype(np.float32)
  for name in ('v2v-lin', 'lin-comb'):
    out = recycling.fit_recycler(name, src, tgt)(prompt)
    np.testing.assert_allclose(out, prompt @ a, rtol=1e-3, atol=1e-3)
  errors = []
  for epochs in (25, 400):  # Lester et al.'s 25 epochs are 130 steps over 256 bytes
    nn_out = recycling.fit_recycler('v2v-nn', src, tgt, epochs=epochs)(prompt)
    assert nn_out.shape == (6, 24)
    errors.append(np.linalg.norm(nn_out - prompt @ a) / np.linalg.norm(prompt @ a))
  assert errors[1] < 0.25 and errors[1] < errors[0], errors
  assert list(recycling.shared_token_ids(384)) == list(range(3, 259))
  assert recycling.shared_token_ids(32128)[0] == 1000
  with pytest.raises(ValueError, match='Unknown recycler'):
    recycling.fit_recycler('magic', src, tgt)



def _metrics(run):
  return [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]


@pytest.fixture(scope='module')
def source_prompts(tmp_path_factory):
  """Prompts of the two pretrained stand-ins, the 128-wide mini model (the
  source) and the 64-wide tiny one (the target), 4 rows each: step-0
  (sampled-vocab) prompts of a run on one task, sidecars included. The
  projector learns the task from any fixed source prompt; these tests check
  its mechanics, bench/cross_model.py what it transfers."""
  root = tmp_path_factory.mktemp('projector')
  out = {}
  for name, gin_file in (('source', 'models/t5_1_1_mini_synthetic.gin'),
                         ('target', 'models/t5_1_1_tiny_synthetic.gin')):
    run = str(root / name)
    t5x_here('train', f'--gin_file={gin_file}', '--gin_file=prompts/from_sampled_vocab.gin',
             '--gin_file=runs/prompt_tune.gin', f'--gin.MODEL_DIR={run}',
             f'--gin.MIXTURE_OR_TASK_NAME={TASK}', LENGTHS, '--gin.TRAIN_STEPS=0',
             '--gin.BATCH_SIZE=16', '--gin.PROMPT_LENGTH=4', '--gin.train.eval_period=None',
             '--gin.train.tensorboard=False')
    out[name] = files.prompt_file(run, 0)
  out['root'] = root
  return out


PROJECTOR_RUN = ['--gin_file=models/t5_1_1_tiny_synthetic.gin', '--gin_file=runs/prompt_tune.gin',
                 f'--gin.MIXTURE_OR_TASK_NAME={TASK}', LENGTHS, '--gin.BATCH_SIZE=16',
                 '--gin.train.eval_period=None',
                 '--gin.train.log_period=5', '--gin.train.checkpoint_period=30',
                 '--gin.train.tensorboard=False']


def _score(prompt_file, task=TASK):
  out = prompt_file + '.eval.json'
  t5x_here('eval', '--gin_file=runs/eval.gin', '--gin_file=models/t5_1_1_tiny_synthetic.gin',
      f'--gin.MIXTURE_OR_TASK_NAME={task}', LENGTHS, f'--gin.PROMPT_FILE={prompt_file}',
      '--gin.evaluate.num_examples=50', f'--gin.evaluate.output_file={out}')
  return json.load(open(out))['metrics'][f'{task}/sequence_accuracy']


def test_task_tuning_trains_only_the_projector_and_is_reused(source_prompts, tmp_path):
  """Task tuning mini -> tiny: the projected prompt beats a random prompt
  zero-shot on the training task (a random prompt, like the untrained
  projector's output, scores 0), and the saved projector reproduces it."""
  run = str(tmp_path / 'projector')
  t5x_here('train', *PROJECTOR_RUN, '--gin_file=projectors/task_tuning.gin',
           f'--gin.MODEL_DIR={run}', '--gin.TRAIN_STEPS=30', '--gin.PROJECTOR_HIDDEN=32',
           f"--gin.SOURCE_PROMPT_FILES=['{source_prompts['source']}']",
           '--gin.train.eval_period=30', '--gin.train.eval_num_examples=50')
  recs = [r for r in _metrics(run) if 'loss' in r]
  assert recs[-1]['loss'] < 0.5 * recs[0]['loss'], [r['loss'] for r in recs]
  folder = files.numpy_checkpoint_dir(run, 30)
  info = json.load(open(os.path.join(folder, projector.PROJECTOR_FILE)))
  assert info['source_model']['name'] == 't5_1_1_mini_synthetic' and info['source_dim'] == 128
  assert info['target_model']['name'] == 't5_1_1_tiny_synthetic' and info['target_dim'] == 64
  assert info['training'] == 'task_tuning' and info['trained_on'] == [TASK]
  sidecar = files.load_prompt_info(os.path.join(folder, PROMPT))
  assert sidecar.module == 'ProjectedPrompt' and sidecar.prompt_length == 4
  assert set(sidecar.param_shapes) == {f'encoder.prompt.prompt.{n}' for n in (
      'dense_in.kernel', 'dense_in.bias', 'dense_out.kernel', 'dense_out.bias',
      'layer_norm.scale', 'layer_norm.bias')}
  trained = np.load(os.path.join(folder, PROMPT))
  # `t5x project` with the saved projector gives the run's own projected prompt.
  out = str(tmp_path / 'projected')
  t5x_here('project', source_prompts['source'], '--projector', run, '--output_dir', out)
  (name,) = os.listdir(out)
  np.testing.assert_allclose(np.load(os.path.join(out, name, PROMPT)), trained, atol=1e-5)
  random_prompt = str(tmp_path / 'random.npy')
  np.save(random_prompt, np.random.default_rng(0).uniform(-0.5, 0.5, (4, 64)).astype(np.float32))
  # The run's own evaluation at step 30 is the projected prompt's score.
  projected = _metrics(run)[-1][f'eval/{TASK}/sequence_accuracy']
  rand = _score(random_prompt)
  assert projected >= rand + 30, (projected, rand)
  projected_info = files.load_prompt_info(os.path.join(out, name, PROMPT))
  assert projected_info.model['name'] == 't5_1_1_tiny_synthetic'
  assert projected_info.weights == sidecar.weights and 'by projector' in projected_info.origin
  # `t5x similarity --projector` compares prompts of the two models in the target's space.
  sim = str(tmp_path / 'sim.json')
  proc = t5x_here('similarity', source_prompts['source'], source_prompts['target'],
                  '--projector', run, '--json', sim)
  assert 'projected 1 prompt(s) of t5_1_1_mini_synthetic to t5_1_1_tiny_synthetic' in proc.stderr
  shapes = [p['shape'] for p in json.load(open(sim))['prompts'].values()]
  assert shapes == [[4, 64], [4, 64]]
  # prompts/from_projector.gin starts a target run from it.
  target = str(tmp_path / 'target')
  t5x_here('train', *PROJECTOR_RUN, '--gin_file=prompts/from_projector.gin',
           f'--gin.MODEL_DIR={target}', '--gin.TRAIN_STEPS=0', '--gin.PROMPT_LENGTH=4',
           f'--gin.SOURCE_PROMPT_FILE={source_prompts["source"]}', f'--gin.PROJECTOR_DIR={run}')
  np.testing.assert_allclose(np.load(files.prompt_file(target, 0)), trained, atol=1e-5)


def test_task_tuning_on_several_tasks(source_prompts, tmp_path, capsys):
  """projectors/task_tuning_multi.gin: one projector for K tasks, each
  example given the projection of its own task's source prompt."""
  run = str(tmp_path / 'multi')
  tasks = [TASK, 'synthetic_reverse_mirror']
  sources = [source_prompts['source']] * 2
  # A single task cannot feed it (its examples carry no task ids).
  code, err = refused_here(capsys, 'train', *PROJECTOR_RUN, '--gin_file=projectors/task_tuning_multi.gin',
                       f'--gin.MODEL_DIR={tmp_path / "single"}', '--gin.TRAIN_STEPS=4',
                       f'--gin.TASKS={tasks!r}', f'--gin.SOURCE_PROMPT_FILES={sources!r}')
  assert code == 1 and "reads the per-example feature 'task_ids'" in err, err
  multi_run = [a for a in PROJECTOR_RUN if 'MIXTURE_OR_TASK_NAME' not in a]
  t5x_here('train', *multi_run, '--gin_file=projectors/task_tuning_multi.gin',
           f'--gin.MODEL_DIR={run}', '--gin.TRAIN_STEPS=4', '--gin.PROJECTOR_HIDDEN=32',
           f'--gin.TASKS={tasks!r}', f'--gin.SOURCE_PROMPT_FILES={sources!r}',
           '--gin.train.eval_period=4', '--gin.train.eval_num_examples=8')
  evals = [r for r in _metrics(run) if any(k.startswith('eval/') for k in r)][-1]
  for task in tasks:  # the mixture's copies carry task ids; both are evaluated
    assert any(k.startswith(f'eval/{task}:') for k in evals), sorted(evals)
  folder = files.numpy_checkpoint_dir(run, 4)
  assert sorted(os.listdir(folder)).count('prompt_1') == 1
  code, err = refused_here(capsys, 'train', *multi_run, '--gin_file=projectors/task_tuning_multi.gin',
                       f'--gin.MODEL_DIR={tmp_path / "bad"}', '--gin.TRAIN_STEPS=4',
                       f'--gin.TASKS={tasks + [TASK]!r}', f'--gin.SOURCE_PROMPT_FILES={sources!r}')
  assert code == 1 and '2 SOURCE_PROMPT_FILES' in err and '3 TASKS' in err, err
  assert len(err.strip().splitlines()) == 1, err


def test_distance_minimisation_pulls_projections_to_the_target_prompts(source_prompts, tmp_path):
  run = str(tmp_path / 'distance')
  t5x_here('train', *PROJECTOR_RUN, '--gin_file=projectors/distance.gin',
           f'--gin.MODEL_DIR={run}', '--gin.TRAIN_STEPS=30', '--gin.PROJECTOR_HIDDEN=32',
           f"--gin.SOURCE_PROMPT_FILES=['{source_prompts['source']}']",
           f"--gin.TARGET_PROMPT_FILES=['{source_prompts['target']}']")
  recs = [r for r in _metrics(run) if 'loss' in r]
  # Only the distance trains (the task loss is logged, weight 0).
  assert all(r['loss'] == pytest.approx(r['losses/distance'], rel=1e-5) for r in recs)
  assert recs[-1]['losses/distance'] < 0.5 * recs[0]['losses/distance']
  info = json.load(open(os.path.join(files.numpy_checkpoint_dir(run, 30),
                                     projector.PROJECTOR_FILE)))
  assert info['training'] == 'distance'


def test_project_by_recycling_and_refusals(source_prompts, tmp_path, capsys):
  out = str(tmp_path / 'recycled')
  asset = 'pkg://assets/t5_1_1_tiny_synthetic'
  t5x_here('project', source_prompts['target'], '--recycler', 'v2v-lin', '--source_checkpoint', asset,
      '--target_checkpoint', asset, '--output_dir', out)
  (name,) = os.listdir(out)
  # Same model both sides: the least-squares map is the identity.
  np.testing.assert_allclose(np.load(os.path.join(out, name, PROMPT)),
                             np.load(source_prompts['target']), atol=1e-3)
  assert 'by recycler v2v-lin' in files.load_prompt_info(os.path.join(out, name, PROMPT)).origin
  # A prompt of another model than the recycler's source is refused.
  code, err = refused_here(capsys, 'project', source_prompts['source'], '--recycler', 'v2v-lin',
                       '--source_checkpoint', asset, '--target_checkpoint', asset,
                       '--output_dir', out)
  assert code == 1 and 'emb_dim 128 vs 64' in err, err
