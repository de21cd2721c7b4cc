"""Extractive question answering: SQuAD v1.1 (`squad_v1`) and v2.0 (`squad_v2`).

TFDS squad/v1.1:3.0.0 and squad/v2.0:3.0.0. Input 'squad question: <q>
context: <c>' ('squad2 ...' for v2.0, so a mixture of both can tell them apart);
target: the first gold answer, or 'unanswerable' for v2.0's unanswerable
questions. Scored with SQuAD's exact match and token F1, each the best over all
gold answers; an unanswerable question counts as the empty answer, as in the
official v2.0 script.
"""
from __future__ import annotations

import functools

from tasks import core
from tasks import metrics
from tasks import preprocessors

_SPLITS = {'train': 'train', 'validation': 'validation'}
_VERSIONS = {
    'squad_v1': ('squad/v1.1:3.0.0', 'squad', {'train': 87599, 'validation': 10570},
                 'SQuAD v1.1 extractive QA'),
    'squad_v2': ('squad/v2.0:3.0.0', 'squad2', {'train': 130319, 'validation': 11873},
                 'SQuAD v2.0 extractive QA with unanswerable questions'),
}

for _name, (_tfds_name, _benchmark, _sizes, _desc) in _VERSIONS.items():
  core.add_task(
      _name, core.TfdsSource(_name, _tfds_name, splits=_SPLITS, sizes=_sizes),
      [functools.partial(preprocessors.squad, benchmark=_benchmark)],
      task_type='extractive_qa', kind='generation', label_words=None,
      metric_fns=[metrics.squad], metric_names=['em', 'f1'],
      postprocess_fn=metrics.qa_postprocess, splits=list(_SPLITS),
      source_desc=f'tfds:{_tfds_name}', description=_desc)
