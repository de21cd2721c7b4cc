"""Prompt transfer end to end on the tiny model: train six synthetic prompts
with `trainer.train`, compare them (embedding metrics, activated-neuron
overlap), evaluate prompts on tasks (`t5x transfer-matrix`) and check the
Google numpy layout.

Related tasks here are what the SPoT and Prompt-Transferability papers call
tasks of one type: the same labelling rule AND the same verbalizer (label
words), phrased differently (tasks.synthetic.TASK_TYPES: majority ->
negative/positive, parity -> odd/even, greater -> lower/higher; two templates
each). Unrelated tasks differ in both. The frozen model is the packaged
pretrained tiny T5 (prompt_transfer/assets/t5_1_1_tiny_synthetic) when present,
else the seeded random tiny T5.

Measured while writing this test (this configuration: 40 steps, batch 16,
prompt length 10, same initial prompt for every task; training seeds 0-3, and
seed 0 again after `greater_versus` was renamed, which changed its examples), over
the 6 targets x (1 related, 4 unrelated) sources: the cosine metrics put the
related source above every unrelated one for 4-6 of 6 targets and order 22-24
of the 24 (related, unrelated) pairs right; ON on decoder layers (the authors'
probe) 5-6 of 6 and 23-24 of 24. The Euclidean metrics do not (2-3 of 6, 14-20
of 24): they follow how far a prompt travelled, and the hardest rule
(`greater`) moves its prompts furthest from every other prompt, its own twin
included. Divided by each prompt's mean token norm first (`t5x similarity
--normalize=scale`) they rank like the cosines: 4-6 of 6 and 22-24 of 24 flat,
6 of 6 and 24 of 24 per token. Asserted with a margin (related first for at
least 3 of 6 targets and at least 85% of pairs right; chance is 1 in 5 and
half): the four cosine metrics, both Euclidean metrics after scale
normalisation, ON on decoder layers. Everything is printed (pytest -rP).

What the indicators do NOT separate on this model: the rule alone. With the
label words held equal across rules (every task answering yes/no), the same
measurement gave 33-83% related-first for the cosine metrics and chance for ON,
and with label words crossed (same rule, other words vs other rule, same words)
the shared label words win. The earlier `synthetic_<rule>_{yesno,truefalse}`
families remain for that contrast and for the quick-start.
"""
import json
import os

import gin
import numpy as np
import pytest

import tasks  # noqa: F401  (registers the synthetic tasks)
from tasks import synthetic
from prompt_transfer import cli
from prompt_transfer.training import evaluation, trainer
from prompt_transfer.analysis import library, neurons
from prompt_transfer.prompts import files, initializers
from prompt_transfer.prompts.free import free_prompt
from prompt_transfer.analysis import similarity as S
from prompt_transfer.model.config import get_config
from prompt_transfer.model.models import build_model
from prompt_transfer.model.pretrained import load_frozen_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOGLE_SST2 = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'google_prompt_tuning',
                           'pretrained_prompts', 't5_1_1_lm100k_base', 'sst2.npy')
# The packaged pretrained tiny T5 (tools/make_tiny_checkpoint.py); the env
# variable points the test at another Hugging Face T5 directory.
ASSET = os.environ.get('PROMPT_TRANSFER_TEST_TINY_ASSET') or os.path.join(
    REPO, 'prompt_transfer', 'assets', 't5_1_1_tiny_synthetic')
# A and B: one task type (majority rule, negative/positive); C another type.
A, B, C = 'synthetic_majority_posneg', 'synthetic_majority_mood', 'synthetic_parity_evenodd'
TASKS = (A, B, C)  # the transfer matrix's tasks
FAMILY = tuple(n for names in synthetic.TASK_TYPES.values() for n in names)  # prompts trained
LENGTHS = {'inputs': 64, 'targets': 12}
PROMPT_LENGTH = 10
STEPS = 40
EVAL_EXAMPLES = 32



def _has_asset() -> bool:
  return os.path.exists(os.path.join(ASSET, 'config.json'))


def _setup():
  """(config, checkpoint path or None, model gin file) of the frozen model."""
  if _has_asset():
    from prompt_transfer.model import checkpoint_import  # pylint: disable=g-import-not-at-top
    config, _ = checkpoint_import.read_hf_checkpoint(ASSET)
    return config.replace(name='t5_1_1_tiny_synthetic'), ASSET, 'models/t5_1_1_tiny_synthetic.gin'
  return get_config('t5_1_1', 'tiny', vocab_size=384), None, 'models/t5_1_1_tiny.gin'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('transfer')
  config, ckpt, gin_file = _setup()
  runs = {}
  for task in FAMILY:
    runs[task] = str(root / 'runs' / task)
    # Same seed: every prompt starts from the same initial array, so their
    # differences come from the tasks alone.
    trainer.train(model_dir=runs[task], mixture_or_task_name=task, task_feature_lengths=LENGTHS,
                  train_steps=STEPS, batch_size=16, config=config,
                  prompt_module=free_prompt(PROMPT_LENGTH, initializers.random_uniform()), checkpoint_path=ckpt,
                  checkpoint_period=STEPS, log_period=STEPS, seed=0, model_seed=0)
  model = build_model(config)
  frozen = load_frozen_params(config, ckpt, 0)
  return {'root': root, 'runs': runs, 'config': config, 'ckpt': ckpt, 'gin_file': gin_file,
          'model': model, 'frozen': frozen}


