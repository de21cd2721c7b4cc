"""Metric and postprocessing functions in seqio's form.

seqio calls `postprocess_fn(text, example=..., is_target=...)` on every decoded
prediction and on every target text, then each metric fn as
`fn(targets, predictions) -> {name: value}`. Values are percentages, as in T5.
Classification postprocessors map a label word to its class index (-1 when the
text is no label word), so metrics compare class indices.

The statistics come from the field's libraries (scikit-learn, SciPy,
rouge-score), imported when a metric runs so that `import tasks` needs none of
them.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np


def _text(x: Any) -> str:
  if isinstance(x, bytes):
    return x.decode('utf-8')
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return _text(x.item())
  return str(x)


# ----------------------------------------------------------- postprocessors ---


def label_index(text: Any, label_words: Sequence[str]) -> int:
  """Class index of a label word (exact match after stripping), else -1."""
  t = _text(text).strip()
  for i, word in enumerate(label_words):
    if t == word:
      return i
  return -1


def make_label_postprocessor(label_words: Sequence[str]
                             ) -> Callable[..., int]:
  """postprocess_fn mapping a label word to its class index (-1 if unknown)."""
  words = tuple(label_words)

  def postprocess(output: Any, example: Optional[Mapping[str, Any]] = None,
                  is_target: bool = False) -> int:
    del example, is_target
    return label_index(output, words)

  return postprocess


def string_to_float(output: Any, example: Optional[Mapping[str, Any]] = None,
                    is_target: bool = False, default: float = -1.0) -> float:
  """postprocess_fn for regression targets written as text (STS-B)."""
  del example, is_target
  try:
    return float(_text(output).strip())
  except ValueError:
    return default


def make_grouped_label_postprocessor(label_words: Sequence[str],
                                     group_key: str) -> Callable[..., Any]:
  """Like `make_label_postprocessor`, but targets carry their group (MultiRC)."""
  words = tuple(label_words)

  def postprocess(output: Any, example: Optional[Mapping[str, Any]] = None,
                  is_target: bool = False) -> Any:
    value = label_index(output, words)
    if is_target:
      return {'value': value, 'group': int(np.asarray(example[group_key]))}
    return value

  return postprocess


UNANSWERABLE = 'unanswerable'


def qa_postprocess(output: Any, example: Optional[Mapping[str, Any]] = None,
                   is_target: bool = False) -> Any:
  """SQuAD-style: targets become all gold answers, predictions plain text.

  An unanswerable question (SQuAD 2.0) has no gold answers; it is scored as the
  empty answer, and a prediction of 'unanswerable' counts as the empty answer.
  """
  if is_target:
    answers = [_text(a) for a in np.asarray(example['answers']).reshape(-1)]
    return answers
  text = _text(output).strip()
  return '' if text == UNANSWERABLE else text


def record_postprocess(output: Any, example: Optional[Mapping[str, Any]] = None,
                       is_target: bool = False) -> Any:
  """ReCoRD: targets carry all answers and the query id (examples repeat per answer)."""
  if is_target:
    return {'answers': qa_postprocess(output, example, True),
            'group': int(np.asarray(example['query_idx']))}
  return _text(output).strip()


def text_postprocess(output: Any, example: Optional[Mapping[str, Any]] = None,
                     is_target: bool = False) -> str:
  del example, is_target
  return _text(output).strip()


# -------------------------------------------------------------- metric fns ---


def accuracy(targets: Sequence[int], predictions: Sequence[int]
             ) -> dict[str, float]:
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  return {'accuracy': 100.0 * skm.accuracy_score(targets, predictions)}


def f1_positive(targets: Sequence[int], predictions: Sequence[int]
                ) -> dict[str, float]:
  """F1 of class 1 (GLUE's F1 for MRPC and QQP); unknown predictions count as wrong."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  return {'f1': 100.0 * skm.f1_score(targets, predictions, labels=[1],
                                     average='macro', zero_division=0)}


def make_f1_macro(num_classes: int) -> Callable[..., dict[str, float]]:
  """Mean F1 over the classes (CB's 'mean 3-class F1')."""

  def f1_macro(targets: Sequence[int], predictions: Sequence[int]
               ) -> dict[str, float]:
    from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
    return {'f1_macro': 100.0 * skm.f1_score(
        targets, predictions, labels=list(range(num_classes)), average='macro',
        zero_division=0)}

  return f1_macro


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]
                      ) -> dict[str, float]:
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  return {'mcc': 100.0 * skm.matthews_corrcoef(targets, predictions)}


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]
                     ) -> dict[str, float]:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return {'pearson': 100.0 * float(stats.pearsonr(targets, predictions)[0])}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]
                      ) -> dict[str, float]:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return {'spearman': 100.0 * float(stats.spearmanr(targets, predictions)[0])}


