"""The Flax T5 and its prompt slot: internal consistency (parity with Hugging
Face lives in test_hf_parity.py)."""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_transfer.prompts import files, initializers
from prompt_transfer.prompts.free import free_prompt
from prompt_transfer.model.config import get_config
from prompt_transfer.model.models import build_model, merge_prompt, split_prompt

ENC = np.array([[5, 6, 7, 9, 1, 0, 0], [8, 9, 1, 0, 0, 0, 0], [4, 4, 4, 4, 4, 4, 1]], np.int32)
TGT = np.array([[3, 4, 1], [5, 1, 0], [7, 7, 1]], np.int32)
DIN = np.array([[0, 3, 4], [0, 5, 1], [0, 7, 7]], np.int32)


def _cfg(variant='t5_1_1', **kw):
  kw.setdefault('dropout_rate', 0.0)
  return get_config(variant, 'tiny', vocab_size=64, **kw)


@pytest.fixture(scope='module', params=['t5_1_0', 't5_1_1'])
def plain(request):
  model = build_model(_cfg(request.param))
  # Larger weights than the init so decodes are not all identical.
  params = jax.tree_util.tree_map(lambda x: x * 3.0,
                                  model.init_params(jax.random.PRNGKey(1)))
  return model, params


def test_param_tree_uses_t5x_names(plain):
  model, params = plain
  flat = {'/'.join(k.key for k in path) for path, _ in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  assert 'token_embedder/embedding' in flat
  assert 'encoder/layers_0/attention/query/kernel' in flat
  assert 'decoder/layers_1/encoder_decoder_attention/out/kernel' in flat
  assert 'encoder/relpos_bias/rel_embedding' in flat
  assert ('decoder/logits_dense/kernel' in flat) == (not model.config.logits_via_embedding)
  assert ('encoder/layers_0/mlp/wi_0/kernel' in flat) == model.config.is_gated
  axes = model.param_logical_axes()
  assert tuple(axes['token_embedder']['embedding']) == ('vocab', 'embed')
  assert tuple(axes['encoder']['layers_0']['mlp']['wo']['kernel']) == ('mlp', 'embed')


def test_greedy_matches_teacher_forcing(plain):
  """Each greedy token is the argmax of a full forward pass over the decode."""
  model, params = plain
  batch = {'encoder_input_tokens': ENC, 'decoder_input_tokens': np.zeros((3, 6), np.int32)}
  tokens, scores = model.predict_batch(params, batch, return_scores=True)
  tokens = np.asarray(tokens)
  assert len({tuple(t) for t in tokens}) > 1, 'degenerate decodes make the test weak'
  din = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], axis=1)
  # No target mask: greedy may emit the pad id 0 as an ordinary token.
  logits = model.module.apply({'params': params}, ENC, din, None)
  argmax = np.asarray(jnp.argmax(logits, -1))
  valid = np.cumsum(np.cumsum(tokens == 1, axis=1), axis=1) <= 1  # up to first EOS
  np.testing.assert_array_equal(argmax[valid], tokens[valid])
  clean = ~((tokens == 0) & valid).any(1)  # rows without an emitted pad id
  full_scores = model.score_batch(params, {'encoder_input_tokens': ENC,
                                           'decoder_input_tokens': din,
                                           'decoder_target_tokens': tokens})
  np.testing.assert_allclose(np.asarray(scores)[clean], np.asarray(full_scores)[clean],
                             rtol=1e-4, atol=1e-4)


def test_beam_search_scores_and_beats_greedy(plain):
  model, params = plain
  batch = {'encoder_input_tokens': ENC, 'decoder_input_tokens': np.zeros((3, 6), np.int32)}
  g_tokens = np.asarray(model.predict_batch(params, batch))
  b_tokens, b_scores = model.predict_batch(params, batch, num_decodes=4, length_penalty=0.0,
                                           return_scores=True)
  b_tokens = np.asarray(b_tokens)

  def loglik(tokens):  # up to the first EOS; a pad id inside counts as a token
    din = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(model.module.apply({'params': params}, ENC, din, None))
    tok = np.take_along_axis(np.asarray(logp), tokens[..., None], -1)[..., 0]
    valid = np.cumsum(np.cumsum(tokens == 1, axis=1), axis=1) <= 1
    return (tok * valid).sum(1)
  # length_penalty 0: the beam score is the plain log-likelihood of the sequence.
  np.testing.assert_allclose(b_scores, loglik(b_tokens), rtol=1e-4, atol=1e-4)
  finished = (b_tokens == 1).any(1) & (g_tokens == 1).any(1)
  assert np.all(loglik(b_tokens)[finished] >= loglik(g_tokens)[finished] - 1e-4)


