"""Prompt similarity metrics, the prompt library and neuron read-outs.

Real data (skipped when absent): the 14 RoBERTa-base prompts of Su et al. with
their measured zero-shot transfer, and Google's 3 T5 1.1 prompts, from
`../shared/data` next to the repository. The Spearman correlations of each
metric with transfer are printed (run with -s or -rP), not asserted: they are
a measurement to compare with the data's README (pooled 0.01 to 0.31, mean per
target -0.03 to 0.40).
"""
import json
import os

import jax
import numpy as np
import pytest
from scipy import stats

from prompt_transfer.prompts import files
from prompt_transfer.prompts.free import free_prompt
from prompt_transfer.analysis import library, neurons
from prompt_transfer.analysis import similarity as S
from prompt_transfer.model.config import get_config
from prompt_transfer.model.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared', 'data')
ROBERTA = os.path.join(SHARED, 'prompt_transferability_roberta_base')
GOOGLE = os.path.join(SHARED, 'google_prompt_tuning', 'pretrained_prompts', 't5_1_1_lm100k_base')
needs_roberta = pytest.mark.skipif(
    not os.path.exists(os.path.join(ROBERTA, 'zero_shot_transfer.json')),
    reason=f'shared data not found at {ROBERTA}: real-prompt tests skipped')
needs_google = pytest.mark.skipif(not os.path.exists(os.path.join(GOOGLE, 'sst2.npy')),
                                  reason=f'shared data not found at {GOOGLE}')
# Metrics for which metric(p, p) == 1 for every prompt (per_token_cosine and
# per_token_euclidean_sim average over all pairs i != j too, so they are not).
SELF_ONE = ('avg_token_cosine', 'per_token_max_cosine', 'flat_cosine', 'flat_euclidean_sim')


def _cos(u, v):
  return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


# ---------------------------------------------------------------------------
# Metric definitions on small arrays, checked by plain loops.
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def pair():
  rng = np.random.default_rng(0)
  return rng.normal(size=(5, 8)), rng.normal(size=(7, 8)) * 3.0 + 0.5


def test_metrics_match_plain_loops(pair):
  a, b = pair
  pairs = [[_cos(x, y) for y in b] for x in a]
  assert S.per_token_cosine(a, b) == pytest.approx(np.mean(pairs), abs=1e-12)
  assert S.per_token_max_cosine(a, b) == pytest.approx(np.mean(np.max(pairs, 1)), abs=1e-12)
  assert S.per_token_max_cosine(b, a) == pytest.approx(np.mean(np.max(pairs, 0)), abs=1e-12)
  assert S.avg_token_cosine(a, b) == pytest.approx(_cos(a.mean(0), b.mean(0)), abs=1e-12)
  dists = [[np.sqrt(np.sum((x - y) ** 2)) for y in b] for x in a]
  assert S.per_token_euclidean(a, b) == pytest.approx(np.mean(dists))
  assert S.per_token_euclidean_sim(a, b) == pytest.approx(1 / (1 + np.mean(dists)))
  c = a[::-1] * 2 + 1
  assert S.flat_cosine(a, c) == pytest.approx(_cos(a.ravel(), c.ravel()))
  assert S.flat_euclidean_sim(a, c) == pytest.approx(1 / (1 + np.linalg.norm(a - c)))
  # similarity_matrix's one-Gram-matrix path equals the pairwise functions.
  for metric in S.METRICS:
    m = S.similarity_matrix({'a': a, 'b': b, 'c': c}, metric)
    assert m[0, 2] == pytest.approx(S.METRICS[metric].fn(a, c), rel=1e-9), metric
    if not S.METRICS[metric].same_shape:
      assert m[1, 0] == pytest.approx(S.METRICS[metric].fn(b, a), rel=1e-9), metric


