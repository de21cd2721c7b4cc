"""Prompt transfer end to end on the tiny model: train three synthetic prompts
with `trainer.train`, compare them (embedding metrics, activated-neuron
overlap), evaluate every prompt on every task (`t5x transfer-matrix`) and check
the Google numpy layout.

Tasks: A = majority_yesno, B = majority_truefalse (A's family: same rule, other
template and label words), C = parity_yesno (another rule, A's label words).
The frozen model is the packaged pretrained tiny T5 when present
(prompt_transfer/assets/t5_1_1_tiny_synthetic), else the seeded random tiny T5.

What the indicators measure after a few steps (measured while writing these
tests, 9 synthetic tasks of 3 families, 30-120 steps, prompt length 20): over
all (target, same-family source, other-family source) triples a same-family
source ranks first in only 30-53% of triples for every embedding metric and
for ON, on the random and on a model-tuned tiny T5 alike, i.e. chance; what
they follow is the shared LABEL WORDS (a source with the target's label words
ranks above one without in 53-100% of triples; 77-100% for ON on decoder
layers). For the triple used here the token-cosine metrics rank B's family
member A above C in every run measured (both models, 30-120 steps; the
majority templates share the phrase "more a than b"), and on the random model
A's label-word twin C above A's family member B. Those are asserted; the rest
is printed (pytest -rP) and was not stable across runs.
"""
import json
import os

import gin
import numpy as np
import pytest

import tasks  # noqa: F401  (registers the synthetic tasks)
from prompt_transfer import cli, evaluation, library, neurons, prompts, trainer
from prompt_transfer import similarity as S
from prompt_transfer.config import get_config
from prompt_transfer.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOGLE_SST2 = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'google_prompt_tuning',
                           'pretrained_prompts', 't5_1_1_lm100k_base', 'sst2.npy')
# The packaged pretrained tiny T5 (tools/make_tiny_checkpoint.py); the env
# variable points the test at another Hugging Face T5 directory.
ASSET = os.environ.get('PROMPT_TRANSFER_TEST_TINY_ASSET') or os.path.join(
    REPO, 'prompt_transfer', 'assets', 't5_1_1_tiny_synthetic')
A, B, C = 'synthetic_majority_yesno', 'synthetic_majority_truefalse', 'synthetic_parity_yesno'
TASKS = (A, B, C)
LENGTHS = {'inputs': 64, 'targets': 12}
PROMPT_LENGTH = 10
STEPS = 40
EVAL_EXAMPLES = 32



def _has_asset() -> bool:
  return os.path.exists(os.path.join(ASSET, 'config.json'))


def _setup():
  """(config, checkpoint path or None, model gin file) of the frozen model."""
  if _has_asset():
    from prompt_transfer import checkpoint_import  # pylint: disable=g-import-not-at-top
    config, _ = checkpoint_import.read_hf_checkpoint(ASSET)
    return config.replace(name='t5_1_1_tiny_synthetic'), ASSET, 'models/t5_1_1_tiny_synthetic.gin'
  return get_config('t5_1_1', 'tiny', vocab_size=384), None, 'models/t5_1_1_tiny.gin'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('transfer')
  config, ckpt, gin_file = _setup()
  runs = {}
  for task in TASKS:
    runs[task] = str(root / 'runs' / task)
    # Same seed: every prompt starts from the same initial array, so their
    # differences come from the tasks alone.
    trainer.train(model_dir=runs[task], mixture_or_task_name=task, task_feature_lengths=LENGTHS,
                  train_steps=STEPS, batch_size=16, config=config,
                  prompt=(PROMPT_LENGTH, prompts.random_uniform()), checkpoint_path=ckpt,
                  checkpoint_period=STEPS, log_period=STEPS, seed=0, model_seed=0)
  model = build_model(config)
  frozen = trainer.load_frozen_params(model, ckpt, 0)
  return {'root': root, 'runs': runs, 'config': config, 'ckpt': ckpt, 'gin_file': gin_file,
          'model': model, 'frozen': frozen}


def _prompt_file(run_dir: str) -> str:
  return os.path.join(run_dir, 'numpy_checkpoints', f'checkpoint_{STEPS}', library.PROMPT_FILE)


