"""Embedding similarity between soft prompts (transferability indicators).

Prompts are [L, d] arrays; two prompts may differ in length L (not in d).
Metrics (name -> what it computes, e1 / e2 the rows of the two prompts):

* `avg_token_cosine` (SPoT): cos(mean_i e1_i, mean_j e2_j).
* `per_token_cosine` (SPoT; Su et al.'s `CosineSimilarity_per_token`):
  (1 / (L1 L2)) sum_i sum_j cos(e1_i, e2_j), the average over all token pairs.
* `per_token_max_cosine` (extra): (1 / L1) sum_i max_j cos(e1_i, e2_j). Not
  symmetric: each row of the first prompt looks for its best match.
* `flat_cosine` (Su et al.'s `CosineSimilarity`): cosine of the flattened
  prompts; same shape only.
* `flat_euclidean`: ||flat(e1) - flat(e2)|| (a distance: lower = closer);
  `flat_euclidean_sim` = 1 / (1 + that) (Su et al.'s `EuclideanDistances`).
* `per_token_euclidean`: mean over token pairs of ||e1_i - e2_j||;
  `per_token_euclidean_sim` = 1 / (1 + that mean) (Su et al.'s
  `EuclideanDistances_per_token`: the similarity of the averaged distance).

Normalisation (`normalize=`): trained prompts differ a lot in scale (token
norms 1.1 to 28.8 among the RoBERTa prompts of Su et al., about 1,385 for
Google's T5 1.1 prompts), which dominates the Euclidean metrics and the
averaged-token cosine. 'none' uses the raw arrays; 'scale' divides each prompt
by its mean token norm (keeps directions and the relative norms of its tokens);
'token' gives every token unit norm. Per-token cosines are unchanged by both.

Orientation: `similarity_matrix(...)[i, j] = metric(prompt_i, prompt_j)`, row =
the reference (target) prompt, column = the candidate (source) prompt, as in
`rank_sources(target, candidates)`. Transfer matrices are [source, target]
(`transfer[s, t]` = score on t with s's prompt), so `transfer_correlation`
compares `similarity[t, s]` with `transfer[s, t]`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import stats
from scipy.spatial import distance

from prompt_transfer import fileio

ArrayLike = Union[np.ndarray, Sequence]
MetricFn = Callable[[np.ndarray, np.ndarray], float]
NORMALIZATIONS = ('none', 'scale', 'token')
# A row whose norm is below this is treated as zero (its cosines are 0).
_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Metric:
  """A prompt-to-prompt indicator and how to read it."""
  name: str
  fn: MetricFn
  description: str
  higher_is_better: bool = True  # False for distances
  symmetric: bool = True
  same_shape: bool = False  # only defined for prompts of equal shape


def as_prompt(x: ArrayLike, skip_rows: int = 0) -> np.ndarray:
  """A float64 [L, d] array (float64: T5 1.1 prompts have norms ~1e3).

  skip_rows drops the first rows, e.g. 1 for Su et al.'s RoBERTa prompts whose
  row 0 was overwritten by the <mask> embedding at run time (never trained).
  """
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 2:
    raise ValueError(f'A prompt is a 2-D [length, d_model] array; got shape {a.shape}.')
  if skip_rows:
    a = a[skip_rows:]
  if a.shape[0] == 0:
    raise ValueError('The prompt has no rows left.')
  return a


def normalize_prompt(x: ArrayLike, mode: Optional[str] = 'none') -> np.ndarray:
  """Rescales a prompt (see the module docstring for the modes)."""
  a = as_prompt(x)
  mode = mode or 'none'
  norms = np.linalg.norm(a, axis=1, keepdims=True)
  if mode == 'none':
    return a
  if mode == 'scale':
    return a / max(float(np.mean(norms)), _EPS)
  if mode == 'token':
    return a / np.maximum(norms, _EPS)
  raise ValueError(f'Unknown normalisation {mode!r}; expected one of {NORMALIZATIONS}.')


def _unit_rows(a: np.ndarray) -> np.ndarray:
  return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), _EPS)


def _pair_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[L1, L2] cosines of every token pair (0 where a token is all zeros)."""
  return _unit_rows(a) @ _unit_rows(b).T


