#!/usr/bin/env python
"""`t5x serve` under a bounded local load (run by hand; prints JSON).

K prompts of one stand-in model (rows of its embedding table, sidecars
naming the model) are served on 127.0.0.1; --clients concurrent clients
send --requests requests in all, each for a random prompt and input, with
--bad_fraction of them malformed in one of several ways (bad JSON, unknown
prompt, empty or over-long input, wrong types). Reports requests/s, p50 /
p99 latency, rows per device call, that every request got exactly one
answer, that every good answer equals offline predict_batch for its row,
and that every bad request got a 4xx.

  python bench/serve_load.py --json bench/results/serve_load_cpu2.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time

import aiohttp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prompt_transfer import load_pretrained, serve  # pylint: disable=wrong-import-position
from prompt_transfer.prompts import files  # pylint: disable=wrong-import-position

BAD = [
    (None, '{"prompt": ', 400),
    ({'prompt': 'no_such_prompt', 'inputs': 'copy: a'}, None, 404),
    ({'prompt': 'p0', 'inputs': ' '}, None, 400),
    ({'prompt': 'p0', 'inputs': 'x' * 400}, None, 413),
    ({'prompt': 'p0', 'inputs': 5}, None, 400),
    ({'prompt': 'p0', 'inputs': 'a', 'temperature': 1}, None, 400),
]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', default='pkg://assets/t5_1_1_mini_synthetic')
  parser.add_argument('--prompts', type=int, default=8)
  parser.add_argument('--clients', type=int, default=32)
  parser.add_argument('--requests', type=int, default=2000)
  parser.add_argument('--bad_fraction', type=float, default=0.05)
  parser.add_argument('--max_batch', type=int, default=32)
  parser.add_argument('--max_wait_ms', type=float, default=5.0)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  cli.import_modules([])
  model, frozen = load_pretrained(args.checkpoint)
  emb = np.asarray(frozen['token_embedder']['embedding'])
  weights = files.weights_fingerprint(emb)
  rs = np.random.RandomState(0)
  lib = tempfile.mkdtemp(prefix='serve_load_')
  for k in range(args.prompts):
    info = files.PromptInfo(task=f'p{k}', model=model.config.describe(), prompt_length=20,
                            module='Prompt', weights=weights,
                            vocabulary='ByteVocabulary(, size=259)')
    files.save_prompt_folder(os.path.join(lib, f'p{k}'), emb[rs.randint(3, 250, size=20)], info)
  limits = serve.Limits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                        max_input_tokens=64, max_decode_tokens=16)
  t0 = time.time()
  service = serve.PromptService(model.config, frozen, None, [lib], limits)
  server = serve.Server(service, model.config.name)
  url, stop = serve.serve_in_background(server)
  ready_s = time.time() - t0
  rng = random.Random(0)
  pool = [f'copy: {"".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 12)))}'
          for _ in range(40)]
  jobs = []
  for i in range(args.requests):
    if rng.random() < args.bad_fraction:
      jobs.append(('bad', rng.randrange(len(BAD))))
    else:
      jobs.append(('good', (f'p{rng.randrange(args.prompts)}', rng.choice(pool))))
  answers: list = [[] for _ in jobs]
  latencies: list = []

  async def client(session, mine):
    for i in mine:
      kind, what = jobs[i]
      if kind == 'good':
        body, raw = {'prompt': what[0], 'inputs': what[1]}, None
      else:
        body, raw, _ = BAD[what]
      t = time.perf_counter()
      async with session.post(url + '/predict', data=raw if raw is not None else json.dumps(body),
                              headers={'Content-Type': 'application/json'}) as r:
        answers[i].append((r.status, await r.json()))
      latencies.append(time.perf_counter() - t)

  async def run():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.clients)) as s:
      await asyncio.gather(*[client(s, range(c, len(jobs), args.clients))
                             for c in range(args.clients)])

  start = time.perf_counter()
  asyncio.run(run())
  wall = time.perf_counter() - start
  stop()
  # Offline reference for every (prompt, input) that was asked.
  bank = service.bank
  offline = {}
  for kind, what in jobs:
    if kind == 'good' and what not in offline:
      ids = service.tokens(what[1], 'x', limits.max_input_tokens)
      offline[what] = service._predict_rows(bank, [(bank.id_of(what[0]), ids)])[0]  # pylint: disable=protected-access
  once = all(len(a) == 1 for a in answers)
  good_ok = all(a[0][0] == 200 and a[0][1]['outputs'] == [offline[what]]
                for (kind, what), a in zip(jobs, answers) if kind == 'good' and a)
  bad_ok = all(a[0][0] == BAD[what][2] for (kind, what), a in zip(jobs, answers)
               if kind == 'bad' and a)
  lat = np.sort(np.asarray(latencies)) * 1000
  calls = server.predictor.batches
  result = {
      'checkpoint': args.checkpoint, 'settings': {k: v for k, v in vars(args).items()
                                                  if k != 'json'},
      'ready_seconds': round(ready_s, 1), 'wall_seconds': round(wall, 2),
      'requests_per_s': round(len(jobs) / wall, 1),
      'latency_ms': {'p50': round(float(np.percentile(lat, 50)), 1),
                     'p99': round(float(np.percentile(lat, 99)), 1),
                     'max': round(float(lat[-1]), 1)},
      'device_calls': calls, 'rows_per_call': round(server.predictor.rows / max(calls, 1), 2),
      'bad_requests': sum(k == 'bad' for k, _ in jobs),
      'every_request_answered_once': once, 'good_answers_equal_offline': good_ok,
      'bad_requests_got_their_4xx': bad_ok,
  }
  text = json.dumps(result, indent=1)
  print(text)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(text + '\n')
  return 0 if (once and good_ok and bad_ok) else 1


if __name__ == '__main__':
  sys.exit(main())