def _prompt_file(run_dir: str) -> str:
  return os.path.join(run_dir, 'numpy_checkpoints', f'checkpoint_{STEPS}', library.PROMPT_FILE)


def test_google_layout_round_trip(trained):
  path = _prompt_file(trained['runs'][A])
  with open(path, 'rb') as f:  # Google's layout: plain np.save content, no .npy suffix
    plain = np.load(f)
  assert plain.shape == (PROMPT_LENGTH, trained['config'].emb_dim) and plain.dtype == np.float32
  np.testing.assert_array_equal(files.load_prompt_file(path), plain)
  lib = library.load_library(trained['root'] / 'runs')
  assert sorted(lib) == sorted(FAMILY)
  array, info = lib[A]
  np.testing.assert_array_equal(array, plain)
  assert info.step == STEPS and info.model['emb_dim'] == trained['config'].emb_dim
  library.check_compatible(info, trained['config'], 'ByteVocabulary(, size=259)', array=array)
  if os.path.exists(GOOGLE_SST2):
    google = files.load_prompt_file(GOOGLE_SST2, expected_shape=(100, 768))
    assert google.dtype == np.float32 and np.linalg.norm(google, axis=1).mean() > 1000
    # A Google prompt is refused for our tiny model, with both widths named.
    with pytest.raises(library.IncompatiblePromptError, match='768'):
      library.check_compatible(library.load_library(GOOGLE_SST2)['sst2'][1], trained['config'],
                               array=google)


def _indicators(trained) -> tuple:
  lib = library.load_library(trained['root'] / 'runs')
  arrays = {t: lib[t][0] for t in FAMILY}
  values = {m: S.similarity_matrix(arrays, m) for m in S.METRICS}
  for m in ('flat_euclidean', 'per_token_euclidean'):  # `t5x similarity --normalize=scale`
    values[f'{m}[scale]'] = S.similarity_matrix(arrays, m, 'scale')
  for stack in ('decoder', 'encoder'):
    patterns = neurons.activation_patterns(trained['model'], trained['frozen'], arrays,
                                           stack=stack)
    values[f'neuron_overlap_{stack}'] = neurons.overlap_matrix(patterns)
  return list(arrays), values


def _higher(metric: str) -> bool:
  return (metric.startswith('neuron_overlap') or
          S.METRICS[metric.split('[')[0]].higher_is_better)


def _ranking_quality(names: list, v: np.ndarray, higher: bool) -> tuple:
  """(targets whose related source beats every unrelated one, (related,
  unrelated) pairs ordered right, number of pairs)."""
  first = right = pairs = 0
  for i, target in enumerate(names):
    score = lambda j: v[i, j] if higher else -v[i, j]  # pylint: disable=cell-var-from-loop
    rel = [j for j, n in enumerate(names) if j != i and synthetic.same_type(target, n)]
    unrel = [j for j, n in enumerate(names) if not synthetic.same_type(target, n)]
    first += all(score(r) > max(score(u) for u in unrel) for r in rel)
    right += sum(score(r) > score(u) for r in rel for u in unrel)
    pairs += len(rel) * len(unrel)
  return first, right, pairs


def test_indicators_rank_related_source_first(trained):
  """For each of the six targets, its one same-type source against the four
  other-type sources: the cosine metrics, the scale-normalised Euclidean
  metrics and ON (decoder layers, the authors' probe) rank the related source
  first. Thresholds leave a margin below what was measured (module docstring)."""
  names, values = _indicators(trained)
  lines = [f'frozen model: {"pretrained asset" if trained["ckpt"] else "random tiny T5"}, '
           f'{STEPS} steps, prompt length {PROMPT_LENGTH}',
           f'{"indicator":<28} {"related first":>13} {"pairs right":>11}']
  quality = {}
  for m, v in values.items():
    quality[m] = _ranking_quality(names, v, _higher(m))
    first, right, pairs = quality[m]
    lines.append(f'{m:<28} {first:>11}/{len(names)} {right:>8}/{pairs}')
  report = '\n'.join(lines)
  print('\n' + report)
  if not trained['ckpt']:
    pytest.skip('thresholds were measured on the packaged pretrained tiny T5')
  for m in ('avg_token_cosine', 'per_token_cosine', 'per_token_max_cosine', 'flat_cosine',
            'flat_euclidean[scale]', 'per_token_euclidean[scale]', 'neuron_overlap_decoder'):
    first, right, pairs = quality[m]
    assert first >= 3 and right >= 0.85 * pairs, (m, report)


