"""PEFT interchange (prompts/peft_format.py, `t5x export-prompt` / `import-prompt`):
exact round trips, the same logits in PEFT as in ours, PEFT's own adapters
imported, and clear refusals."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_transfer import build_model, get_config
from prompt_transfer.model import export
from prompt_transfer.prompts import files
from prompt_transfer.prompts.free import free_prompt
from in_process import refused_here, t5x_here

LENGTH = 3


def _config(variant='t5_1_1'):
  return get_config(variant, 'tiny', vocab_size=40, head_dim=5, num_decoder_layers=3,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20,
                    dropout_rate=0.0)


@pytest.fixture(name='base')
def _base(tmp_path):
  """A frozen model exported as a Hugging Face folder, a trained-looking
  prompt for it (with sidecar) and our model with that prompt."""
  config = _config()
  model = build_model(config, free_prompt(LENGTH))
  params = jax.tree_util.tree_map(np.asarray, model.init_params(jax.random.PRNGKey(3)))
  frozen = {k: v for k, v in params.items()}
  frozen['encoder'] = {k: v for k, v in params['encoder'].items() if k != 'prompt'}
  hf_dir = export.export_hf_checkpoint(frozen, config, str(tmp_path / 'hf'))
  prompt = np.random.RandomState(0).normal(size=(LENGTH, config.emb_dim)).astype(np.float32)
  info = files.PromptInfo(task='synthetic_majority_yesno', model=config.describe(),
                          vocabulary='ByteVocabulary(size=40)', prompt_length=LENGTH, step=7,
                          module='Prompt',
                          weights=files.weights_fingerprint(params['token_embedder']['embedding']),
                          metrics={'accuracy': 91.0})
  prompt_dir = files.save_prompt_folder(str(tmp_path / 'prompt'), prompt, info)
  return dict(config=config, model=model, params=params, hf=hf_dir, prompt=prompt, info=info,
              prompt_dir=prompt_dir, tmp=tmp_path)


def _batch(vocab: int):
  rng = np.random.RandomState(1)
  enc = rng.randint(2, vocab, size=(2, 9)).astype(np.int32)
  enc[1, 6:] = 0  # padding in the encoder
  tgt = rng.randint(2, vocab, size=(2, 5)).astype(np.int32)
  tgt[:, -1] = 1
  dec = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], axis=1)  # shifted right
  return enc, dec, tgt


def _our_logits(base, prompt):
  params = dict(base['params'])
  params['encoder'] = dict(params['encoder'], prompt={'prompt': {'prompt': prompt}})
  enc, dec, tgt = _batch(base['config'].vocab_size)
  return np.asarray(base['model'].module.apply({'params': params}, jnp.asarray(enc),
                                               jnp.asarray(dec), jnp.asarray(tgt)))


NEEDS = 'the PEFT parity checks need the test extra (pip install -e .[test]: torch, transformers, peft)'


def _peft_logits(hf_dir, adapter_dir=None, peft_model=None):
  torch = pytest.importorskip('torch', reason=NEEDS)
  transformers = pytest.importorskip('transformers', reason=NEEDS)
  peft = pytest.importorskip('peft', reason=NEEDS)
  if peft_model is None:
    hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir)
    peft_model = peft.PeftModel.from_pretrained(hf, adapter_dir)
  peft_model.eval()
  enc, dec, _ = _batch(peft_model.base_model.config.vocab_size)
  with torch.no_grad():
    return peft_model(input_ids=torch.tensor(enc, dtype=torch.long),
                      attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                      decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


def test_export_import_round_trip_is_exact(base):
  adapter = str(base['tmp'] / 'adapter')
  t5x_here('export-prompt', '--format', 'peft', base['prompt_dir'], '--output_dir', adapter)
  assert sorted(os.listdir(adapter)) == ['adapter_config.json', 'adapter_model.safetensors',
                                         'prompt_info.json']
  config = json.load(open(os.path.join(adapter, 'adapter_config.json')))
  assert config['peft_type'] == 'PROMPT_TUNING' and config['task_type'] == 'SEQ_2_SEQ_LM'
  assert config['num_virtual_tokens'] == LENGTH and config['token_dim'] == base['config'].emb_dim
  assert config['num_transformer_submodules'] == 1
  back = str(base['tmp'] / 'back')
  t5x_here('import-prompt', adapter, '--output_dir', back)
  path = os.path.join(back, files.PROMPT_FILE)
  np.testing.assert_array_equal(np.load(path), base['prompt'])
  assert files.load_prompt_info(path) == base['info']


def test_exported_prompt_gives_our_logits_in_peft(base):
  adapter = str(base['tmp'] / 'adapter')
  out = t5x_here('export-prompt', base['prompt_dir'], '--output_dir', adapter,
                 '--base_model', base['hf']).stdout
  assert 'encoder only' in out
  config = json.load(open(os.path.join(adapter, 'adapter_config.json')))
  assert config['base_model_name_or_path'] == base['hf']
  ours = _our_logits(base, base['prompt'])
  theirs = _peft_logits(base['hf'], adapter)
  assert ours.shape == theirs.shape  # PEFT returns decoder logits only
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
  # The prompt matters: without it the logits differ.
  assert np.abs(_our_logits(base, np.zeros_like(base['prompt'])) - theirs).max() > 1e-3


def test_peft_trained_adapter_imports_with_its_decoder_rows_dropped(base):
  """An adapter as PEFT writes it (num_transformer_submodules 2 by default):
  the encoder rows come in, and our model computes what PEFT computes."""
  torch = pytest.importorskip('torch', reason=NEEDS)
  transformers = pytest.importorskip('transformers', reason=NEEDS)
  peft = pytest.importorskip('peft', reason=NEEDS)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(base['hf'])
  pm = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type='SEQ_2_SEQ_LM',
                                                       num_virtual_tokens=LENGTH))
  with torch.no_grad():  # stands in for training: PEFT's prompt is not ours
    pm.prompt_encoder['default'].embedding.weight.normal_(generator=torch.Generator().manual_seed(5))
  adapter = str(base['tmp'] / 'peft_adapter')
  pm.save_pretrained(adapter)
  saved = json.load(open(os.path.join(adapter, 'adapter_config.json')))
  assert saved['num_transformer_submodules'] == 2
  out = str(base['tmp'] / 'imported')
  printed = t5x_here('import-prompt', adapter, '--output_dir', out, '--base_model', base['hf'],
                     '--task', 'synthetic_majority_yesno').stdout
  assert f'dropped the {LENGTH} decoder rows' in printed
  path = os.path.join(out, files.PROMPT_FILE)
  prompt = np.load(path)
  rows = pm.prompt_encoder['default'].embedding.weight.detach().numpy()
  assert rows.shape == (2 * LENGTH, base['config'].emb_dim)
  np.testing.assert_array_equal(prompt, rows[:LENGTH])
  info = files.load_prompt_info(path)
  named = lambda d: {k: v for k, v in d.items() if k != 'name'}  # HF folders name the model by folder
  assert info.task == 'synthetic_majority_yesno'
  assert named(info.model) == named(base['config'].describe())
  assert info.weights == base['info'].weights and 'PEFT adapter' in info.origin
  theirs = _peft_logits(base['hf'], peft_model=pm)
  np.testing.assert_allclose(_our_logits(base, prompt), theirs, rtol=1e-4,
                             atol=1e-5 * np.abs(theirs).max())


def _write_config(adapter, **changes):
  path = os.path.join(adapter, 'adapter_config.json')
  config = json.load(open(path))
  config.update(changes)
  json.dump(config, open(path, 'w'))


def test_refusals_name_the_file_and_what_was_expected(base, capsys):
  tmp = base['tmp']
  adapter = str(tmp / 'adapter')
  t5x_here('export-prompt', base['prompt_dir'], '--output_dir', adapter)
  # Not an adapter at all.
  code, err = refused_here(capsys, 'import-prompt', str(tmp), '--output_dir', str(tmp / 'x'))
  assert code == 1 and 'has no adapter_config.json' in err, err
  # Another PEFT method.
  _write_config(adapter, peft_type='LORA')
  code, err = refused_here(capsys, 'import-prompt', adapter, '--output_dir', str(tmp / 'x'))
  assert code == 1 and 'is a LORA adapter' in err and 'adapter_config.json' in err, err
  # Config and tensor disagree.
  _write_config(adapter, peft_type='PROMPT_TUNING', num_virtual_tokens=LENGTH + 1)
  code, err = refused_here(capsys, 'import-prompt', adapter, '--output_dir', str(tmp / 'x'))
  assert code == 1 and f'has shape ({LENGTH}, ' in err and 'adapter_model.safetensors' in err, err
  # Two submodules written by PEFT < 0.4, whose decoder rows were in use.
  rows = np.concatenate([base['prompt'], base['prompt'] + 1])
  from safetensors.numpy import save_file
  save_file({'prompt_embeddings': rows}, os.path.join(adapter, 'adapter_model.safetensors'))
  _write_config(adapter, num_virtual_tokens=LENGTH, num_transformer_submodules=2,
                peft_version='0.3.0')
  code, err = refused_here(capsys, 'import-prompt', adapter, '--output_dir', str(tmp / 'x'))
  assert code == 1 and 'PEFT 0.3.0' in err and '--drop_decoder_rows' in err, err
  t5x_here('import-prompt', adapter, '--output_dir', str(tmp / 'x'), '--drop_decoder_rows')
  np.testing.assert_array_equal(np.load(str(tmp / 'x' / files.PROMPT_FILE)), base['prompt'])
  # A base model of another width.
  other = get_config('t5_1_1', 'tiny', vocab_size=40, emb_dim=16, head_dim=4)
  other_model = build_model(other)
  other_hf = export.export_hf_checkpoint(
      jax.tree_util.tree_map(np.asarray, other_model.init_params(jax.random.PRNGKey(0))), other,
      str(tmp / 'other_hf'))
  code, err = refused_here(capsys, 'import-prompt', adapter, '--output_dir', str(tmp / 'y'),
                           '--base_model', other_hf, '--drop_decoder_rows')
  assert code == 1 and f'[{LENGTH}, 16]' in err and 'adapter_model.safetensors' in err, err
  code, err = refused_here(capsys, 'export-prompt', base['prompt_dir'], '--output_dir',
                           str(tmp / 'z'), '--base_model', other_hf)
  assert code == 1 and 'emb_dim' in err, err
  assert not (tmp / 'y').exists() and not (tmp / 'z').exists()


def test_export_for_another_checkpoint_of_the_same_shape_is_refused(base, capsys):
  """Same dimensions, other frozen weights: the adapter would name a model
  the prompt was not trained for."""
  config = base['config']
  params = jax.tree_util.tree_map(np.asarray, build_model(config).init_params(
      jax.random.PRNGKey(11)))
  other_hf = export.export_hf_checkpoint(params, config, str(base['tmp'] / 'other_hf'))
  code, err = refused_here(capsys, 'export-prompt', base['prompt_dir'], '--output_dir',
                           str(base['tmp'] / 'z'), '--base_model', other_hf)
  assert code == 1 and 'other checkpoint' in err and base['info'].weights in err, err
