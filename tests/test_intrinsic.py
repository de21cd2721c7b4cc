"""Intrinsic prompt tuning (IPT): the task pool, the prompt zoo, MSF's
auto-encoder, IST inside a found or random subspace, the Fastfood baseline
and stage two, on the tiny stand-in (what the trend is: bench/ipt.py)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from prompt_transfer import intrinsic, zoo
from prompt_transfer.projector import Frozen
from prompt_transfer.prompts import files
from prompt_transfer.training import run_lock
from tasks import pool
from tests.in_process import refused_here, t5x_here

LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"
TINY = '--gin_file=models/t5_1_1_tiny_synthetic.gin'
SMALL_RUN = [LENGTHS, '--gin.PROMPT_LENGTH=4', '--gin.BATCH_SIZE=8', '--gin.train.eval_period=None',
             '--gin.train.tensorboard=False']
ZOO_TASKS = ['pool_morea_bad_good', 'pool_greater_no_yes']


# ---------------------------------------------------------------------------
# The task pool.
# ---------------------------------------------------------------------------
def test_the_pool_has_40_training_tasks_and_10_held_out_types():
  assert len(pool.TRAIN_TASKS) >= 40 and len(pool.HELD_OUT_TASKS) == 10
  assert not set(pool.TRAIN_TASKS) & set(pool.HELD_OUT_TASKS)
  train_types = {(pool.rule_of(t), tuple(tasks.get_label_words(t))) for t in pool.TRAIN_TASKS
                 if t in pool.CLASSIFICATION_TASKS}
  for t in pool.HELD_OUT_TASKS:
    rule, words = pool.rule_of(t), tuple(tasks.get_label_words(t))
    assert (rule, words) not in train_types  # a type no training task covers
    # ... made of a rule and answer words the training tasks do use
    assert any(r == rule for r, _ in train_types) and any(w == words for _, w in train_types)
  for name, members in pool.MIXTURES.items():
    assert set(tasks.mixture_tasks(name)) == set(members)


@pytest.mark.parametrize('name', ['pool_morea_cold_hot', 'pool_moreb_cold_hot',
                                  'pool_greater_lose_win', 'pool_smaller_lose_win'])
def test_pool_labels_follow_the_rule_and_new_data_is_new(name):
  rows = pool.generate_examples(name, 'train')
  neg, posw = tasks.get_label_words(name)
  for r in rows[:200]:
    if pool.rule_of(name) in ('morea', 'moreb'):
      a, b = r['inputs'].count('a'), r['inputs'].count('b')
      truth = a > b if pool.rule_of(name) == 'morea' else b > a
    else:
      x, y = map(int, r['inputs'].split())
      truth = x > y if pool.rule_of(name) == 'greater' else x < y
    assert r['targets'] == (posw if truth else neg), r
  assert sum(r['label'] for r in rows) == len(rows) // 2
  new = {r['inputs'] for r in pool.generate_examples(name + pool.NEW_DATA, 'train')}
  assert len(new & {r['inputs'] for r in rows}) < len(rows) // 4  # other draws


# ---------------------------------------------------------------------------
# The modules.
# ---------------------------------------------------------------------------
def test_fwht_is_the_hadamard_matrix_and_fastfood_keeps_norms():
  scipy_linalg = pytest.importorskip('scipy.linalg')
  x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
  np.testing.assert_allclose(intrinsic.fwht(jnp.asarray(x)), x @ scipy_linalg.hadamard(64),
                             rtol=1e-4, atol=1e-3)
  ff = intrinsic.Fastfood.make(1280, seed=3)  # pads to 2048
  v = jnp.asarray(np.random.default_rng(1).standard_normal((200, 10)), jnp.float32)
  out = ff(v)
  assert out.shape == (200, 1280)
  ratio = np.linalg.norm(out, axis=1) / np.linalg.norm(v, axis=1)
  assert 0.8 < ratio.mean() < 1.2
  np.testing.assert_allclose(ff(v[:1] + v[1:2]), ff(v[:1]) + ff(v[1:2]), atol=1e-4)  # linear
  with pytest.raises(ValueError, match='power-of-two'):
    intrinsic.fwht(jnp.ones((6,)))


def test_autoencoder_decodes_each_examples_task_and_sows_the_weighted_mse():
  src = np.random.default_rng(0).standard_normal((3, 4, 8)).astype(np.float32)
  module = intrinsic.SubspaceAutoencoder(sources=Frozen(src), dim=2, hidden=5,
                                         reconstruction_weight=200.0)
  emb = jnp.zeros((10, 8))
  ids = jnp.asarray([2, 0, 2])
  params = module.init(jax.random.PRNGKey(0), emb, {'task_ids': ids})['params']
  out, state = module.apply({'params': params}, emb, {'task_ids': ids}, mutable=['losses'])
  z = src.reshape(3, -1) @ params['encode']['kernel'] + params['encode']['bias']
  decoded = np.asarray(intrinsic.decode(params['decoder'], z)).reshape(3, 4, 8)
  np.testing.assert_allclose(out, decoded[[2, 0, 2]], rtol=1e-5, atol=1e-5)
  want = 200.0 * np.mean(np.square(decoded[[2, 0, 2]] - src[[2, 0, 2]]))
  np.testing.assert_allclose(state['losses']['reconstruction'][0], want, rtol=1e-5)


def test_intrinsic_prompt_is_the_decoder_of_v_and_only_v_is_a_parameter():
  emb = jnp.zeros((10, 8))
  module = intrinsic.intrinsic_prompt(None, length=4, dim=3, hidden=6, seed=7)()
  params = module.init(jax.random.PRNGKey(1), emb, {})['params']
  assert list(params) == ['v'] and params['v'].shape == (1, 3)
  assert float(jnp.std(params['v'])) < 0.1  # N(0, 0.02)
  out = module.apply({'params': params}, emb, {})
  dec = intrinsic.random_decoder(3, 6, 32, seed=7)  # the untrained decoder, made again
  np.testing.assert_allclose(out, np.asarray(intrinsic.decode(dec, params['v'])).reshape(4, 8),
                             rtol=1e-5, atol=1e-6)
  # K tasks at once: each example gets its task's own v.
  multi = intrinsic.intrinsic_prompt(None, length=4, dim=3, hidden=6, num_prompts=2)()
  p2 = multi.init(jax.random.PRNGKey(2), emb, {'task_ids': jnp.asarray([0, 1])})['params']
  out2 = multi.apply({'params': p2}, emb, {'task_ids': jnp.asarray([1, 1, 0])})
  assert out2.shape == (3, 4, 8)
  np.testing.assert_allclose(out2[0], out2[1])
  assert not np.allclose(out2[0], out2[2])
  found = intrinsic.IntrinsicPrompt(decoder=Frozen(dec), length=4, source='/runs/msf')
  with pytest.raises(intrinsic.SubspaceError, match='/runs/msf decodes 32 numbers'):
    found.init(jax.random.PRNGKey(1), jnp.zeros((10, 16)), {})  # another model's width


def test_fastfood_prompt_starts_at_p0():
  emb = jnp.asarray(np.random.default_rng(0).standard_normal((50, 8)), jnp.float32)
  module = intrinsic.fastfood_prompt(length=4, dim=3, seed=5)()
  params = module.init(jax.random.PRNGKey(0), emb, {})['params']
  assert list(params) == ['v'] and not np.any(params['v'])
  p0 = module.apply({'params': params}, emb, {})
  rows = {tuple(np.round(r, 5)) for r in np.asarray(emb)}
  assert all(tuple(np.round(r, 5)) in rows for r in np.asarray(p0))  # sampled vocab rows
  moved = module.apply({'params': {'v': params['v'] + 1.0}}, emb, {})
  assert not np.allclose(moved, p0)


# ---------------------------------------------------------------------------
# The commands, end to end on the tiny stand-in.
# ---------------------------------------------------------------------------



def _zoo(zoo_dir, *task_names, steps=5):
  return t5x_here('zoo', '--output_dir', zoo_dir, '--tasks', *task_names, TINY,
                  '--gin_file=prompts/from_sampled_vocab.gin', '--gin_file=runs/prompt_tune.gin',
                  f'--gin.TRAIN_STEPS={steps}', f'--gin.train.checkpoint_period={steps}',
                  *SMALL_RUN)


@pytest.fixture(scope='module')
def zoo_and_subspace(tmp_path_factory):
  root = tmp_path_factory.mktemp('ipt')
  zoo_dir, msf = str(root / 'zoo'), str(root / 'msf')
  out = _zoo(zoo_dir, *ZOO_TASKS).stdout
  msf_out = t5x_here(
      'train', TINY, '--gin_file=runs/prompt_tune.gin', '--gin_file=runs/ipt_msf.gin',
      f'--gin.ZOO_DIR={zoo_dir}', f'--gin.TASKS={ZOO_TASKS!r}', '--gin.INTRINSIC_DIM=3',
      '--gin.DECODER_HIDDEN=16', f'--gin.MODEL_DIR={msf}', '--gin.TRAIN_STEPS=10',
      '--gin.train.checkpoint_period=10', '--gin.train.log_period=1',
      '--gin.LEARNING_RATE=1e-2', *SMALL_RUN).stdout
  return {'root': root, 'zoo': zoo_dir, 'msf': msf, 'zoo_out': out, 'msf_out': msf_out}


def test_zoo_trains_each_task_once_and_refuses_other_settings(zoo_and_subspace, capsys):
  z = zoo_and_subspace['zoo']
  assert 'zoo 2/2 pool_greater_no_yes: trained' in zoo_and_subspace['zoo_out']
  index = json.load(open(os.path.join(z, zoo.INDEX_FILE)))
  assert sorted(index) == sorted(ZOO_TASKS)
  paths = zoo.prompt_files(z, ZOO_TASKS)
  for task, path in zip(ZOO_TASKS, paths):
    assert files.load_prompt_info(path).task == task and files.load_prompt_file(path).shape == (4, 64)
  again = _zoo(z, *ZOO_TASKS).stdout  # resumable: finished tasks are not trained again
  assert again.count(': done') == 2 and '0 trained now' in again
  code, err = refused_here(capsys, 'zoo', '--output_dir', z, '--tasks', *ZOO_TASKS, TINY,
                       '--gin_file=runs/prompt_tune.gin', '--gin.TRAIN_STEPS=7')
  assert code == 1 and 'was built with other settings' in err and len(err.splitlines()) == 1
  with pytest.raises(zoo.ZooError, match='no finished prompt for 1 of the 2 tasks: pool_morea_no_yes'):
    zoo.prompt_files(z, ['pool_greater_no_yes', 'pool_morea_no_yes'])
  code, err = refused_here(capsys, 'zoo', '--output_dir', z, '--tasks', 'no_such_task', TINY)
  assert code == 1 and "'no_such_task' is neither a registered task nor a mixture" in err


def test_zoo_skips_a_task_another_process_is_training(zoo_and_subspace):
  z = zoo_and_subspace['zoo']
  busy = os.path.join(z, 'pool_smaller_no_yes')
  os.makedirs(busy, exist_ok=True)
  with run_lock.RunLock(busy):  # another zoo's run holds it
    out = _zoo(z, 'pool_greater_no_yes', 'pool_smaller_no_yes').stdout
  assert 'pool_smaller_no_yes: locked' in out and '1 being trained elsewhere' in out
  assert zoo.read_entry(z, 'pool_smaller_no_yes') is None


def test_msf_finds_a_subspace_from_the_zoo(zoo_and_subspace):
  msf = zoo_and_subspace['msf']
  rows = [json.loads(l) for l in open(os.path.join(msf, 'metrics.jsonl'))]
  rec = [r['losses/reconstruction'] for r in rows if 'losses/reconstruction' in r]
  assert len(rec) >= 5 and rec[-1] < rec[0]  # the auto-encoder learns to reconstruct
  info, decoder = intrinsic.load_subspace(msf)
  assert (info.dim, info.hidden, info.length, info.width) == (3, 16, 4, 64)
  assert info.tasks == ZOO_TASKS and info.model['name'] == 't5_1_1_tiny_synthetic'
  assert decoder['decode_out']['kernel'].shape == (16, 4 * 64)
  # One decoded prompt per task, each sidecar naming its task (task id order,
  # not seqio's sorted order of the mixture's tasks).
  folder = files.numpy_checkpoint_dir(msf, 10)
  for k, task in enumerate(ZOO_TASKS):
    path = os.path.join(folder, f'prompt_{k}', files.PROMPT_FILE)
    assert files.load_prompt_info(path).task == task
  with pytest.raises(intrinsic.SubspaceError, match='is not a subspace'):
    intrinsic.load_subspace(zoo_and_subspace['zoo'])


def test_ist_trains_only_v_and_stage_two_starts_from_its_prompt(zoo_and_subspace, tmp_path,
                                                               capsys):
  msf = zoo_and_subspace['msf']
  ist = str(tmp_path / 'ist')
  t5x_here('train', TINY, '--gin_file=runs/prompt_tune.gin', '--gin_file=prompts/intrinsic.gin',
           f'--gin.SUBSPACE_DIR={msf}', '--gin.MIXTURE_OR_TASK_NAME=pool_morea_cold_hot',
           f'--gin.MODEL_DIR={ist}', '--gin.TRAIN_STEPS=20', '--gin.train.checkpoint_period=20',
           '--gin.train.log_period=1', '--gin.LEARNING_RATE=0.1', *SMALL_RUN)
  folder = files.numpy_checkpoint_dir(ist, 20)
  info = files.load_prompt_info(os.path.join(folder, files.PROMPT_FILE))
  assert info.param_shapes == {'encoder.prompt.prompt.v': [1, 3]}
  v = np.load(os.path.join(folder, 'encoder.prompt.prompt.v'))
  _, decoder = intrinsic.load_subspace(msf)
  prompt = files.load_prompt_file(os.path.join(folder, files.PROMPT_FILE))
  np.testing.assert_allclose(prompt, np.asarray(intrinsic.decode(decoder, v)).reshape(4, 64),
                             rtol=1e-4, atol=1e-5)
  rows = [json.loads(l) for l in open(os.path.join(ist, 'metrics.jsonl'))]
  first, last = np.mean([r['loss'] for r in rows[:3]]), np.mean([r['loss'] for r in rows[-3:]])
  assert last < first  # 3 numbers are enough to move the task loss
  # Stage two: a full prompt started at Decoder(v).
  two = str(tmp_path / 'stage_two')
  t5x_here('train', TINY, '--gin_file=prompts/from_file.gin', '--gin_file=runs/prompt_tune.gin',
           f'--gin.PROMPT_FILE={os.path.join(folder, files.PROMPT_FILE)}',
           '--gin.MIXTURE_OR_TASK_NAME=pool_morea_cold_hot', f'--gin.MODEL_DIR={two}',
           '--gin.TRAIN_STEPS=0', *SMALL_RUN)
  np.testing.assert_allclose(files.load_prompt_file(files.prompt_file(two, 0)), prompt,
                             rtol=1e-6)
  # A subspace of another length is refused before training.
  code, err = refused_here(capsys, 'train', TINY, '--gin_file=runs/prompt_tune.gin',
                       '--gin_file=prompts/intrinsic.gin', f'--gin.SUBSPACE_DIR={msf}',
                       '--gin.MIXTURE_OR_TASK_NAME=pool_morea_cold_hot',
                       f'--gin.MODEL_DIR={tmp_path / "bad"}', '--gin.intrinsic_prompt.length=6',
                       *SMALL_RUN)
  assert code == 1 and 'PROMPT_LENGTH is 6; the subspace' in err
  # A subspace found on other frozen weights (same shapes) is refused too.
  other = tmp_path / 'other_model_subspace'
  shutil.copytree(intrinsic.subspace_folder(msf), other)
  meta = json.loads((other / intrinsic.SUBSPACE_FILE).read_text())
  (other / intrinsic.SUBSPACE_FILE).write_text(json.dumps({**meta, 'weights': '0123456789abcdef'}))
  code, err = refused_here(capsys, 'train', TINY, '--gin_file=runs/prompt_tune.gin',
                           '--gin_file=prompts/intrinsic.gin', f'--gin.SUBSPACE_DIR={other}',
                           '--gin.MIXTURE_OR_TASK_NAME=pool_morea_cold_hot',
                           f'--gin.MODEL_DIR={tmp_path / "bad2"}', *SMALL_RUN)
  assert code == 1 and 'weights 0123456789abcdef' in err and 'this run freezes' in err, err


@pytest.mark.parametrize('gin_file', ['prompts/intrinsic_random.gin', 'prompts/fastfood.gin'])
def test_random_subspace_baselines_train_only_v(gin_file, tmp_path):
  run = str(tmp_path / 'run')
  t5x_here('train', TINY, '--gin_file=runs/prompt_tune.gin', f'--gin_file={gin_file}',
           '--gin.INTRINSIC_DIM=3', '--gin.MIXTURE_OR_TASK_NAME=pool_morea_cold_hot',
           f'--gin.MODEL_DIR={run}', '--gin.TRAIN_STEPS=3', '--gin.train.checkpoint_period=3',
           *SMALL_RUN)
  info = files.load_prompt_info(files.prompt_file(run, 3))
  assert info.param_shapes == {'encoder.prompt.prompt.v': [1, 3]}
  assert files.load_prompt_file(files.prompt_file(run, 3)).shape == (4, 64)


# ---------------------------------------------------------------------------
# The effect: a subspace found over the pool's 44 training tasks.
# ---------------------------------------------------------------------------
FOUND = os.path.join(os.path.dirname(__file__), 'fixtures', 'ipt_subspace_tiny_r5')


def test_ist_in_the_found_subspace_beats_the_untrained_decoder_on_unseen_tasks(tmp_path):
  """IPT's claim at r=5 on two held-out task types (tests/fixtures/
  ipt_subspace_tiny_r5: MSF over the pool's 44 training tasks' zoo prompts on
  the tiny stand-in, decoder hidden 64). Both runs tune 5 numbers per task
  from the same start distribution for the same steps; the untrained decoder
  (bench/ipt.py: ~0 on every unseen task) is far below the found subspace."""
  info, _ = intrinsic.load_subspace(FOUND)
  held_out = ['pool_morea_no_yes', 'pool_moreb_small_big']
  assert not set(held_out) & set(info.tasks)  # unseen by the subspace
  common = [TINY, '--gin_file=runs/prompt_tune.gin', "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}",
            '--gin.MIXTURE_OR_TASK_NAME=@task_ids_mixture()',
            f'--gin.task_ids_mixture.task_names={held_out!r}', '--gin.intrinsic_prompt.num_prompts=2',
            '--gin.TRAIN_STEPS=300', '--gin.BATCH_SIZE=32', '--gin.train.eval_period=300',
            '--gin.train.eval_num_examples=100', '--gin.train.checkpoint_period=300',
            '--gin.train.tensorboard=False']
  scores = {}
  for name, flags in (('found', ['--gin_file=prompts/intrinsic.gin', f'--gin.SUBSPACE_DIR={FOUND}']),
                      ('random', ['--gin_file=prompts/intrinsic_random.gin', '--gin.INTRINSIC_DIM=5',
                                  f'--gin.DECODER_HIDDEN={info.hidden}',
                                  f'--gin.PROMPT_LENGTH={info.length}'])):
    run = str(tmp_path / name)
    t5x_here('train', *common, *flags, f'--gin.MODEL_DIR={run}')
    rows = [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]
    last = [r for r in rows if any(k.startswith('eval/') for k in r)][-1]
    scores[name] = np.mean([v for k, v in last.items() if k.endswith('/accuracy')])
  assert scores['found'] > scores['random'] + 30, scores  # seeds 0-2: ~75 vs <= 2
