"""Length buckets in training (data.bucket_batch, train.length_buckets): each
batch is cut to the smallest bucket its rows fit in, which drops only padding:
the same losses as one fixed shape, one compile per bucket shape, fewer
FLOPs, and a resumed run still ends bit-exact."""
import json
import os

import numpy as np
import pytest

from prompt_transfer.training import data

LENGTHS = {'inputs': 64, 'targets': 8}


def test_resolve_buckets():
  assert data.resolve_buckets(None, LENGTHS) is None
  assert data.resolve_buckets('pow2', LENGTHS) == {'inputs': [8, 16, 32, 64],
                                                   'targets': [2, 4, 8]}
  assert data.resolve_buckets('pow2/2', LENGTHS) == {
      'inputs': [8, 12, 16, 24, 32, 48, 64], 'targets': [2, 3, 4, 6, 8]}
  assert data.resolve_buckets({'inputs': 'pow2/4'}, LENGTHS)['inputs'] == [
      8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]
  assert data.resolve_buckets({'inputs': [48, 16, 100]}, LENGTHS) == {
      'inputs': [16, 48, 64], 'targets': [8]}
  for bad in ('pow3', 'pow2/0', 'pow2/x'):
    with pytest.raises(data.DataError, match=f"'{bad}' is not a bucket spec"):
      data.resolve_buckets(bad, LENGTHS)
  with pytest.raises(data.DataError, match='length < 1'):
    data.resolve_buckets({'inputs': [0, 8]}, LENGTHS)


def test_bucket_batch_drops_only_padding():
  rs = np.random.RandomState(0)
  enc = np.zeros((4, 64), np.int32)
  for i, n in enumerate((5, 17, 30, 9)):
    enc[i, :n] = rs.randint(2, 200, n)
  tgt = np.zeros((4, 8), np.int32)
  tgt[:, :3] = 7
  dec = np.concatenate([np.zeros((4, 1), np.int32), tgt[:, :-1]], 1)
  batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
           'decoder_target_tokens': tgt, 'task_ids': np.arange(4)}
  out = data.bucket_batch(batch, {'inputs': [8, 16, 32, 64], 'targets': [4, 8]})
  assert out['encoder_input_tokens'].shape == (4, 32)   # the longest row has 30 tokens
  assert out['decoder_target_tokens'].shape == out['decoder_input_tokens'].shape == (4, 4)
  np.testing.assert_array_equal(out['encoder_input_tokens'], enc[:, :32])
  assert not enc[:, 32:].any() and not tgt[:, 4:].any()  # what was cut is padding
  np.testing.assert_array_equal(out['task_ids'], batch['task_ids'])


