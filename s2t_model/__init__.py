"""Speech2Text (fairseq S2T) in plain PyTorch: loads Hugging Face checkpoints unchanged, decodes like transformers."""

from .config import Speech2TextConfig
from .decoding import GenerationOutput
from .features import FeatureExtractor
from .speech2text import Speech2Text
from .tokenizer import Tokenizer

__all__ = ["Speech2Text", "Speech2TextConfig", "FeatureExtractor", "Tokenizer", "GenerationOutput"]
