"""Tests of prompt_transfer.model.checkpoint_import (Hugging Face and T5X readers/writer)."""
import json
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from prompt_transfer.model import checkpoint_import as ci
from prompt_transfer.model.config import T5Config, get_config

# ../shared/data relative to the repository root (CI always has it; a fresh
# clone does not).
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
REAL_TEST_DATA = SHARED_DATA / 'google_prompt_tuning' / 'test_data'
REAL_T5X = REAL_TEST_DATA / 'test_t5_1_1_tiny'
requires_real_t5x = pytest.mark.skipif(
    not (REAL_T5X / 'checkpoint_3' / 'checkpoint').is_file(),
    reason=f'real T5X checkpoint not found at {REAL_T5X} (../shared/data is absent); '
           'skipping the tests against the T5X-written checkpoint')


# ----------------------------------------------------------------------------
# Tiny Hugging Face directories written by the tests.


def _hf_config(gated: bool, tied: bool, num_decoder_layers=None) -> dict:
  config = {
      'model_type': 't5', 'vocab_size': 11, 'd_model': 8, 'd_kv': 3, 'num_heads': 2,
      'd_ff': 16, 'num_layers': 2, 'relative_attention_num_buckets': 6,
      'relative_attention_max_distance': 20, 'layer_norm_epsilon': 1e-5,
      'dropout_rate': 0.0, 'feed_forward_proj': 'gated-gelu' if gated else 'relu',
      'tie_word_embeddings': tied,
  }
  if num_decoder_layers is not None:
    config['num_decoder_layers'] = num_decoder_layers
  return config


def _hf_tensors(config: dict, seed: int = 0) -> dict:
  """HF T5 state dict (torch layouts) with random values."""
  rng = np.random.default_rng(seed)
  d, hd, f = config['d_model'], config['num_heads'] * config['d_kv'], config['d_ff']
  t = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  mlp = ['wi_0', 'wi_1'] if config['feed_forward_proj'].startswith('gated') else ['wi']
  out = {'shared.weight': t(config['vocab_size'], d)}
  stacks = (('encoder', config['num_layers'], ['SelfAttention']),
            ('decoder', config.get('num_decoder_layers') or config['num_layers'],
             ['SelfAttention', 'EncDecAttention']))
  for stack, layers, attentions in stacks:
    for i in range(layers):
      for n, module in enumerate(attentions):
        for w in 'qkv':
          out[f'{stack}.block.{i}.layer.{n}.{module}.{w}.weight'] = t(hd, d)
        out[f'{stack}.block.{i}.layer.{n}.{module}.o.weight'] = t(d, hd)
        out[f'{stack}.block.{i}.layer.{n}.layer_norm.weight'] = t(d)
      n = len(attentions)
      for w in mlp:
        out[f'{stack}.block.{i}.layer.{n}.DenseReluDense.{w}.weight'] = t(f, d)
      out[f'{stack}.block.{i}.layer.{n}.DenseReluDense.wo.weight'] = t(d, f)
      out[f'{stack}.block.{i}.layer.{n}.layer_norm.weight'] = t(d)
    out[f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'] = t(
        config['relative_attention_num_buckets'], config['num_heads'])
    out[f'{stack}.final_layer_norm.weight'] = t(d)
  if not config['tie_word_embeddings']:
    out['lm_head.weight'] = t(config['vocab_size'], d)
  return out


def _write_hf(directory: pathlib.Path, config: dict, tensors: dict, shards: int = 1,
              extra_aliases: bool = False) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.json').write_text(json.dumps(config))
  tensors = dict(tensors)
  if extra_aliases:  # duplicates some exports keep; must be ignored
    tensors['encoder.embed_tokens.weight'] = tensors['shared.weight']
    tensors['decoder.embed_tokens.weight'] = tensors['shared.weight']
  if shards == 1:
    save_file(tensors, str(directory / 'model.safetensors'))
    return directory
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file_name = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
    part = {n: tensors[n] for n in names[s::shards]}
    save_file(part, str(directory / file_name))
    weight_map.update({n: file_name for n in part})
  (directory / 'model.safetensors.index.json').write_text(
      json.dumps({'metadata': {'total_size': 0}, 'weight_map': weight_map}))
  return directory


