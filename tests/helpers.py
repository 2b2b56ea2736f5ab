"""Helpers shared by the tests: text corpora, sentencepiece models and random-weight checkpoints made on the spot."""

import json
import random
from typing import TYPE_CHECKING

import sentencepiece

if TYPE_CHECKING:
    import numpy as np

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
WORDS = (
    "the a cat dog sat on mat and ran far away with his big red ball it was very happy today we will go "
    "there tomorrow morning evening speech model translation audio data".split()
)


def in_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10 - 2] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " and " + in_words(n % 100))
    return in_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + in_words(n % 1000))


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join([in_words(rng.randrange(10000))] + rng.sample(WORDS, rng.randint(1, 6))) for _ in range(n)]


def train_spm(folder, name, user_symbols=()):
    """A small fairseq-style spm model: ids 0..3 are <s>, <pad>, </s>, <unk>, then user-defined symbols."""
    text = folder / f"{name}.txt"
    text.write_text("\n".join(corpus(400, seed=0)) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / name),
        model_type="unigram",
        vocab_size=200,
        hard_vocab_limit=False,
        character_coverage=1.0,
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
        user_defined_symbols=list(user_symbols),
        minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / f"{name}.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    # vocab.json as in hub checkpoints: every spm piece with its spm id.
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    (folder / f"{name}.json").write_text(json.dumps(vocab))
    return str(folder / f"{name}.model"), str(folder / f"{name}.json")


MUSTC = ["pt", "fr", "ru", "nl", "ro", "it", "es", "de"]
LANG_TOKENS = [f"<lang:{lang}>" for lang in MUSTC]

TINY = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    conv_channels=32,
    max_source_positions=2000,
    max_target_positions=256,
)


def random_transformers_model(seed: int, weight_scale: float = 2.0, **config):
    """A transformers Speech2TextForConditionalGeneration with random weights that make decisive, varied choices.

    Default initialisation (std 0.02) gives near-uniform next-token distributions, where every decoder "agrees"
    by luck and ties hide bugs; larger weights give peaked distributions that depend on the input, and a push
    towards </s> makes hypotheses end at different lengths, so beam search has finished hypotheses to rank.
    """
    import torch
    from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

    torch.manual_seed(seed)
    model = Speech2TextForConditionalGeneration(Speech2TextConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, weight_scale / p.shape[1] ** 0.5)
            elif "layer_norm.weight" not in name:
                p.normal_(0, 0.1)
        final_bias = model.model.decoder.layer_norm.bias
        model.lm_head.weight[model.config.eos_token_id] += 2 * final_bias / final_bias.norm()
    return model