@pytest.fixture(scope='module')
def cli_outputs(trained):
  """`t5x similarity` and `t5x transfer-matrix` run on the three prompts."""
  runs = [trained['runs'][t] for t in TASKS]
  out = trained['root'] / 'cli'
  common = [f'--gin_file={trained["gin_file"]}', f'--gin.TASK_FEATURE_LENGTHS={LENGTHS!r}']
  if trained['ckpt']:
    common.append(f'--gin.CHECKPOINT_PATH={trained["ckpt"]}')
  try:
    assert cli.run(['similarity', *runs, '--neurons', '--target', B, '--json',
                    str(out / 'sim.json'), '--png', str(out / 'sim.png'), *common]) == 0
    gin.clear_config()
    assert cli.run(['similarity', *runs, '--json', str(out / 'matrix.json'), '--png',
                    str(out / 'matrix.png')]) == 0
    assert cli.run(['transfer-matrix', *[trained['runs'][t] for t in FAMILY], '--output_dir',
                    str(out / 'tm'),
                    f'--num_examples={EVAL_EXAMPLES}', '--batch_size=32', '--neurons',
                    *common]) == 0
  finally:
    gin.clear_config()
  return out


def test_similarity_cli_outputs(cli_outputs):
  ranked = json.loads((cli_outputs / 'sim.json').read_text())
  assert ranked['target'] == B
  assert set(ranked['rankings']) == set(S.SIMILARITY_METRICS) | {'neuron_overlap'}
  assert sorted(n for n, _ in ranked['rankings']['neuron_overlap']) == sorted([A, C])
  full = json.loads((cli_outputs / 'matrix.json').read_text())
  m = np.array(full['metrics']['avg_token_cosine']['matrix'])
  assert full['names'] == list(TASKS) and np.allclose(np.diag(m), 1.0)
  for png in ('sim.png', 'matrix.png'):
    assert (cli_outputs / png).stat().st_size > 1000


def test_transfer_matrix_matches_separate_evaluations(trained, cli_outputs):
  tm = cli_outputs / 'tm'
  result = json.loads((tm / 'transfer.json').read_text())
  assert result['sources'] == list(FAMILY) and result['tasks'] == list(FAMILY)
  assert result['score_metric'] == {t: 'accuracy' for t in FAMILY}
  raw = np.array(result['raw'], dtype=float)
  rel = np.array(result['relative'], dtype=float)
  with np.errstate(invalid='ignore', divide='ignore'):
    np.testing.assert_allclose(rel, raw / np.diag(raw)[None, :])
  for name in ('transfer_raw.csv', 'transfer_relative.csv', 'transfer_raw.png',
               'transfer_relative.png'):
    assert (tm / name).stat().st_size > 0
  assert (tm / 'transfer_raw.png').stat().st_size > 1000
  assert set(result['correlations']) == set(S.SIMILARITY_METRICS) | {'neuron_overlap'}
  # Separate `t5x eval`-style runs (evaluation.evaluate with the same model
  # through gin) give the same scores: one diagonal and two transfer cells.
  config = trained['config']
  try:
    with gin.unlock_config():
      for field in ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim', 'name'):
        gin.bind_parameter(f'model_config.{field}', getattr(config, field))
      gin.bind_parameter('model_config.variant', 't5_1_1')
      gin.bind_parameter('model_config.size', 'tiny')
      gin.bind_parameter('prompt_config.length', PROMPT_LENGTH)
    for s, t in ((A, A), (C, A), (A, B)):
      got = evaluation.evaluate(prompt_file=_prompt_file(trained['runs'][s]),
                                mixture_or_task_name=t, task_feature_lengths=LENGTHS,
                                checkpoint_path=trained['ckpt'], batch_size=32,
                                num_examples=EVAL_EXAMPLES, model_seed=0,
                                output_file=str(tm / f'eval_{s}_{t}.json'))
      assert got[f'{t}/accuracy'] == pytest.approx(raw[FAMILY.index(s), FAMILY.index(t)]), (s, t)
  finally:
    gin.clear_config()
  print('\nzero-shot accuracy (rows: source prompt; columns: task):\n' +
        S.format_matrix([t.replace('synthetic_', '') for t in FAMILY], raw, 1, 16))
  corr = {m: c['relative']['pooled'] for m, c in result['correlations'].items()}
  print('Spearman with relative transfer, pooled:', json.dumps(corr, indent=1))
  # Measured (seed 0): ON +0.77 (the best, as in the paper), cosines +0.52..+0.66.
  assert corr['neuron_overlap'] > 0.3 and corr['avg_token_cosine'] > 0.2, corr
