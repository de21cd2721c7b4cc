"""`t5x curves RUN_DIR...`: learning curves of runs side by side (table + PNG).

Reads each run's metrics.jsonl; prints first/last loss and the last eval
metrics, and draws loss (and eval metrics) against steps.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from prompt_transfer import fileio

HELP = 'Compare runs: first/last loss, eval metrics, and learning curves as a PNG.'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('run_dirs', nargs='+', help='MODEL_DIRs holding metrics.jsonl.')
  parser.add_argument('--png', default=None, help='Write the learning curves here.')
  parser.add_argument('--json', default=None, help='Write the summary as JSON here.')


def read_metrics(run_dir: str) -> list:
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: is {run_dir!r} a MODEL_DIR of `t5x train`?')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize(run_dirs: Sequence[str]) -> list:
  rows = []
  for d in run_dirs:
    all_recs = read_metrics(d)
    recs = [r for r in all_recs if 'loss' in r]
    evals = [r for r in all_recs if any(k.startswith('eval/') for k in r)]
    rows.append({
        'run': d,
        'steps': recs[-1]['step'] if recs else 0,
        'first_loss': recs[0]['loss'] if recs else float('nan'),
        'last_loss': recs[-1]['loss'] if recs else float('nan'),
        'eval': {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith('eval/')},
        'eval_at_start': {k: v for k, v in (evals[0] if evals and evals[0]['step'] == 0
                                             else {}).items() if k.startswith('eval/')},
        'wall_seconds': recs[-1].get('elapsed_seconds') if recs else None,
    })
  return rows


def plot(run_dirs: Sequence[str], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for d in run_dirs:
    recs = [r for r in read_metrics(d) if 'loss' in r]
    ax.plot([r['step'] for r in recs], [r['loss'] for r in recs], label=os.path.basename(
        os.path.normpath(d)))
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (per target token)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fileio.save_figure(fig, path, dpi=120)
  plt.close(fig)


def run(args: argparse.Namespace, gin_bindings: Sequence[str]) -> int:
  del gin_bindings
  rows = summarize(args.run_dirs)
  width = max(len(r['run']) for r in rows)
  print(f'{"run":<{width}}  {"steps":>6}  {"first loss":>10}  {"last loss":>10}  '
        'eval at start -> at end')
  for r in rows:
    start = ', '.join(f'{k[5:]} {v:.4g}' for k, v in sorted(r['eval_at_start'].items()))
    ev = ', '.join(f'{k[5:]} {v:.4g}' for k, v in sorted(r['eval'].items()))
    print(f'{r["run"]:<{width}}  {r["steps"]:>6}  {r["first_loss"]:>10.4f}  '
          f'{r["last_loss"]:>10.4f}  {start or "-"} -> {ev or "-"}')
  if args.json:
    fileio.atomic_write_text(args.json, json.dumps(rows, indent=1))
  if args.png:
    plot(args.run_dirs, args.png)
    print(f'learning curves: {args.png}')
  return 0