def test_google_layout_round_trip(trained):
  path = _prompt_file(trained['runs'][A])
  with open(path, 'rb') as f:  # Google's layout: plain np.save content, no .npy suffix
    plain = np.load(f)
  assert plain.shape == (PROMPT_LENGTH, trained['config'].emb_dim) and plain.dtype == np.float32
  np.testing.assert_array_equal(prompts.load_prompt_file(path), plain)
  lib = library.load_library(trained['root'] / 'runs')
  assert sorted(lib) == sorted(TASKS)
  array, info = lib[A]
  np.testing.assert_array_equal(array, plain)
  assert info.step == STEPS and info.model['emb_dim'] == trained['config'].emb_dim
  library.check_compatible(info, trained['config'], 'ByteVocabulary(, size=259)', array=array)
  if os.path.exists(GOOGLE_SST2):
    google = prompts.load_prompt_file(GOOGLE_SST2, expected_shape=(100, 768))
    assert google.dtype == np.float32 and np.linalg.norm(google, axis=1).mean() > 1000
    # A Google prompt is refused for our tiny model, with both widths named.
    with pytest.raises(library.IncompatiblePromptError, match='768'):
      library.check_compatible(library.load_library(GOOGLE_SST2)['sst2'][1], trained['config'],
                               array=google)


def _indicators(trained) -> tuple:
  lib = library.load_library(trained['root'] / 'runs')
  arrays = {t: lib[t][0] for t in TASKS}
  values = {m: S.similarity_matrix(arrays, m) for m in S.METRICS}
  for stack in ('decoder', 'encoder'):
    patterns = neurons.activation_patterns(trained['model'], trained['frozen'], arrays,
                                           stack=stack)
    values[f'neuron_overlap_{stack}'] = neurons.overlap_matrix(patterns)
  return list(arrays), values


def _higher(metric: str) -> bool:
  return metric.startswith('neuron_overlap') or S.METRICS[metric].higher_is_better


def test_indicators_rank_related_source_first(trained):
  """Target B: its family's A ranks above C (neither shares B's label words)
  under the token-cosine metrics. Target A on the random model: C, which
  shares A's label words, ranks above A's family member B (the label-word
  effect; reported, and asserted only for the random model, where it held in
  every measured run). Other metrics and ON are printed, not asserted: they
  varied between runs (see the module docstring)."""
  names, values = _indicators(trained)
  a, b, c = (names.index(t) for t in TASKS)
  pretrained = trained['ckpt'] is not None
  lines = [f'frozen model: {"pretrained asset" if pretrained else "random tiny T5"}, '
           f'{STEPS} steps, prompt length {PROMPT_LENGTH}',
           f'{"indicator":<24} {"B:A(fam)":>9} {"B:C(other)":>10} {"A:B(fam)":>9} '
           f'{"A:C(labels)":>11}  B ranks A first']
  for m, v in values.items():
    first = (v[b, a] > v[b, c]) == _higher(m)
    lines.append(f'{m:<24} {v[b, a]:>9.4f} {v[b, c]:>10.4f} {v[a, b]:>9.4f} {v[a, c]:>11.4f}'
                 f'  {first}')
  report = '\n'.join(lines)
  print('\n' + report)
  cosines = ('avg_token_cosine', 'per_token_cosine', 'per_token_max_cosine')
  for m in cosines:
    assert values[m][b, a] > values[m][b, c], (m, report)
  if not pretrained:
    for m in cosines + ('neuron_overlap_decoder',):
      assert values[m][a, c] > values[m][a, b], (m, report)


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
    assert cli.run(['transfer-matrix', *runs, '--output_dir', str(out / 'tm'),
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
  assert result['sources'] == list(TASKS) and result['tasks'] == list(TASKS)
  assert result['score_metric'] == {t: 'accuracy' for t in TASKS}
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
      assert got[f'{t}/accuracy'] == pytest.approx(raw[TASKS.index(s), TASKS.index(t)]), (s, t)
  finally:
    gin.clear_config()
  print('\nzero-shot accuracy (rows: source prompt; columns: task):\n' +
        S.format_matrix([t.replace('synthetic_', '') for t in TASKS], raw, 1, 16))
