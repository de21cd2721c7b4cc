"""The seqio task catalogue of prompt-transfer.

`import tasks` (or `--module_import=tasks.glue`, which imports this package
first) registers every task and mixture:

* GLUE: cola, sst2, mrpc, qqp, stsb, mnli (+ mnli_matched, mnli_mismatched),
  qnli, rte, wnli; T5-label-word twins glue_<name>_v2; mixtures glue_mixture
  (all nine) and spot_glue_mixture (SPoT's eight, no WNLI).
* SuperGLUE: superglue_{boolq,cb,copa,multirc,record,rte,wic,wsc};
  superglue_mixture.
* Sentiment: imdb, semeval14_laptop, semeval14_restaurant. Relation
  extraction: fewrel. QA: squad_v1, squad_v2. Summarisation: xsum.
* spot_mixture: SPoT's large multi-task source mixture (K = 2^19).
* Synthetic families (tasks.synthetic): synthetic_<rule>_<template>.
* The IPT task pool (tasks.pool): pool_<rule>_<words> (+ _newdata twins),
  44 training and 10 held-out task types.
* Rank-classification twins (tasks.rank): <task>_rank for every
  classification task; eval splits score each label word (seqio score mode).
  `add_rank_task(name)` makes one for another task.

Options (read when data is used, so they may be set after import):
`set_tfds_data_dir` / env TFDS_DATA_DIR, `set_data_dir` / env
PROMPT_TRANSFER_DATA_DIR (SemEval, FewRel files), `set_default_vocabulary` /
env T5_VOCAB.
"""
from tasks.core import add_mixture
from tasks.core import check_available
from tasks.core import DataUnavailableError
from tasks.core import DEFAULT_VOCAB_PATH
from tasks.core import DEFAULT_VOCABULARY
from tasks.core import default_vocabulary_path
from tasks.core import DefaultVocabulary
from tasks.core import get_data_dir
from tasks.core import get_label_words
from tasks.core import get_task_info
from tasks.core import get_tfds_data_dir
from tasks.core import get_vocabulary
from tasks.core import is_available
from tasks.core import list_tasks
from tasks.core import MIXING_RATE_CAP
from tasks.core import mixture_names
from tasks.core import mixture_tasks
from tasks.core import set_data_dir
from tasks.core import set_default_vocabulary
from tasks.core import set_tfds_data_dir
from tasks.core import task_names
from tasks.core import TaskInfo
from tasks.core import TaskRow
from tasks.preprocessors import rank_classification
from tasks.preprocessors import rank_classification_dataset
from tasks.preprocessors import rank_classification_pairs
from tasks.preprocessors import rank_classification_predictions

# Registration happens on import of each module.
from tasks import glue  # pylint: disable=g-bad-import-order
from tasks import superglue
from tasks import sentiment
from tasks import fewrel
from tasks import qa
from tasks import summarization
from tasks import mixtures
from tasks import synthetic
from tasks import pool
from tasks import metrics
from tasks import preprocessors
# Last: rank-classification twins of every classification task above.
from tasks import rank
from tasks.rank import add_rank_task
from tasks.rank import RANK_TASKS
from tasks.rank import rank_task_name