def _check_dims(a: np.ndarray, b: np.ndarray) -> None:
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'Prompts of different widths cannot be compared: {a.shape} vs '
                     f'{b.shape} (prompts of different models need a projector).')


def _check_same_shape(a: np.ndarray, b: np.ndarray, name: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f'{name} needs prompts of equal shape; got {a.shape} and {b.shape}. '
                     'Use a per-token metric for prompts of different lengths.')


def avg_token_cosine(a: np.ndarray, b: np.ndarray) -> float:
  _check_dims(a, b)
  return float(_unit_rows(a.mean(0)) @ _unit_rows(b.mean(0)))


def per_token_cosine(a: np.ndarray, b: np.ndarray) -> float:
  _check_dims(a, b)
  # mean_ij <u_i, v_j> = <mean_i u_i, mean_j v_j>: O(L d) instead of O(L^2 d).
  return float(np.mean(_unit_rows(a), 0) @ np.mean(_unit_rows(b), 0))


def per_token_max_cosine(a: np.ndarray, b: np.ndarray) -> float:
  _check_dims(a, b)
  return float(np.mean(np.max(_pair_cosines(a, b), axis=1)))


def flat_cosine(a: np.ndarray, b: np.ndarray) -> float:
  _check_same_shape(a, b, 'flat_cosine')
  return float(_unit_rows(a.ravel()) @ _unit_rows(b.ravel()))


def flat_euclidean(a: np.ndarray, b: np.ndarray) -> float:
  _check_same_shape(a, b, 'flat_euclidean')
  return float(np.linalg.norm(a.ravel() - b.ravel()))


def flat_euclidean_sim(a: np.ndarray, b: np.ndarray) -> float:
  return 1.0 / (1.0 + flat_euclidean(a, b))


def per_token_euclidean(a: np.ndarray, b: np.ndarray) -> float:
  _check_dims(a, b)
  return float(np.mean(distance.cdist(a, b, 'euclidean')))


def per_token_euclidean_sim(a: np.ndarray, b: np.ndarray) -> float:
  return 1.0 / (1.0 + per_token_euclidean(a, b))


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric('avg_token_cosine', avg_token_cosine, 'cosine of the averaged tokens (SPoT)'),
    Metric('per_token_cosine', per_token_cosine,
           'average cosine over all token pairs (SPoT, Su et al.)'),
    Metric('per_token_max_cosine', per_token_max_cosine,
           'mean over the first prompt\'s tokens of the best cosine in the second',
           symmetric=False),
    Metric('flat_cosine', flat_cosine, 'cosine of the flattened prompts (Su et al.)',
           same_shape=True),
    Metric('flat_euclidean', flat_euclidean, 'Euclidean distance of the flattened prompts',
           higher_is_better=False, same_shape=True),
    Metric('flat_euclidean_sim', flat_euclidean_sim,
           '1 / (1 + Euclidean distance of the flattened prompts) (Su et al.)',
           same_shape=True),
    Metric('per_token_euclidean', per_token_euclidean,
           'mean Euclidean distance over all token pairs', higher_is_better=False),
    Metric('per_token_euclidean_sim', per_token_euclidean_sim,
           '1 / (1 + mean Euclidean distance over token pairs) (Su et al.)'),
)}
# Metrics a transfer study reports by default: the similarities (the two
# distances are monotone in their `_sim` twins and add nothing to a rank).
SIMILARITY_METRICS = tuple(n for n, m in METRICS.items() if m.higher_is_better)


def get_metric(metric: Union[str, Metric]) -> Metric:
  if isinstance(metric, Metric):
    return metric
  if metric not in METRICS:
    raise ValueError(f'Unknown metric {metric!r}; expected one of {sorted(METRICS)}.')
  return METRICS[metric]


def prompt_similarity(a: ArrayLike, b: ArrayLike, metric: Union[str, Metric] = 'per_token_cosine',
                      normalize: Optional[str] = 'none') -> float:
  """metric(a, b) after normalising each prompt."""
  m = get_metric(metric)
  return m.fn(normalize_prompt(a, normalize), normalize_prompt(b, normalize))


