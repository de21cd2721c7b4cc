"""`t5x curves RUN_DIR...`: learning curves of runs side by side (tables + PNG).

Reads each run's metrics.jsonl. Prints first/last loss and the eval metrics
at the start and the end of each run, then, for each eval metric, how the
runs that report it compare: the score at step 0 (zero-shot: what a transferred
prompt buys before any training), the mean over all evaluations (the area
under the score-vs-step curve, divided by the number of evaluations), the best,
and the first step (and the training FLOPs spent by then, `train_flops_total`)
at or above a threshold. The PNG draws training loss and every eval metric
against steps, or with `--x flops` against cumulative training FLOPs, so runs
of different cost per step (FPT's partial models) compare on one axis.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

from prompt_transfer import fileio

HELP = 'Compare runs: loss, eval scores against steps, zero-shot and steps to a threshold; PNG.'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('run_dirs', nargs='+', help='MODEL_DIRs holding metrics.jsonl.')
  parser.add_argument('--png', default=None, help='Write the learning curves here.')
  parser.add_argument('--json', default=None, help='Write the summary as JSON here.')
  parser.add_argument('--threshold', type=float, default=None,
                      help='Score for "first step at or above" (in the metric\'s units; '
                           'default: 90%% of the best score any run reached).')
  parser.add_argument('--x', choices=('step', 'flops'), default='step',
                      help='The PNG\'s x axis: steps or cumulative training FLOPs.')


def read_metrics(run_dir: str) -> list:
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: is {run_dir!r} a MODEL_DIR of `t5x train`?')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def eval_curves(records: Sequence[dict]) -> dict:
  """{metric: [(step, value), ...]} of a run's eval lines, 'eval/' dropped."""
  curves: dict = {}
  for r in records:
    for k, v in r.items():
      if k.startswith('eval/'):
        curves.setdefault(k[len('eval/'):], []).append((int(r['step']), float(v)))
  return {k: sorted(v) for k, v in curves.items()}


def _flops(records: Sequence[dict]) -> dict:
  out = {int(r['step']): float(r['train_flops_total'])
         for r in records if 'train_flops_total' in r}
  return {0: 0.0, **out} if out else {}


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
        'curves': eval_curves(all_recs),
        # Cumulative training FLOPs at each logged step (step 0: none spent;
        # empty for runs that do not log them).
        'flops': _flops(all_recs),
    })
  return rows


def compare(rows: Sequence[dict], threshold: Optional[float] = None) -> dict:
  """Per eval metric, per run: score at step 0, mean over evaluations, best,
  last, and the first step at or above the threshold (None: never)."""
  out: dict = {}
  metrics = sorted({m for r in rows for m in r['curves']})
  flops = {r['run']: r.get('flops', {}) for r in rows}
  for m in metrics:
    runs = [(r['run'], r['curves'][m]) for r in rows if m in r['curves']]
    best = max(v for _, c in runs for _, v in c)
    level = threshold if threshold is not None else 0.9 * best
    out[m] = {'threshold': level, 'runs': {}}
    for name, curve in runs:
      values = [v for _, v in curve]
      first = next((s for s, v in curve if v >= level), None)
      out[m]['runs'][name] = {
          'at_step_0': next((v for s, v in curve if s == 0), None),
          'mean': sum(values) / len(values),
          'best': max(values),
          'last': values[-1],
          'evaluations': len(values),
          'first_step_at_threshold': first,
          'flops_at_threshold': flops[name].get(first) if first is not None else None,
          'train_flops_total': max(flops[name].values()) if flops[name] else None,
      }
  return out


def _fmt(value: Any) -> str:
  if value is None:
    return '-'
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def print_comparison(comparison: dict) -> None:
  for metric, c in comparison.items():
    runs = c['runs']
    width = max(len(n) for n in runs)
    print(f'\n{metric}: threshold {c["threshold"]:.4g}')
    flops = any(s.get('train_flops_total') for s in runs.values())
    print(f'{"run":<{width}}  {"at step 0":>9}  {"mean":>7}  {"best":>7}  {"last":>7}  '
          f'{"first step >= threshold":>23}' +
          (f'  {"FLOPs by then":>13}  {"FLOPs in all":>12}' if flops else ''))
    for name, s in runs.items():
      never = s['first_step_at_threshold'] is None
      line = (f'{name:<{width}}  {_fmt(s["at_step_0"]):>9}  {_fmt(s["mean"]):>7}  '
              f'{_fmt(s["best"]):>7}  {_fmt(s["last"]):>7}  '
              f'{"never" if never else s["first_step_at_threshold"]:>23}')
      if flops:
        line += f'  {_fmt(s.get("flops_at_threshold")):>13}  {_fmt(s.get("train_flops_total")):>12}'
      print(line)


def plot(rows: Sequence[dict], path: str, x: str = 'step') -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  has_eval = any(r['curves'] for r in rows)
  fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(12 if has_eval else 7, 4),
                           squeeze=False)
  loss_ax = axes[0][0]
  for r in rows:
    label = os.path.basename(os.path.normpath(r['run']))
    recs = [x for x in read_metrics(r['run']) if 'loss' in x]
    loss_ax.plot([x['step'] for x in recs], [x['loss'] for x in recs], label=label)
  loss_ax.set_xlabel('step')
  loss_ax.set_ylabel('training loss (per target token)')
  loss_ax.grid(alpha=0.3)
  loss_ax.legend()
  if has_eval:
    ax = axes[0][1]
    several = len({m for r in rows for m in r['curves']}) > 1
    for r in rows:
      label = os.path.basename(os.path.normpath(r['run']))
      for m, curve in sorted(r['curves'].items()):
        if x == 'flops':
          curve = [(r['flops'][s], v) for s, v in curve if s in r['flops']]
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker='.',
                label=f'{label}: {m}' if several else label)
    ax.set_xlabel('training FLOPs' if x == 'flops' else 'step')
    ax.set_ylabel('eval score' if several else next(m for r in rows for m in r['curves']))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
  comparison = compare(rows, args.threshold)
  print_comparison(comparison)
  if args.json:
    fileio.atomic_write_text(args.json, json.dumps(
        {'runs': [{k: v for k, v in r.items() if k != 'curves'} for r in rows],
         'comparison': comparison}, indent=1))
  if args.png:
    if args.x == 'flops' and not any(r['flops'] for r in rows):
      raise ValueError('--x flops: no run logs train_flops_total (runs of an older '
                       'version, or a step XLA could not count).')
    plot(rows, args.png, args.x)
    print(f'\nlearning curves: {args.png}')
  return 0