def test_same_shape_metrics_refuse_other_lengths(pair):
  a, b = pair
  with pytest.raises(ValueError, match='equal shape'):
    S.flat_cosine(a, b)
  m = S.similarity_matrix({'a': a, 'b': b, 'a2': a * 2}, 'flat_cosine')
  assert np.isnan(m[0, 1]) and np.isnan(m[1, 2])
  assert m[0, 2] == pytest.approx(1.0)
  with pytest.raises(ValueError, match='widths'):
    S.per_token_cosine(a, np.ones((3, 4)))


def test_normalisation(pair):
  a, b = pair
  scaled = S.normalize_prompt(a, 'scale')
  assert np.mean(np.linalg.norm(scaled, axis=1)) == pytest.approx(1.0)
  assert np.allclose(np.linalg.norm(S.normalize_prompt(b, 'token'), axis=1), 1.0)
  for mode in S.NORMALIZATIONS:  # per-token cosines ignore every rescaling
    assert S.prompt_similarity(a, b, 'per_token_cosine', mode) == pytest.approx(
        S.per_token_cosine(a, b))
  # A prompt and 8x itself: far apart raw, identical once normalised.
  assert S.prompt_similarity(a, 8 * a, 'flat_euclidean_sim') < 0.1
  assert S.prompt_similarity(a, 8 * a, 'flat_euclidean_sim', 'scale') == pytest.approx(1.0)
  with pytest.raises(ValueError, match='normalisation'):
    S.normalize_prompt(a, 'zscore')


def test_rank_sources_orders_similarities_and_distances(pair):
  a, _ = pair
  rng = np.random.default_rng(1)
  cands = {'near': a + 0.1 * rng.normal(size=a.shape), 'far': rng.normal(size=a.shape),
           'mid': a + 1.0 * rng.normal(size=a.shape)}
  for metric in ('flat_cosine', 'flat_euclidean', 'flat_euclidean_sim', 'avg_token_cosine'):
    assert [n for n, _ in S.rank_sources(a, cands, metric)] == ['near', 'mid', 'far'], metric


def test_transfer_correlation_orientation():
  # Target-row similarity vs [source, target] transfer: a perfect indicator.
  rng = np.random.default_rng(0)
  transfer = rng.uniform(size=(5, 5))
  sim = transfer.T.copy()
  c = S.transfer_correlation(sim, transfer)
  assert c.pooled == pytest.approx(1.0) and c.mean_per_target == pytest.approx(1.0)
  assert c.num_pairs == 20
  off = ~np.eye(5, dtype=bool)
  assert S.transfer_correlation(transfer, transfer).pooled == pytest.approx(
      stats.spearmanr(transfer.T[off], transfer[off]).statistic)


# ---------------------------------------------------------------------------
# Real prompts.
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def roberta():
  with open(os.path.join(ROBERTA, 'zero_shot_transfer.json')) as f:
    acc = json.load(f)['source_to_target_accuracy']
  names = list(acc)
  raw = np.array([[acc[s][t] for t in names] for s in names])
  prompts = {n: np.load(os.path.join(ROBERTA, f'{n}.npy')) for n in names}
  return names, prompts, raw


@needs_roberta
def test_real_prompts_hand_checked_properties(roberta):
  names, prompts, _ = roberta
  assert len(names) == 14 and all(p.shape == (100, 768) for p in prompts.values())
  sub = {n: prompts[n] for n in names[:5]}
  for metric in S.METRICS:
    m = S.similarity_matrix(sub, metric)
    if metric in SELF_ONE:
      assert np.allclose(np.diag(m), 1.0), metric
    if S.METRICS[metric].symmetric:
      assert np.allclose(m, m.T), metric
  # per_token_cosine(p, p) = mean of p's token-cosine Gram matrix, not 1.
  p = prompts['IMDB'].astype(np.float64)
  unit = p / np.linalg.norm(p, axis=1, keepdims=True)
  assert S.per_token_cosine(p, p) == pytest.approx(np.mean(unit @ unit.T))
  # One pair by plain numpy, independently of the module.
  x, y = prompts['IMDB'].astype(np.float64), prompts['SST2'].astype(np.float64)
  loops = np.mean([[np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v) for v in y] for u in x])
  assert S.prompt_similarity(x, y, 'per_token_cosine') == pytest.approx(loops, abs=1e-10)
  assert S.prompt_similarity(x, y, 'avg_token_cosine') == pytest.approx(
      _cos(x.mean(0), y.mean(0)))
  assert S.prompt_similarity(x, y, 'flat_euclidean_sim') == pytest.approx(
      1 / (1 + np.sqrt(np.sum((x - y) ** 2))))
  # Token norms differ ~8x between prompts (MRPC vs MNLI): why normalising exists.
  norms = {n: np.linalg.norm(prompts[n][1:], axis=1).mean() for n in ('MRPC', 'MNLI')}
  assert norms['MNLI'] / norms['MRPC'] > 5