def sequence_accuracy(targets: Sequence[str], predictions: Sequence[str]
                      ) -> dict[str, float]:
  """Share of predictions equal to the target text (generation tasks)."""
  hits = [_text(t).strip() == _text(p).strip() for t, p in zip(targets, predictions)]
  return {'sequence_accuracy': 100.0 * float(np.mean(hits))}


# SQuAD answer normalisation and EM/F1 follow the official evaluation script of
# SQuAD v2.0 (which equals v1.1's on answerable questions). No installable
# package offers it offline: Hugging Face `evaluate` downloads the script at run
# time and `t5` pulls in mesh-tensorflow and torch, so it is written here.
_ARTICLES = re.compile(r'\b(a|an|the)\b', re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """Lower case, drop punctuation and articles (a/an/the), squeeze spaces."""
  s = s.lower()
  s = ''.join(ch for ch in s if ch not in _PUNCTUATION)
  s = _ARTICLES.sub(' ', s)
  return ' '.join(s.split())


def squad_exact(gold: str, pred: str) -> float:
  return float(normalize_answer(gold) == normalize_answer(pred))


def squad_f1(gold: str, pred: str) -> float:
  gold_toks = normalize_answer(gold).split()
  pred_toks = normalize_answer(pred).split()
  if not gold_toks or not pred_toks:
    # An unanswerable question is right only when the prediction is empty too.
    return float(gold_toks == pred_toks)
  common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(pred_toks)
  recall = num_same / len(gold_toks)
  return 2 * precision * recall / (precision + recall)


def _gold_answers(answers: Sequence[str]) -> list[str]:
  golds = [a for a in answers if normalize_answer(a)]
  return golds or ['']  # SQuAD 2.0: no answer is the empty answer.


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]
          ) -> dict[str, float]:
  """Exact match and token F1, each the max over the gold answers."""
  em, f1 = [], []
  for answers, pred in zip(targets, predictions):
    golds = _gold_answers([_text(a) for a in answers])
    pred = _text(pred)
    em.append(max(squad_exact(g, pred) for g in golds))
    f1.append(max(squad_f1(g, pred) for g in golds))
  return {'em': 100.0 * float(np.mean(em)), 'f1': 100.0 * float(np.mean(f1))}


def record(targets: Sequence[Mapping[str, Any]], predictions: Sequence[str]
           ) -> dict[str, float]:
  """ReCoRD EM/F1: SQuAD scoring, one score per query (examples repeat per answer)."""
  seen = set()
  kept_t, kept_p = [], []
  for t, p in zip(targets, predictions):
    if t['group'] in seen:
      continue
    seen.add(t['group'])
    kept_t.append(t['answers'])
    kept_p.append(p)
  return squad(kept_t, kept_p)


def multirc(targets: Sequence[Mapping[str, int]], predictions: Sequence[int]
            ) -> dict[str, float]:
  """MultiRC: F1 over all answer options (F1a) and per-question exact match (EM)."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  values = [t['value'] for t in targets]
  f1a = skm.f1_score(values, predictions, labels=[1], average='macro',
                     zero_division=0)
  groups: dict[int, list[bool]] = collections.defaultdict(list)
  for t, p in zip(targets, predictions):
    groups[t['group']].append(t['value'] == p)
  em = np.mean([all(v) for v in groups.values()])
  return {'f1a': 100.0 * float(f1a), 'em': 100.0 * float(em)}


def _prepare_summary(summary: str) -> str:
  # rougeLsum splits sentences on newlines (T5's convention).
  return summary.replace(' . ', ' .\n')


def rouge(targets: Sequence[str], predictions: Sequence[str]
          ) -> dict[str, float]:
  """Mean ROUGE-1/2/Lsum F-measure with Porter stemming (Google's rouge-score)."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  keys = ('rouge1', 'rouge2', 'rougeLsum')
  scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
  totals = {k: [] for k in keys}
  for t, p in zip(targets, predictions):
    scores = scorer.score(_prepare_summary(_text(t)), _prepare_summary(_text(p)))
    for k in keys:
      totals[k].append(scores[k].fmeasure)
  return {k: 100.0 * float(np.mean(v)) for k, v in totals.items()}
