"""`t5x similarity` and `t5x transfer-matrix`: transferability indicators and
zero-shot transfer between the prompts of a library.

  # Rank a library's prompts as sources for a target (embedding metrics):
  t5x similarity runs/ --target synthetic_majority_truefalse
  # Full matrices, activated-neuron overlap included, JSON and heatmap:
  t5x similarity runs/ google/*.npy --neurons --gin_file=models/t5_1_1_tiny.gin \\
      --json sim.json --png sim.png
  # Every prompt on every task, no training; CSV/JSON/PNG under --output_dir:
  t5x transfer-matrix runs/ --gin_file=models/t5_1_1_tiny.gin \\
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 64, 'targets': 16}" --output_dir=/tmp/tm

Prompts: run folders, numpy checkpoint folders, prompt files or folders of
them (see library.py). The model is described by gin files as in `t5x eval`
(models/*.gin, --gin.CHECKPOINT_PATH=...); a prompt whose sidecar names a
model of other dimensions or vocabulary is refused; --projector DIR maps
the prompts of its source model to its target model first.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from etils import epath

from prompt_transfer import fileio
from prompt_transfer.analysis import library
from prompt_transfer.analysis import similarity as sim_lib
from prompt_transfer.prompts import files

# One module serves both commands (cli.EXTRA_COMMANDS gives each this HELP).
HELP = ('Prompt transferability: similarity = indicators between prompts; transfer-matrix = '
        'zero-shot score of every prompt on every task.')
_DESCRIPTIONS = {
    'similarity': 'Compare prompts by embedding similarity (and activated-neuron overlap with '
                  '--neurons): a ranking of sources for --target, else full matrices.',
    'transfer-matrix': 'Evaluate every prompt on every task with no training; writes raw and '
                       'relative (score / the task\'s own prompt score) matrices as CSV, JSON '
                       'and PNG, and the Spearman correlation of each indicator with them.',
}
NEURON_METRIC = 'neuron_overlap'
DEFAULT_FEATURE_LENGTHS = {'inputs': 512, 'targets': 16}


# ---------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the flags of `similarity` or `transfer-matrix` (from the parser's prog)."""
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  command = 'transfer-matrix' if parser.prog.endswith('transfer-matrix') else 'similarity'
  parser.description = _DESCRIPTIONS[command]
  parser.add_argument('prompts', nargs='+', metavar='PROMPT',
                      help='Prompt files, run folders or folders of them.')
  parser.add_argument('--step', type=int, default=None,
                      help='Numpy checkpoint step of run folders (default: the latest).')
  parser.add_argument('--skip_rows', type=int, default=0,
                      help='Leave out the first rows of every prompt in embedding metrics '
                           '(1 for Su et al.\'s RoBERTa prompts, whose row 0 is untrained).')
  parser.add_argument('--normalize', choices=sim_lib.NORMALIZATIONS, default='none',
                      help='Rescale prompts before embedding metrics: scale = divide by the '
                           'mean token norm, token = unit-norm tokens.')
  parser.add_argument('--projector', default=None, metavar='DIR',
                      help='A trained projector (gin/projectors/*.gin): prompts of its source '
                           'model are projected to its target model first, so prompts of two '
                           'models are compared in one space.')
  parser.add_argument('--neurons', action='store_true',
                      help='Add activated-neuron overlap (needs the model: --gin_file=models/...).')
  parser.add_argument('--probe', choices=('prompt', 'examples'), default='prompt',
                      help='Neuron probe: the prompt + one start token (default) or task '
                           'examples (--probe_task).')
  parser.add_argument('--probe_task', default=None, help='Task whose validation inputs probe.')
  parser.add_argument('--probe_examples', type=int, default=32)
  parser.add_argument('--stack', choices=('decoder', 'encoder', 'both'), default='decoder',
                      help='Layers whose FFN neurons are read (default: decoder, as Su et al.).')
  parser.add_argument('--model_seed', type=int, default=0,
                      help='Seed of the random frozen model when no CHECKPOINT_PATH is set '
                           '(the one the prompts were trained with).')
  if command == 'similarity':
    parser.add_argument('--target', default=None,
                        help='Rank the other prompts as sources for this prompt.')
    parser.add_argument('--metric', action='append', default=None,
                        choices=sorted(sim_lib.METRICS) + [NEURON_METRIC],
                        help='Metric (repeatable; default: every similarity metric).')
    parser.add_argument('--json', default=None, metavar='PATH', help='Write results as JSON.')
    parser.add_argument('--png', default=None, metavar='PATH', help='Write a heatmap PNG.')
  else:
    parser.add_argument('--tasks', action='append', default=None,
                        help='Tasks to evaluate on (comma-separated or repeated; default: '
                             'the tasks the prompts were trained on).')
    parser.add_argument('--output_dir', required=True)
    parser.add_argument('--split', default='validation')
    parser.add_argument('--num_examples', type=int, default=None)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--score_metric', default=None,
                        help="The task metric used as the score (default: each task's first).")
    parser.add_argument('--indicators', action='append', default=None,
                        choices=sorted(sim_lib.METRICS),
                        help='Embedding metrics to correlate (default: every similarity metric).')
  cli._add_common_flags(parser)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Model set-up from gin (as `t5x eval`).
