"""Builds tiny random Hugging Face T5 models and their reference outputs.

The fixtures under tests/fixtures/ are the proof that our Flax T5 computes what
Hugging Face `T5ForConditionalGeneration` computes, for checkpoints in the formats
users actually download:

  hf_t5_1_0_tiny/       T5 1.0 (ReLU MLP, head tied to the embedding and scaled by
                        d_model**-0.5), written by `save_pretrained` (one
                        model.safetensors). Few relative-position buckets and a small
                        max distance so that the log-bucket and clamping branches run.
  hf_t5_1_1_tiny/       T5 1.1 (gated GELU, separate `lm_head.weight`, no scaling),
                        sharded (model.safetensors.index.json + shards) with a
                        hub-style config.json (`tie_word_embeddings: false`), like
                        google/t5-v1_1-* and google/flan-t5-*. num_heads * d_kv !=
                        d_model on purpose.
  hf_t5_1_1_tied_tiny/  What transformers >= 5 `save_pretrained` writes for a T5 1.1
                        config: config.json says `tie_word_embeddings: true` and
                        `scale_decoder_outputs: false`, and there is no
                        `lm_head.weight`: the head is the embedding, *unscaled*. A
                        loader that maps "tied" to T5X `logits_via_embedding` (which
                        scales) is wrong by a factor d_model**-0.5 on this file.

Each directory also holds `reference.npz` (see `reference_outputs`).

Usage (CPU, needs torch + transformers; writes tests/fixtures/):
  python tools/make_reference.py [--out tests/fixtures]

Importable: tests build fresh random models at test time with `make_hf_model`,
`save_hf_model` and `reference_outputs` (or `make_case`, which also retries seeds
until the decodes are informative).

Weights are drawn with numpy (not torch's RNG) so fixtures are reproducible across
torch versions. Every weight is random, layer-norm scales included (HF initialises
them to 1, which would hide a loader that swaps two norms), and relative-position
biases are drawn with std 1 (HF: d_model**-0.5) so the bucket layout matters.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from typing import Any, Dict, Optional

import numpy as np

KINDS = ('t5_1_0', 't5_1_1', 't5_1_1_tied')

# Default tiny dimensions per kind (override any of them via **dims).
DEFAULT_DIMS = {
    't5_1_0': dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                   num_decoder_layers=3, relative_attention_num_buckets=8,
                   relative_attention_max_distance=10),
    't5_1_1': dict(vocab_size=128, d_model=32, d_kv=4, num_heads=6, d_ff=48, num_layers=2,
                   num_decoder_layers=3, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128),
    't5_1_1_tied': dict(vocab_size=96, d_model=24, d_kv=8, num_heads=2, d_ff=40, num_layers=1,
                        num_decoder_layers=2, relative_attention_num_buckets=16,
                        relative_attention_max_distance=32),
}

# Shapes of the reference batch.
BATCH = 3
ENCODER_LEN = 12
TARGET_LEN = 7
MAX_DECODE_LEN = 8
NUM_BEAMS = 3
# Beam search settings handed to HF generate (see reference_outputs).
BEAM_LENGTH_PENALTIES = (0.0, 1.0)
BEAM_EARLY_STOPPING = 'never'
PAD, EOS = 0, 1


def _hf_supports_unscaled_tied_head() -> bool:
  """transformers >= 5 separates 'tied' from 'scaled' (config.scale_decoder_outputs)."""
  from transformers import T5Config
  return hasattr(T5Config(), 'scale_decoder_outputs')


def make_hf_model(kind: str, seed: int, init_scale: float = 3.0, eos_boost: float = 2.0,
                  pad_scale: float = 0.1, **dims: Any):
  """Returns a random `T5ForConditionalGeneration` in eval mode.

  Args:
    kind: 't5_1_0' (ReLU, tied + scaled head), 't5_1_1' (gated GELU, separate
      lm_head), or 't5_1_1_tied' (gated GELU, head = embedding, unscaled; needs
      transformers >= 5).
    seed: numpy seed for all weights.
    init_scale: multiplies the init std of every weight except the embedding and the
      layer-norm scales (like HF's initializer_factor).
    eos_boost: multiplies the EOS row of the output embedding, so that random models
      sometimes stop before the maximum decode length.
    pad_scale: multiplies the pad/BOS (0) row of the output embedding, so that
      random models rarely emit 0 mid-sequence.
    **dims: overrides of DEFAULT_DIMS[kind] (HF T5Config field names).
  """
  import torch
  from transformers import T5Config, T5ForConditionalGeneration

  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
  if kind == 't5_1_1_tied' and not _hf_supports_unscaled_tied_head():
    raise NotImplementedError('t5_1_1_tied needs transformers >= 5 (scale_decoder_outputs).')
  cfg_kw = dict(DEFAULT_DIMS[kind])
  cfg_kw.update(dims)
  gated = kind != 't5_1_0'
  config = T5Config(
      feed_forward_proj='gated-gelu' if gated else 'relu',
      tie_word_embeddings=(kind != 't5_1_1_tied') and not gated,
      dropout_rate=0.1, layer_norm_epsilon=1e-6, decoder_start_token_id=PAD,
      pad_token_id=PAD, eos_token_id=EOS, initializer_factor=1.0, **cfg_kw)
  torch.manual_seed(seed)  # HF's own init; every tensor is overwritten below anyway.
  model = T5ForConditionalGeneration(config)
  if kind == 't5_1_1' and model.lm_head.weight is model.shared.weight:
    # transformers >= 5 always ties lm_head to shared; a real T5 1.1 checkpoint has
    # its own lm_head, so untie it.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  if kind == 't5_1_1_tied':
    assert model.lm_head.weight is model.shared.weight
    assert not model.config.scale_decoder_outputs

  rng = np.random.RandomState(seed)
  d, dkv, h, dff = config.d_model, config.d_kv, config.num_heads, config.d_ff
  with torch.no_grad():
    for name, p in sorted(model.named_parameters(remove_duplicate=True)):
      leaf = name.split('.')[-2]
      if name.endswith('layer_norm.weight') or 'final_layer_norm' in name:
        value = rng.uniform(0.5, 1.5, p.shape)
      elif 'relative_attention_bias' in name:
        value = rng.normal(0.0, 1.0, p.shape)
      elif name == 'shared.weight':
        value = rng.normal(0.0, 1.0, p.shape)
      elif name == 'lm_head.weight':
        value = rng.normal(0.0, d ** -0.5 * 2.0, p.shape)
      elif leaf == 'q':
        value = rng.normal(0.0, (d * dkv) ** -0.5, p.shape)
      elif leaf in ('k', 'v'):
        value = rng.normal(0.0, d ** -0.5, p.shape)
      elif leaf == 'o':
        value = rng.normal(0.0, (h * dkv) ** -0.5, p.shape)
      elif leaf in ('wi', 'wi_0', 'wi_1'):
        value = rng.normal(0.0, d ** -0.5, p.shape)
      elif leaf == 'wo':
        value = rng.normal(0.0, dff ** -0.5, p.shape)
      else:
        raise ValueError(f'unexpected parameter {name}')
      # The embedding keeps std 1: scaling the sub-layers but not the embedding makes
      # their outputs, not the input token, dominate the residual stream (otherwise a
      # tied head mostly repeats the previous token).
      if 'layer_norm' not in name and name != 'shared.weight':
        value = value * init_scale
      p.copy_(torch.from_numpy(value.astype(np.float32)))
    head = model.lm_head.weight
    head[EOS] *= eos_boost
    head[PAD] *= pad_scale
  model.eval()
  model._pt_kind = kind  # remembered by save_hf_model
  return model


def save_hf_model(model, path: str, max_shard_size: Optional[str] = None,
                  hub_style_config: Optional[bool] = None) -> None:
  """Writes `model` with `save_pretrained(safe_serialization=True)`.

  Args:
    model: from make_hf_model.
    path: output directory (replaced).
    max_shard_size: e.g. '20KB' to force model.safetensors.index.json + shards.
    hub_style_config: rewrite config.json like the public T5 1.1 / Flan-T5 configs
      (`tie_word_embeddings: false`, no `scale_decoder_outputs`). Default: True for
      kind 't5_1_1'. transformers >= 5 would otherwise write `tie_word_embeddings:
      true` next to a separate lm_head.weight (it only unties on load because the
      two tensors differ).
  """
  kind = getattr(model, '_pt_kind', None)
  if hub_style_config is None:
    hub_style_config = kind == 't5_1_1'
  if os.path.isdir(path):
    shutil.rmtree(path)
  kw = {'safe_serialization': True}
  if max_shard_size:
    kw['max_shard_size'] = max_shard_size
  model.save_pretrained(path, **kw)
  # generation_config.json is irrelevant to us; keep fixtures minimal.
  gen = os.path.join(path, 'generation_config.json')
  if os.path.exists(gen):
    os.remove(gen)
  if hub_style_config:
    cfg_path = os.path.join(path, 'config.json')
    with open(cfg_path) as f:
      cfg = json.load(f)
    cfg['tie_word_embeddings'] = False
    cfg.pop('scale_decoder_outputs', None)
    with open(cfg_path, 'w') as f:
      json.dump(cfg, f, indent=2, sort_keys=True)
  _check_saved_head(model, path)


def _check_saved_head(model, path: str) -> None:
  """Asserts the written files hold a separate lm_head iff the model has one."""
  from safetensors import safe_open
  files = [f for f in os.listdir(path) if f.endswith('.safetensors')]
  keys = set()
  for f in files:
    with safe_open(os.path.join(path, f), 'np') as s:
      keys |= set(s.keys())
  untied = model.lm_head.weight is not model.shared.weight
  if untied != ('lm_head.weight' in keys):
    raise AssertionError(f'{path}: untied={untied} but saved keys {sorted(keys)[:3]}...')


def make_inputs(seed: int, vocab_size: int, batch: int = BATCH, encoder_len: int = ENCODER_LEN,
                target_len: int = TARGET_LEN) -> Dict[str, np.ndarray]:
  """Random int32 token batch: trailing-0 padding, EOS=1 ending each valid part."""
  rng = np.random.RandomState(seed + 1000)
  # First row full, the others padded (lengths include the EOS).
  enc_lens = [encoder_len] + list(rng.randint(2, encoder_len, size=batch - 1))
  tgt_lens = [target_len] + list(rng.randint(2, target_len, size=batch - 1))
  enc = np.zeros((batch, encoder_len), np.int32)
  tgt = np.zeros((batch, target_len), np.int32)
  for b in range(batch):
    enc[b, :enc_lens[b] - 1] = rng.randint(2, vocab_size, enc_lens[b] - 1)
    enc[b, enc_lens[b] - 1] = EOS
    tgt[b, :tgt_lens[b] - 1] = rng.randint(2, vocab_size, tgt_lens[b] - 1)
    tgt[b, tgt_lens[b] - 1] = EOS
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  return {'encoder_input_tokens': enc, 'decoder_target_tokens': tgt,
          'decoder_input_tokens': dec_in}


def _postprocess(sequences: np.ndarray, max_len: int) -> np.ndarray:
  """HF generate output -> T5X predict_batch layout (no BOS, 0 after first EOS)."""
  seq = np.asarray(sequences)[:, 1:]  # drop decoder start token 0
  out = np.zeros((seq.shape[0], max_len), np.int32)
  for b, row in enumerate(seq):
    for t, tok in enumerate(row[:max_len]):
      out[b, t] = tok
      if tok == EOS:
        break
  return out


def reference_outputs(hf_model, seed: int, max_decode_len: int = MAX_DECODE_LEN,
                      beams: bool = True, **input_kw: Any) -> Dict[str, np.ndarray]:
  """Runs HF on a random batch; returns the arrays stored in reference.npz.

  - logits [B, T, V] float32: forward with attention_mask = enc > 0 and
    decoder_input_ids = decoder_input_tokens (no decoder mask: causal only), run in
    float64 and rounded to float32, so the reference is exact to float32 precision.
  - hf_float32_logits_error (scalar): max |HF float32 logits - float64 logits| over
    non-pad target positions, how much float32 arithmetic alone moves these logits
    (a conditioning measure).
  - greedy_tokens [B, max_decode_len]: generate(do_sample=False, num_beams=1).
  - greedy_margin [B, max_decode_len]: top1 - top2 logit at each greedy step (inf
    after EOS); tests can see how robust the argmax is.
  - beam_tokens [B, max_decode_len] and beam_scores [B]: generate(num_beams=3,
    length_penalty=0.0, early_stopping='never'). length_penalty=0 makes HF rank
    beams by their plain summed log-probability (T5X beam search with alpha=0), and
    'never' keeps searching until no running beam can win, so no heuristic
    stopping decides the winner. beam_scores is HF's sequences_scores (sum of
    log-probs, EOS included).
  - beam_tokens_lp1 / beam_scores_lp1: the same with HF's default
    length_penalty=1.0 (score = sum log p / number of generated tokens incl. EOS).
    Beam outputs are left out with beams=False.
  HF's beam search differs from a T5X-style one by design: it admits a hypothesis
  ending in EOS only if it ranks among the top num_beams of the step's 2*num_beams
  candidates, and at max length it lets running beams compete with finished ones.
  See tests/test_hf_parity.py::check_beam for how beams are compared.
  """
  import torch
  from transformers import GenerationConfig

  vocab = hf_model.config.vocab_size
  batch = make_inputs(seed, vocab, **input_kw)
  enc = torch.from_numpy(batch['encoder_input_tokens']).long()
  mask = (enc > 0).long()
  dec_in = torch.from_numpy(batch['decoder_input_tokens']).long()
  with torch.no_grad():
    logits32 = hf_model(input_ids=enc, attention_mask=mask,
                        decoder_input_ids=dec_in).logits.float().numpy()
    # The reference logits are HF's forward in float64: the exact answer our float32
    # forward is compared to. HF's own float32 error is kept to judge conditioning.
    hf64 = copy.deepcopy(hf_model).double()
    logits = hf64(input_ids=enc, attention_mask=mask, decoder_input_ids=dec_in).logits.numpy()
    del hf64
    common = dict(max_new_tokens=max_decode_len, do_sample=False, decoder_start_token_id=PAD,
                  pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, min_new_tokens=0,
                  no_repeat_ngram_size=0, repetition_penalty=1.0, output_scores=True,
                  return_dict_in_generate=True,
                  # transformers 5.x sizes the KV cache by config.num_layers (encoder
                  # depth), so generate() with the cache fails with IndexError when
                  # num_decoder_layers > num_layers. Without the cache the decoder is
                  # recomputed each step: same results, and the models are tiny.
                  use_cache=False)
    greedy = hf_model.generate(input_ids=enc, attention_mask=mask,
                               generation_config=GenerationConfig(num_beams=1, **common))
    beam_out = {}
    for lp in BEAM_LENGTH_PENALTIES if beams else ():
      beam_out[lp] = hf_model.generate(
          input_ids=enc, attention_mask=mask,
          generation_config=GenerationConfig(num_beams=NUM_BEAMS, num_return_sequences=1,
                                             length_penalty=lp,
                                             early_stopping=BEAM_EARLY_STOPPING, **common))
  greedy_tokens = _postprocess(greedy.sequences.numpy(), max_decode_len)
  margin = np.full(greedy_tokens.shape, np.inf, np.float32)
  for t, step_scores in enumerate(greedy.scores):
    top2 = np.sort(step_scores.float().numpy(), axis=-1)[:, -2:]
    for b in range(greedy_tokens.shape[0]):
      if t == 0 or EOS not in greedy_tokens[b, :t]:
        margin[b, t] = top2[b, 1] - top2[b, 0]
  valid = batch['decoder_target_tokens'] > 0
  result = dict(batch)
  result.update(
      logits=logits.astype(np.float32),
      hf_float32_logits_error=np.float32(np.max(np.abs(logits32 - logits)[valid])),
      greedy_tokens=greedy_tokens,
      greedy_margin=margin,
  )
  for lp, beam in beam_out.items():
    suffix = '' if lp == 0.0 else f'_lp{lp:g}'
    result[f'beam_tokens{suffix}'] = _postprocess(beam.sequences.numpy(), max_decode_len)
    result[f'beam_scores{suffix}'] = beam.sequences_scores.float().numpy().astype(np.float32)
  return result


def is_informative(ref: Dict[str, np.ndarray], min_margin: float = 1e-2,
                   max_float32_error: float = 1e-5) -> bool:
  """True if the reference makes a demanding and numerically fair test.

  Greedy decodes must differ by example, decode something before EOS, stop early
  for at least one example (so the zeros-after-EOS logic runs), never emit the pad
  id 0, and at least one must use 3+ distinct tokens (random tied models tend to
  repeat a token). No greedy step may be a near-tie (top1 - top2 logit
  <= min_margin) that float noise between frameworks could flip. HF's own float32
  logit error must stay below max_float32_error * max|logits| (strongly scaled
  random weights can be ill-conditioned; tests allow 1e-5 * max|logits|).
  """
  g = ref['greedy_tokens']
  if len({tuple(r) for r in g}) < g.shape[0] or np.any(g[:, 0] == EOS):
    return False
  stopped = diverse = False
  for row in g:
    n = list(row).index(EOS) if EOS in row else len(row)
    stopped |= n < len(row)
    body = row[:n]
    if PAD in body:
      return False
    diverse |= len(set(body.tolist())) >= 3
  if not (stopped and diverse and np.min(ref['greedy_margin']) > min_margin):
    return False
  scale = np.max(np.abs(ref['logits'][ref['decoder_target_tokens'] > 0]))
  return bool(ref['hf_float32_logits_error'] <= max_float32_error * scale)


def make_case(kind: str, seed: int, max_tries: int = 200, require_all_eos: bool = False,
              input_kw: Optional[Dict[str, int]] = None,
              max_decode_len: int = MAX_DECODE_LEN, beams: bool = True, **dims: Any):
  """make_hf_model + reference_outputs, trying seed, seed+1, ... until informative.

  Args:
    kind, **dims: as for make_hf_model.
    seed: first seed tried.
    max_tries: number of seeds tried before giving up.
    require_all_eos: also require every HF beam to end with EOS (so beams can be
      compared exactly; see reference_outputs), and some beam of each search to
      decode 2+ tokens before it.
    input_kw: batch / encoder_len / target_len for make_inputs.
    max_decode_len: decode length of greedy and beam search.
    beams: also run beam search (slow-ish).

  Returns (hf_model, reference dict, seed used).
  """
  for s in range(seed, seed + max_tries):
    model = make_hf_model(kind, s, **dims)
    ref = reference_outputs(model, s, max_decode_len=max_decode_len, beams=beams,
                            **(input_kw or {}))
    beam_keys = [k for k in ref if k.startswith('beam_tokens')]
    if is_informative(ref) and (not require_all_eos or all(
        all(EOS in r for r in ref[k]) and any(list(r).index(EOS) >= 2 for r in ref[k])
        for k in beam_keys)):
      return model, ref, s
  raise RuntimeError(f'no informative random {kind} model in seeds {seed}..{seed + max_tries}')


# name -> (kind, first seed, shard size)
FIXTURES = {
    'hf_t5_1_0_tiny': ('t5_1_0', 10, None),
    'hf_t5_1_1_tiny': ('t5_1_1', 0, '20KB'),
    'hf_t5_1_1_tied_tiny': ('t5_1_1_tied', 0, None),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests',
                                                    'fixtures'))
  args = parser.parse_args()
  import torch
  import transformers
  torch.set_num_threads(1)  # tiny models: threads only add overhead
  for name, (kind, seed, shard) in FIXTURES.items():
    if kind == 't5_1_1_tied' and not _hf_supports_unscaled_tied_head():
      print(f'skip {name}: needs transformers >= 5')
      continue
    model, ref, used = make_case(kind, seed, require_all_eos=True)
    path = os.path.join(args.out, name)
    save_hf_model(model, path, max_shard_size=shard)
    np.savez_compressed(os.path.join(path, 'reference.npz'), **ref)
    with open(os.path.join(path, 'README.md'), 'w') as f:
      f.write(f'Random {kind} model and reference outputs written by tools/make_reference.py '
              f'(seed {used}, transformers {transformers.__version__}). Do not edit.\n')
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f'{name}: seed {used}, {size / 1024:.1f} KiB, greedy=\n{ref["greedy_tokens"]}\n'
        f'beam=\n{ref["beam_tokens"]}\nbeam lp1=\n{ref["beam_tokens_lp1"]}\n'
        f'min greedy margin {ref["greedy_margin"].min():.3f}')


if __name__ == '__main__':
  main()