def test_zero_length_prompt_is_plain_t5(plain):
  model, params = plain
  same = build_model(model.config, free_prompt(0))
  a = model.module.apply({'params': params}, ENC, DIN, TGT)
  b = same.module.apply({'params': params}, ENC, DIN, TGT)
  np.testing.assert_array_equal(a, b)
  assert 'prompt' not in params['encoder']


def test_prompt_prepends_and_extends_mask():
  cfg = _cfg()
  model = build_model(cfg, free_prompt(3))
  params = model.init_params(jax.random.PRNGKey(0))
  prompt = params['encoder']['prompt']['prompt']['prompt']
  assert prompt.shape == (3, cfg.emb_dim)
  (encoded, mask) = model.module.apply({'params': params}, ENC, method=model.module.encode)
  assert encoded.shape == (3, 3 + ENC.shape[1], cfg.emb_dim)
  np.testing.assert_array_equal(mask[:, :3], True)
  np.testing.assert_array_equal(mask[:, 3:], ENC > 0)
  # The prompt acts as 3 extra leading tokens: replacing the prompt by the
  # embeddings of 3 real tokens gives exactly the plain model on those tokens.
  extra = np.array([11, 12, 13])
  emb = params['token_embedder']['embedding']
  params_p = merge_prompt({'prompt': {'prompt': emb[extra]}}, split_prompt(params)[1])
  plain = build_model(cfg)
  enc_plain = np.concatenate([np.tile(extra, (3, 1)), ENC], axis=1)
  a = model.module.apply({'params': params_p}, ENC, DIN, TGT)
  b = plain.module.apply({'params': split_prompt(params)[1]}, enc_plain, DIN, TGT)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_prompt():
  model = build_model(_cfg(dropout_rate=0.1), free_prompt(4))
  params = model.init_params(jax.random.PRNGKey(0))
  prompt, frozen = split_prompt(params)
  batch = {'encoder_input_tokens': ENC, 'decoder_input_tokens': DIN,
           'decoder_target_tokens': TGT}

  def loss(prompt, frozen):
    return model.loss_fn(merge_prompt(prompt, frozen), batch, jax.random.PRNGKey(2))[0]
  g_prompt = jax.grad(loss)(prompt, frozen)
  assert float(jnp.abs(g_prompt['prompt']['prompt']).sum()) > 0
  # Gradients are taken with respect to the prompt subtree only: nothing is
  # computed or stored for the frozen weights.
  assert jax.tree_util.tree_structure(g_prompt) == jax.tree_util.tree_structure(prompt)
  g_all = jax.grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
  np.testing.assert_allclose(g_all['encoder']['prompt']['prompt']['prompt'],
                             jax.grad(lambda q: model.loss_fn(merge_prompt(q, frozen), batch,
                                                              None)[0])(prompt)['prompt']['prompt'],
                             rtol=1e-5, atol=1e-7)


def test_initialisers_give_documented_rows():
  rng = jax.random.PRNGKey(3)
  emb = jax.random.normal(jax.random.PRNGKey(4), (50, 8))
  u = initializers.random_uniform(0.25)(rng, (6, 8), emb)
  assert u.shape == (6, 8) and float(jnp.abs(u).max()) <= 0.25 and float(jnp.abs(u).max()) > 0.1
  s = np.asarray(initializers.from_sampled_vocab(10)(rng, (6, 8), emb))
  rows = [int(np.where(np.all(np.isclose(np.asarray(emb), r), axis=1))[0][0]) for r in s]
  assert all(r < 10 for r in rows) and len(set(rows)) == 6  # first N ids, no repeats
  c = np.asarray(initializers.from_class_labels([[3, 4], [7]], initializers.from_sampled_vocab(10))(
      rng, (6, 8), emb))
  np.testing.assert_allclose(c[0], (emb[3] + emb[4]) / 2, rtol=1e-6)
  np.testing.assert_allclose(c[1], emb[7], rtol=1e-6)
  np.testing.assert_allclose(c[2:], s[2:], rtol=1e-6)  # rest = the fallback's rows
  arr = np.arange(48, dtype=np.float32).reshape(6, 8)
  np.testing.assert_array_equal(initializers.from_array(arr)(rng, (6, 8), emb), arr)