# ---------------------------------------------------------------------------
def _setup_gin(args: argparse.Namespace, gin_bindings: Sequence[str], need_model: bool) -> None:
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  if not (need_model or args.gin_file or args.gin_bindings or gin_bindings or
          args.module_import):
    return  # embedding metrics only: no model, no task catalogue (TensorFlow) needed
  cli.import_modules(args.module_import)
  if need_model and not (args.gin_file or args.gin_bindings or gin_bindings):
    raise cli.UsageError(f'{args.command} needs the frozen model: add its gin file, e.g. '
                         '--gin_file=models/t5_1_1_tiny.gin (and --gin.CHECKPOINT_PATH=...).')
  cli.parse_gin(args, list(gin_bindings), args.command)
  cli._configure_tasks()  # pylint: disable=protected-access


def load_frozen_model(model_seed: int = 0) -> tuple:
  """(plain model, frozen params) of the gin-configured model."""
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.models import build_model  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.pretrained import load_frozen_params  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import configurables  # pylint: disable=g-import-not-at-top
  config = configurables.model_config()
  checkpoint = cli._macro('CHECKPOINT_PATH')  # pylint: disable=protected-access
  return build_model(config), load_frozen_params(config, checkpoint, model_seed)


def _feature_lengths() -> dict:
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  lengths = cli._macro('TASK_FEATURE_LENGTHS')  # pylint: disable=protected-access
  return dict(lengths or DEFAULT_FEATURE_LENGTHS)


def task_batch(task_name: str, feature_lengths: Mapping[str, int], num_examples: int,
               split: str = 'validation') -> dict:
  """The first examples of a split as one batch of encoder-decoder features."""
  from prompt_transfer.training import data  # pylint: disable=g-import-not-at-top
  return data.first_examples(task_name, feature_lengths, num_examples, split)


def neuron_matrices(prompts: Mapping[str, np.ndarray], model: Any, params: Any,
                    probe: str = 'prompt', batch: Optional[Mapping] = None,
                    stack: str = 'decoder') -> tuple:
  """(overall ON matrix, {window or layer: ON matrix}) in dict order."""
  from prompt_transfer.analysis import neurons  # pylint: disable=g-import-not-at-top
  patterns = neurons.activation_patterns(model, params, prompts, probe=probe, batch=batch,
                                         stack=stack)
  first = next(iter(patterns.values()))
  parts = list(neurons.neuron_overlap(first, first).windows)
  return (neurons.overlap_matrix(patterns),
          {w: neurons.overlap_matrix(patterns, window=w) for w in parts})


# ---------------------------------------------------------------------------
# `t5x similarity`.
# ---------------------------------------------------------------------------
def _load(args: argparse.Namespace) -> dict:
  lib = library.load_library(args.prompts, args.step)
  if args.projector:
    lib = _project_sources(lib, args.projector)
  widths = {a.shape[1] for a, _ in lib.values()}
  if len(widths) > 1:
    print(f'[prompt-transfer] note: prompts of widths {sorted(widths)}; only equal widths are '
          'compared (other pairs are left empty).', file=sys.stderr)
  return lib


