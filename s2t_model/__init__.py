"""Speech2Text (fairseq S2T) in plain PyTorch: loads Hugging Face checkpoints unchanged, decodes like transformers."""

import os as _os

from .config import Speech2TextConfig
from .decoding import DecodingOptions, GenerationOutput
from .features import FeatureExtractor
from .segment import Segment, find_segments, segment_stream
from .speech2text import Speech2Text, Transcript
from .tokenizer import Tokenizer

_ASSETS = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "assets")
DEMO_MODEL = _os.path.join(_ASSETS, "demo-model")  # the demo model's checkpoint folder
# English speech of spoken numbers with fr/de/es translations, none of them said in the demo model's training corpus
# (NeMo manifest.jsonl, relative audio paths; made by `make demo-assets`, see demo/corpus.py):
DEMO_CORPUS = _os.path.join(_ASSETS, "demo-corpus")  # 50 utterances
DEMO_LONG_FORM = _os.path.join(_ASSETS, "long-form")  # two long recordings and where each utterance lies in them

__all__ = [
    "Speech2Text",
    "Speech2TextConfig",
    "FeatureExtractor",
    "Tokenizer",
    "DecodingOptions",
    "GenerationOutput",
    "Transcript",
    "Segment",
    "find_segments",
    "segment_stream",
    "DEMO_MODEL",
    "DEMO_CORPUS",
    "DEMO_LONG_FORM",
]
