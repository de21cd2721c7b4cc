"""`t5x serve` (serve.py): micro-batched requests over several prompts give
what offline predict_batch / score_batch give; bad requests get a 4xx and do
not disturb the rest; prompts are added and refused by reload."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from prompt_transfer import load_pretrained
from prompt_transfer import serve
from prompt_transfer.prompts import files

aiohttp = pytest.importorskip('aiohttp', reason='t5x serve needs aiohttp (a dependency of the package)')
ASSET = 'pkg://assets/t5_1_1_tiny_synthetic'
INPUTS = ['copy: hello', 'copy: abcabc', 'more a than b? aab', 'rank 12 against 7:', 'copy: xyz']


def _save(folder, task, rows, model, weights):
  info = files.PromptInfo(task=task, model=model.config.describe(), prompt_length=len(rows),
                          module='Prompt', weights=weights, vocabulary='ByteVocabulary(, size=259)')
  return files.save_prompt_folder(folder, rows, info)


@pytest.fixture(name='served', scope='module')
def _served(tmp_path_factory):
  from prompt_transfer import cli
  cli.import_modules([])
  model, frozen = load_pretrained(ASSET)
  emb = frozen['token_embedder']['embedding']
  weights = files.weights_fingerprint(emb)
  root = tmp_path_factory.mktemp('served')
  lib = root / 'library'
  rs = np.random.RandomState(0)
  for task, length in (('synthetic_copy_plain', 3), ('synthetic_majority_yesno', 5),
                       ('synthetic_greater_versus', 4)):
    _save(str(lib / task), task, emb[rs.randint(3, 250, size=length)], model, weights)
  limits = serve.Limits(max_batch=8, max_wait_ms=20, max_input_tokens=32, max_decode_tokens=12)
  service = serve.PromptService(model.config, frozen, None, [str(lib)], limits)
  vocab = service.vocab
  assert type(vocab).__name__ == 'ByteVocabulary'  # read from the sidecars
  server = serve.Server(service, model.config.name)
  url, stop = serve.serve_in_background(server)
  yield dict(url=url, server=server, service=service, model=model, frozen=frozen, lib=lib,
             root=root, weights=weights, vocab=vocab, limits=limits)
  stop()


def _offline(served, name, text, labels=None):
  """What the bank computes for one row in a batch of its own."""
  svc = served['service']
  bank = svc.bank
  k = bank.id_of(name)
  ids = svc.tokens(text, 'x', served['limits'].max_input_tokens)
  if labels is None:
    return svc._predict_rows(bank, [(k, ids)])[0]  # pylint: disable=protected-access
  return [svc._score_rows(bank, [(k, ids, svc.tokens(w, 'w', 12))])[0] for w in labels]  # pylint: disable=protected-access


async def _post(session, url, body, raw=None):
  async with session.post(url + '/predict', data=raw if raw is not None else json.dumps(body),
                          headers={'Content-Type': 'application/json'}) as r:
    return r.status, await r.json()


def test_concurrent_mixed_requests_equal_offline_and_are_batched(served):
  url, server = served['url'], served['server']
  names = served['service'].bank.names
  jobs = [(names[i % len(names)], INPUTS[i % len(INPUTS)]) for i in range(30)]
  calls_before = server.predictor.batches

  async def main():
    async with aiohttp.ClientSession() as s:
      async with s.get(url + '/health') as r:
        health = await r.json()
      async with s.get(url + '/prompts') as r:
        listed = await r.json()
      answers = await asyncio.gather(*[_post(s, url, {'prompt': n, 'inputs': t}) for n, t in jobs])
      many = await _post(s, url, {'prompt': names[0], 'inputs': INPUTS})
      return health, listed, answers, many
  health, listed, answers, many = asyncio.run(main())
  assert health['status'] == 'ok' and health['prompts'] == 3
  assert sorted(p['task'] for p in listed) == sorted(names)
  for (name, text), (status, body) in zip(jobs, answers):
    assert status == 200, body
    assert body['outputs'] == [_offline(served, name, text)], (name, text)
  assert many[0] == 200 and many[1]['outputs'] == [_offline(served, names[0], t) for t in INPUTS]
  # 35 rows reached the device in fewer calls: requests for different prompts shared batches.
  assert server.predictor.batches - calls_before < 35
  outputs = {o for _, b in answers for o in b['outputs']}
  assert len(outputs) > 1  # the prompts and inputs change the answers


def test_length_buckets_give_the_same_answers(served):
  """--length_buckets: device calls padded to the batch's bucket, same outputs."""
  limits = serve.Limits(max_batch=8, max_wait_ms=20, max_input_tokens=32, max_decode_tokens=12,
                        length_buckets=True)
  assert limits.input_buckets() == [8, 16, 32]
  svc = serve.PromptService(served['model'].config, served['frozen'], None,
                            [str(served['lib'])], limits)
  bank = svc.bank
  for name in bank.names[:2]:
    for text in INPUTS:
      ids = svc.tokens(text, 'x', 32)
      assert svc._predict_rows(bank, [(bank.id_of(name), ids)]) == [_offline(served, name, text)]  # pylint: disable=protected-access
  assert svc._batch([(0, [5] * 10)], False)['encoder_input_tokens'].shape == (8, 16)  # pylint: disable=protected-access


