"""Summarisation: XSum (`xsum`), TFDS xsum:1.1.0, 'summarize: <document>' -> summary.

Scored with ROUGE-1/2/Lsum (Google's rouge-score, Porter stemming). TFDS needs
the XSum archive downloaded by hand before it can build the data set.
"""
from __future__ import annotations

from tasks import core
from tasks import metrics
from tasks import preprocessors

_TFDS_NAME = 'xsum:1.1.0'
_SPLITS = {'train': 'train', 'validation': 'validation', 'test': 'test'}

core.add_task(
    'xsum',
    core.TfdsSource(
        'xsum', _TFDS_NAME, splits=_SPLITS,
        sizes={'train': 203577, 'validation': 11305, 'test': 11301},
        instructions=(
            'XSum needs a manual download first: follow '
            'github.com/EdinburghNLP/XSum (XSum-Dataset/README.md) and put '
            'xsum-extracts-from-downloads.tar.gz in <TFDS data dir>/downloads/'
            'manual/ before `tfds build xsum`.')),
    [preprocessors.summarize],
    task_type='summarization', kind='generation', label_words=None,
    metric_fns=[metrics.rouge], metric_names=['rouge1', 'rouge2', 'rougeLsum'],
    postprocess_fn=metrics.text_postprocess, splits=list(_SPLITS),
    source_desc=f'tfds:{_TFDS_NAME}', description='XSum news summarisation')