def similarity_matrix(prompts: Mapping[str, ArrayLike], metric: Union[str, Metric],
                      normalize: Optional[str] = 'none') -> np.ndarray:
  """[n, n] matrix, entry [i, j] = metric(prompt_i, prompt_j), in dict order.

  Pairs a same-shape metric cannot compare (different lengths) are NaN.
  """
  m = get_metric(metric)
  arrays = [normalize_prompt(p, normalize) for p in prompts.values()]
  n = len(arrays)
  if m is METRICS.get(m.name) and m.name in _TOKEN_PAIR_REDUCERS and n > 1 and len(
      {a.shape[1] for a in arrays}) == 1:
    return _token_pair_matrix(arrays, m.name)
  out = np.full((n, n), np.nan)
  for i in range(n):
    for j in range(n):
      if m.symmetric and j < i:
        out[i, j] = out[j, i]
      elif not m.same_shape or arrays[i].shape == arrays[j].shape:
        out[i, j] = m.fn(arrays[i], arrays[j])
  return out


# Token-pair metrics of many prompts from one Gram matrix of all their rows
# instead of n^2 small products (same values; far fewer BLAS calls).
_TOKEN_PAIR_REDUCERS = {
    'per_token_max_cosine': ('cosine', lambda block: np.mean(np.max(block, axis=1))),
    'per_token_euclidean': ('euclidean', np.mean),
    'per_token_euclidean_sim': ('euclidean', lambda block: 1.0 / (1.0 + np.mean(block))),
}


def _token_pair_matrix(arrays: Sequence[np.ndarray], name: str) -> np.ndarray:
  kind, reduce = _TOKEN_PAIR_REDUCERS[name]
  rows = np.concatenate(arrays)
  if kind == 'cosine':
    unit = _unit_rows(rows)
    pair = unit @ unit.T
  else:
    sq = np.sum(rows * rows, axis=1)
    # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y, clipped at 0 against rounding.
    pair = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (rows @ rows.T), 0.0))
  bounds = np.cumsum([0] + [a.shape[0] for a in arrays])
  n = len(arrays)
  out = np.empty((n, n))
  for i in range(n):
    for j in range(n):
      out[i, j] = reduce(pair[bounds[i]:bounds[i + 1], bounds[j]:bounds[j + 1]])
  return out


def rank_sources(target: ArrayLike, candidates: Mapping[str, ArrayLike],
                 metric: Union[str, Metric] = 'per_token_cosine',
                 normalize: Optional[str] = 'none') -> list[tuple[str, float]]:
  """Candidates sorted best first: [(name, metric(target, candidate))].

  Distances sort ascending; candidates a same-shape metric cannot compare are
  left out.
  """
  m = get_metric(metric)
  t = normalize_prompt(target, normalize)
  scored = []
  for name, c in candidates.items():
    c = normalize_prompt(c, normalize)
    if m.same_shape and c.shape != t.shape:
      continue
    scored.append((name, m.fn(t, c)))
  return sorted(scored, key=lambda x: -x[1] if m.higher_is_better else x[1])


def relative_transfer(raw: ArrayLike) -> np.ndarray:
  """[source, target] scores / each target's own-prompt score (the diagonal)."""
  raw = np.asarray(raw, dtype=np.float64)
  return raw / np.diag(raw)[None, :]