def demo_rows(count: int | None = None) -> list[dict]:
    """The bundled demo corpus' manifest rows, audio paths made absolute."""
    import os

    from s2t_model import DEMO_CORPUS

    with open(os.path.join(DEMO_CORPUS, "manifest.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        row["audio_filepath"] = os.path.join(DEMO_CORPUS, row["audio_filepath"])
    return rows[:count]


# A job run in small pieces (a file, a block and a batch of 2 rows; greedy): many files to kill a run between.
SMALL_RUN = [
    "--batch-size",
    "2",
    "--feature-batch-size",
    "2",
    "--rows-per-file",
    "2",
    "--rows-per-block",
    "2",
    "--num-beams",
    "1",
]


def non_speech(seconds: float = 5.0, rate: int = 16000) -> dict[str, "np.ndarray"]:
    """Audio without speech, made on the spot: noise of three colours at three levels, tones, a chord, clicks, mains
    hum, dither of one 16-bit step, exact zeros. float32 in [-1, 1)."""
    import numpy as np

    rng = np.random.default_rng(16)
    n = int(seconds * rate)
    t = np.arange(n) / rate

    def coloured(exponent: float) -> np.ndarray:  # power ~ 1/f**exponent: 0 white, 1 pink, 2 brown
        spectrum = np.fft.rfft(rng.standard_normal(n))
        spectrum[1:] /= np.arange(1, len(spectrum)) ** (exponent / 2)
        x = np.fft.irfft(spectrum, n)
        return x / np.sqrt(np.mean(x**2))

    def at_dbfs(x: np.ndarray, dbfs: float) -> np.ndarray:
        return x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)

    clips = {
        f"{colour}-{level}dB": at_dbfs(coloured(exponent), level)
        for colour, exponent in (("white", 0), ("pink", 1), ("brown", 2))
        for level in (-60, -40, -20)
    }
    clips["tone-440"] = 0.3 * np.sin(2 * np.pi * 440 * t)
    clips["tone-1k-sweep"] = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    clips["chord-c-major"] = sum(0.1 * np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0, 523.25))
    clicks = np.zeros(n)
    clicks[:: rate // 4] = 0.8
    clips["clicks"] = clicks
    clips["hum-50"] = sum(0.05 / k * np.sin(2 * np.pi * 50 * k * t) for k in (1, 2, 3, 5))
    clips["lsb-dither"] = np.round(rng.standard_normal(n)) / 32768
    clips["zeros"] = np.zeros(n)
    return {name: x.astype(np.float32) for name, x in clips.items()}


def killed_mid_job(manifest: str, output, ray_address: str, files: int, options=()) -> list[str]:
    """`s2t transcribe manifest output` with the demo model in a driver process of its own, on the tests' Ray,
    SIGKILLed once `files` Parquet files are in `output` (or after 240 s); the ids of the files left whole."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2t_model import DEMO_MODEL

    options = [*SMALL_RUN, *options]
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.transcribe", manifest, str(output), "--model", DEMO_MODEL, *options],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list(output.glob("*.parquet"))) < files and driver.poll() is None:
        time.sleep(0.05)  # a small job may write all its files within a few tenths of a second
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    intact = []
    for f in output.glob("*.parquet"):
        try:
            intact += pq.read_table(f, columns=["id"])["id"].to_pylist()
        except (pa.ArrowInvalid, OSError):
            pass  # cut short by the kill; the rerun removes it and redoes its rows
    return intact


def formats_people_keep(clip, rate: int = 16000) -> dict[str, tuple[str, bytes, int]]:
    """One mono float32 clip -> {format: (file extension, the file's bytes, the rate of the PCM to compare with)},
    encoded as podcasts, phone memos, video, browser recordings and streaming encoders store audio (PyAV's own
    encoders: bench.decode.encode_audio). mp4 carries an H.264 video track (libx264 is in PyAV's wheel)."""
    import numpy as np

    from bench.decode import VBR_MP3, encode_audio

    cover = np.random.default_rng(7).integers(0, 255, (600, 600, 3), dtype=np.uint8)  # ~200 kB of cover art
    enc = lambda *args, **kw: encode_audio(clip, rate, *args, **kw)  # noqa: E731
    return {
        "m4a": ("m4a", enc("ipod", "aac", out_rate=44100, channels=2, bit_rate=96000), rate),
        "mp4 (H.264 + AAC)": ("mp4", enc("mp4", "aac", out_rate=48000, bit_rate=128000, video="libx264"), rate),
        "mov": ("mov", enc("mov", "aac", out_rate=48000, bit_rate=128000), rate),
        "mkv": ("mkv", enc("matroska", "aac", bit_rate=64000), rate),
        "webm opus": ("webm", enc("webm", "libopus", out_rate=48000, bit_rate=32000), rate),
        "ogg opus": ("opus", enc("ogg", "libopus", out_rate=48000, bit_rate=32000), rate),
        "mp3 VBR, no Xing header": ("mp3", enc("mp3", "libmp3lame", out_rate=44100, **VBR_MP3), rate),
        "mp3 CBR, cover art, no Info header": (
            "mp3",
            enc(
                "mp3", "libmp3lame", out_rate=44100, bit_rate=128000, container_options={"write_xing": "0"}, cover=cover
            ),
            rate,
        ),
        "amr-nb": ("amr", enc("amr", "libopencore_amrnb", out_rate=8000, bit_rate=12200), 8000),
        "wma": ("wma", enc("asf", "wmav2", out_rate=44100, bit_rate=64000), rate),
    }


# ---- a fault-injecting proxy in front of the tests' S3 server -----------------------------------------------------

S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
MIXED = ("500", "503", "reset", "reset_body")


class Fault:
    """A rule of `FaultProxy`: requests whose method is in `methods` and whose path contains `path` get the fault
    `kind` with probability `rate` (drawn from a hash of the request: the same requests get the same faults in
    every run), or the first `first` of them all.

    kind: "500" (S3 InternalError), "503" (SlowDown), "reset" (the connection closed before any answer), "reset_body"
    (headers and half the body, then the connection closed), "stall" (no answer for `stall_s`, then closed),
    "lost_answer" (forwarded, so the store does it, then closed before the answer), "mixed" (one of MIXED each time).
    """

    def __init__(
        self,
        kind: str,
        rate: float = 1.0,
        methods=("GET", "HEAD", "PUT", "POST", "DELETE"),
        path: str = "",
        first: int | None = None,
        stall_s: float = 5.0,
    ):
        self.kind, self.rate, self.methods, self.path, self.first, self.stall_s = (
            kind,
            rate,
            methods,
            path,
            first,
            stall_s,
        )
        self.fired = 0

    def fires(self, method: str, path: str, draw: float) -> bool:
        if method not in self.methods or self.path not in path:
            return False
        if self.first is not None:
            return self.fired < self.first
        return draw < self.rate


def start_fault_proxy(upstream: str, seed: int = 0):
    """A proxy in front of `upstream` (moto's S3 server) that injects the faults of its `faults` list (`Fault`
    rules, first firing wins; empty: a plain relay), in a thread of this process; -> the server (its `injected`
    counts faults by kind) and its URL."""
    import collections
    import hashlib
    import socket
    import struct
    import threading
    import time
    from http.server import ThreadingHTTPServer

    from bench.io import LatencyProxy

    class FaultyProxy(LatencyProxy):
        def relay(self) -> None:
            server = self.server
            body = self.request_body()
            with server.lock:
                key = (self.command, self.path, self.headers.get("Range"))
                server.seen[key] += 1
                digest = hashlib.sha256(repr((server.seed, key, server.seen[key])).encode()).digest()
                draw, pick = struct.unpack("<QQ", digest[:16])
                fault = next((f for f in server.faults if f.fires(self.command, self.path, draw / 2**64)), None)
                if fault is not None:
                    fault.fired += 1
                    kind = MIXED[pick % len(MIXED)] if fault.kind == "mixed" else fault.kind
                    server.injected[kind] += 1
            if fault is None:
                return self.answer(*self.ask_upstream(body))
            if kind in ("500", "503"):
                code, message = S3_ERRORS[int(kind)]
                xml = (
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message>"
                    f"</Error>"
                ).encode()
                self.send_response(int(kind))
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            if kind == "stall":
                time.sleep(fault.stall_s)
            elif kind == "lost_answer":
                self.ask_upstream(body)
            elif kind == "reset_body" and self.command == "GET":
                response, data = self.ask_upstream(body)
                self.answer(response, data, sent=len(data) // 2)
                self.wfile.flush()
            self.reset()

        def reset(self) -> None:
            """Close the connection with a TCP reset (SO_LINGER 0), as a store's load balancer may."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def count(self, method: str, step: int) -> None:
            pass

    host, port = upstream.removeprefix("http://").split(":")
    server = Server(("127.0.0.1", 0), FaultyProxy)
    server.upstream, server.latency_s, server.seed = (host, int(port)), 0.0, seed
    server.faults, server.lock = [], threading.Lock()
    server.seen, server.injected = collections.Counter(), collections.Counter()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