def test_init_prompt_reads_the_loaded_embedding():
  cfg = _cfg()
  frozen = build_model(cfg).init_params(jax.random.PRNGKey(0))
  model = build_model(cfg, free_prompt(2, initializers.from_class_labels([[9], [10, 11]])))
  params = model.init_prompt(jax.random.PRNGKey(1), frozen)
  emb = frozen['token_embedder']['embedding']
  p = params['encoder']['prompt']['prompt']['prompt']
  np.testing.assert_allclose(p[0], emb[9], rtol=1e-6)
  np.testing.assert_allclose(p[1], (emb[10] + emb[11]) / 2, rtol=1e-6)


def test_prompt_file_validation(tmp_path):
  good = tmp_path / 'encoder.prompt.prompt.prompt'
  with open(good, 'wb') as f:
    np.save(f, np.ones((4, 32), np.float32))
  assert files.load_prompt_file(str(good), (4, 32)).shape == (4, 32)
  with pytest.raises(files.PromptFileError, match=r'has shape \(4, 32\).*expects \(5, 32\)'):
    files.load_prompt_file(str(good), (5, 32))
  with pytest.raises(files.PromptFileError, match='does not exist'):
    files.load_prompt_file(str(tmp_path / 'nope'), (4, 32))
  bad = tmp_path / 'nan'
  with open(bad, 'wb') as f:
    np.save(f, np.full((4, 32), np.nan, np.float32))
  with pytest.raises(files.PromptFileError, match='NaN'):
    files.load_prompt_file(str(bad), (4, 32))