@needs_roberta
def test_real_prompts_correlation_with_transfer(roberta):
  """Reports Spearman(metric, relative transfer); asserts only well-formedness."""
  names, prompts, raw = roberta
  rel = S.relative_transfer(raw)
  assert np.allclose(np.diag(rel), 1.0)
  lines, values = [], []
  for skip in (0, 1):  # row 0 was the <mask> slot, never trained
    arrays = {n: S.as_prompt(p, skip) for n, p in prompts.items()}
    cache = {}
    for norm in S.NORMALIZATIONS:
      for metric in S.SIMILARITY_METRICS:
        # Cosines of token pairs do not change with either normalisation.
        key = (metric, 'none' if metric.startswith('per_token_') and 'cosine' in metric
               else norm)
        if key not in cache:
          cache[key] = S.similarity_matrix(arrays, metric, key[1])
        c = S.transfer_correlation(cache[key], rel, names)
        assert c.num_pairs == 182 and -1 <= c.pooled <= 1 and -1 <= c.mean_per_target <= 1
        values.append((c.pooled, c.mean_per_target))
        lines.append(f'skip_rows={skip} {norm:<5} {metric:<24} pooled {c.pooled:+.3f} '
                     f'(p={c.pooled_p:.2g})  mean per target {c.mean_per_target:+.3f}')
  pooled, per_target = np.array(values).T
  print('\nSpearman with relative zero-shot transfer, 14 RoBERTa-base prompts, 182 pairs '
        '(README: pooled 0.01 to 0.31, mean per target -0.03 to 0.40):\n' + '\n'.join(lines))
  print(f'range: pooled {pooled.min():+.3f} to {pooled.max():+.3f}; mean per target '
        f'{per_target.min():+.3f} to {per_target.max():+.3f}')


@needs_google
def test_google_t5_prompts_large_norms():
  lib = library.load_library(GOOGLE)
  assert sorted(lib) == ['mrpc', 'rte', 'sst2']
  for name, (array, info) in lib.items():
    assert array.shape == (100, 768) and array.dtype == np.float32
    assert info.task == '' and info.model == {} and info.prompt_length == 100
  arrays = {n: a for n, (a, _) in lib.items()}
  assert np.linalg.norm(arrays['sst2'], axis=1).mean() > 1000  # T5 1.1 scale
  for metric in SELF_ONE:
    assert np.allclose(np.diag(S.similarity_matrix(arrays, metric)), 1.0), metric
  raw = S.similarity_matrix(arrays, 'flat_euclidean_sim')
  scaled = S.similarity_matrix(arrays, 'flat_euclidean_sim', 'scale')
  off = ~np.eye(3, dtype=bool)
  # Raw distances of ~1e4 squash 1/(1+d) to ~0; normalised, it is informative.
  assert raw[off].max() < 1e-3 and scaled[off].min() > 10 * raw[off].max()
  cos = S.similarity_matrix(arrays, 'per_token_cosine')
  assert np.all(np.isfinite(cos)) and np.all(np.abs(cos) <= 1)
  print('\nGoogle T5 1.1 prompts, per_token_cosine:\n' +
        S.format_matrix(list(arrays), cos, 4))


