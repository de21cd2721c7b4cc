"""Tests of prompt_transfer.model.export (T5X parameters -> Hugging Face T5 directory)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_transfer import build_model, get_config, load_pretrained
from prompt_transfer.model import checkpoint_import as ci
from prompt_transfer.model import export
from prompt_transfer.prompts.free import free_prompt

VARIANTS = ('t5_1_0', 't5_1_1')  # tied + ReLU, untied + gated GELU


def _config(variant: str):
  # heads * head_dim != emb_dim and unequal stacks, so transposes and the
  # decoder-layer count are exercised.
  return get_config(variant, 'tiny', vocab_size=40, head_dim=5, num_decoder_layers=3,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20,
                    dropout_rate=0.0)


def _model_and_params(variant: str, prompt_length: int = 0, seed: int = 0):
  model = build_model(_config(variant), free_prompt(prompt_length))
  params = model.init_params(jax.random.PRNGKey(seed))
  return model, jax.tree_util.tree_map(np.asarray, params)


def _assert_trees_equal(a, b) -> None:
  fa, fb = ci.flatten_params(a), ci.flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


def _batch(vocab: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, vocab, size=(2, 9))
  enc[1, 6:] = 0  # padding in the encoder
  tgt = rng.randint(2, vocab, size=(2, 6))
  tgt[:, -1] = 1
  dec = np.concatenate([np.zeros((2, 1), tgt.dtype), tgt[:, :-1]], axis=1)
  return enc.astype(np.int32), dec.astype(np.int32), tgt.astype(np.int32)


@pytest.mark.parametrize('variant', VARIANTS)
def test_round_trip(tmp_path, variant):
  model, params = _model_and_params(variant)
  out = export.export_hf_checkpoint(params, model.config, str(tmp_path / 'hf'))
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  config, read = ci.read_hf_checkpoint(out)
  _assert_trees_equal(read, params)
  assert config.replace(name=model.config.name) == model.config


@pytest.mark.parametrize('variant', VARIANTS)
def test_config_json_and_tensor_names(tmp_path, variant):
  from safetensors import safe_open
  model, params = _model_and_params(variant)
  out = export.export_hf_checkpoint(params, model.config, str(tmp_path / 'hf'))
  with open(os.path.join(out, 'config.json')) as f:
    cfg = json.load(f)
  gated = variant == 't5_1_1'
  expected = {
      'model_type': 't5', 'architectures': ['T5ForConditionalGeneration'],
      'd_model': 32, 'd_kv': 5, 'd_ff': 64, 'num_layers': 2, 'num_decoder_layers': 3,
      'num_heads': 4, 'relative_attention_num_buckets': 8,
      'relative_attention_max_distance': 20, 'layer_norm_epsilon': 1e-6,
      'feed_forward_proj': 'gated-gelu' if gated else 'relu',
      'tie_word_embeddings': not gated, 'vocab_size': 40, 'dropout_rate': 0.0,
      'decoder_start_token_id': 0, 'pad_token_id': 0, 'eos_token_id': 1}
  assert {k: cfg[k] for k in expected} == expected
  with safe_open(os.path.join(out, 'model.safetensors'), framework='np') as f:
    names = set(f.keys())
    assert f.metadata() == {'format': 'pt'}
    assert f.get_tensor('encoder.block.0.layer.0.SelfAttention.q.weight').shape == (20, 32)
  assert names == set(ci.hf_name_map(model.config))
  assert ('lm_head.weight' in names) == gated
  assert 'encoder.block.0.layer.1.DenseReluDense.wi_1.weight' in names if gated else (
      'encoder.block.0.layer.1.DenseReluDense.wi.weight' in names)


def test_prompt_saved_beside(tmp_path):
  model, params = _model_and_params('t5_1_1', prompt_length=3)
  prompt = params['encoder']['prompt']['prompt']['prompt']
  out = export.export_hf_checkpoint(params, model.config, str(tmp_path / 'hf'))
  np.testing.assert_array_equal(export.load_prompt(out), prompt)
  # The HF weights hold the frozen model only.
  _, read = ci.read_hf_checkpoint(out)
  assert 'prompt' not in read['encoder']
  explicit = np.ones((5, 32), np.float32)
  out2 = export.export_hf_checkpoint(params, model.config, str(tmp_path / 'hf2'),
                                     prompt=explicit)
  np.testing.assert_array_equal(np.load(os.path.join(out2, 'prompt.npy')), explicit)
  with pytest.raises(ValueError, match='prompt has shape'):
    export.export_hf_checkpoint(params, model.config, str(tmp_path / 'hf3'),
                                prompt=np.ones((5, 7)))
  assert not (tmp_path / 'hf3').exists()


def test_overwrite_and_atomicity(tmp_path):
  model, params = _model_and_params('t5_1_0')
  target = str(tmp_path / 'hf')
  export.export_hf_checkpoint(params, model.config, target)
  with pytest.raises(FileExistsError):
    export.export_hf_checkpoint(params, model.config, target)
  _, other = _model_and_params('t5_1_0', seed=1)
  export.export_hf_checkpoint(other, model.config, target, overwrite=True)
  _assert_trees_equal(ci.read_hf_checkpoint(target)[1], other)
  assert sorted(os.listdir(tmp_path)) == ['hf']  # no temporary or old dirs left
  umask = os.umask(0)
  os.umask(umask)
  mode = os.stat(os.path.join(target, 'model.safetensors')).st_mode & 0o777
  assert mode == 0o666 & ~umask  # readable like any file, not safetensors' 0600


def test_mismatched_params_refused(tmp_path):
  model, params = _model_and_params('t5_1_1')
  wrong = _config('t5_1_0')
  with pytest.raises(ci.CheckpointMismatchError, match='wi_0'):
    export.export_hf_checkpoint(params, wrong, str(tmp_path / 'hf'))
  assert not (tmp_path / 'hf').exists()
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('variant', VARIANTS)
def test_load_pretrained_reads_export(tmp_path, variant):
  model, params = _model_and_params(variant)
  out = export.export_hf_checkpoint(params, model.config, str(tmp_path / 'hf'))
  loaded_model, loaded = load_pretrained(out)
  enc, dec, tgt = _batch(model.config.vocab_size)
  want = model.module.apply({'params': params}, enc, dec, tgt)
  got = loaded_model.module.apply({'params': loaded}, enc, dec, tgt)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('variant', VARIANTS)
def test_transformers_logits_match(tmp_path, variant):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model, params = _model_and_params(variant, seed=3)
  out = export.export_hf_checkpoint(params, model.config, str(tmp_path / 'hf'))
  hf, info = transformers.T5ForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  hf.eval()
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  # The export's head must be what we compute: tied only for T5 1.0.
  assert (hf.lm_head.weight.data_ptr() == hf.shared.weight.data_ptr()) == (
      variant == 't5_1_0')
  enc, dec, tgt = _batch(model.config.vocab_size, seed=1)
  ours = np.asarray(model.module.apply({'params': params}, jnp.asarray(enc),
                                       jnp.asarray(dec), jnp.asarray(tgt)))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(enc, dtype=torch.long),
                attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
  # Absolute floor: float32 matmul order differs between XLA and torch.
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


PACKAGED = 'pkg://assets/t5_1_1_tiny_synthetic'


def test_packaged_tiny_checkpoint():
  """The quick-start's pretrained tiny model: small, loadable by path prefix."""
  from prompt_transfer.model import pretrained
  path = pretrained.resolve_checkpoint_path(PACKAGED)
  if not os.path.isdir(path):
    pytest.skip(f'{path} not built (tools/make_tiny_checkpoint.py)')
  assert sorted(os.listdir(path)) == ['README.md', 'config.json', 'model.safetensors']
  assert os.path.getsize(os.path.join(path, 'model.safetensors')) < 1024 * 1024
  model, params = load_pretrained(PACKAGED)
  assert model.config.vocab_size == 384 and model.config.is_gated
  assert not model.config.logits_via_embedding
  # The same directory through the relative-path fallback.
  assert pretrained.resolve_checkpoint_path('t5_1_1_tiny_synthetic') == path
  enc, dec, tgt = _batch(model.config.vocab_size)
  logits = np.asarray(model.module.apply({'params': params}, enc, dec, tgt))
  assert np.all(np.isfinite(logits))