def test_group_by_length_batches_one_bucket_each():
  """Every batch holds rows of one inputs bucket and one targets bucket,
  every example is used at most once, and the order is reproducible."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(1)
  n = 200
  lengths = rs.randint(1, 65, n)
  tlengths = rs.randint(1, 9, n)
  enc = np.zeros((n, 64), np.int32)
  tgt = np.zeros((n, 8), np.int32)
  for i in range(n):
    enc[i, :lengths[i]] = i + 2   # the row's id, to follow it through the grouping
    tgt[i, :tlengths[i]] = 3
  buckets = {'inputs': [8, 16, 32, 64], 'targets': [4, 8]}
  ds = tf.data.Dataset.from_tensor_slices({'encoder_input_tokens': enc,
                                           'decoder_target_tokens': tgt})
  group = data.group_by_length(buckets)
  batches = list(group(ds, 4).as_numpy_iterator())
  again = list(group(ds, 4).as_numpy_iterator())
  assert all(np.array_equal(a['encoder_input_tokens'], b['encoder_input_tokens'])
             for a, b in zip(batches, again)) and len(batches) == len(again)
  bucket_of = lambda x, sizes: next(k for k, s in enumerate(sizes) if s >= x)  # noqa: E731
  ids = []
  for b in batches:
    rows = b['encoder_input_tokens'][:, 0] - 2
    ids.extend(rows)
    assert len({bucket_of(lengths[r], buckets['inputs']) for r in rows}) == 1
    assert len({bucket_of(tlengths[r], buckets['targets']) for r in rows}) == 1
  assert len(ids) == len(set(ids)) > n - 8 * 4   # at most 3 rows left over per (inputs, targets) bucket
  assert ids != sorted(ids)   # grouping reorders


def _run(model_dir, steps, buckets, use_dropout=False, grouping=False):
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from prompt_transfer.model.config import get_config  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts import initializers  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.free import free_prompt  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import trainer  # pylint: disable=g-import-not-at-top
  trainer.train(
      model_dir=str(model_dir), mixture_or_task_name='synthetic_copy_plain',
      task_feature_lengths=LENGTHS, train_steps=steps, batch_size=8,
      config=get_config('t5_1_1', 'tiny', vocab_size=384),
      prompt_module=free_prompt(4, initializers.from_sampled_vocab()), checkpoint_period=3,
      log_period=1, seed=5, tensorboard=False, length_buckets=buckets, use_dropout=use_dropout,
      length_grouping=grouping)
  return [json.loads(l) for l in open(os.path.join(model_dir, 'metrics.jsonl'))]


def _prompt(model_dir, step):
  from prompt_transfer.prompts import files  # pylint: disable=g-import-not-at-top
  return np.load(os.path.join(files.numpy_checkpoint_dir(str(model_dir), step), files.PROMPT_FILE))


def test_bucketed_training_matches_one_shape_and_resumes_bit_exact(tmp_path):
  """Without dropout the losses match (dropout masks are drawn per element
  of the activations, so another shape draws other, equally likely, masks)."""
  buckets = {'inputs': [8, 16, 24, 32, 48]}   # copy inputs are 9-18 bytes
  fixed = _run(tmp_path / 'fixed', 8, None)
  bucketed = _run(tmp_path / 'bucketed', 8, buckets)
  np.testing.assert_allclose([r['loss'] for r in bucketed], [r['loss'] for r in fixed], rtol=2e-5)
  assert bucketed[-1]['recompilations'] == 0   # one compile per bucket shape, no more
  assert bucketed[-1]['train_flops_total'] < 0.7 * fixed[-1]['train_flops_total']
  np.testing.assert_allclose(_prompt(tmp_path / 'bucketed', 8), _prompt(tmp_path / 'fixed', 8),
                             rtol=0, atol=1e-4)
  # Stopped at 6 and resumed: bit-exact with the uninterrupted bucketed run.
  # With dropout, stopped at 6 and resumed: bit-exact with an uninterrupted bucketed run.
  _run(tmp_path / 'straight', 8, buckets, use_dropout=True)
  _run(tmp_path / 'resumed', 6, buckets, use_dropout=True)
  resumed = _run(tmp_path / 'resumed', 8, buckets, use_dropout=True)
  np.testing.assert_array_equal(_prompt(tmp_path / 'resumed', 8), _prompt(tmp_path / 'straight', 8))
  assert [r['step'] for r in resumed] == list(range(1, 9))


def test_grouped_training_pays_for_less_padding_and_resumes_bit_exact(tmp_path):
  """LENGTH_GROUPING: copy inputs (10-19 tokens with EOS) fall in two buckets;
  grouped batches use the shorter one about half of the time, where random
  batches of 8 almost never do. Resume stays bit-exact (dropout on)."""
  from prompt_transfer.training import trainer  # pylint: disable=g-import-not-at-top
  buckets = {'inputs': [16, 24]}
  plain = _run(tmp_path / 'plain', 8, buckets, use_dropout=True)
  grouped = _run(tmp_path / 'grouped', 8, buckets, use_dropout=True, grouping=True)
  assert grouped[-1]['train_flops_total'] < 0.9 * plain[-1]['train_flops_total']
  assert grouped[-1]['recompilations'] == 0
  _run(tmp_path / 'resumed', 5, buckets, use_dropout=True, grouping=True)
  _run(tmp_path / 'resumed', 8, buckets, use_dropout=True, grouping=True)
  np.testing.assert_array_equal(_prompt(tmp_path / 'resumed', 8), _prompt(tmp_path / 'grouped', 8))
  with pytest.raises(trainer.TrainingError, match='give LENGTH_BUCKETS too'):
    _run(tmp_path / 'bad', 1, None, grouping=True)


def test_two_processes_agree_on_each_batch_bucket(tmp_path):
  """With seqio's per-host shards each process sees other rows (and groups
  its own shard by length): they must still pick one bucket per global batch
  (else the step would not run)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  d = str(tmp_path / 'two')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'T5X': f'{sys.executable} -m prompt_transfer.cli',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  proc = subprocess.run(
      ['bash', os.path.join(root, 'launch', 'local.sh'), '2', '--', 'train',
       '--gin_file=runs/quickstart.gin', '--gin.TRAIN_STEPS=6', '--gin.BATCH_SIZE=8',
       '--gin.PROMPT_LENGTH=4', '--gin.train.log_period=1', '--gin.train.eval_period=None',
       "--gin.train.host_data_sharding='seqio'", "--gin.LENGTH_BUCKETS='pow2'",
       '--gin.LENGTH_GROUPING=True',
       '--gin.train.tensorboard=False', f'--gin.MODEL_DIR={d}'],
      cwd=root, env=env, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [json.loads(l) for l in open(os.path.join(d, 'metrics.jsonl'))]
  assert [r['step'] for r in records] == list(range(1, 7)) and records[-1]['recompilations'] == 0


@pytest.mark.parametrize('task', ['synthetic_copy_plain', 'synthetic_greater_versus_rank'])
def test_eval_and_infer_in_buckets_equal_one_shape(task, tmp_path, monkeypatch):
  """Decoding (inputs cut, decoding length kept) and rank scoring (inputs and
  targets cut) in length buckets give the same metrics and predictions."""
  from in_process import t5x_here  # pylint: disable=g-import-not-at-top
  from prompt_transfer import load_pretrained  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts import files  # pylint: disable=g-import-not-at-top
  _, params = load_pretrained('pkg://assets/t5_1_1_tiny_synthetic')
  emb = params['token_embedder']['embedding']
  prompt = os.path.join(files.save_prompt_folder(str(tmp_path / 'p'), emb[[5, 40, 77, 120]],
                                                 files.PromptInfo(prompt_length=4)),
                        files.PROMPT_FILE)
  common = ['--gin_file=models/t5_1_1_tiny_synthetic.gin', f'--gin.MIXTURE_OR_TASK_NAME={task}',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", f'--gin.PROMPT_FILE={prompt}']
  cut = []  # (inputs, targets) lengths of the batches that were cut
  real = data.bucket_batch

  def spy(batch, buckets, cut_targets=True):
    out = real(batch, buckets, cut_targets)
    cut.append((out['encoder_input_tokens'].shape[1], out['decoder_input_tokens'].shape[1]))
    return out
  monkeypatch.setattr(data, 'bucket_batch', spy)
  got = {}
  for buckets in ('None', "'pow2'"):
    out = str(tmp_path / f'eval_{len(buckets)}.json')
    t5x_here('eval', '--gin_file=runs/eval.gin', *common, '--gin.evaluate.num_examples=24',
             '--gin.evaluate.batch_size=8', f'--gin.LENGTH_BUCKETS={buckets}',
             f'--gin.evaluate.output_file={out}')
    pred = str(tmp_path / f'pred_{len(buckets)}.jsonl')
    t5x_here('infer', '--gin_file=runs/infer.gin', *common, '--gin.infer.num_examples=24',
             '--gin.infer.batch_size=8', f'--gin.LENGTH_BUCKETS={buckets}',
             f'--gin.infer.output_file={pred}')
    got[buckets] = (json.load(open(out))['metrics'], [json.loads(l) for l in open(pred)])
  (m0, p0), (m1, p1) = got['None'], got["'pow2'"]
  assert cut and all(i < 64 for i, _ in cut)  # the inputs really ran shorter
  assert any(t < 16 for _, t in cut) == task.endswith('_rank')  # decoding keeps its length
  assert m1 == pytest.approx(m0, abs=1e-6)
  assert [l['prediction'] for l in p1] == [l['prediction'] for l in p0]
  for a, b in zip(p1, p0):
    for word, score in b.get('scores', {}).items():
      assert a['scores'][word] == pytest.approx(score, rel=1e-5, abs=1e-4)


def test_logged_mfu_counts_each_bucket_step(tmp_path, monkeypatch):
  """With buckets the steps of one logging window differ in cost: the MFU is
  the window's summed FLOPs over its time, not the last step's times the rate."""
  from prompt_transfer.training import logger as logger_lib  # pylint: disable=g-import-not-at-top
  calls = []   # the logger starts at t=100 s; the record comes 4 s later

  def clock():
    calls.append(1)
    return 100.0 if len(calls) == 1 else 104.0
  monkeypatch.setattr(logger_lib.time, 'time', clock)
  with logger_lib.StepLogger(str(tmp_path), 0, 10, 8, lambda s: 0.3, tensorboard=False) as log:
    log.peak = 1e9   # as on an accelerator with a 1 GFLOP/s peak
    log.new_stage(1e9)
    log.step_done()
    log.new_shape(3e9)   # a longer bucket
    log.step_done()
    record = log.record(2, {'loss': np.float32(1.0)}, None)
  assert record['mfu'] == pytest.approx((1e9 + 3e9) / 4.0 / 1e9)
  assert record['train_flops_total'] == pytest.approx(4e9)
  assert record['train_step_flops'] == 3e9