# ---------------------------------------------------------------------------
# Library.
# ---------------------------------------------------------------------------
def _save_run(model_dir, task, array, step, config=None, vocab='ByteVocabulary(, size=259)'):
  config = config or get_config('t5_1_1', 'tiny', vocab_size=384)
  info = files.PromptInfo(task=task, model=config.describe(), vocabulary=vocab,
                                prompt_length=array.shape[0], step=step)
  return files.save_numpy_checkpoint(str(model_dir), step, array, {}, info)


def test_library_reads_runs_checkpoints_and_bare_files(tmp_path):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 32)).astype(np.float32), rng.normal(size=(6, 32)).astype(np.float32)
  _save_run(tmp_path / 'lib' / 'run_a', 'task_a', a * 0, 0)
  _save_run(tmp_path / 'lib' / 'run_a', 'task_a', a, 10)  # the latest step wins
  _save_run(tmp_path / 'lib' / 'run_b', 'task_b', b, 5)
  _save_run(tmp_path / 'lib' / 'run_b2', 'task_b', b + 1, 5)  # a second run of task_b
  np.save(tmp_path / 'lib' / 'google.npy', a)
  (tmp_path / 'lib' / 'logs').mkdir()
  lib = library.load_library(tmp_path / 'lib')
  assert sorted(lib) == ['google', 'task_a', 'task_b', 'task_b@run_b2']
  np.testing.assert_array_equal(lib['task_a'][0], a)
  assert lib['task_a'][1].step == 10 and lib['task_a'][1].model['emb_dim'] == 32
  assert lib['google'][1].model == {} and lib['google'][1].prompt_length == 4
  # A given step, a checkpoint folder and a single file.
  assert np.all(library.load_library(tmp_path / 'lib' / 'run_a', step=0)['task_a'][0] == 0)
  ckpt = files.numpy_checkpoint_dir(str(tmp_path / 'lib' / 'run_b'), 5)
  assert list(library.load_library(ckpt)) == ['task_b']
  assert list(library.load_library([os.path.join(ckpt, library.PROMPT_FILE)])) == ['task_b']
  with pytest.raises(FileNotFoundError):
    library.load_library(tmp_path / 'missing')
  # A given folder holding no prompt is named, not silently dropped.
  with pytest.raises(FileNotFoundError, match=r'logs holds no prompt'):
    library.load_library([tmp_path / 'lib' / 'run_a', tmp_path / 'lib' / 'logs'])


def test_other_weights_of_the_same_shape_are_named():
  tiny = get_config('t5_1_1', 'tiny', vocab_size=384)
  info = files.PromptInfo(model=tiny.describe(), weights='aaaa')
  assert library.other_weights_warning(info, tiny, 'aaaa', 'p') is None
  msg = library.other_weights_warning(info, tiny, 'bbbb', 'p')
  assert 't5_1_1_tiny (weights aaaa)' in msg and 't5_1_1_tiny (weights bbbb)' in msg
  # Sidecars written before fingerprints: the model names decide.
  old = files.PromptInfo(model=tiny.describe())
  assert library.other_weights_warning(old, tiny, 'bbbb', 'p') is None
  assert 't5_1_1_tiny' in library.other_weights_warning(old, tiny.replace(name='flan_tiny'),
                                                        'bbbb', 'p')