def test_packaged_mini_checkpoint_is_the_gin_files_model_and_loads_in_transformers():
  """The second stand-in: under 10 MB, the dims models/t5_1_1_mini_synthetic.gin
  names, and Hugging Face computes the same logits from it."""
  from prompt_transfer.model import pretrained
  path = pretrained.resolve_checkpoint_path('pkg://assets/t5_1_1_mini_synthetic')
  if not os.path.isdir(path):
    pytest.skip(f'{path} not built (tools/make_tiny_checkpoint.py --gin_file=...mini...)')
  assert os.path.getsize(os.path.join(path, 'model.safetensors')) <= 10 * 1024 * 1024
  gin_text = open(os.path.join(os.path.dirname(pretrained.PACKAGE_DIR), 'gin', 'models',
                               't5_1_1_mini_synthetic.gin')).read()
  model, params = load_pretrained(path)
  for field in ('emb_dim', 'num_heads', 'head_dim', 'mlp_dim', 'num_encoder_layers',
                'num_decoder_layers', 'vocab_size'):
    assert f'model_config.{field} = {getattr(model.config, field)}\n' in gin_text, field
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  hf = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  enc, dec, tgt = _batch(model.config.vocab_size, seed=2)
  ours = np.asarray(model.module.apply({'params': params}, enc, dec, tgt))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(enc, dtype=torch.long),
                attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
