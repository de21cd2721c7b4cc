"""Everything gin can configure besides the entry points, registered in one place.

gin binds entry points (`train`, `evaluate`, `infer`, in trainer.py and
evaluation.py) and the top-level objects they take: the model config, the
prompt module, the optimizer, prompt initialisers and training stages. Model
internals are not gin-configurable on purpose.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Tuple

import gin
import optax

from prompt_transfer import intrinsic
from prompt_transfer import progressive
from prompt_transfer import projector
from prompt_transfer.model.config import T5Config, get_config
from prompt_transfer.prompts import initializers
from prompt_transfer.prompts.bank import PromptBank
from prompt_transfer.prompts.free import free_prompt
from prompt_transfer.prompts.low_rank import LowRankPrompt
from prompt_transfer.prompts.slot import PromptModuleFactory
from prompt_transfer.training import data
from prompt_transfer.training import stages


@gin.configurable
def model_config(variant: str = 't5_1_1', size: str = 'small', **overrides: Any) -> T5Config:
  """The frozen model's T5Config (see config.get_config)."""
  return get_config(variant, size, **overrides)


@dataclasses.dataclass(frozen=True)
class ClassLabelInit:
  """Placeholder resolved by the trainer (`bind_task`): label words come from the task."""
  labels: Optional[Tuple[str, ...]] = None
  population_size: int = initializers.DEFAULT_POPULATION


@gin.configurable
def class_label_init(labels: Optional[Tuple[str, ...]] = None,
                     population_size: int = initializers.DEFAULT_POPULATION) -> ClassLabelInit:
  """Class-label init; labels default to the task's label words."""
  return ClassLabelInit(tuple(labels) if labels else None, population_size)


@gin.configurable
def prompt_config(length: int = 100, init: Any = None) -> Optional[PromptModuleFactory]:
  """The free prompt's module: `length` rows from `init` (prompts/*.gin set it).
  length 0: no prompt (model tuning)."""
  return free_prompt(length, init or initializers.random_uniform())


@gin.configurable
def low_rank_prompt(length: int = 100, rank: int = 4, init: Any = None) -> PromptModuleFactory:
  """A [length, d_model] prompt = u [length, rank] @ v [rank, d_model]
  (`train.prompt_module = @low_rank_prompt()`)."""
  return functools.partial(LowRankPrompt, length=length, rank=rank,
                           init=init or initializers.random_uniform())


@gin.configurable
def prompt_bank(num_prompts: int = gin.REQUIRED, length: int = 100, init: Any = None
                ) -> PromptModuleFactory:
  """K prompts, one chosen per example by its `task_ids` feature."""
  return functools.partial(PromptBank, num_prompts=num_prompts, length=length,
                           init=init or initializers.random_uniform())


@gin.configurable
def task_ids_mixture(task_names: Sequence[str] = gin.REQUIRED,
                     rates: Optional[Sequence[float]] = None) -> str:
  """The name of a mixture of `task_names` whose examples carry `task_ids`
  (each task's position in the list), for modules with one prompt per task
  (a prompt bank, a projector over K source prompts):
  `MIXTURE_OR_TASK_NAME = @task_ids_mixture()`."""
  if isinstance(task_names, str):  # a task, or a mixture standing for its tasks
    task_names = [t.name for t in data.leaf_tasks(task_names)]
  name = 'task_ids_' + '_'.join(task_names)
  return data.register_with_task_ids(name, list(task_names), rates)


@gin.configurable
def linear_warmup_decay(peak: float = gin.REQUIRED, total_steps: int = gin.REQUIRED,
                        warmup_fraction: float = 0.06) -> optax.Schedule:
  """Linear warm-up to `peak` over `warmup_fraction` of the steps, then linear
  decay to 0 (the IPT authors' schedule: transformers' linear schedule)."""
  warmup = max(1, int(round(warmup_fraction * total_steps)))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup),
       optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup))], [warmup])


def bind_task(prompt_module: Optional[PromptModuleFactory], task: Any
              ) -> Optional[PromptModuleFactory]:
  """Resolves a class-label initialiser (in the factory's fields) against the
  task's label words and vocabulary."""
  if not isinstance(prompt_module, functools.partial):
    return prompt_module
  init = prompt_module.keywords.get('init')
  if not isinstance(init, ClassLabelInit):
    return prompt_module
  labels = init.labels
  if labels is None:
    import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
    labels = tasks_lib.get_label_words(task.name)
  vocab = task.output_features['targets'].vocabulary
  resolved = initializers.from_class_labels(initializers.class_label_ids(labels, vocab),
                                            initializers.from_sampled_vocab(init.population_size))
  return functools.partial(prompt_module, init=resolved)


for _fn in (optax.adafactor, optax.adamw, optax.adam, optax.sgd, optax.constant_schedule,
            optax.linear_schedule, optax.warmup_cosine_decay_schedule,
            optax.warmup_constant_schedule if hasattr(optax, 'warmup_constant_schedule')
            else optax.constant_schedule):
  gin.external_configurable(_fn, module='optax')

for _fn in (initializers.random_uniform, initializers.from_sampled_vocab, initializers.from_file,
            initializers.from_array):
  gin.external_configurable(_fn, module='prompts')

gin.external_configurable(projector.projected_prompt)
gin.external_configurable(intrinsic.msf_autoencoder)
gin.external_configurable(intrinsic.intrinsic_prompt)
gin.external_configurable(intrinsic.fastfood_prompt)
gin.external_configurable(projector.from_projector, module='prompts')
gin.external_configurable(stages.Stage, module='stages')
gin.external_configurable(stages.keep_layers, module='stages')
gin.external_configurable(progressive.fpt_stages)
gin.external_configurable(progressive.PartialModel, module='stages')