def _project_sources(lib: Mapping[str, tuple], path: str) -> dict:
  """The library with the projector's source-model prompts mapped to its
  target model (sidecar weights or model name decide; a bare file by width)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from prompt_transfer import projector as proj  # pylint: disable=g-import-not-at-top
  info, params = proj.load_projector(path)
  src_name = info.source_model.get('name')

  def from_source(array: np.ndarray, p: Any) -> bool:
    if p.weights and info.source_weights:
      return p.weights == info.source_weights
    if p.model:
      return p.model.get('name') == src_name and array.shape[1] == info.source_dim
    return array.shape[1] == info.source_dim != info.target_dim

  out, mapped = {}, []
  for name, (array, p) in lib.items():
    if from_source(array, p):
      array = proj.project(array, info, params)
      p = dataclasses.replace(p, model=dict(info.target_model), weights=info.target_weights,
                              origin=f'projected by {path}')
      mapped.append(name)
    out[name] = (array, p)
  print(f'[prompt-transfer] projected {len(mapped)} prompt(s) of {src_name or "the source model"}'
        f' to {info.target_model.get("name", "the target model")}: {", ".join(mapped) or "none"}',
        file=sys.stderr)
  return out


def _grouped_matrix(arrays: Mapping[str, np.ndarray], metric: str, normalize: str) -> np.ndarray:
  """similarity_matrix, NaN between prompts of different widths."""
  names = list(arrays)
  out = np.full((len(names), len(names)), np.nan)
  for width in {a.shape[1] for a in arrays.values()}:
    idx = [i for i, n in enumerate(names) if arrays[n].shape[1] == width]
    sub = sim_lib.similarity_matrix({names[i]: arrays[names[i]] for i in idx}, metric, normalize)
    out[np.ix_(idx, idx)] = sub
  return out


def _check_all(lib: Mapping[str, tuple], config: Any, vocab: Any, params: Any = None) -> None:
  """Refuses prompts of other dimensions/vocabularies; with the frozen params,
  warns once per prompt trained on other weights of the same shape."""
  from prompt_transfer.training.checkpoints import log_warning  # pylint: disable=g-import-not-at-top
  weights = files.weights_fingerprint(params['token_embedder']['embedding']) \
      if params is not None else None
  for name, (array, info) in lib.items():
    library.check_compatible(info, config, vocab, array=array, name=name)
    warning = None if params is None else library.other_weights_warning(
        info, config, weights, name)
    if warning:
      log_warning(warning)


def run_similarity(args: argparse.Namespace, gin_bindings: Sequence[str]) -> int:
  metrics = list(args.metric or sim_lib.SIMILARITY_METRICS)
  if args.neurons and NEURON_METRIC not in metrics:
    metrics.append(NEURON_METRIC)
  want_neurons = NEURON_METRIC in metrics
  _setup_gin(args, gin_bindings, need_model=want_neurons)
  lib = _load(args)
  names = list(lib)
  if args.target is not None and args.target not in lib:
    raise _usage(f'--target {args.target!r} is not among the prompts: {names}')
  arrays = {n: sim_lib.as_prompt(a, args.skip_rows) for n, (a, _) in lib.items()}
  matrices = {m: _grouped_matrix(arrays, m, args.normalize)
              for m in metrics if m != NEURON_METRIC}
  windows = {}
  if want_neurons:
    model, params = load_frozen_model(args.model_seed)
    batch, vocab = None, None
    if args.probe == 'examples':
      if not args.probe_task:
        raise _usage('--probe=examples needs --probe_task=TASK.')
      from prompt_transfer.training import data  # pylint: disable=g-import-not-at-top
      vocab = data.get_task(args.probe_task).output_features['targets'].vocabulary
      batch = task_batch(args.probe_task, _feature_lengths(), args.probe_examples)
    _check_all(lib, model.config, vocab, params)
    matrices[NEURON_METRIC], windows = neuron_matrices(
        {n: a for n, (a, _) in lib.items()}, model, params, args.probe, batch, args.stack)

  result: dict = {
      'prompts': {n: {'path': p, 'shape': list(lib[n][0].shape), 'task': lib[n][1].task,
                      'model': lib[n][1].model.get('name', '')}
                  for n, p in library.find_prompt_files(args.prompts, args.step).items()},
      'normalize': args.normalize, 'skip_rows': args.skip_rows, 'names': names,
      'metrics': {m: {'description': _describe(m), 'higher_is_better': _higher(m),
                      'matrix': _jsonable(v)} for m, v in matrices.items()},
  }
  if windows:
    result['neuron_overlap_windows'] = {w: _jsonable(v) for w, v in windows.items()}
  if args.target is not None:
    t = names.index(args.target)
    others = [i for i in range(len(names)) if i != t]
    rankings = {}
    for m, v in matrices.items():
      scored = [(names[i], float(v[t, i])) for i in others if np.isfinite(v[t, i])]
      scored.sort(key=lambda x: -x[1] if _higher(m) else x[1])
      rankings[m] = scored
    result['target'], result['rankings'] = args.target, rankings
    print(_ranking_table(args.target, [names[i] for i in others], list(matrices), rankings))
  else:
    for m, v in matrices.items():
      print(f'== {m}: {_describe(m)}' + ('' if _higher(m) else ' (a distance: lower = closer)'))
      print(sim_lib.format_matrix(names, v))
  if args.json:
    _write_json(args.json, result)
  if args.png:
    if args.target is not None:
      t = names.index(args.target)
      cols = [n for n in names if n != args.target]
      values = np.array([[matrices[m][t, names.index(c)] for c in cols] for m in matrices])
      _heatmap_rows(args.png, list(matrices), cols, values,
                    f'similarity to {args.target}\n(colour: rank within each metric)')
    else:
      save_heatmaps(args.png, names, matrices)
  return 0


def _describe(metric: str) -> str:
  if metric == NEURON_METRIC:
    return 'activated-neuron overlap (cosine of binary FFN activation patterns)'
  return sim_lib.METRICS[metric].description


def _higher(metric: str) -> bool:
  return metric == NEURON_METRIC or sim_lib.METRICS[metric].higher_is_better


def _ranking_table(target: str, candidates: Sequence[str], metrics: Sequence[str],
                   rankings: Mapping[str, list]) -> str:
  names_all = list(candidates)
  width = max([len(c) for c in names_all] + [9])
  cw = max([len(m) for m in metrics] + [8])
  lines = [f'Sources ranked for target {target} (value, rank):',
           f'{"source":<{width}}  ' + '  '.join(f'{m:>{cw}}' for m in metrics)]
  first = [n for n, _ in rankings[metrics[0]]] + [
      n for n in names_all if n not in dict(rankings[metrics[0]])]
  for c in first:
    cells = []
    for m in metrics:
      order = [n for n, _ in rankings[m]]
      value = dict(rankings[m]).get(c)
      cells.append(f'{value:.4f} ({order.index(c) + 1})'.rjust(cw) if value is not None
                   else '-'.rjust(cw))
    lines.append(f'{c:<{width}}  ' + '  '.join(cells))
  return '\n'.join(lines)


def _heatmap_rows(path: str, rows: Sequence[str], cols: Sequence[str], values: np.ndarray,
                  title: str) -> None:
  """Rows of different scales: colour by rank within each row, annotate values."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ranks = np.full(values.shape, np.nan)
  for i, m in enumerate(rows):
    ok = np.isfinite(values[i])
    if ok.any():
      sign = 1 if _higher(m) else -1
      ranks[i, ok] = stats.rankdata(sign * values[i, ok]) / ok.sum()
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cols) + 3), max(3, 0.5 * len(rows) + 2)))
  ax.imshow(np.ma.masked_invalid(ranks), cmap='viridis', aspect='auto')
  ax.set_xticks(range(len(cols)), cols, rotation=60, ha='right', fontsize=8)
  ax.set_yticks(range(len(rows)), rows, fontsize=8)
  for (i, j), v in np.ndenumerate(values):
    if np.isfinite(v):
      ax.text(j, i, f'{v:.3g}', ha='center', va='center', fontsize=6,
              color='black' if ranks[i, j] > 0.6 else 'white')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fileio.save_figure(fig, path, dpi=100)
  plt.close(fig)


