"""`t5x serve`: one frozen model, a library of prompts, an HTTP JSON API.

  t5x serve --gin_file=models/t5_1_1_tiny_synthetic.gin --prompts /runs --port 8000

  GET  /health                 {"status": "ok", "prompts": K, "model": ..., "served": N}
  GET  /prompts                [{"name", "task", "length", "source"}, ...]
  POST /predict                {"prompt": NAME, "inputs": TEXT or [TEXT, ...]}
                               -> {"prompt": NAME, "outputs": [TEXT, ...]}
                               {"prompt": NAME, "inputs": TEXT, "labels": [WORD, ...]}
                               -> {"prompt", "scores": {WORD: log-likelihood}, "prediction"}
  POST /prompts/reload         re-reads the library folders: new prompts are added,
                               changed ones replaced; {"prompts": K, "added": [...], ...}

Requests for different prompts are micro-batched: rows wait at most
--max_wait_ms for others and go to the device together, up to --max_batch
rows, each with its own prompt (a PromptBank, many_prompts.py). Every device
call has one shape (max_batch x max_input_tokens, decoding max_decode_tokens),
so nothing recompiles while serving. A reload builds the new bank and compiles
its programs while the old bank keeps serving, then swaps them (a reload that
changes no prompt length keeps the compiled programs).

Inputs are the task's preprocessed text (what `t5x infer` shows as
"inputs"). A bad request gets a 4xx with a message; nothing a client sends
stops the server. aiohttp serves HTTP (no hand-written parsing); the model
runs in one worker thread so the event loop keeps accepting requests.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import threading
import time
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

HELP = 'Serve prompts of one frozen model over HTTP, micro-batching requests across prompts.'
EOS, PAD = 1, 0
log = logging.getLogger('prompt_transfer.serve')


class RequestError(Exception):
  """A client's mistake: answered with `status` and the message."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class Limits:
  max_batch: int = 32
  max_wait_ms: float = 5.0
  max_input_tokens: int = 256
  max_decode_tokens: int = 32
  max_inputs_per_request: int = 64
  max_labels: int = 32
  # Inputs padded to the smallest power of two (from 8) that holds the longest
  # row of the device call, not to max_input_tokens: one program per bucket.
  length_buckets: bool = False

  def input_buckets(self) -> List[int]:
    if not self.length_buckets:
      return [self.max_input_tokens]
    return [2 ** k for k in range(3, 31) if 2 ** k < self.max_input_tokens] + [self.max_input_tokens]


class MicroBatcher:
  """Collects rows from concurrent requests and runs them together.

  `run(rows) -> results` is called in one worker thread with at most
  max_batch rows, after the first row waited max_wait_ms for company.
  """

  def __init__(self, run: Callable[[list], list], limits: Limits,
               executor: concurrent.futures.Executor):
    self._run, self._limits, self._executor = run, limits, executor
    self._queue: Optional[asyncio.Queue] = None
    self.batches = 0
    self.rows = 0

  async def submit(self, row: Any) -> Any:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    await self._queue.put((row, future))
    return await future

  async def loop(self) -> None:
    self._queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    while True:
      items = [await self._queue.get()]
      deadline = loop.time() + self._limits.max_wait_ms / 1000
      while len(items) < self._limits.max_batch:
        try:
          items.append(self._queue.get_nowait())
          continue
        except asyncio.QueueEmpty:
          pass
        left = deadline - loop.time()
        if left <= 0:
          break
        try:
          items.append(await asyncio.wait_for(self._queue.get(), left))
        except asyncio.TimeoutError:
          break
      try:
        results = await loop.run_in_executor(self._executor, self._run, [r for r, _ in items])
      except Exception as e:  # pylint: disable=broad-except  # answered as 500s; serving goes on
        log.exception('device call failed')
        for _, future in items:
          if not future.done():
            future.set_exception(e)
        continue
      self.batches += 1
      self.rows += len(items)
      for (_, future), result in zip(items, results):
        if not future.done():  # a client that went away leaves a cancelled future
          future.set_result(result)


