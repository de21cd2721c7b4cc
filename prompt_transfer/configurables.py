"""Everything gin can configure, registered in one place.

gin binds entry points (`train`, `evaluate`, `infer`) and the top-level objects
they take (model config, prompt spec, optimizer, prompt initialisers); model
internals are not gin-configurable on purpose.
"""
import gin
import optax

from prompt_transfer import evaluation  # noqa: F401  (registers evaluate, infer)
from prompt_transfer import prompts
from prompt_transfer import trainer  # noqa: F401  (registers train, model_config, ...)

for _fn in (optax.adafactor, optax.adamw, optax.adam, optax.sgd, optax.constant_schedule,
            optax.linear_schedule, optax.warmup_cosine_decay_schedule,
            optax.warmup_constant_schedule if hasattr(optax, 'warmup_constant_schedule')
            else optax.constant_schedule):
  gin.external_configurable(_fn, module='optax')

for _fn in (prompts.random_uniform, prompts.from_sampled_vocab, prompts.from_file,
            prompts.from_array):
  gin.external_configurable(_fn, module='prompts')