def test_check_compatible_names_both_models(tmp_path):
  tiny = get_config('t5_1_1', 'tiny', vocab_size=384)
  base = get_config('t5_1_1', 'base')
  prompt = np.zeros((4, 32), np.float32)
  _save_run(tmp_path / 'r', 'task_a', prompt, 1, tiny)
  (array, info), = library.load_library(tmp_path / 'r').values()
  library.check_compatible(info, tiny, 'ByteVocabulary(, size=259)', array=array)
  with pytest.raises(library.IncompatiblePromptError) as e:
    library.check_compatible(info, base, array=array)
  msg = str(e.value)
  assert 't5_1_1_tiny' in msg and 't5_1_1_base' in msg and 'emb_dim 32 vs 768' in msg
  library.check_compatible(info, base, array=array, projector=True)  # a projector maps it
  with pytest.raises(library.IncompatiblePromptError, match='vocabulary'):
    library.check_compatible(info, tiny, 'SentencePieceVocabulary(/x/spm.model, size=32100)')
  # The same vocabulary file elsewhere is the same vocabulary.
  info.vocabulary = 'SentencePieceVocabulary(/a/spm.model, size=32100)'
  library.check_compatible(info, tiny, 'SentencePieceVocabulary(/b/spm.model, size=32100)')
  # A bare file: only its width can be checked.
  bare = files.PromptInfo(prompt_length=100)
  with pytest.raises(library.IncompatiblePromptError, match="'sst2'.*width 768 vs emb_dim 32"):
    library.check_compatible(bare, tiny, array=np.zeros((100, 768)), name='sst2')


# ---------------------------------------------------------------------------
# Neuron read-outs on a random tiny model (no training).
# ---------------------------------------------------------------------------
L = 4  # one prompt length everywhere: one compilation per model


def _tiny(variant):
  config = get_config(variant, 'tiny', vocab_size=64, dropout_rate=0.0)
  model = build_model(config)
  prompted = build_model(config, free_prompt(L))
  # The reference read-out: capture_activations of a prompted model, jitted.
  return model, model.init_params(jax.random.PRNGKey(0)), jax.jit(prompted.capture_activations)


@pytest.fixture(scope='module')
def gated():
  return _tiny('t5_1_1')


@pytest.mark.parametrize('variant', ['t5_1_0', 't5_1_1'])
def test_activation_pattern_reads_capture_activations(variant, gated):
  model, params, capture = gated if variant == 't5_1_1' else _tiny(variant)
  prompt = np.random.default_rng(0).uniform(-0.5, 0.5, (L, 32)).astype(np.float32)
  pattern = neurons.activation_pattern(model, params, prompt)
  assert pattern.layers == ('decoder/layers_0', 'decoder/layers_1')
  assert pattern.values.shape == (2, model.config.mlp_dim)
  # The same numbers straight from capture_activations of a prompted model.
  inter = capture(neurons.with_prompt(params, prompt), neurons.prompt_probe())
  for i in range(2):
    mlp = inter['decoder'][f'layers_{i}']['mlp']
    np.testing.assert_allclose(pattern.values[i], mlp['pre_activation'][0][0, 0],
                               rtol=1e-4, atol=1e-5)
    if not model.config.is_gated:  # ReLU: active exactly where the hidden unit is non-zero
      np.testing.assert_array_equal(pattern.active[i], np.asarray(mlp['hidden'][0][0, 0]) > 0)
  enc = neurons.activation_pattern(model, params, prompt, stack='encoder')
  np.testing.assert_allclose(enc.values[0], inter['encoder']['layers_0']['mlp'][
      'pre_activation'][0][0, L], rtol=1e-4, atol=1e-5)  # the start token after the prompt
  both = neurons.activation_pattern(model, params, prompt, stack='both')
  assert both.layers[:2] == enc.layers and both.values.shape == (4, model.config.mlp_dim)
  with pytest.raises(ValueError, match='does not fit'):
    neurons.activation_pattern(model, params, np.zeros((L, 16)))


BATCH = {'encoder_input_tokens': np.array([[5, 6, 1, 0], [7, 1, 0, 0]], np.int32),
         'decoder_input_tokens': np.array([[0, 3, 1], [0, 4, 0]], np.int32),
         'decoder_target_tokens': np.array([[3, 1, 0], [4, 0, 0]], np.int32)}


