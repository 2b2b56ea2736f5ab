"""The Ray Data stages of every job: audio -> features on CPU actors, features -> text on the generation pool; on
CPU-only jobs both in one actor (`TranscribeAudio`).

Both take and return pyarrow tables, so the manifest's own columns pass through with their types untouched. A row
that fails keeps going with its `error` set; later stages leave such rows alone.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from s2t_model import DecodingOptions, FeatureExtractor, Speech2Text
from s2t_model.batching import CPU_MAX_FRAMES
from s2t_model.vad import shared_vad, speech_features

from .audio import INLINE_AUDIO, IO_CONCURRENCY, as_audio_error, is_remote, load_audio, store_failed
from .metrics import GenerationMetrics
from .storage import RowRetry, fetch_checkpoint

# Batches an audio actor works on at once (Ray Data's `max_concurrent_calls_per_actor`): one batch's reads wait on
# storage while another's features are computed. The CPU work itself goes one batch at a time (`ComputeFeatures.busy`).
CALLS_PER_ACTOR = 2
# The `words` column (--word-timestamps): each word's times in seconds from the row's start, and the word.
WORDS_TYPE = pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("word", pa.string())]))


@dataclass(frozen=True)
class FeatureOptions:
    """What an audio stage (`ComputeFeatures`, `DecodeAudio`) is built with: how rows are read, checked, and made
    into features (`TranscribeConfig.feature_options` builds it from a job's configuration)."""

    feature_config: dict  # the checkpoint's preprocessor config (FeatureExtractor.to_dict)
    min_duration_s: float = 0.1
    max_duration_s: float = 4 * 3600.0
    storage_options: dict | None = None  # fsspec options for the audio's URLs
    max_frames: int = CPU_MAX_FRAMES  # padded feature frames per batch of the fbank
    vad: str = "silero"  # or "off"
    io_concurrency: int = IO_CONCURRENCY  # audio files read at once
    row_retry: RowRetry = RowRetry()


@dataclass(frozen=True)
class GenerationOptions:
    """What a generation stage (`GenerateText`, `GenerateFromAudio`) is built with: the model, where it runs, and how
    it decodes (`TranscribeConfig.generation_options` builds it from a job's configuration)."""

    model_uri: str
    model_label: str  # the output's `model` column: the URI and the checkpoint's content hash
    device: str = "cpu"  # "cuda", "cpu", or "auto": the actor's GPU when it has one
    dtype: str = "float32"
    cuda_graphs: bool = True
    storage_options: dict | None = None  # fsspec options for the model's URL
    fetch_retry: RowRetry = RowRetry()  # the model's fetch, done again while the store fails
    tgt_lang: str | None = None  # every row's target language (None: the row's own, where the model has it)
    decoding: DecodingOptions = DecodingOptions()


def set_column(table: pa.Table, name: str, values, type: pa.DataType) -> pa.Table:
    column = pa.array(values, type=type)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)


def features_column(batch: pa.Table, n_mels: int) -> list[np.ndarray | None]:
    """The `features` column (flat float32 lists) -> each row's (T, n_mels) array (views of one copy); None where
    null."""
    column = batch.column("features").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False, writable=True)  # torch wants writable arrays
    offsets = column.offsets.to_numpy()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]].reshape(-1, n_mels) if valid[i] else None for i in range(len(column))]


