"""The model's configuration: transformers' Speech2TextConfig fields, read from and written to `config.json`.

Hub checkpoints keep their decoding defaults (num_beams, max_length, early_stopping) in `config.json`; newer
transformers versions move them to `generation_config.json`. We read both (the latter wins) and write both, so a
folder we save loads in old and new transformers alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

GENERATION_FIELDS = ("num_beams", "max_length", "early_stopping", "length_penalty", "num_return_sequences")


@dataclass
class Speech2TextConfig:
    vocab_size: int = 10000
    d_model: int = 256
    encoder_layers: int = 12
    encoder_ffn_dim: int = 2048
    encoder_attention_heads: int = 4
    decoder_layers: int = 6
    decoder_ffn_dim: int = 2048
    decoder_attention_heads: int = 4
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    activation_function: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = True
    tie_word_embeddings: bool = True
    use_cache: bool = True
    is_encoder_decoder: bool = True
    # Special tokens (fairseq's dictionary order).
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    # Positions and the convolutional subsampler.
    max_source_positions: int = 6000
    max_target_positions: int = 1024
    num_conv_layers: int = 2
    conv_kernel_sizes: list[int] = field(default_factory=lambda: [5, 5])
    conv_channels: int = 1024
    input_feat_per_channel: int = 80
    input_channels: int = 1
    # Decoding defaults (fairseq-generate's, as the hub checkpoints have them).
    num_beams: int = 5
    max_length: int = 200
    early_stopping: bool | str = True
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    # Fields of config.json that we do not use, kept so that save_pretrained writes them back.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.conv_kernel_sizes = list(self.conv_kernel_sizes)
        if len(self.conv_kernel_sizes) != self.num_conv_layers:
            raise ValueError(
                f"config: conv_kernel_sizes {self.conv_kernel_sizes} must have "
                f"num_conv_layers={self.num_conv_layers} entries"
            )
        if self.activation_function != "relu":
            raise ValueError(f"config: activation_function {self.activation_function!r} is not supported (only relu)")
        for n_heads, name in ((self.encoder_attention_heads, "encoder"), (self.decoder_attention_heads, "decoder")):
            if self.d_model % n_heads:
                raise ValueError(f"config: d_model {self.d_model} is not divisible by {name}_attention_heads {n_heads}")

    @classmethod
    def from_dict(cls, values: dict) -> "Speech2TextConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in values.items() if k not in known}
        if isinstance(kwargs.get("eos_token_id"), list):  # some configs list several; S2T has one
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_pretrained(cls, folder: str) -> "Speech2TextConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder}: no config.json, so this is not a Speech2Text checkpoint folder")
        with open(path) as f:
            values = json.load(f)
        if values.get("model_type", "speech_to_text") != "speech_to_text":
            raise ValueError(f"{path}: model_type is {values['model_type']!r}, expected 'speech_to_text'")
        generation_path = os.path.join(folder, "generation_config.json")
        if os.path.exists(generation_path):
            with open(generation_path) as f:
                generation = json.load(f)
            values.update({k: v for k, v in generation.items() if k in GENERATION_FIELDS and v is not None})
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        values = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {
            **self.extra,
            **values,
            "architectures": ["Speech2TextForConditionalGeneration"],
            "model_type": "speech_to_text",
        }

    def generation_dict(self) -> dict:
        return {
            "_from_model_config": False,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            **{k: getattr(self, k) for k in GENERATION_FIELDS},
        }

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(self.generation_dict(), f, indent=2, sort_keys=True)
