"""SPoT's large multi-task source mixture (`spot_mixture`).

SPoT trains one "generic" source prompt on a mixture of many tasks and uses it
to initialise target prompts. This mixture holds every TFDS task of the
catalogue (SPoT's 8 GLUE tasks, SuperGLUE, IMDB, SQuAD v1.1 and v2.0, XSum),
except SuperGLUE RTE, whose examples are GLUE RTE's with other label words,
mixed in proportion to their training examples with each count capped at
K = 2^19 (T5's recipe, `seqio.mixing_rate_num_examples(maximum=K)`). The
file-based tasks (SemEval-2014, FewRel) are left out so the mixture runs on TFDS
data alone. Build other mixtures (e.g. the top-k sources of targeted SPoT) with
`tasks.add_mixture(name, task_names, maximum=K)`.
"""
from __future__ import annotations

from tasks import core
from tasks import glue
from tasks import qa  # pylint: disable=unused-import
from tasks import sentiment  # pylint: disable=unused-import
from tasks import summarization  # pylint: disable=unused-import
from tasks import superglue

SPOT_MIXTURE_TASKS = (
    *glue.SPOT_GLUE_TASKS,
    *(t for t in superglue.SUPERGLUE_TASKS if t != 'superglue_rte'),
    'imdb',
    'squad_v1',
    'squad_v2',
    'xsum',
)

core.add_mixture('spot_mixture', SPOT_MIXTURE_TASKS, maximum=core.MIXING_RATE_CAP)