def test_activation_capture_and_partial_models(plain):
  model, params = plain
  batch = {'encoder_input_tokens': ENC, 'decoder_input_tokens': DIN,
           'decoder_target_tokens': TGT}
  inter = model.capture_activations(params, batch)
  pre = inter['decoder']['layers_0']['mlp']['pre_activation'][0]
  assert pre.shape == (3, 3, model.config.mlp_dim)
  assert inter['encoder']['layers_0']['mlp']['hidden'][0].shape == (3, 7, model.config.mlp_dim)
  # A partial model: one encoder layer and half the FFN neurons, same config.
  keep = np.arange(model.config.mlp_dim // 2)

  def shrink(mlp):
    out = {k: {'kernel': v['kernel'][:, keep]} for k, v in mlp.items() if k != 'wo'}
    out['wo'] = {'kernel': mlp['wo']['kernel'][keep]}
    return out
  partial = jax.tree_util.tree_map(lambda x: x, params)
  partial['encoder'] = {k: v for k, v in params['encoder'].items() if k != 'layers_1'}
  partial['encoder']['layers_0'] = dict(params['encoder']['layers_0'],
                                        mlp=shrink(params['encoder']['layers_0']['mlp']))
  logits = model.module.apply({'params': partial}, ENC, DIN, TGT)
  assert logits.shape == (3, 3, model.config.vocab_size) and np.all(np.isfinite(logits))
  inter = model.capture_activations(partial, batch)
  assert 'layers_1' not in inter['encoder']
  assert inter['encoder']['layers_0']['mlp']['hidden'][0].shape[-1] == len(keep)


@pytest.mark.parametrize('policy', ['dots', 'nothing'])
def test_remat_gives_the_same_loss_gradient_and_decode(policy):
  cfg = _cfg(dropout_rate=0.1)
  plain = build_model(cfg, free_prompt(3))
  remat = build_model(cfg.replace(remat=True, remat_policy=policy), free_prompt(3))
  params = plain.init_params(jax.random.PRNGKey(0))
  prompt, frozen = split_prompt(params)
  batch = {'encoder_input_tokens': ENC, 'decoder_input_tokens': DIN,
           'decoder_target_tokens': TGT}
  grads = [jax.jit(jax.grad(lambda q, m=m: m.loss_fn(merge_prompt(q, frozen), batch,
                                                     jax.random.PRNGKey(1))[0]))(prompt)
           for m in (plain, remat)]
  np.testing.assert_allclose(grads[1]['prompt']['prompt'], grads[0]['prompt']['prompt'],
                             rtol=1e-5, atol=1e-7)
  dec = {'encoder_input_tokens': ENC, 'decoder_input_tokens': np.zeros((3, 5), np.int32)}
  np.testing.assert_array_equal(remat.predict_batch(params, dec), plain.predict_batch(params, dec))


def test_config_refuses_unknown_remat_policy_dropout_mask_and_dtype():
  from prompt_transfer.model.config import REMAT_POLICY_NAMES, ConfigError
  from prompt_transfer.model.network import REMAT_POLICIES
  assert set(REMAT_POLICIES) == set(REMAT_POLICY_NAMES)
  with pytest.raises(ConfigError, match="remat_policy must be one of .*got 'everything'"):
    _cfg().replace(remat=True, remat_policy='everything')
  with pytest.raises(ConfigError, match="dropout_mask must be one of .*got 'bernoulli'"):
    _cfg(dropout_mask='bernoulli')
  with pytest.raises(ConfigError, match="dtype must be a floating dtype .*got 'bfloat61'"):
    _cfg(dtype='bfloat61')
  with pytest.raises(ConfigError, match="param_dtype must be a floating dtype .*got 'int32'"):
    _cfg(param_dtype='int32')
  with pytest.raises(ConfigError, match="Unknown T5 size 'huge'"):
    get_config('t5_1_1', 'huge')
  assert _cfg(dtype='bfloat16', dropout_mask='prng', remat_policy='nothing').dtype == 'bfloat16'


def _equations(fn, *args, name: str) -> list:
  """Every `name` equation in fn's jaxpr, those in nested jaxprs (jit, remat,
  custom_vjp) included."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == name:
        yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from walk(sub)
  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def _dot_operand_dtypes(fn, *args):
  """(lhs, rhs, preferred) dtypes of every dot_general in fn's jaxpr, nested ones too."""
  return [(str(eqn.invars[0].aval.dtype), str(eqn.invars[1].aval.dtype),
           str(eqn.params['preferred_element_type']))
          for eqn in _equations(fn, *args, name='dot_general')]


def test_bfloat16_products_take_bf16_operands_forward_and_backward():
  """With bf16 activations every matmul, the gradient's included, multiplies bf16
  by bf16 into float32 (XLA's CPU backend upcasts mixed or bf16-output dots to
  slow float32 matmuls); the result is close to the float32 model's."""
  from prompt_transfer.model.layers import einsum
  a = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 16))
  b = jax.random.normal(jax.random.PRNGKey(1), (6, 16, 8))

  def loss(a, b, dtype):
    return jnp.sum(jnp.sin(einsum('bqd,bdk->bqk', a, b, dtype, jnp.float32)))
  grad = jax.grad(loss, argnums=(0, 1))
  dots = _dot_operand_dtypes(lambda a, b: grad(a, b, jnp.bfloat16), a, b)
  assert len(dots) == 3 and set(dots) == {('bfloat16', 'bfloat16', 'float32')}
  for g16, g32 in zip(grad(a, b, jnp.bfloat16), grad(a, b, jnp.float32)):
    assert g16.dtype == jnp.float32
    np.testing.assert_allclose(g16, g32, rtol=0.05, atol=0.05 * float(jnp.abs(g32).max()))

  # The whole model: every dot of the prompt gradient is bf16 x bf16 -> f32.
  cfg = _cfg(dtype='bfloat16')
  model = build_model(cfg, free_prompt(3))
  params = model.init_params(jax.random.PRNGKey(0))
  prompt, frozen = split_prompt(params)
  batch = {'encoder_input_tokens': ENC, 'decoder_input_tokens': DIN,
           'decoder_target_tokens': TGT}

  def prompt_grad(model, q):
    return jax.grad(lambda q: model.loss_fn(merge_prompt(q, frozen), batch, None)[0])(q)
  dots = _dot_operand_dtypes(functools.partial(prompt_grad, model), prompt)
  assert len(dots) > 20 and set(dots) == {('bfloat16', 'bfloat16', 'float32')}
  g16 = jax.jit(functools.partial(prompt_grad, model))(prompt)['prompt']['prompt']
  g32 = jax.jit(functools.partial(prompt_grad, build_model(_cfg(), free_prompt(3))))(
      prompt)['prompt']['prompt']
  cosine = float(jnp.vdot(g16, g32) / (jnp.linalg.norm(g16) * jnp.linalg.norm(g32)))
  assert cosine > 0.99, cosine