def _random_params(config: T5Config, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  flat = ci.flatten_params(ci.param_shapes(config))
  return ci.unflatten_params(
      {n: rng.standard_normal(s).astype(np.float32) for n, s in flat.items()})


def _assert_trees_equal(a, b):
  fa, fb = ci.flatten_params(a), ci.flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


# ----------------------------------------------------------------------------
# Hugging Face reader.


def test_hf_tied_relu_mapping(tmp_path):
  config = _hf_config(gated=False, tied=True, num_decoder_layers=1)
  tensors = _hf_tensors(config)
  path = _write_hf(tmp_path / 't5-tiny', config, tensors, extra_aliases=True)

  cfg, params = ci.read_hf_checkpoint(path)

  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (
      11, 8, 2, 3, 16)
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (2, 1)
  assert cfg.mlp_activations == ('relu',) and cfg.logits_via_embedding
  assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (6, 20)
  assert cfg.layer_norm_epsilon == 1e-5 and cfg.dropout_rate == 0.0
  flat = ci.flatten_params(params)
  assert 'decoder/logits_dense/kernel' not in flat
  assert all(v.dtype == np.float32 for v in flat.values())
  # Exact name and layout checks, spelled out independently of the module.
  T = lambda name: tensors[name].T
  expected = {
      'token_embedder/embedding': tensors['shared.weight'],
      'encoder/relpos_bias/rel_embedding':
          T('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'),
      'decoder/relpos_bias/rel_embedding':
          T('decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'),
      'encoder/layers_1/attention/query/kernel': T('encoder.block.1.layer.0.SelfAttention.q.weight'),
      'encoder/layers_1/attention/key/kernel': T('encoder.block.1.layer.0.SelfAttention.k.weight'),
      'encoder/layers_1/attention/value/kernel': T('encoder.block.1.layer.0.SelfAttention.v.weight'),
      'encoder/layers_1/attention/out/kernel': T('encoder.block.1.layer.0.SelfAttention.o.weight'),
      'encoder/layers_0/pre_attention_layer_norm/scale':
          tensors['encoder.block.0.layer.0.layer_norm.weight'],
      'encoder/layers_0/pre_mlp_layer_norm/scale':
          tensors['encoder.block.0.layer.1.layer_norm.weight'],
      'encoder/layers_0/mlp/wi/kernel': T('encoder.block.0.layer.1.DenseReluDense.wi.weight'),
      'encoder/layers_0/mlp/wo/kernel': T('encoder.block.0.layer.1.DenseReluDense.wo.weight'),
      'encoder/encoder_norm/scale': tensors['encoder.final_layer_norm.weight'],
      'decoder/layers_0/self_attention/query/kernel':
          T('decoder.block.0.layer.0.SelfAttention.q.weight'),
      'decoder/layers_0/pre_self_attention_layer_norm/scale':
          tensors['decoder.block.0.layer.0.layer_norm.weight'],
      'decoder/layers_0/encoder_decoder_attention/key/kernel':
          T('decoder.block.0.layer.1.EncDecAttention.k.weight'),
      'decoder/layers_0/encoder_decoder_attention/out/kernel':
          T('decoder.block.0.layer.1.EncDecAttention.o.weight'),
      'decoder/layers_0/pre_cross_attention_layer_norm/scale':
          tensors['decoder.block.0.layer.1.layer_norm.weight'],
      'decoder/layers_0/mlp/wi/kernel': T('decoder.block.0.layer.2.DenseReluDense.wi.weight'),
      'decoder/layers_0/pre_mlp_layer_norm/scale':
          tensors['decoder.block.0.layer.2.layer_norm.weight'],
      'decoder/decoder_norm/scale': tensors['decoder.final_layer_norm.weight'],
  }
  for name, value in expected.items():
    np.testing.assert_array_equal(flat[name], value, err_msg=name)
  assert flat['encoder/layers_1/attention/query/kernel'].shape == (8, 6)
  assert flat['encoder/layers_1/attention/out/kernel'].shape == (6, 8)
  assert flat['encoder/relpos_bias/rel_embedding'].shape == (2, 6)
  # Exactly the CONTRACT tree, one parameter per HF tensor (duplicates ignored).
  ci.check_params(params, ci.param_shapes(cfg), str(path))
  assert len(flat) == len(tensors)


def test_hf_untied_gated_sharded_bf16(tmp_path):
  config = _hf_config(gated=True, tied=False)  # no num_decoder_layers: defaults to num_layers
  del config['relative_attention_max_distance']  # older configs lack it
  tensors = _hf_tensors(config, seed=1)
  stored = {n: v.astype(ml_dtypes.bfloat16) if n.startswith('decoder.') else v
            for n, v in tensors.items()}
  path = _write_hf(tmp_path / 'sharded', config, stored, shards=2)
  assert not (path / 'model.safetensors').exists()

  cfg, params = ci.read_hf_checkpoint(path)

  assert cfg.mlp_activations == ('gelu', 'linear') and not cfg.logits_via_embedding
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (2, 2)
  assert cfg.relative_attention_max_distance == 128
  flat = ci.flatten_params(params)
  assert all(v.dtype == np.float32 for v in flat.values())
  np.testing.assert_array_equal(flat['decoder/logits_dense/kernel'], tensors['lm_head.weight'].T)
  assert flat['decoder/logits_dense/kernel'].shape == (8, 11)
  for stack, n in (('encoder', 1), ('decoder', 2)):
    for w in ('wi_0', 'wi_1', 'wo'):
      hf = stored[f'{stack}.block.1.layer.{n}.DenseReluDense.{w}.weight']
      np.testing.assert_array_equal(flat[f'{stack}/layers_1/mlp/{w}/kernel'],
                                    hf.astype(np.float32).T)
  assert 'encoder/layers_0/mlp/wi/kernel' not in flat
  ci.check_params(params, ci.param_shapes(cfg), str(path))

  # dtype=None keeps the stored bfloat16.
  _, raw = ci.read_hf_checkpoint(path, dtype=None)
  assert ci.flatten_params(raw)['decoder/decoder_norm/scale'].dtype == ml_dtypes.bfloat16
  assert ci.flatten_params(raw)['encoder/encoder_norm/scale'].dtype == np.float32


def test_hf_unknown_tensor_names_file_and_tensor(tmp_path):
  config = _hf_config(gated=True, tied=False)
  tensors = _hf_tensors(config)
  tensors['encoder.block.0.layer.0.SelfAttention.extra.weight'] = np.zeros((2, 2), np.float32)
  path = _write_hf(tmp_path / 'm', config, tensors, shards=2)
  with pytest.raises(ci.CheckpointMismatchError) as info:
    ci.read_hf_checkpoint(path)
  message = str(info.value)
  assert 'encoder.block.0.layer.0.SelfAttention.extra.weight' in message
  assert 'model-0000' in message and '.safetensors: encoder.block.0' in message
  assert 'unexpected (1)' in message and str(path) in message
  assert info.value.unexpected and not info.value.missing


def test_hf_missing_tensor(tmp_path):
  config = _hf_config(gated=False, tied=True)
  tensors = _hf_tensors(config)
  del tensors['decoder.block.1.layer.1.EncDecAttention.v.weight']
  path = _write_hf(tmp_path / 'm', config, tensors)
  with pytest.raises(ci.CheckpointMismatchError) as info:
    ci.read_hf_checkpoint(path)
  message = str(info.value)
  assert 'missing (1)' in message
  assert 'decoder.block.1.layer.1.EncDecAttention.v.weight' in message
  assert 'decoder/layers_1/encoder_decoder_attention/value/kernel' in message
  assert 'model.safetensors' in message and str(path) in message


def test_hf_wrong_shape(tmp_path):
  config = _hf_config(gated=False, tied=True)
  tensors = _hf_tensors(config)
  tensors['encoder.block.0.layer.1.DenseReluDense.wo.weight'] = np.zeros((8, 15), np.float32)
  path = _write_hf(tmp_path / 'm', config, tensors)
  with pytest.raises(ci.CheckpointMismatchError) as info:
    ci.read_hf_checkpoint(path)
  message = str(info.value)
  assert ('encoder/layers_0/mlp/wo/kernel (model.safetensors: '
          'encoder.block.0.layer.1.DenseReluDense.wo.weight)  expected (16, 8), got (15, 8)'
          in message)
  assert info.value.mismatched[0][1:] == ((16, 8), (15, 8))


def test_hf_activations_and_unsupported_inputs(tmp_path):
  config = _hf_config(gated=True, tied=False)
  config['feed_forward_proj'] = 'gated-silu'
  cfg, _ = ci.read_hf_checkpoint(_write_hf(tmp_path / 'silu', config, _hf_tensors(config)))
  assert cfg.mlp_activations == ('silu', 'linear')

  config = _hf_config(gated=False, tied=True)
  config['feed_forward_proj'] = 'gelu'  # exact erf GELU: not what the network computes
  path = _write_hf(tmp_path / 'gelu', config, _hf_tensors(_hf_config(False, True)))
  with pytest.raises(NotImplementedError, match="feed_forward_proj 'gelu'"):
    ci.read_hf_checkpoint(path)

  config = _hf_config(gated=True, tied=False)
  config['model_type'] = 'umt5'  # one relative position bias per layer
  (path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(NotImplementedError, match="model_type 'umt5'"):
    ci.read_hf_checkpoint(path)

  torch_only = tmp_path / 'torch_only'
  torch_only.mkdir()
  (torch_only / 'config.json').write_text(json.dumps(_hf_config(False, True)))
  (torch_only / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='pytorch_model.bin'):
    ci.read_hf_checkpoint(torch_only)


def test_config_from_params_hf(tmp_path):
  for gated, tied in ((False, True), (True, False)):
    config = _hf_config(gated=gated, tied=tied, num_decoder_layers=3)
    path = _write_hf(tmp_path / f'{gated}{tied}', config, _hf_tensors(config))
    cfg, params = ci.read_hf_checkpoint(path)
    inferred = ci.config_from_params(params, base=cfg.replace(name='base'))
    assert inferred == cfg.replace(name='base')
    auto_cfg, auto_params = ci.read_checkpoint(path)  # detects the HF layout
    assert auto_cfg == cfg
    _assert_trees_equal(auto_params, params)
    plain = ci.config_from_params(params)
    assert (plain.num_encoder_layers, plain.num_decoder_layers) == (2, 3)
    assert plain.is_gated == gated and plain.logits_via_embedding == tied
    assert (plain.num_heads, plain.head_dim, plain.relative_attention_num_buckets) == (2, 3, 6)


# ----------------------------------------------------------------------------
# The real T5X-written checkpoint.


@requires_real_t5x
def test_read_real_t5x_checkpoint():
  params = ci.read_t5x_checkpoint(REAL_T5X / 'checkpoint_3')
  flat = ci.flatten_params(params)
  # The tiny config of google-research/prompt-tuning's test gin: emb 4, 2 heads
  # of 2, mlp 8, 2+2 layers, 4 relative position buckets, T5 1.1 (gated, untied).
  assert flat['token_embedder/embedding'].shape == (32128, 4)
  assert flat['decoder/logits_dense/kernel'].shape == (4, 32128)
  assert flat['encoder/relpos_bias/rel_embedding'].shape == (2, 4)
  assert flat['decoder/layers_1/encoder_decoder_attention/query/kernel'].shape == (4, 4)
  assert flat['encoder/layers_0/mlp/wi_0/kernel'].shape == (4, 8)
  assert flat['decoder/layers_1/mlp/wo/kernel'].shape == (8, 4)
  assert flat['decoder/layers_0/pre_cross_attention_layer_norm/scale'].shape == (4,)
  assert len(flat) == 52 and all(v.dtype == np.float32 for v in flat.values())

  cfg = ci.config_from_params(params)
  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (
      32128, 4, 2, 2, 8)
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (2, 2)
  assert cfg.relative_attention_num_buckets == 4
  assert cfg.is_gated and not cfg.logits_via_embedding
  # Exactly the CONTRACT tree of that config.
  ci.check_params(params, ci.param_shapes(cfg), str(REAL_T5X))

  # The embedding (a zarr leaf) equals the gold copy prompt-tuning's tests use.
  gold = np.load(REAL_TEST_DATA / 'tiny_embeddings_32128x4.npy')
  np.testing.assert_array_equal(flat['token_embedder/embedding'], gold)
  # An inline leaf equals the array stored in the msgpack file.
  from flax import serialization
  raw = serialization.msgpack_restore((REAL_T5X / 'checkpoint_3' / 'checkpoint').read_bytes())
  assert raw['version'] == 3 and int(raw['optimizer']['state']['step']) == 3
  np.testing.assert_array_equal(
      flat['encoder/relpos_bias/rel_embedding'],
      raw['optimizer']['target']['encoder']['relpos_bias']['rel_embedding'])
  assert not np.allclose(flat['encoder/layers_0/attention/query/kernel'], 0)

  # The same checkpoint through the model dir (latest step) and the msgpack file.
  for other in (REAL_T5X, REAL_T5X / 'checkpoint_3' / 'checkpoint'):
    _assert_trees_equal(ci.read_t5x_checkpoint(other), params)
  read_cfg, read_params = ci.read_checkpoint(REAL_T5X, base=T5Config(
      relative_attention_max_distance=8))
  assert read_cfg.relative_attention_max_distance == 8 and read_cfg.num_heads == 2
  _assert_trees_equal(read_params, params)


@requires_real_t5x
def test_writer_matches_real_t5x_layout(tmp_path):
  from flax import serialization
  params = ci.read_t5x_checkpoint(REAL_T5X)
  out = ci.write_t5x_checkpoint(tmp_path / 'checkpoint_3', params, step=3)
  _assert_trees_equal(ci.read_t5x_checkpoint(tmp_path), params)

  real_dir = REAL_T5X / 'checkpoint_3'
  real = serialization.msgpack_restore((real_dir / 'checkpoint').read_bytes())
  mine = serialization.msgpack_restore(pathlib.Path(out, 'checkpoint').read_bytes())
  assert set(mine) == set(real) == {'version', 'optimizer'}
  assert mine['version'] == real['version'] == 3
  assert int(mine['optimizer']['state']['step']) == 3
  real_flat = ci._flatten_with_specs(real['optimizer']['target'])
  mine_flat = ci._flatten_with_specs(mine['optimizer']['target'])
  assert sorted(real_flat) == sorted(mine_flat)

  def keys(tree, prefix=''):
    if not isinstance(tree, dict):
      return {prefix}
    return set().union(*(keys(v, f'{prefix}/{k}') for k, v in tree.items()))

  for name, real_leaf in real_flat.items():
    mine_leaf = mine_flat[name]
    assert ci._is_ts_spec(real_leaf) == ci._is_ts_spec(mine_leaf), name
    if ci._is_ts_spec(real_leaf):
      # Same spec layout: driver, kvstore {driver, path}, metadata {chunks,
      # compressor {id, level}, dtype, shape}; T5X's legacy 'gfile' driver
      # name is written as tensorstore's 'file'.
      assert keys(real_leaf) == keys(mine_leaf), name
      assert mine_leaf['kvstore'] == {'driver': 'file', 'path': real_leaf['kvstore']['path']}
      assert real_leaf['driver'] == mine_leaf['driver'] == 'zarr'
      for field in ('compressor', 'dtype', 'shape'):
        assert real_leaf['metadata'][field] == mine_leaf['metadata'][field], (name, field)
      zarray_real = json.loads((real_dir / real_leaf['kvstore']['path'] / '.zarray').read_text())
      zarray_mine = json.loads(pathlib.Path(out, mine_leaf['kvstore']['path'], '.zarray')
                               .read_text())
      assert set(zarray_real) <= set(zarray_mine), name
      assert {k: zarray_mine[k] for k in ('compressor', 'dtype', 'shape', 'order')} == {
          k: zarray_real[k] for k in ('compressor', 'dtype', 'shape', 'order')}
    else:
      assert mine_leaf.dtype == real_leaf.dtype and mine_leaf.shape == real_leaf.shape
      np.testing.assert_array_equal(mine_leaf, real_leaf)
  zarr_dirs = lambda d: sorted(p.name for p in pathlib.Path(d).iterdir() if p.is_dir())
  assert zarr_dirs(out) == zarr_dirs(real_dir)


@requires_real_t5x
def test_real_checkpoint_against_another_model():
  params = ci.read_t5x_checkpoint(REAL_T5X)
  other = ci.param_shapes(get_config('t5_1_0', 'tiny'))  # relu, tied, emb 32, 4 heads
  with pytest.raises(ci.CheckpointMismatchError) as info:
    ci.check_params(params, other, str(REAL_T5X))
  err = info.value
  message = str(err)
  assert str(REAL_T5X) in message
  assert ('encoder/layers_0/mlp/wi/kernel', (32, 64)) in err.missing
  assert ('decoder/logits_dense/kernel', (4, 32128)) in err.unexpected
  assert ('token_embedder/embedding', (32128, 32), (32128, 4)) in err.mismatched
  assert 'token_embedder/embedding  expected (32128, 32), got (32128, 4)' in message
  assert 'encoder/layers_0/mlp/wi/kernel  expected (32, 64)' in message
  assert 'decoder/logits_dense/kernel  (4, 32128)' in message
  assert 'another model' in message and '... and' in message  # long lists are cut


# ----------------------------------------------------------------------------
# Writer / reader without the shared data.


def test_write_read_round_trip(tmp_path):
  cfg = get_config('t5_1_1', 'tiny', vocab_size=40)
  params = _random_params(cfg)
  prompt = np.random.default_rng(1).standard_normal((5, cfg.emb_dim)).astype(np.float32)
  params['encoder']['prompt'] = {'prompt': {'prompt': prompt}}

  out = ci.write_t5x_checkpoint(tmp_path / 'model' / 'checkpoint_7', params, step=7)

  assert out == str(tmp_path / 'model' / 'checkpoint_7')
  assert os.listdir(tmp_path / 'model') == ['checkpoint_7']  # no .tmp-* left behind
  for path in (out, tmp_path / 'model', os.path.join(out, 'checkpoint')):
    _assert_trees_equal(ci.read_t5x_checkpoint(path), params)
  # Kernels / embedding in zarr, the rest inline.
  from flax import serialization
  raw = serialization.msgpack_restore(pathlib.Path(out, 'checkpoint').read_bytes())
  target = raw['optimizer']['target']
  assert ci._is_ts_spec(target['encoder']['layers_1']['mlp']['wi_0']['kernel'])
  assert ci._is_ts_spec(target['token_embedder']['embedding'])
  assert isinstance(target['encoder']['relpos_bias']['rel_embedding'], np.ndarray)
  assert isinstance(target['encoder']['prompt']['prompt']['prompt'], np.ndarray)
  assert os.path.isdir(os.path.join(out, 'target.decoder.logits_dense.kernel'))
  assert ci.config_from_params(ci.read_t5x_checkpoint(out)) == cfg.replace(
      name='t5', dropout_rate=T5Config().dropout_rate)

  with pytest.raises(FileExistsError):
    ci.write_t5x_checkpoint(out, params, step=7)


def test_write_bfloat16_and_latest_step(tmp_path):
  cfg = get_config('t5_1_0', 'tiny', vocab_size=24)
  old, new = _random_params(cfg, seed=2), _random_params(cfg, seed=3)
  ci.write_t5x_checkpoint(tmp_path / 'checkpoint_2', old, step=2)
  ci.write_t5x_checkpoint(tmp_path / 'checkpoint_10', new, step=10, dtype=ml_dtypes.bfloat16)
  (tmp_path / 'checkpoint_11.tmp-1700000000').mkdir()  # an unfinished save: ignored
  latest = ci.read_t5x_checkpoint(tmp_path)  # 10, not 2 (numeric, not lexicographic)
  expected = {n: v.astype(ml_dtypes.bfloat16).astype(np.float32)
              for n, v in ci.flatten_params(new).items()}
  _assert_trees_equal(latest, ci.unflatten_params(expected))
  kept = ci.read_t5x_checkpoint(tmp_path / 'checkpoint_10', dtype=None)
  assert ci.flatten_params(kept)['token_embedder/embedding'].dtype == ml_dtypes.bfloat16
  _assert_trees_equal(ci.read_t5x_checkpoint(tmp_path / 'checkpoint_2'), old)


def test_t5x_missing_zarr_and_foreign_names(tmp_path):
  import shutil
  cfg = get_config('t5_1_1', 'tiny', vocab_size=24)
  params = _random_params(cfg)
  out = ci.write_t5x_checkpoint(tmp_path / 'checkpoint_1', params, step=1)
  shutil.rmtree(os.path.join(out, 'target.encoder.layers_0.attention.key.kernel'))
  with pytest.raises(FileNotFoundError, match='encoder/layers_0/attention/key/kernel'):
    ci.read_t5x_checkpoint(out)

  scanned = {'token_embedder': params['token_embedder'],
             'encoder': {'layers': {'attention': {'query': {'kernel': np.zeros((2, 32, 32))}}}}}
  out = ci.write_t5x_checkpoint(tmp_path / 'scanned' / 'checkpoint_1', scanned, step=1)
  with pytest.raises(ci.CheckpointMismatchError, match='encoder/layers/attention/query/kernel'):
    ci.read_t5x_checkpoint(out)
  assert ci.read_t5x_checkpoint(out, strict=False)['encoder']['layers']

  with pytest.raises(FileNotFoundError, match='not a T5X checkpoint'):
    ci.read_t5x_checkpoint(tmp_path / 'scanned' / 'checkpoint_1' / 'target.token_embedder.embedding')


def test_read_orbax_t5x_checkpoint(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  cfg = get_config('t5_1_1', 'tiny', vocab_size=24)
  params = _random_params(cfg, seed=4)
  # T5X's orbax CheckpointManager: <model_dir>/checkpoint_N/state holds the
  # train-state dict {'target': params, 'state': {'step', 'param_states'}}.
  ocp.PyTreeCheckpointer().save(
      str(tmp_path / 'checkpoint_4' / 'state'),
      {'target': params, 'state': {'step': np.int32(4)}})  # OCDBT (orbax's default)
  ci.write_t5x_checkpoint(tmp_path / 'checkpoint_3', _random_params(cfg, seed=5), step=3)
  _assert_trees_equal(ci.read_t5x_checkpoint(tmp_path), params)
  _assert_trees_equal(ci.read_t5x_checkpoint(tmp_path / 'checkpoint_4'), params)


def test_check_params_messages():
  expected = {'a': {'kernel': (2, 3)}, 'b': {'scale': np.zeros(4)}, 'c': {'scale': (5,)}}
  ci.check_params({'a': {'kernel': np.ones((2, 3))}, 'b': {'scale': np.ones(4)},
                   'c': {'scale': np.ones(5)}}, expected, 'ok')
  with pytest.raises(ci.CheckpointMismatchError) as info:
    ci.check_params({'params': {'a': {'kernel': np.ones((3, 2))}, 'b': {'scale': np.ones(4)},
                                'd': {'x': np.ones(1)}}}, expected, '/ckpt/dir')
  err = info.value
  assert isinstance(err, ValueError) and err.source == '/ckpt/dir'
  assert err.missing == [('c/scale', (5,))]
  assert err.unexpected == [('d/x', (1,))]
  assert err.mismatched == [('a/kernel', (2, 3), (3, 2))]
  message = str(err)
  assert message.startswith('/ckpt/dir: parameters do not match')
  assert '1 missing, 1 unexpected, 1 with the wrong shape' in message
  assert 'c/scale  expected (5,)' in message
  assert 'a/kernel  expected (2, 3), got (3, 2)' in message


def test_param_shapes_match_network():
  jax = pytest.importorskip('jax')
  network = pytest.importorskip('prompt_transfer.model.network')
  for variant in ('t5_1_0', 't5_1_1'):
    cfg = get_config(variant, 'tiny', vocab_size=50)
    tokens = jax.numpy.ones((1, 3), jax.numpy.int32)
    shapes = jax.eval_shape(lambda: network.Transformer(cfg).init(
        jax.random.PRNGKey(0), tokens, tokens, tokens))
    ci.check_params(shapes, ci.param_shapes(cfg), f'network {variant}')
    assert ci.config_from_params(shapes['params'], base=cfg) == cfg