def save_heatmaps(path: str, names: Sequence[str], matrices: Mapping[str, np.ndarray],
                  col_names: Optional[Sequence[str]] = None) -> str:
  """One PNG, one annotated heatmap panel per matrix."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  col_names = list(col_names) if col_names is not None else list(names)
  n = len(matrices)
  ncols = min(n, 3)
  nrows = -(-n // ncols)
  side = max(3.5, 0.45 * max(len(names), len(col_names)) + 2)
  fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * (side + 1), nrows * side),
                           squeeze=False)
  for ax, (title, values) in zip(axes.ravel(), matrices.items()):
    values = np.asarray(values, np.float64)
    # Colours span the off-diagonal values: self-similarity would flatten them.
    off = values[~np.eye(*values.shape, dtype=bool)] if values.ndim == 2 else values
    off = off[np.isfinite(off)]
    lims = dict(vmin=off.min(), vmax=off.max()) if off.size and np.ptp(off) > 0 else {}
    im = ax.imshow(np.ma.masked_invalid(values), cmap='viridis', **lims)
    fig.colorbar(im, ax=ax, shrink=0.7)
    ax.set_xticks(range(len(col_names)), col_names, rotation=60, ha='right', fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    if values.size <= 400:
      for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
          ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=5, color='white')
    ax.set_title(title, fontsize=9)
  for ax in axes.ravel()[n:]:
    ax.axis('off')
  fig.tight_layout()
  fileio.save_figure(fig, path, dpi=90)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------
# `t5x transfer-matrix`.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class TransferMatrix:
  """Zero-shot scores: raw[s, t] = score on task t with source prompt s."""
  sources: list
  tasks: list
  raw: np.ndarray
  score_metric: dict  # task -> the metric used as its score
  all_metrics: dict  # source -> task -> {metric: value}

  @property
  def relative(self) -> np.ndarray:
    """raw / the task's own prompt score (NaN without a prompt named as the task)."""
    out = np.full(self.raw.shape, np.nan)
    for j, t in enumerate(self.tasks):
      if t in self.sources:
        own = self.raw[self.sources.index(t), j]
        if own:
          out[:, j] = self.raw[:, j] / own
    return out

  def square(self, values: np.ndarray) -> tuple:
    """(names, [source, target] sub-matrix) over prompts named as tasks."""
    names = [s for s in self.sources if s in self.tasks]
    rows = [self.sources.index(n) for n in names]
    cols = [self.tasks.index(n) for n in names]
    return names, np.asarray(values)[np.ix_(rows, cols)]