def test_frozen_weights_stored_in_the_compute_dtype_give_the_same_numbers():
  """frozen_storage_dtype: with bf16 activations the frozen kernels, embeddings
  and relative-position tables are kept in bf16 (layer-norm scales in float32),
  and loss, prompt gradient and decode are bit-identical to casting them in
  every step."""
  from prompt_transfer.training import partitioning
  from prompt_transfer.model.models import frozen_storage_dtype
  for dtype, expect_cast in (('bfloat16', True), ('float32', False)):
    model = build_model(_cfg(dtype=dtype), free_prompt(3))
    params = jax.tree_util.tree_map(lambda x: x * 3.0, model.init_params(jax.random.PRNGKey(2)))
    prompt, frozen = split_prompt(params)
    host = jax.tree_util.tree_map(np.asarray, frozen)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    stored = partitioning.put_consuming(
        host, device, functools.partial(frozen_storage_dtype, model.config))
    assert host == {}  # consumed
    assert stored['encoder']['layers_0']['mlp']['wi_0']['kernel'].dtype == (
        jnp.bfloat16 if expect_cast else jnp.float32)
    assert stored['token_embedder']['embedding'].dtype == stored['encoder']['relpos_bias'][
        'rel_embedding'].dtype == stored['encoder']['layers_0']['mlp']['wi_0']['kernel'].dtype
    assert stored['encoder']['encoder_norm']['scale'].dtype == jnp.float32
    batch = {'encoder_input_tokens': ENC, 'decoder_input_tokens': DIN,
             'decoder_target_tokens': TGT}
    outs = []
    for fz in (frozen, stored):
      loss, grad = jax.jit(jax.value_and_grad(
          lambda q, fz=fz: model.loss_fn(merge_prompt(q, fz), batch, None)[0]))(prompt)
      dec = model.predict_batch(merge_prompt(prompt, fz), {
          'encoder_input_tokens': ENC, 'decoder_input_tokens': np.zeros((3, 5), np.int32)})
      outs.append((loss, grad['prompt']['prompt'], dec))
    for x, y in zip(*outs):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_hash_dropout_masks_have_the_rate_and_no_structure():
  """hash_keep_mask: keep rate 1 - rate overall and along every axis, no
  correlation between neighbours along any axis or between masks of other
  seeds, the same mask for the same seeds."""
  from prompt_transfer.model.layers import hash_keep_mask
  shape = (4, 6, 96, 96)
  n = np.prod(shape)
  seeds = [np.array(s, np.uint32) for s in ((1, 2), (1, 3), (2, 2), (123456789, 987654321))]
  masks = [np.asarray(hash_keep_mask(jnp.asarray(s), shape, 0.1)) for s in seeds]
  np.testing.assert_array_equal(masks[0], np.asarray(hash_keep_mask(jnp.asarray(seeds[0]), shape, 0.1)))
  sigma = np.sqrt(0.09 / n)
  for m in masks:
    assert m.dtype == np.bool_ and m.shape == shape
    assert abs(m.mean() - 0.9) < 5 * sigma, m.mean()
    for axis in range(len(shape)):  # every slice along each axis keeps ~90%
      other = tuple(a for a in range(len(shape)) if a != axis)
      per = m.mean(axis=other)
      assert np.all(np.abs(per - 0.9) < 6 * np.sqrt(0.09 / (n / shape[axis]))), (axis, per)
    x = m.astype(np.float32) - m.mean()
    for axis in range(len(shape)):  # neighbours along each axis are independent
      a, b = np.swapaxes(x, axis, -1)[..., 1:], np.swapaxes(x, axis, -1)[..., :-1]
      corr = (a * b).mean() / x.var()
      assert abs(corr) < 5 / np.sqrt(a.size), (axis, corr)
  for i in range(len(masks)):  # masks of different seeds are independent
    for j in range(i + 1, len(masks)):
      a = masks[i].astype(np.float32) - 0.9
      b = masks[j].astype(np.float32) - 0.9
      assert abs((a * b).mean() / 0.09) < 5 / np.sqrt(n), (i, j)
  # The rate is honoured at the extremes of its range.
  assert float(hash_keep_mask(jnp.asarray(seeds[0]), (4096,), 0.5).mean()) == pytest.approx(0.5, abs=0.04)
  assert bool(hash_keep_mask(jnp.asarray(seeds[0]), (4096,), 0.0).all())