class ComputeFeatures:
    """Decode each row's audio slice, find its speech (`speech_s`) and compute its fbank + CMVN features (T, 80),
    stored flat as float32 lists; null for a row without speech, which the generation stage gives the text ""."""

    def __init__(self, options: FeatureOptions):
        self.extractor = FeatureExtractor.from_dict(options.feature_config)
        # Reading a file is mostly waiting on storage (a round trip per request on an object store): threads read a
        # batch's rows at once. Memory stays one batch of samples, as when read one by one; libsndfile (called
        # through cffi) releases the GIL while it decodes.
        self.reads = ThreadPoolExecutor(options.io_concurrency, thread_name_prefix="audio-read")
        # Held while a batch's features are computed: a second batch meanwhile only reads (CALLS_PER_ACTOR).
        self.busy = threading.Lock()
        self.vad = shared_vad() if options.vad == "silero" else None
        self.options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch, features = self.compute(batch)
        flat = [None if f is None else f.reshape(-1) for f in features]
        return set_column(batch, "features", flat, pa.list_(pa.float32()))

    def compute(self, batch: pa.Table) -> tuple[pa.Table, list[np.ndarray | None]]:
        """-> the batch with `error`, `duration_s` and `speech_s` filled in, and each row's features (T, 80), None
        for errors and rows without speech."""
        batch, waves, speech = self.read(batch)
        rate = self.extractor.sampling_rate
        features: list[np.ndarray | None] = [None] * batch.num_rows
        good = sorted(waves)
        with self.busy:
            computed, seconds = speech_features(
                self.extractor, [waves[i] for i in good], rate, self.options.max_frames, self.vad
            )
        for i, row, row_speech in zip(good, computed, seconds):
            features[i], speech[i] = None if row is None else row.numpy(), row_speech
        return set_column(batch, "speech_s", speech, pa.float64()), features

    def read(self, batch: pa.Table) -> tuple[pa.Table, dict[int, np.ndarray], list[float | None]]:
        """-> the batch with `error` and `duration_s` filled in (its inline audio dropped), the samples of each row
        read (by row index), and each row's `speech_s` as far as known (0.0: a long recording's silent segment,
        not read)."""
        known = [c for c in ("speech_s", INLINE_AUDIO) if c in batch.column_names]
        rows = batch.select(["audio", "offset_s", "duration_s", "error", *known]).to_pylist()
        rate = self.extractor.sampling_rate
        waves: dict[int, np.ndarray] = {}
        errors = [row["error"] for row in rows]
        durations = [row["duration_s"] for row in rows]
        speech: list[float | None] = [row.get("speech_s") for row in rows]
        to_read = [i for i, row in enumerate(rows) if row["error"] is None and speech[i] != 0.0]
        # Local files are read in this thread: a local disk answers in microseconds, and handing each row to a
        # thread costs more than that (docs/decisions/2026-12-01-corpus-scale.md).
        remote = any(is_remote(rows[i]["audio"]) for i in to_read)
        for i, loaded in zip(to_read, (self.reads.map if remote else map)(self.load, [rows[i] for i in to_read])):
            if isinstance(loaded, str):
                errors[i] = loaded
            else:
                waves[i], durations[i] = loaded, len(loaded) / rate
        if INLINE_AUDIO in batch.column_names:  # decoded: not carried on to the generation actors or the output
            batch = batch.drop_columns([INLINE_AUDIO])
        batch = set_column(batch, "error", errors, pa.string())
        batch = set_column(batch, "speech_s", speech, pa.float64())  # filled in where speech is detected
        return set_column(batch, "duration_s", durations, pa.float64()), waves, speech

    def load(self, row: dict) -> np.ndarray | str:
        """One row's samples, or its error; read again (`row_retry`) while the store fails."""
        o = self.options
        try:
            return o.row_retry.call(
                lambda: load_audio(
                    row["audio"],
                    self.extractor.sampling_rate,
                    row["offset_s"] or 0.0,
                    row["duration_s"],
                    storage_options=o.storage_options,
                    data=row.get(INLINE_AUDIO),
                    connections=o.io_concurrency,
                    min_duration_s=o.min_duration_s,
                    max_duration_s=o.max_duration_s,
                ),
                store_failed,
            )
        except Exception as error:  # a file system or codec failure of this row only
            return str(as_audio_error(row["audio"], error))


