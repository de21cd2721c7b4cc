"""FewRel 1.0 as supervised relation classification (task `fewrel`).

Read from the files the FewRel authors publish (github.com/thunlp/FewRel,
folder data/): train_wiki.json (64 relations) and val_wiki.json (16 other
relations), 700 sentences per relation. FewRel is built for few-shot episodes
with disjoint relations; used as one 80-way classification task (as in the
prompt-transferability work) both files are pooled and each relation's
sentences are split by position: every tenth from the ninth on is 'validation',
every tenth from the tenth 'test', the rest 'train' (560 / 70 / 70).

Input: 'fewrel sentence: <tokens> head: <head entity> tail: <tail entity>'.
Target: the Wikidata name of the relation (from the authors' pid2name.json),
e.g. 'place served by transport hub'. Label words are ordered by property id.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Mapping

import tensorflow as tf

from tasks import core
from tasks import metrics
from tasks import preprocessors

# The 80 FewRel 1.0 relations and their names in the authors' pid2name.json.
RELATION_NAMES = {
    'P6': 'head of government',
    'P17': 'country',
    'P22': 'father',
    'P25': 'mother',
    'P26': 'spouse',
    'P27': 'country of citizenship',
    'P31': 'instance of',
    'P39': 'position held',
    'P40': 'child',
    'P57': 'director',
    'P58': 'screenwriter',
    'P59': 'constellation',
    'P84': 'architect',
    'P86': 'composer',
    'P101': 'field of work',
    'P102': 'member of political party',
    'P105': 'taxon rank',
    'P106': 'occupation',
    'P118': 'league',
    'P123': 'publisher',
    'P127': 'owned by',
    'P131': 'located in the administrative territorial entity',
    'P135': 'movement',
    'P136': 'genre',
    'P137': 'operator',
    'P140': 'religion',
    'P150': 'contains administrative territorial entity',
    'P155': 'follows',
    'P156': 'followed by',
    'P159': 'headquarters location',
    'P175': 'performer',
    'P176': 'manufacturer',
    'P177': 'crosses',
    'P178': 'developer',
    'P206': 'located in or next to body of water',
    'P241': 'military branch',
    'P264': 'record label',
    'P276': 'location',
    'P306': 'operating system',
    'P355': 'subsidiary',
    'P361': 'part of',
    'P364': 'original language of film or TV show',
    'P400': 'platform',
    'P403': 'mouth of the watercourse',
    'P407': 'language of work or name',
    'P410': 'military rank',
    'P412': 'voice type',
    'P413': 'position played on team / speciality',
    'P449': 'original network',
    'P460': 'said to be the same as',
    'P463': 'member of',
    'P466': 'occupant',
    'P495': 'country of origin',
    'P527': 'has part',
    'P551': 'residence',
    'P641': 'sport',
    'P674': 'characters',
    'P706': 'located on terrain feature',
    'P710': 'participant',
    'P740': 'location of formation',
    'P750': 'distributor',
    'P800': 'notable work',
    'P921': 'main subject',
    'P931': 'place served by transport hub',
    'P937': 'work location',
    'P974': 'tributary',
    'P991': 'successful candidate',
    'P1001': 'applies to jurisdiction',
    'P1303': 'instrument',
    'P1344': 'participant of',
    'P1346': 'winner',
    'P1408': 'licensed to broadcast to',
    'P1411': 'nominated for',
    'P1435': 'heritage designation',
    'P1877': 'after a work by',
    'P1923': 'participating team',
    'P2094': 'competition class',
    'P3373': 'sibling',
    'P3450': 'sports season of league or competition',
    'P4552': 'mountain range',
}
RELATION_IDS = tuple(sorted(RELATION_NAMES, key=lambda p: int(p[1:])))
LABEL_WORDS = tuple(RELATION_NAMES[p] for p in RELATION_IDS)
FILES = ('train_wiki.json', 'val_wiki.json')
SUBDIR = 'fewrel'
_HELP = ('They are FewRel 1.0 as published by its authors: data/train_wiki.json '
         'and data/val_wiki.json of github.com/thunlp/FewRel.')


def read_fewrel(paths: Mapping[str, str], split: str) -> list[dict[str, Any]]:
  """Examples of one split from FewRel's JSON files (relation id -> instances)."""
  index = {p: i for i, p in enumerate(RELATION_IDS)}
  rows = []
  for name in FILES:
    with open(paths[name], encoding='utf-8') as f:
      data = json.load(f)
    for pid, instances in data.items():
      if pid not in index:
        raise ValueError(f'{paths[name]}: unknown FewRel relation {pid!r}; '
                         'expected the FewRel 1.0 wiki files.')
      for i, inst in enumerate(instances):
        part = {8: 'validation', 9: 'test'}.get(i % 10, 'train')
        if part != split:
          continue
        rows.append({
            'sentence': ' '.join(inst['tokens']),
            'head': inst['h'][0],
            'tail': inst['t'][0],
            'label': index[pid],
        })
  return rows


core.add_task(
    'fewrel',
    core.FileSource(
        'fewrel', SUBDIR,
        files={s: FILES for s in ('train', 'validation', 'test')},
        read_fn=lambda split, paths: read_fewrel(paths, split),
        columns={'sentence': tf.string, 'head': tf.string, 'tail': tf.string,
                 'label': tf.int32},
        how_to_get=_HELP),
    [functools.partial(preprocessors.fewrel, label_words=LABEL_WORDS)],
    task_type='relation_extraction', kind='classification',
    label_words=LABEL_WORDS,
    metric_fns=[metrics.accuracy], metric_names=['accuracy'],
    postprocess_fn=metrics.make_label_postprocessor(LABEL_WORDS),
    splits=['train', 'validation', 'test'],
    source_desc=f'files:{SUBDIR}/{{train_wiki.json,val_wiki.json}}',
    description='FewRel 1.0, 80-way relation classification')
