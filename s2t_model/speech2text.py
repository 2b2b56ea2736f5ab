"""`Speech2Text`: the network plus its feature extractor and tokenizer, loading, saving, decoding and transcribing."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import alignment, checkpoint
from .batching import default_max_frames, frame_budget_batches
from .config import Speech2TextConfig
from .decoding import DecodingOptions, GenerationOutput, generate
from .features import FeatureExtractor
from .model import Speech2TextModule
from .tokenizer import Tokenizer

TgtLang = str | None | Sequence[str | None]
# Default of --min-avg-logprob: in the gap between the demo model's scores on speech and on non-speech decoded
# without the VAD (the scores, and how to choose another checkpoint's value: docs/speech-detection.md).
MIN_AVG_LOGPROB = -0.3


class Speech2Text(Speech2TextModule):
    def __init__(
        self,
        config: Speech2TextConfig,
        feature_extractor: FeatureExtractor | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        super().__init__(config)
        self.feature_extractor = feature_extractor or FeatureExtractor()
        self.tokenizer = tokenizer
        self.source = None  # where it was loaded from

    @classmethod
    def from_pretrained(
        cls,
        uri: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        storage_options: dict | None = None,
        cuda_graphs: bool = True,
    ) -> "Speech2Text":
        """Load a transformers Speech2Text checkpoint from a local folder or any fsspec URL (s3://, file://, hf://).

        cuda_graphs: on a GPU, decode with the decoder step captured as CUDA graphs (s2t_model/cuda_graphs.py);
        False decodes eagerly (the same ids in float32; for debugging, or a driver that cannot capture graphs)."""
        folder = checkpoint.local_folder(uri, storage_options)
        config = Speech2TextConfig.from_pretrained(folder)
        feature_extractor = FeatureExtractor.from_pretrained(folder)
        # A checkpoint without vocab.json still decodes to ids (random-weight test models, say), not to text.
        has_vocab = os.path.exists(os.path.join(folder, "vocab.json"))
        tokenizer = Tokenizer.from_pretrained(folder) if has_vocab else None
        with torch.device("meta"):  # no time spent on random weights that are overwritten at once
            model = cls(config, feature_extractor, tokenizer)
        checkpoint.load_weights(model, checkpoint.read_state_dict(folder), source=str(uri))
        model.source = str(uri)
        model.use_cuda_graphs = cuda_graphs
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, folder: str, dtype: torch.dtype | None = None) -> None:
        """Write a folder that both `Speech2Text.from_pretrained` and transformers' `from_pretrained` load.

        dtype: store the weights in this dtype (default: as they are); loading casts them to the dtype asked for.
        """
        os.makedirs(folder, exist_ok=True)
        self.config.save_pretrained(folder)
        checkpoint.save_weights(self, folder, dtype)
        self.feature_extractor.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forced_tokens(self, tgt_lang: TgtLang, batch_size: int) -> Tensor:
        """(B,) id of each row's target-language tag, forced as its first token; -1 where nothing is forced."""
        langs = [tgt_lang] * batch_size if tgt_lang is None or isinstance(tgt_lang, str) else list(tgt_lang)
        if len(langs) != batch_size:
            raise ValueError(f"tgt_lang has {len(langs)} entries for a batch of {batch_size}")
        if any(lang is not None for lang in langs) and self.tokenizer is None:
            raise ValueError("tgt_lang needs a tokenizer that knows the language tags, and this model has none")
        ids = [-1 if lang is None else self.tokenizer.lang_id(lang) for lang in langs]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def generate(
        self,
        features: Tensor,
        lengths: Tensor,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        length_penalty: float | None = None,
        early_stopping: bool | str | None = None,
        num_return_sequences: int = 1,
        tgt_lang: TgtLang = None,
    ) -> GenerationOutput:
        """Decode a padded batch of features (B, T, 80) with lengths (B,); unset options come from the config.

        max_length counts the start token, as in transformers (max_new_tokens = max_length - 1); tgt_lang is one
        language for the whole batch or one per row (None for no forced language).
        """
        c = self.config
        if max_new_tokens is None:
            max_new_tokens = (max_length if max_length is not None else c.max_length) - 1
        return generate(
            self,
            features.to(self.device),
            lengths.to(self.device),
            forced=self.forced_tokens(tgt_lang, features.shape[0]),
            max_new_tokens=max_new_tokens,
            num_beams=c.num_beams if num_beams is None else num_beams,
            length_penalty=c.length_penalty if length_penalty is None else length_penalty,
            early_stopping=c.early_stopping if early_stopping is None else early_stopping,
            num_return_sequences=num_return_sequences,
        )

    def transcribe(
        self,
        waveforms: Sequence[np.ndarray] | np.ndarray,
        sampling_rate: int,
        tgt_lang: TgtLang = None,
        **options,
    ) -> list[str]:
        """Waveforms (a list of 1-D arrays) -> texts, in length-sorted batches of at most `max_frames` padded frames
        (default: the device's, s2t_model.batching.default_max_frames). options: `DecodingOptions`' fields."""
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            waveforms = [waveforms]
        decoding = DecodingOptions(**options)
        results = self.transcribe_features(
            self.features(waveforms, sampling_rate, decoding.max_frames), tgt_lang=tgt_lang, options=decoding
        )
        return [result.text for result in results]

    def features(
        self, waveforms: Sequence[np.ndarray], sampling_rate: int, max_frames: int | None = None
    ) -> list[Tensor]:
        """Waveforms (1-D arrays) -> features (T_i, 80) each, on the model's device, computed in length-sorted batches
        of at most `max_frames` padded frames (a batch pads every waveform to its longest)."""
        max_frames = max_frames or default_max_frames(self.device)
        return self.feature_extractor.each(waveforms, sampling_rate, max_frames, device=self.device)

    def transcribe_features(
        self,
        features: Sequence[Tensor | np.ndarray | None],
        tgt_lang: TgtLang = None,
        options: DecodingOptions | None = None,
        on_batch: Callable[[list[int]], None] | None = None,
        **fields,
    ) -> list[Transcript]:
        """Features of utterances, each (T_i, 80) -> one `Transcript` each, in the order given, decoded as `options`
        (`DecodingOptions`, with any of its `fields` given here instead).

        None stands for an utterance without speech (see `vad.speech_features`): its transcript is empty, and the
        model does not run on it. A transcript whose mean log-probability is below `min_avg_logprob` is flagged
        `low_confidence`. word_timestamps: each transcript's `words`, timed in its utterance; logprobs: each
        token's log-probability (`token_logprobs`); both from one teacher-forced pass over the ids decoded
        (s2t_model/alignment.py). on_batch: called with each generation batch's utterance lengths in frames (metrics).

        The one path from features to text that the batch job, the Serve endpoint and `transcribe` share: utterances
        are sorted by length and cut into batches of at most `max_frames` padded frames (fairseq's max_tokens), so a
        batch pays for little padding and its memory is bounded whatever the mix of lengths.
        """
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: this checkpoint has no vocab.json, so ids cannot be turned into text")
        langs = [tgt_lang] * len(features) if tgt_lang is None or isinstance(tgt_lang, str) else list(tgt_lang)
        if len(langs) != len(features):
            raise ValueError(f"tgt_lang has {len(langs)} entries for {len(features)} utterances")
        o = dataclasses.replace(options or DecodingOptions(), **fields)
        results = [Transcript("", [], None, speech=False) for _ in features]
        heard = [i for i, f in enumerate(features) if f is not None]
        max_frames = o.max_frames or default_max_frames(self.device)
        for batch in frame_budget_batches([len(features[i]) for i in heard], max_frames):
            batch = [heard[j] for j in batch]
            if on_batch is not None:
                on_batch([len(features[i]) for i in batch])
            padded, lengths = pad_features([features[i] for i in batch], self.device)
            out = self.generate(
                padded,
                lengths,
                num_beams=o.num_beams,
                max_new_tokens=o.max_new_tokens,
                length_penalty=o.length_penalty,
                early_stopping=o.early_stopping,
                tgt_lang=[langs[i] for i in batch],
            )
            timed = self.timed(padded, lengths, out.ids, o.word_timestamps) if o.word_timestamps or o.logprobs else None
            for n, (i, ids, score) in enumerate(zip(batch, out.ids, out.scores)):
                low = o.min_avg_logprob is not None and score < o.min_avg_logprob
                results[i] = Transcript(self.tokenizer.decode(ids), ids, score, low_confidence=low)
                if timed is not None:
                    results[i].token_logprobs = timed[n][0] if o.logprobs else None
                    results[i].words = timed[n][1]
        return results

    def timed(
        self, padded: Tensor, lengths: Tensor, ids: list[list[int]], word_timestamps: bool = True
    ) -> list[tuple[list[float], list[alignment.Word] | None]]:
        """A batch's decoded ids -> each row's token log-probabilities and (with word_timestamps) its words."""
        heads = alignment.alignment_heads(self) if word_timestamps else []
        passes = alignment.teacher_forced(self, padded, lengths, ids, heads)
        out = []
        for row, result in zip(ids, passes):
            found = None
            if word_timestamps:
                pieces, content = alignment.text_pieces(self, row)
                found = alignment.words(
                    pieces,
                    content,
                    result.weights,
                    alignment.frame_seconds(self),
                    bool(row) and row[-1] == self.config.eos_token_id,
                    result.weights.shape[-1],
                    alignment.filter_width(self),
                    alignment.method(self),
                )
            out.append((result.logprobs, found))
        return out

    def align_ids(
        self, features: Sequence[Tensor | np.ndarray], ids: Sequence[list[int]], max_frames: int | None = None
    ) -> list[Transcript]:
        """Forced alignment: utterances' features (T_i, 80) and given token ids (a reference's `tokenizer.encode`)
        -> one `Transcript` each with those ids' words and log-probabilities (no decoding)."""
        results: list[Transcript | None] = [None] * len(features)
        max_frames = max_frames or default_max_frames(self.device)
        for batch in frame_budget_batches([len(f) for f in features], max_frames):
            padded, lengths = pad_features([features[i] for i in batch], self.device)
            for i, (logprobs, found) in zip(batch, self.timed(padded, lengths, [list(ids[i]) for i in batch])):
                mean = sum(logprobs) / max(1, len(logprobs))
                results[i] = Transcript(
                    self.tokenizer.decode(ids[i]), list(ids[i]), mean, words=found, token_logprobs=logprobs
                )
        return results


@dataclasses.dataclass
class Transcript:
    text: str
    ids: list[int]  # generated tokens, </s> included when it was reached
    avg_logprob: float | None  # mean log-probability per generated token; None without speech
    low_confidence: bool = False  # avg_logprob below the caller's min_avg_logprob
    speech: bool = True  # False: speech detection found none, and the model did not run
    words: list[alignment.Word] | None = None  # with word_timestamps: times from the utterance's start
    token_logprobs: list[float] | None = None  # with logprobs: one per id


def pad_features(features: Sequence[Tensor | np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    """Utterances (T_i, 80) -> padded (B, T_max, 80) float32 on `device`, and lengths (B,)."""
    rows = [torch.as_tensor(f, dtype=torch.float32) for f in features]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return padded.to(device), lengths.to(device)