class GenerateText:
    """Features -> text with `Speech2Text.transcribe_features`: length-sorted, frame-budgeted batches.

    One instance per actor loads the model once. Rows with an error pass through; a row whose generation fails gets
    its own error, the rest of its batch is still decoded.
    """

    def __init__(self, options: GenerationOptions):
        self.model = load_model(
            options.model_uri,
            options.storage_options,
            options.fetch_retry,
            options.device,
            options.dtype,
            options.cuda_graphs,
        )
        self.model_label = options.model_label
        self.tgt_lang = options.tgt_lang
        self.decoding = options.decoding
        self.on_batch = GenerationMetrics("job")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.generate(
            batch.drop_columns(["features"]), features_column(batch, self.model.config.input_feat_per_channel)
        )

    def generate(self, batch: pa.Table, features: list[np.ndarray | None]) -> pa.Table:
        """The batch with text, tgt_lang, num_tokens, avg_logprob, low_confidence, error and model set; features: each
        row's (T, 80), None for a row without speech (text "")."""
        errors = batch.column("error").to_pylist()
        langs = self._target_languages(batch, errors)
        to_decode = [i for i, error in enumerate(errors) if error is None]
        results = self._transcribe([features[i] for i in to_decode], [langs[i] for i in to_decode])
        texts, num_tokens, scores, low, words = ([None] * len(errors) for _ in range(5))
        for i, result in zip(to_decode, results):
            if isinstance(result, str):
                errors[i] = result
            else:
                texts[i], num_tokens[i], scores[i] = result.text, len(result.ids), result.avg_logprob
                low[i] = result.low_confidence
                words[i] = [{"start_s": w.start_s, "end_s": w.end_s, "word": w.word} for w in result.words or []]
        if self.decoding.word_timestamps:
            batch = set_column(batch, "words", words, WORDS_TYPE)
        for name, values, type in [
            ("text", texts, pa.string()),
            ("tgt_lang", langs, pa.string()),
            ("num_tokens", num_tokens, pa.int32()),
            ("avg_logprob", scores, pa.float32()),
            ("low_confidence", low, pa.bool_()),
            ("error", errors, pa.string()),
            ("model", [self.model_label] * len(errors), pa.string()),
        ]:
            batch = set_column(batch, name, values, type)
        return batch

    def _target_languages(self, batch: pa.Table, errors: list[str | None]) -> list[str | None]:
        """The job's target language, else the row's own (fairseq's tgt_lang) when the model has such tags."""
        known = self.model.tokenizer.langs if self.model.tokenizer else []
        rows = batch.column("tgt_lang").to_pylist()
        langs = []
        for i, row_lang in enumerate(rows):
            lang = self.tgt_lang or (row_lang if known and row_lang in known else None)
            if self.tgt_lang and self.tgt_lang not in known and errors[i] is None:
                errors[i] = f"unknown_tgt_lang: the model has no tag for {self.tgt_lang!r} (it has {known})"
            langs.append(lang)
        return langs

    def _transcribe(self, features: list[np.ndarray], langs: list[str | None]) -> list:
        if not features:
            return []
        try:
            return self.model.transcribe_features(features, langs, self.decoding, self.on_batch)
        except Exception:
            pass
        # One row broke the batch (or memory ran out): decode the rows one by one, so only the bad one fails.
        results = []
        for f, lang in zip(features, langs):
            try:
                results.extend(self.model.transcribe_features([f], [lang], self.decoding, self.on_batch))
            except Exception as error:
                results.append(f"generation_failed: {type(error).__name__}: {error}")
        return results


class TranscribeAudio:
    """Audio -> text in one actor: both stages above, with no features handed between processes.

    For jobs on CPUs only: there, separate feature actors would compete for the cores the model uses, and each hour of
    audio would travel between processes as 115 MB of features. With GPUs the stages stay apart, so that CPU actors
    keep the GPUs fed.
    """

    def __init__(self, features: FeatureOptions, generation: GenerationOptions):
        self.compute_features = ComputeFeatures(features)
        self.generate_text = GenerateText(generation)

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch, features = self.compute_features.compute(batch)
        # The features' lock: one batch's CPU work at a time, features or generation (the actor reserved
        # --generation-cpus, not twice that); another batch meanwhile only reads (CALLS_PER_ACTOR).
        with self.compute_features.busy:
            return self.generate_text.generate(batch, features)


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" where this process has a GPU, else "cpu"; any other device as it is: the one place "auto" is
    resolved, in the process that runs the model (a job's actor, a Serve replica)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(
    uri: str, storage_options: dict | None, retry: RowRetry, device: str, dtype: str, cuda_graphs: bool
) -> Speech2Text:
    """The model as a job's generation actor and a Serve replica load it: fetched with the store's retries
    (`storage.fetch_checkpoint`), on `device` ("auto" resolved here, in the process that runs it)."""
    folder = fetch_checkpoint(uri, storage_options, retry)
    model = Speech2Text.from_pretrained(
        folder, device=resolve_device(device), dtype=getattr(torch, dtype), cuda_graphs=cuda_graphs
    )
    model.source = uri  # its name in errors: the URI, not the cache folder
    return model