def _pick_score(task: str, metrics: Mapping[str, float], wanted: Optional[str]) -> str:
  names = [k.split('/', 1)[1] for k in metrics]
  if wanted:
    if wanted not in names:
      raise ValueError(f'--score_metric {wanted!r} is not reported by {task}: {names}')
    return wanted
  try:
    import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
    preferred = tasks_lib.get_task_info(task).metric_names
    for name in preferred:
      if name in names:
        return name
  except (ImportError, ValueError):
    pass
  return names[0]


def compute_transfer_matrix(prompts: Mapping[str, np.ndarray], task_names: Sequence[str],
                            config: Any, frozen_params: Any,
                            task_feature_lengths: Mapping[str, int],
                            split: str = 'validation', num_examples: Optional[int] = None,
                            batch_size: int = 32, score_metric: Optional[str] = None,
                            log: bool = True) -> TransferMatrix:
  """Evaluates every prompt on every task (no training), with the tasks' metrics.

  One model per prompt length and one seqio evaluator per task are built, so a
  prompt swap only changes parameter values (no recompilation).
  """
  from prompt_transfer.analysis import neurons  # pylint: disable=g-import-not-at-top
  from prompt_transfer.model.models import build_model  # pylint: disable=g-import-not-at-top
  from prompt_transfer.prompts.free import free_prompt  # pylint: disable=g-import-not-at-top
  from prompt_transfer.training import data, evaluation  # pylint: disable=g-import-not-at-top
  sources, task_names = list(prompts), list(task_names)
  evaluators = {t: data.build_evaluator(t, task_feature_lengths, split, num_examples)
                for t in task_names}
  models: dict = {}
  raw = np.full((len(sources), len(task_names)), np.nan)
  all_metrics: dict = {s: {} for s in sources}
  chosen: dict = {}
  for i, s in enumerate(sources):
    array = np.asarray(prompts[s], np.float32)
    length = array.shape[0]
    if length not in models:
      models[length] = build_model(config, free_prompt(length))
    params = neurons.with_prompt(frozen_params, array)
    for j, t in enumerate(task_names):
      results = evaluation.run_evaluation(evaluators[t], models[length], params, batch_size)
      if not results:
        raise ValueError(f'Task {t!r} reported no metrics.')
      chosen.setdefault(t, _pick_score(t, results, score_metric))
      all_metrics[s][t] = {k.split('/', 1)[1]: v for k, v in results.items()}
      raw[i, j] = all_metrics[s][t][chosen[t]]
      if log:
        print(f'[prompt-transfer] {s} -> {t}: {chosen[t]} {raw[i, j]:.4g}', flush=True)
  return TransferMatrix(sources, task_names, raw, chosen, all_metrics)