def test_label_scores_equal_offline(served):
  name = 'synthetic_majority_yesno'
  labels = ['yes', 'no']

  async def main():
    async with aiohttp.ClientSession() as s:
      return await _post(s, served['url'], {'prompt': name, 'inputs': INPUTS[2], 'labels': labels})
  status, body = asyncio.run(main())
  assert status == 200, body
  want = _offline(served, name, INPUTS[2], labels)
  assert [body['scores'][w] for w in labels] == pytest.approx(want, rel=1e-5)
  assert body['prediction'] == labels[int(np.argmax(want))]


def test_bad_requests_get_4xx_and_the_rest_are_served(served):
  url = served['url']
  name = served['service'].bank.names[0]
  bad = [
      (None, b'{"prompt": ', 400, 'not valid JSON'),
      (None, b'[1, 2]', 400, 'JSON object'),
      ({'prompt': 'nope', 'inputs': 'x'}, None, 404, 'unknown prompt'),
      ({'prompt': name, 'inputs': '  '}, None, 400, 'empty'),
      ({'prompt': name, 'inputs': 'x' * 100}, None, 413, 'at most 32'),
      ({'prompt': name, 'inputs': 7}, None, 400, 'string'),
      ({'prompt': name}, None, 400, 'missing'),
      ({'prompt': name, 'inputs': 'x', 'extra': 1}, None, 400, 'unknown fields'),
      ({'prompt': name, 'inputs': 'x', 'labels': []}, None, 400, 'labels'),
      ({'prompt': name, 'inputs': []}, None, 400, 'list of 1'),
  ]

  async def main():
    async with aiohttp.ClientSession() as s:
      good = [_post(s, url, {'prompt': name, 'inputs': t}) for t in INPUTS]
      wrong = [_post(s, url, body, raw) for body, raw, _, _ in bad]
      results = await asyncio.gather(*good, *wrong)
      async with s.get(url + '/nowhere') as r:
        missing = r.status
      async with s.get(url + '/health') as r:
        return results, missing, r.status
  results, missing, health = asyncio.run(main())
  for (status, body), text in zip(results[:len(INPUTS)], INPUTS):
    assert status == 200 and body['outputs'] == [_offline(served, name, text)]
  for (status, body), (_, _, want, words) in zip(results[len(INPUTS):], bad):
    assert status == want and words in body['error'], (status, body)
  assert missing == 404 and health == 200


def test_reload_adds_prompts_and_refuses_another_models(served):
  url, lib = served['url'], served['lib']
  model, frozen = served['model'], served['frozen']
  emb = frozen['token_embedder']['embedding']
  _save(str(lib / 'synthetic_copy_echo'), 'synthetic_copy_echo', emb[10:16], model,
        served['weights'])

  async def reload():
    async with aiohttp.ClientSession() as s:
      async with s.post(url + '/prompts/reload') as r:
        out = r.status, await r.json()
      status, body = await _post(s, url, {'prompt': 'synthetic_copy_echo', 'inputs': 'copy: hi'})
      return out, status, body
  (status, body), pstatus, pbody = asyncio.run(reload())
  assert status == 200 and body['added'] == ['synthetic_copy_echo'] and body['prompts'] == 4
  assert pstatus == 200 and pbody['outputs'] == [_offline(served, 'synthetic_copy_echo',
                                                          'copy: hi')]
  # A prompt of another width: refused, the four prompts stay served.
  bad = lib / 'wide'
  info = files.PromptInfo(task='synthetic_copy_again', model={**model.config.describe(),
                                                              'emb_dim': 128}, prompt_length=2)
  files.save_prompt_folder(str(bad), np.zeros((2, 128), np.float32), info)
  try:
    (status, body), pstatus, _ = asyncio.run(reload())
  finally:
    shutil.rmtree(bad)
  assert status == 409 and 'emb_dim 128' in body['error'] and 'still serving' in body['error']
  assert pstatus == 200 and len(served['service'].bank.names) == 4
  os.listdir(lib)  # the library is intact


def test_t5x_serve_command(served):
  """The command as users type it: gin model file, a library, a port."""
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  proc = subprocess.Popen(
      [sys.executable, '-m', 'prompt_transfer.cli', 'serve',
       '--gin_file=models/t5_1_1_tiny_synthetic.gin', '--prompts', str(served['lib']),
       '--port', str(port), '--max_batch', '4', '--max_input_tokens', '32'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 180
    while True:
      try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=5) as r:
          assert json.load(r)['status'] == 'ok'
        break
      except OSError:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, 'server did not come up'
        time.sleep(0.5)
    name = served['service'].bank.names[0]
    req = urllib.request.Request(f'http://127.0.0.1:{port}/predict', method='POST',
                                 data=json.dumps({'prompt': name, 'inputs': 'copy: hi'}).encode(),
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=60) as r:
      assert json.load(r)['outputs'] == [_offline(served, name, 'copy: hi')]
  finally:
    proc.terminate()
    out = proc.communicate(timeout=60)[0]
  assert 'serving on http://127.0.0.1' in out and 'prompts of t5_1_1_tiny_synthetic ready' in out, out
  assert 'Traceback' not in out, out
