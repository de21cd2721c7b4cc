"""prompt-transfer: soft prompt tuning and prompt transfer on frozen T5 models."""
from prompt_transfer.model.config import T5Config, get_config
from prompt_transfer.model.models import EncoderDecoderModel, build_model
from prompt_transfer.model.pretrained import load_pretrained

__all__ = ['T5Config', 'get_config', 'EncoderDecoderModel', 'build_model', 'load_pretrained']
__version__ = '0.1.0'