@dataclasses.dataclass
class Correlation:
  """Spearman rank correlation of an indicator with measured transfer."""
  pooled: float  # over all off-diagonal (source, target) pairs
  pooled_p: float
  mean_per_target: float  # mean over targets of the correlation across sources
  per_target: dict
  num_pairs: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def transfer_correlation(similarity: ArrayLike, transfer: ArrayLike,
                         names: Optional[Sequence[str]] = None,
                         exclude_diagonal: bool = True) -> Correlation:
  """Spearman of similarity[t, s] with transfer[s, t] over pairs s != t.

  similarity: as `similarity_matrix` returns it (row = target). transfer:
  [source, target] (raw or relative). NaN pairs are skipped; a target whose
  sources all tie gives no per-target value.
  """
  sim = np.asarray(similarity, dtype=np.float64).T  # -> [source, target]
  tr = np.asarray(transfer, dtype=np.float64)
  if sim.shape != tr.shape or sim.shape[0] != sim.shape[1]:
    raise ValueError(f'Indicator {sim.shape} and transfer {tr.shape} matrices must be '
                     'square and of the same shape.')
  n = tr.shape[0]
  names = list(names) if names is not None else [str(i) for i in range(n)]
  valid = np.isfinite(sim) & np.isfinite(tr)
  if exclude_diagonal:
    valid &= ~np.eye(n, dtype=bool)
  # Constant inputs (e.g. every score 0) have no rank correlation: NaN.
  pooled = (stats.spearmanr(sim[valid], tr[valid]) if valid.sum() > 2 and
            np.ptp(sim[valid]) > 0 and np.ptp(tr[valid]) > 0 else None)
  per_target = {}
  for t in range(n):
    col = valid[:, t]
    if col.sum() > 2 and np.ptp(sim[col, t]) > 0 and np.ptp(tr[col, t]) > 0:
      per_target[names[t]] = float(stats.spearmanr(sim[col, t], tr[col, t]).statistic)
  return Correlation(
      pooled=float(pooled.statistic) if pooled is not None else float('nan'),
      pooled_p=float(pooled.pvalue) if pooled is not None else float('nan'),
      mean_per_target=float(np.mean(list(per_target.values()))) if per_target else float('nan'),
      per_target=per_target, num_pairs=int(valid.sum()))


def format_matrix(names: Sequence[str], values: ArrayLike, precision: int = 3,
                  width: int = 7, cols: Optional[Sequence[str]] = None) -> str:
  """A plain-text table: full row names on the left, numbered; columns headed
  by those numbers ([1], [2], ...), so no two columns look alike however long
  the names. cols: other column names (a rectangular table), listed after it.
  """
  values = np.asarray(values, dtype=np.float64)
  rows = [f'[{i + 1}] {n}' for i, n in enumerate(names)]
  square = cols is None
  col_names = list(names) if square else list(cols)
  tags = [f'[{i + 1}]' if square else f'[{chr(97 + i % 26)}{i // 26 or ""}]'
          for i in range(len(col_names))]
  width = max([width, precision + 3] + [len(tg) for tg in tags])
  left = max(len(r) for r in rows) if rows else 0
  lines = [' ' * (left + 1) + ' '.join(f'{tg:>{width}}' for tg in tags)]
  for r, row in zip(rows, values):
    cells = ' '.join(f'{v:>{width}.{precision}f}' if np.isfinite(v) else f'{"-":>{width}}'
                     for v in row)
    lines.append(f'{r:<{left}} {cells}')
  if not square:
    lines.append('columns: ' + ', '.join(f'{tg} {c}' for tg, c in zip(tags, col_names)))
  return '\n'.join(lines)


def save_heatmap(path: str, names: Sequence[str], values: ArrayLike, title: str = '',
                 row_label: str = '', col_label: str = '',
                 col_names: Optional[Sequence[str]] = None) -> str:
  """Writes a matrix as an annotated heatmap PNG (matplotlib, Agg backend)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  values = np.asarray(values, dtype=np.float64)
  col_names = list(col_names) if col_names is not None else list(names)
  size = max(4.0, 0.55 * max(values.shape) + 2.0)
  fig, ax = plt.subplots(figsize=(size + 1.5, size))
  im = ax.imshow(np.ma.masked_invalid(values), cmap='viridis')
  fig.colorbar(im, ax=ax, shrink=0.8)
  ax.set_xticks(range(len(col_names)), col_names, rotation=60, ha='right', fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  if values.size <= 400:  # annotations stay readable up to ~20x20
    finite = values[np.isfinite(values)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (i, j), v in np.ndenumerate(values):
      if np.isfinite(v):
        ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=6,
                color='black' if v > mid else 'white')
  ax.set_title(title)
  ax.set_xlabel(col_label)
  ax.set_ylabel(row_label)
  fig.tight_layout()
  fileio.save_figure(fig, path, dpi=100)
  plt.close(fig)
  return path