def resolve_vocabulary(spec: Optional[str], sidecar_texts: Sequence[str]) -> Any:
  """The tokeniser: --vocabulary ('byte' or a SentencePiece model file), else
  the one the prompts' sidecars name (they must agree), else the default T5
  vocabulary (VOCABULARY_PATH / T5_VOCAB)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  if spec:
    return seqio.ByteVocabulary() if spec == 'byte' else seqio.SentencePieceVocabulary(spec)
  named = sorted({t for t in sidecar_texts if t})
  if len(named) > 1:
    raise ValueError(f'The prompts name different vocabularies {named}; serve one model '
                     'and vocabulary at a time, or pass --vocabulary.')
  if named:
    kind, _, rest = named[0].partition('(')
    path = rest.rsplit(', size=', 1)[0]
    if kind == 'ByteVocabulary':
      return seqio.ByteVocabulary()
    if kind == 'SentencePieceVocabulary' and path:
      return seqio.SentencePieceVocabulary(path)
  return tasks_lib.core.DEFAULT_VOCABULARY.resolve()


class PromptService:
  """The model side: the bank, tokenisation, and the two batched programs."""

  def __init__(self, config: Any, frozen: Any, vocabulary: Any, library: Sequence[str],
               limits: Limits, step: Optional[int] = None):
    """vocabulary: a seqio vocabulary, or a resolve_vocabulary spec / None."""
    from prompt_transfer.analysis import library as library_lib  # pylint: disable=g-import-not-at-top
    if vocabulary is None or isinstance(vocabulary, str):
      infos = [info for _, info in library_lib.load_library(list(library), step).values()]
      vocabulary = resolve_vocabulary(vocabulary, [i.vocabulary for i in infos])
    self.config, self.frozen, self.vocab = config, frozen, vocabulary
    self.library, self.step, self.limits = list(library), step, limits
    self.bank = None
    self._lock = threading.Lock()  # one reload at a time
    self.bank = self._build()

  # -- the bank -------------------------------------------------------------
  def _build(self, capacity: Optional[int] = None) -> Any:
    from prompt_transfer import many_prompts  # pylint: disable=g-import-not-at-top
    from prompt_transfer.analysis import library  # pylint: disable=g-import-not-at-top
    lib = library.load_library(self.library, self.step)
    paths = library.find_prompt_files(self.library, self.step)
    k = len(lib)
    capacity = max(capacity or 0, 2 * k)  # spare rows: the bank's row count changes less often
    bank = many_prompts.load_bank(lib, self.config, self.frozen, self.vocab, capacity=capacity)
    bank.sources = [str(paths[n]) for n in bank.names]
    old = self.bank
    if (old is not None and old.model.prompt_module().num_prompts == capacity
        and old.model.prompt_module().length == bank.model.prompt_module().length
        and old.model.prompt_module().lengths == bank.model.prompt_module().lengths):
      bank.model = old.model  # same shapes and masks: the compiled programs carry over
    self._warm_up(bank)
    return bank

  def _warm_up(self, bank: Any) -> None:
    """Compiles both programs (per length bucket) before the bank serves."""
    for width in self.limits.input_buckets():
      row = [3] * (width - 1) + [EOS]
      self._predict_rows(bank, [(0, row)])
      self._score_rows(bank, [(0, row, [EOS])])

  def reload(self) -> dict:
    """Re-reads the library; the old bank serves until the new one is ready.
    A prompt of another model leaves the old bank in place (RequestError 409)."""
    from prompt_transfer.analysis.library import IncompatiblePromptError  # pylint: disable=g-import-not-at-top
    with self._lock:
      before = dict(zip(self.bank.names, self.bank.sources))
      capacity = self.bank.model.prompt_module().num_prompts
      try:
        bank = self._build(capacity if len(before) * 2 <= capacity else None)
      except (IncompatiblePromptError, FileNotFoundError, ValueError) as e:
        raise RequestError(f'reload refused, still serving the previous prompts: {e}', 409)
      self.bank = bank
    added = [n for n in bank.names if n not in before]
    removed = [n for n in before if n not in bank.names]
    log.info('reloaded: %d prompts (added %s, removed %s)', len(bank.names), added, removed)
    return {'prompts': len(bank.names), 'added': added, 'removed': removed}

  # -- requests -------------------------------------------------------------
  def tokens(self, text: Any, what: str, limit: int) -> List[int]:
    if not isinstance(text, str):
      raise RequestError(f'{what} must be a string; got {type(text).__name__}.')
    if not text.strip():
      raise RequestError(f'{what} is empty.')
    ids = [int(t) for t in self.vocab.encode(text)] + [EOS]
    if len(ids) > limit:
      raise RequestError(f'{what} is {len(ids)} tokens with EOS; the server takes at most '
                         f'{limit} (--max_input_tokens / --max_decode_tokens).', 413)
    return ids

  def prompt_id(self, bank: Any, name: Any) -> int:
    if not isinstance(name, str):
      raise RequestError('"prompt" must be the name of a served prompt (GET /prompts).')
    try:
      return bank.id_of(name)
    except KeyError:
      raise RequestError(f'unknown prompt {name!r}; served: {bank.names}', 404) from None

  # -- the device calls (worker thread) ---------------------------------------
  def _batch(self, rows: list, targets: bool) -> dict:
    lim = self.limits
    longest = max(len(row[1]) for row in rows)
    width = next(b for b in lim.input_buckets() if b >= longest)
    enc = np.zeros((lim.max_batch, width), np.int32)
    dec = np.zeros((lim.max_batch, lim.max_decode_tokens), np.int32)
    tgt = np.zeros_like(dec)
    ids = np.zeros((lim.max_batch,), np.int32)
    for i, row in enumerate(rows):
      ids[i], enc[i, :len(row[1])] = row[0], row[1]
      if targets:
        tgt[i, :len(row[2])] = row[2]
        dec[i, 1:len(row[2])] = row[2][:-1]
    return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
            'decoder_target_tokens': tgt, 'task_ids': ids}

  def _predict_rows(self, bank: Any, rows: list) -> list:
    tokens = np.asarray(bank.model.predict_batch(bank.params, self._batch(rows, False)))
    out = []
    for row in tokens[:len(rows)]:
      ids = []
      for t in row:
        if int(t) == EOS:
          break
        if int(t) != PAD:
          ids.append(int(t))
      out.append(self.vocab.decode(ids))
    return out

  def _score_rows(self, bank: Any, rows: list) -> list:
    scores = np.asarray(bank.model.score_batch(bank.params, self._batch(rows, True)))
    return [float(s) for s in scores[:len(rows)]]

  def predict_rows(self, rows: list) -> list:
    """rows: (bank, prompt id, input ids); one bank per call (see _grouped)."""
    return _grouped(rows, self._predict_rows)

  def score_rows(self, rows: list) -> list:
    return _grouped(rows, self._score_rows)


def _grouped(rows: list, fn: Callable[[Any, list], list]) -> list:
  """Rows queued across a reload may hold two banks: one call per bank."""
  out: list = [None] * len(rows)
  banks: dict = {}
  for i, row in enumerate(rows):
    banks.setdefault(id(row[0]), (row[0], []))[1].append(i)
  for bank, idx in banks.values():
    for i, r in zip(idx, fn(bank, [rows[i][1:] for i in idx])):
      out[i] = r
  return out


class Server:
  """The aiohttp application around a PromptService."""

  def __init__(self, service: PromptService, model_name: str = ''):
    self.service, self.limits, self.model_name = service, service.limits, model_name
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='device')
    self.predictor = MicroBatcher(service.predict_rows, self.limits, self.executor)
    self.scorer = MicroBatcher(service.score_rows, self.limits, self.executor)
    self.served = 0
    self.refused = 0
    self._tasks: list = []

  def app(self) -> Any:
    from aiohttp import web  # pylint: disable=g-import-not-at-top
    @web.middleware
    async def errors(request: Any, handler: Callable) -> Any:
      return await self._errors(request, handler)

    app = web.Application(client_max_size=1 << 20, middlewares=[errors])
    app.add_routes([web.get('/health', self.health), web.get('/prompts', self.prompts),
                    web.post('/predict', self.predict),
                    web.post('/prompts/reload', self.reload)])
    app.on_startup.append(self._start)
    app.on_cleanup.append(self._stop)
    return app

  async def _start(self, _app: Any) -> None:
    self._tasks = [asyncio.ensure_future(self.predictor.loop()),
                   asyncio.ensure_future(self.scorer.loop()),
                   asyncio.ensure_future(self._report())]

  async def _stop(self, _app: Any) -> None:
    for task in self._tasks:
      task.cancel()
    self.executor.shutdown(wait=False, cancel_futures=True)

  async def _report(self, every: float = 30.0) -> None:
    last = (0, 0)
    while True:
      await asyncio.sleep(every)
      now = (self.served, self.predictor.rows + self.scorer.rows)
      if now != last:
        batches = self.predictor.batches + self.scorer.batches
        log.info('served %d requests (%d refused), %d rows in %d device calls (%.1f rows/call)',
                 self.served, self.refused, now[1], batches, now[1] / max(batches, 1))
        last = now

  async def _errors(self, request: Any, handler: Callable) -> Any:
    from aiohttp import web  # pylint: disable=g-import-not-at-top
    try:
      response = await handler(request)
      return response
    except RequestError as e:
      self.refused += 1
      return web.json_response({'error': str(e)}, status=e.status)
    except web.HTTPException as e:  # aiohttp's own (404 route, 405 method, 413 body)
      self.refused += 1
      return web.json_response({'error': e.reason or e.text}, status=e.status)
    except Exception as e:  # pylint: disable=broad-except  # never let a request stop the server
      log.exception('request %s %s failed', request.method, request.path)
      return web.json_response({'error': f'internal error: {type(e).__name__}: {e}'}, status=500)

  async def _json(self, request: Any) -> dict:
    try:
      body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
      raise RequestError(f'the body is not valid JSON: {e}') from None
    if not isinstance(body, dict):
      raise RequestError('the body must be a JSON object {"prompt": ..., "inputs": ...}.')
    return body

  async def health(self, _request: Any) -> Any:
    from aiohttp import web  # pylint: disable=g-import-not-at-top
    return web.json_response({'status': 'ok', 'prompts': len(self.service.bank.names),
                              'model': self.model_name, 'served': self.served})

  async def prompts(self, _request: Any) -> Any:
    from aiohttp import web  # pylint: disable=g-import-not-at-top
    bank = self.service.bank
    return web.json_response([{'name': n, 'task': i.task, 'length': i.prompt_length or None,
                               'source': s} for n, i, s in zip(bank.names, bank.infos,
                                                               bank.sources)])

  async def reload(self, _request: Any) -> Any:
    from aiohttp import web  # pylint: disable=g-import-not-at-top
    loop = asyncio.get_running_loop()
    # Not on the device thread: building and compiling must not stall serving.
    result = await loop.run_in_executor(None, self.service.reload)
    return web.json_response(result)

  async def predict(self, request: Any) -> Any:
    from aiohttp import web  # pylint: disable=g-import-not-at-top
    body = await self._json(request)
    unknown = sorted(set(body) - {'prompt', 'inputs', 'labels'})
    if unknown:
      raise RequestError(f'unknown fields {unknown}; expected "prompt", "inputs" and '
                         'optionally "labels".')
    bank, lim, svc = self.service.bank, self.limits, self.service
    k = svc.prompt_id(bank, body.get('prompt'))
    if 'inputs' not in body:
      raise RequestError('"inputs" is missing: a string or a list of strings.')
    if 'labels' in body:
      labels = body['labels']
      if not (isinstance(labels, list) and labels and len(labels) <= lim.max_labels):
        raise RequestError(f'"labels" must be a list of 1 to {lim.max_labels} strings.')
      ids = svc.tokens(body['inputs'], '"inputs"', lim.max_input_tokens)
      targets = [svc.tokens(w, f'label {w!r}', lim.max_decode_tokens) for w in labels]
      scores = await asyncio.gather(*[self.scorer.submit((bank, k, ids, t)) for t in targets])
      by_label = dict(zip(labels, scores))
      self.served += 1
      return web.json_response({'prompt': body['prompt'], 'scores': by_label,
                                'prediction': labels[int(np.argmax(scores))]})
    inputs = body['inputs']
    single = isinstance(inputs, str)
    texts = [inputs] if single else inputs
    if not isinstance(texts, list) or not texts or len(texts) > lim.max_inputs_per_request:
      raise RequestError(f'"inputs" must be a string or a list of 1 to '
                         f'{lim.max_inputs_per_request} strings.')
    rows = [svc.tokens(t, f'inputs[{i}]' if not single else '"inputs"', lim.max_input_tokens)
            for i, t in enumerate(texts)]
    outputs = await asyncio.gather(*[self.predictor.submit((bank, k, r)) for r in rows])
    self.served += 1
    return web.json_response({'prompt': body['prompt'], 'outputs': list(outputs)})


def serve_in_background(server: Server, host: str = '127.0.0.1', port: int = 0
                        ) -> tuple:
  """Runs `server` on its own event loop in a daemon thread (tests, benchmarks).
  Returns (base URL, stop()). port 0: a free port."""
  import queue  # pylint: disable=g-import-not-at-top
  from aiohttp import web  # pylint: disable=g-import-not-at-top
  loop = asyncio.new_event_loop()
  runner = web.AppRunner(server.app(), access_log=None)
  ready: queue.Queue = queue.Queue()

  def main() -> None:
    asyncio.set_event_loop(loop)
    try:
      loop.run_until_complete(runner.setup())
      site = web.TCPSite(runner, host, port)
      loop.run_until_complete(site.start())
      ready.put(site._server.sockets[0].getsockname()[1])  # pylint: disable=protected-access
    except BaseException as e:  # pylint: disable=broad-except
      ready.put(e)
      return
    loop.run_forever()
    loop.run_until_complete(runner.cleanup())

  thread = threading.Thread(target=main, daemon=True, name='serve')
  thread.start()
  got = ready.get(timeout=120)
  if isinstance(got, BaseException):
    raise got

  def stop() -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
  return f'http://{host}:{got}', stop


# ---------------------------------------------------------------------------
# `t5x serve`
# ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  parser.add_argument('--prompts', action='append', required=True,
                      help='A prompt library: run folders, prompt files or folders of them '
                      '(repeatable). Each sidecar is checked against the model.')
  parser.add_argument('--step', type=int, default=None, help='Numpy checkpoint step of runs.')
  parser.add_argument('--vocabulary', default=None,
                      help="'byte' or a SentencePiece model file (default: what the prompts' "
                      'sidecars name, else the T5 vocabulary of VOCABULARY_PATH).')
  parser.add_argument('--host', default='127.0.0.1')
  parser.add_argument('--port', type=int, default=8000)
  for field in dataclasses.fields(Limits):
    if isinstance(field.default, bool):
      parser.add_argument(f'--{field.name}', action='store_true', help='Pad each device call '
                          'to the smallest power of two holding its longest input.')
    else:
      parser.add_argument(f'--{field.name}', type=type(field.default), default=field.default)
  cli._add_common_flags(parser)  # pylint: disable=protected-access


def build_server(args: argparse.Namespace) -> Server:
  """The server of a parsed `t5x serve` (gin already parsed)."""
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.pretrained import load_frozen_params  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import configurables  # pylint: disable=g-import-not-at-top
  config = configurables.model_config()
  frozen = load_frozen_params(config, cli._macro('CHECKPOINT_PATH'))  # pylint: disable=protected-access
  limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
  t0 = time.time()
  service = PromptService(config, frozen, args.vocabulary, args.prompts, limits, args.step)
  log.info('%d prompts of %s ready in %.1f s (compiled for %d x %d tokens)',
           len(service.bank.names), config.name, time.time() - t0, limits.max_batch,
           limits.max_input_tokens)
  return Server(service, config.name)


def run(args: argparse.Namespace, gin_bindings: Sequence[str]) -> int:
  from aiohttp import web  # pylint: disable=g-import-not-at-top
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  if not (args.gin_file or args.gin_bindings or gin_bindings):
    raise cli.UsageError('t5x serve needs the frozen model: add its gin file, e.g. '
                         '--gin_file=models/t5_1_1_tiny_synthetic.gin.')
  cli.import_modules(args.module_import)
  cli.parse_gin(args, list(gin_bindings), args.command)
  cli._configure_tasks()  # pylint: disable=protected-access
  # Our logger only: the root logger at INFO would also print JAX's backend probing.
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter('[prompt-transfer] %(asctime)s %(message)s', '%H:%M:%S'))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  server = build_server(args)
  log.info('serving on http://%s:%d (GET /health, GET /prompts, POST /predict, '
           'POST /prompts/reload)', args.host, args.port)
  web.run_app(server.app(), host=args.host, port=args.port, print=None,
              access_log=None)
  return 0