def indicator_correlations(tm: TransferMatrix, indicators: Mapping[str, np.ndarray],
                           indicator_names: Sequence[str]) -> dict:
  """Spearman of each indicator (matrix over indicator_names, row = target)
  with raw and relative transfer, over the prompts named as tasks."""
  names, rel = tm.square(tm.relative)
  _, raw = tm.square(tm.raw)
  idx = [list(indicator_names).index(n) for n in names]
  out = {}
  for m, matrix in indicators.items():
    sub = np.asarray(matrix)[np.ix_(idx, idx)]
    out[m] = {'relative': sim_lib.transfer_correlation(sub, rel, names).as_dict(),
              'raw': sim_lib.transfer_correlation(sub, raw, names).as_dict()}
  return out


def _write_csv(path: str, rows: Sequence[str], cols: Sequence[str], values: np.ndarray) -> None:
  out = io.StringIO(newline='')
  w = csv.writer(out)
  w.writerow(['source\\target'] + list(cols))
  for r, row in zip(rows, values):
    w.writerow([r] + [f'{v:.6g}' if np.isfinite(v) else '' for v in row])
  fileio.atomic_write_text(path, out.getvalue())


def write_transfer_outputs(output_dir: str, tm: TransferMatrix,
                           correlations: Optional[dict] = None,
                           indicators: Optional[Mapping[str, np.ndarray]] = None,
                           indicator_names: Optional[Sequence[str]] = None) -> dict:
  """transfer_{raw,relative}.{csv,png} and transfer.json; returns the paths."""
  epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
  paths = {}
  for kind, values in (('raw', tm.raw), ('relative', tm.relative)):
    paths[f'{kind}_csv'] = os.path.join(output_dir, f'transfer_{kind}.csv')
    _write_csv(paths[f'{kind}_csv'], tm.sources, tm.tasks, values)
    paths[f'{kind}_png'] = sim_lib.save_heatmap(
        os.path.join(output_dir, f'transfer_{kind}.png'), tm.sources, values,
        title=f'zero-shot transfer ({kind})', row_label='source prompt',
        col_label='target task', col_names=tm.tasks)
  paths['json'] = os.path.join(output_dir, 'transfer.json')
  _write_json(paths['json'], {
      'sources': tm.sources, 'tasks': tm.tasks, 'score_metric': tm.score_metric,
      'raw': _jsonable(tm.raw), 'relative': _jsonable(tm.relative),
      'all_metrics': tm.all_metrics, 'correlations': correlations or {},
      'indicators': {'names': list(indicator_names or []),
                     **{m: _jsonable(v) for m, v in (indicators or {}).items()}}})
  return paths