def test_examples_probe_averages_non_pad_positions(gated):
  model, params, capture = gated
  prompt = np.random.default_rng(1).normal(size=(L, 32)).astype(np.float32)
  pattern = neurons.activation_pattern(model, params, prompt, probe='examples', batch=BATCH,
                                       stack='both')
  inter = capture(neurons.with_prompt(params, prompt), BATCH)
  x = np.asarray(inter['encoder']['layers_1']['mlp']['pre_activation'][0])
  expected = np.concatenate([x[0, :L + 3], x[1, :L + 2]]).mean(0)  # prompt + non-pad tokens
  np.testing.assert_allclose(pattern.values[1], expected, rtol=1e-4, atol=1e-5)
  d = np.asarray(inter['decoder']['layers_0']['mlp']['pre_activation'][0])
  np.testing.assert_allclose(pattern.values[2], d[:, 0].mean(0), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='batch'):
    neurons.activation_pattern(model, params, prompt, probe='examples')


def test_neuron_overlap_cosine_layers_and_windows(gated):
  model, params, _ = gated
  rng = np.random.default_rng(2)
  p1, p2 = (rng.uniform(-0.5, 0.5, (L, 32)).astype(np.float32) for _ in range(2))
  a = neurons.activation_pattern(model, params, p1)
  b = neurons.activation_pattern(model, params, p2)
  o = neurons.neuron_overlap(a, b)
  x, y = a.active.ravel(), b.active.ravel()
  assert o.overall == pytest.approx((x & y).sum() / np.sqrt(x.sum() * y.sum()))
  assert list(o.per_layer) == ['decoder/layers_0', 'decoder/layers_1']
  assert list(o.windows) == ['decoder/layers_0-1']  # 2 layers: one short window
  assert neurons.neuron_overlap(a, a).overall == pytest.approx(1.0)
  m = neurons.overlap_matrix({'a': a, 'b': b})
  assert m[0, 1] == m[1, 0] == pytest.approx(o.overall) and np.allclose(np.diag(m), 1)
  # Windows of 3 consecutive layers, per stack, as Su et al. slice them.
  names = tuple(f'decoder/layers_{i}' for i in range(8))
  fake = neurons.ActivationPattern(names, rng.normal(size=(8, 10)))
  fake2 = neurons.ActivationPattern(names, rng.normal(size=(8, 10)))
  w = neurons.neuron_overlap(fake, fake2).windows
  assert list(w) == ['decoder/layers_0-2', 'decoder/layers_3-5', 'decoder/layers_6-7']
  assert w['decoder/layers_3-5'] == pytest.approx(
      neurons.binary_cosine(fake.active[3:6], fake2.active[3:6]))
  assert neurons.binary_cosine(np.zeros(4), np.ones(4)) == 0.0


def test_ffn_importance_is_mean_abs_hidden_over_non_pad(gated):
  model, params, capture = gated
  prompt = np.random.default_rng(3).normal(size=(L, 32)).astype(np.float32)
  prompted = build_model(model.config, free_prompt(L))
  full = neurons.with_prompt(params, prompt)
  second = {k: v[:1] for k, v in BATCH.items()}
  scores = neurons.ffn_importance(prompted, full, [BATCH, second])
  assert set(scores) == {f'{s}/layers_{i}' for s in ('encoder', 'decoder') for i in (0, 1)}
  h1, h2 = (jax.tree_util.tree_map(lambda v: np.abs(np.asarray(v)), capture(full, b))
            for b in (BATCH, second))
  dec1, dec2 = (h['decoder']['layers_1']['mlp']['hidden'][0] for h in (h1, h2))
  tokens = np.concatenate([dec1[0, :2], dec1[1, :1], dec2[0, :2]])  # targets > 0
  np.testing.assert_allclose(scores['decoder/layers_1'], tokens.mean(0), rtol=1e-4)
  enc1, enc2 = (h['encoder']['layers_0']['mlp']['hidden'][0] for h in (h1, h2))
  tokens = np.concatenate([enc1[0, :L + 3], enc1[1, :L + 2], enc2[0, :L + 3]])
  np.testing.assert_allclose(scores['encoder/layers_0'], tokens.mean(0), rtol=1e-4)