def test_dropout_module_scales_broadcasts_and_validates():
  from prompt_transfer.model.layers import Dropout
  x = jnp.ones((4, 50, 64))
  for mask in ('hash', 'prng'):
    layer = Dropout(0.25, mask=mask)
    y = np.asarray(layer.apply({}, x, rngs={'dropout': jax.random.PRNGKey(0)}))
    # Inverted dropout: zeros or 1/(1-rate), mean preserved.
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs(y.mean() - 1.0) < 5 * np.sqrt(0.25 * 0.75 / y.size) / 0.75
    y2 = np.asarray(layer.apply({}, x, rngs={'dropout': jax.random.PRNGKey(1)}))
    assert (y2 != y).mean() > 0.2  # another key, another mask
    # broadcast_dims=(-2,) (T5X's hidden-state dropout): one mask per sequence.
    yb = np.asarray(Dropout(0.25, broadcast_dims=(-2,), mask=mask).apply(
        {}, x, rngs={'dropout': jax.random.PRNGKey(0)}))
    assert np.all(yb == yb[:, :1, :]) and 0 < (yb == 0).mean() < 0.5
  assert np.all(np.asarray(Dropout(1.0).apply({}, x, rngs={'dropout': jax.random.PRNGKey(0)})) == 0)
  assert Dropout(0.0).apply({}, x) is x
  with pytest.raises(ValueError, match="dropout_mask must be one of .*got 'bernoulli'"):
    Dropout(0.1, mask='bernoulli').apply({}, x, rngs={'dropout': jax.random.PRNGKey(0)})


def test_hash_dropout_draws_two_words_per_mask_and_trains_like_prng_dropout():
  """With dropout_mask='hash' (the default) the prompt gradient draws only two
  random words per dropout layer, never a mask-sized block of PRNG bits; its
  loss over many dropout keys has the same mean as flax's bernoulli dropout."""
  batch = {'encoder_input_tokens': ENC, 'decoder_input_tokens': DIN,
           'decoder_target_tokens': TGT}
  losses = {}
  for mask in ('hash', 'prng'):
    cfg = _cfg(dropout_rate=0.3, dropout_mask=mask)
    model = build_model(cfg, free_prompt(4))
    params = jax.tree_util.tree_map(lambda x: x * 3.0, model.init_params(jax.random.PRNGKey(0)))
    prompt, frozen = split_prompt(params)

    def grad(q, rng, model=model, frozen=frozen):
      return jax.grad(lambda q: model.loss_fn(merge_prompt(q, frozen), batch, rng)[0])(q)
    bits = [tuple(v.aval.shape) for eqn in
            _equations(grad, prompt, jax.random.PRNGKey(0), name='random_bits')
            for v in eqn.outvars]
    if mask == 'hash':
      assert bits and set(bits) == {(2,)}, bits
    else:
      assert max(np.prod(s) for s in bits) > 100, bits
    keys = jax.random.split(jax.random.PRNGKey(7), 200)
    loss = jax.jit(jax.vmap(lambda k, model=model, params=params:
                            model.loss_fn(params, batch, k)[0]))
    losses[mask] = np.asarray(loss(keys))
  assert np.std(losses['hash']) > 0  # the masks change with the key
  diff = abs(losses['hash'].mean() - losses['prng'].mean())
  spread = np.sqrt((losses['hash'].var() + losses['prng'].var()) / 200)
  assert diff < 4 * spread, (losses['hash'].mean(), losses['prng'].mean(), spread)