def run_transfer_matrix(args: argparse.Namespace, gin_bindings: Sequence[str]) -> int:
  _setup_gin(args, gin_bindings, need_model=True)
  from prompt_transfer.training import data  # pylint: disable=g-import-not-at-top
  lib = _load(args)
  task_names = [t for spec in (args.tasks or []) for t in spec.split(',') if t]
  if not task_names:
    task_names = list(dict.fromkeys(info.task for _, info in lib.values() if info.task))
    if not task_names:
      raise _usage('No --tasks given and no prompt sidecar names a task (bare .npy files '
                   'have none): add --tasks=TASK[,TASK...].')
  model, params = load_frozen_model(args.model_seed)
  for i, t in enumerate(task_names):  # fails early on an unknown task or an incompatible prompt
    vocab = data.get_task(t).output_features['targets'].vocabulary
    _check_all(lib, model.config, vocab, params if i == 0 else None)
  prompts = {n: a for n, (a, _) in lib.items()}
  tm = compute_transfer_matrix(prompts, task_names, model.config, params, _feature_lengths(),
                               args.split, args.num_examples, args.batch_size,
                               args.score_metric)
  indicators = {m: sim_lib.similarity_matrix(
      {n: sim_lib.as_prompt(a, args.skip_rows) for n, a in prompts.items()}, m, args.normalize)
                for m in (args.indicators or sim_lib.SIMILARITY_METRICS)}
  if args.neurons:
    if args.probe == 'examples' and not args.probe_task:
      raise _usage('--probe=examples needs --probe_task=TASK.')
    batch = (task_batch(args.probe_task, _feature_lengths(), args.probe_examples)
             if args.probe == 'examples' else None)
    indicators[NEURON_METRIC], _ = neuron_matrices(prompts, model, params, args.probe, batch,
                                                   args.stack)
  names = list(prompts)
  correlations = indicator_correlations(tm, indicators, names)
  paths = write_transfer_outputs(args.output_dir, tm, correlations, indicators, names)
  print('relative transfer (score / target\'s own prompt score; rows = source prompts):')
  print(sim_lib.format_matrix(tm.sources, tm.relative, cols=None if tm.sources == tm.tasks
                              else tm.tasks))
  square_names, _ = tm.square(tm.raw)
  if len(square_names) >= 3 and not np.isfinite(tm.square(tm.relative)[1]).any():
    print('Relative transfer is undefined: every task\'s own prompt scores 0.')
  elif len(square_names) >= 3:
    print(f'Spearman with relative transfer ({len(square_names)} prompts named as tasks, '
          'off-diagonal pairs):')
    for m, c in correlations.items():
      r = c['relative']
      print(f'  {m:<26} pooled {_fmt(r["pooled"])}  mean per target '
            f'{_fmt(r["mean_per_target"])}')
    if len(square_names) < 4:
      print('  (a per-target correlation needs at least 3 other prompts)')
  else:
    print('Correlations need at least 3 prompts named as evaluated tasks.')
  print('wrote ' + ', '.join(sorted(paths.values())))
  return 0


def _fmt(value: Optional[float]) -> str:
  return f'{value:+.3f}' if value is not None and np.isfinite(value) else 'n/a'


# ---------------------------------------------------------------------------
# Entry point (cli.EXTRA_COMMANDS).
# ---------------------------------------------------------------------------
def _jsonable(values: Any) -> Any:
  return [[None if not np.isfinite(v) else float(v) for v in row]
          for row in np.asarray(values, np.float64)]


def _finite(obj: Any) -> Any:
  """NaN/inf -> None, recursively (strict JSON)."""
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def _write_json(path: str, obj: Any) -> None:
  fileio.makedirs_for(path)
  fileio.atomic_write_text(path, json.dumps(_finite(obj), indent=1, allow_nan=False))


def _usage(message: str) -> Exception:
  from prompt_transfer import cli  # pylint: disable=g-import-not-at-top
  return cli.UsageError(message)


def run(args: argparse.Namespace, gin_bindings: Sequence[str]) -> int:
  """Runs `t5x similarity` or `t5x transfer-matrix` (args.command)."""
  try:
    if args.command == 'transfer-matrix':
      return run_transfer_matrix(args, gin_bindings)
    return run_similarity(args, gin_bindings)
  except library.IncompatiblePromptError as e:
    # A problem the user fixes (other model, --projector): no traceback.
    raise _usage(str(e)) from None
