"""`s2t corpus spoken-numbers`: a synthetic corpus of English speech of spoken numbers, with translations.

Each utterance says one to three integers from 0 to 999,999 in English (espeak-ng, varied voices, speed, pitch),
resampled to 16 kHz, with random loudness, additive white/pink/brown noise at a random SNR and short random silence
around it, stored as 16 kHz mono FLAC (PCM_16). The targets are written with num2words:

- `text`: English for ASR, lowercase words only ("four hundred and five thousand six hundred and twelve");
- `text_fr`, `text_de`, `text_es`: num2words lowercased ("quatre cent cinq mille six cent douze"), with two num2words
  0.5.14 mistakes put right (see `fix_num2words`).

Several numbers in one utterance are spoken with a pause between them and written "a, b" in the translations and
"a b" in `text` (which has no punctuation).

The manifest `DIR/manifest.jsonl` is NeMo JSONL, one line per utterance in index order: `id`, `audio_filepath`
(relative to DIR), `duration` (seconds), `text`, `text_fr`, `text_de`, `text_es` and `numbers` (the integers spoken),
so that a held-out set can leave out every number of the training set (`--exclude-numbers`).

Deterministic: every random choice of utterance `index` comes from `numpy.random.default_rng([seed, index])`, and
espeak-ng gives the same samples for the same arguments, so any number of workers writes the same files.

Two commands work on such a corpus (both deterministic):

- `s2t corpus subset`: a few of its utterances within a size budget, with a quota of utterances of several numbers
  (the bundled demo corpus, `s2t_model.DEMO_CORPUS`; see `subset`);
- `s2t corpus long-form`: long recordings that join many of its utterances with pauses of low-level noise, with the
  position of each utterance in the recording (`segments`, the truth for long-form segmentation; see `long_form`).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16000
LANGS = ("fr", "de", "es")
MAX_NUMBER = 999_999
MULTI_PROBABILITY = 0.2  # utterances with two or three numbers

# espeak-ng's own English voices (the mbrola ones need mbrola, which is not a dependency).
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# Voice variants (`espeak-ng --voices=variant`, by file name), "" for none; left out: robots, whispers, heavy echo,
# "Demonic", "announcer" and "fast" (same as none).
VARIANTS = (
    "",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "m8",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "croak",
    "klatt",
    "klatt2",
    "klatt3",
    "klatt4",
    "klatt5",
    "klatt6",
    "adam",
    "Alex",
    "Alicia",
    "Andrea",
    "Andy",
    "Annie",
    "antonio",
    "aunty",
    "belinda",
    "benjamin",
    "boris",
    "caleb",
    "david",
    "Denis",
    "Diogo",
    "ed",
    "edward",
    "edward2",
    "Gene",
    "Gene2",
    "grandma",
    "grandpa",
    "gustave",
    "Henrique",
    "Hugo",
    "iven",
    "iven2",
    "iven3",
    "iven4",
    "Jacky",
    "john",
    "kaukovalta",
    "Lee",
    "linda",
    "marcelo",
    "Marco",
    "Mario",
    "max",
    "Michael",
    "michel",
    "miguel",
    "Mike",
    "norbert",
    "Nguyen",
    "pablo",
    "paul",
    "pedro",
    "quincy",
    "rob",
    "robert",
    "sandro",
    "shelby",
    "steph",
    "steph2",
    "steph3",
    "Storm",
    "travis",
    "victor",
    "zac",
    "anika",
    "AnxiousAndy",
)
NOISES = ("white", "pink", "brown")


# ----------------------------------------------------------------------------------------------------------- text


def fix_num2words(text: str, lang: str) -> str:
    """num2words 0.5.14 mistakes, put right (no-ops where num2words is right):

    - de: a thousands part ending in one gets "eins" ("einhunderteinstausend" for 101000): "eintausend";
    - es: a thousands part ending in one keeps "uno" ("veintiuno mil", "ciento uno mil"): apocope, "veintiún mil",
      "ciento un mil", "treinta y un mil".
    """
    if lang == "de":
        return text.replace("einstausend", "eintausend")
    if lang == "es":
        return text.replace("veintiuno mil", "veintiún mil").replace("uno mil", "un mil")
    return text


def number_words(n: int, lang: str) -> str:
    """One number in words, as it appears in the manifest: lowercase; English also without hyphens and commas."""
    from num2words import num2words

    text = fix_num2words(num2words(n, lang=lang).lower(), lang)
    if lang == "en":
        text = " ".join(text.replace("-", " ").replace(",", " ").split())
    return text


def texts(numbers: list[int]) -> dict[str, str]:
    """The manifest's text fields for an utterance saying `numbers` in this order."""
    out = {"text": " ".join(number_words(n, "en") for n in numbers)}
    for lang in LANGS:
        out[f"text_{lang}"] = ", ".join(number_words(n, lang) for n in numbers)
    return out


def spoken(numbers: list[int]) -> str:
    """What espeak-ng reads: English words, a comma (a pause) between numbers and none inside one."""
    return ", ".join(number_words(n, "en") for n in numbers)


# --------------------------------------------------------------------------------------------------- utterances


def draw_number(rng: np.random.Generator, exclude: frozenset[int] = frozenset()) -> int:
    """Number of digits uniform in 1..6, then a number with that many digits (0..9 for one digit); rejection
    sampling leaves out `exclude`."""
    for _ in range(100_000):
        digits = int(rng.integers(1, 7))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        n = int(rng.integers(low, 10**digits))
        if n not in exclude:
            return n
    raise ValueError(f"could not draw a number outside the {len(exclude)} excluded ones")


@dataclass
class Utterance:
    """Every random choice of one utterance, drawn from `default_rng([seed, index])`, in a fixed order."""

    index: int
    numbers: list[int]
    voice: str
    variant: str
    speed: int  # words per minute (espeak-ng -s)
    pitch: int  # 0..99 (-p)
    amplitude: int  # (-a)
    word_gap: int  # extra pause between words, in 10 ms (-g)
    level_db: float  # speech RMS, dBFS
    noise: str
    snr_db: float
    lead_s: float
    trail_s: float
    noise_seed: int = field(repr=False)

    @classmethod
    def draw(cls, seed: int, index: int, exclude: frozenset[int] = frozenset()) -> "Utterance":
        rng = np.random.default_rng([seed, index])
        count = 1 if rng.random() >= MULTI_PROBABILITY else int(rng.integers(2, 4))
        numbers = [draw_number(rng, exclude) for _ in range(count)]
        return cls(
            index=index,
            numbers=numbers,
            voice=VOICES[rng.integers(len(VOICES))],
            variant=VARIANTS[rng.integers(len(VARIANTS))],
            speed=int(rng.integers(130, 201)),
            pitch=int(rng.integers(30, 71)),
            amplitude=int(rng.integers(70, 141)),
            word_gap=int(rng.integers(0, 4)),
            level_db=float(rng.uniform(-35.0, -15.0)),
            noise=NOISES[rng.integers(len(NOISES))],
            snr_db=float(rng.uniform(10.0, 40.0)),
            lead_s=float(rng.uniform(0.05, 0.5)),
            trail_s=float(rng.uniform(0.05, 0.5)),
            noise_seed=int(rng.integers(2**63)),
        )

    def espeak_args(self) -> list[str]:
        voice = self.voice + (f"+{self.variant}" if self.variant else "")
        return [
            "espeak-ng",
            "--stdout",
            "-v",
            voice,
            "-s",
            str(self.speed),
            "-p",
            str(self.pitch),
            "-a",
            str(self.amplitude),
            "-g",
            str(self.word_gap),
            "--",
            spoken(self.numbers),
        ]


# ------------------------------------------------------------------------------------------------------- audio


def synthesize(args: list[str]) -> tuple[np.ndarray, int]:
    result = subprocess.run(args, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    audio, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    return (audio.mean(axis=1) if audio.ndim == 2 else audio), rate


def colored_noise(rng: np.random.Generator, length: int, color: str) -> np.ndarray:
    """Unit-RMS noise: white, pink (power 1/f) or brown (1/f^2), shaped in the frequency domain."""
    white = rng.standard_normal(length)
    if color != "white":
        spectrum = np.fft.rfft(white)
        freqs = np.arange(len(spectrum), dtype=np.float64)
        freqs[0] = 1.0
        spectrum /= freqs ** (0.5 if color == "pink" else 1.0)
        spectrum[0] = 0.0
        white = np.fft.irfft(spectrum, n=length)
    white -= white.mean()
    return white / max(float(np.sqrt(np.mean(white**2))), 1e-12)


def render(utt: Utterance) -> np.ndarray:
    """The utterance's 16 kHz mono waveform, float32 in [-1, 1]."""
    speech, rate = synthesize(utt.espeak_args())
    voiced = np.flatnonzero(np.abs(speech) > 1e-3)  # espeak-ng's own leading and trailing silence goes
    if len(voiced):
        speech = speech[voiced[0] : voiced[-1] + 1]
    speech = soxr.resample(speech.astype(np.float32), rate, SAMPLE_RATE, quality="HQ").astype(np.float64)
    speech *= 10 ** (utt.level_db / 20) / max(float(np.sqrt(np.mean(speech**2))), 1e-12)
    lead, trail = round(utt.lead_s * SAMPLE_RATE), round(utt.trail_s * SAMPLE_RATE)
    audio = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    noise = colored_noise(np.random.default_rng(utt.noise_seed), len(audio), utt.noise)
    audio += noise * 10 ** ((utt.level_db - utt.snr_db) / 20)
    peak = float(np.max(np.abs(audio)))
    if peak > 0.99:
        audio *= 0.99 / peak
    return audio.astype(np.float32)


_EXCLUDE: frozenset[int] = frozenset()  # numbers to leave out, set once per worker process


def _set_exclude(exclude: frozenset[int]) -> None:
    global _EXCLUDE
    _EXCLUDE = exclude


def make(job: tuple[str, int, int]) -> dict:
    """Writes one utterance's FLAC; returns its manifest row."""
    out_dir, seed, index = job
    utt = Utterance.draw(seed, index, _EXCLUDE)
    audio = render(utt)
    uid = f"spoken-numbers-{seed}-{index:06d}"
    relative = f"audio/{uid}.flac"
    soundfile.write(os.path.join(out_dir, relative), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return {
        "id": uid,
        "audio_filepath": relative,
        "duration": round(len(audio) / SAMPLE_RATE, 3),
        **texts(utt.numbers),
        "numbers": utt.numbers,
    }


# ------------------------------------------------------------------------------------------------------ corpus


def read_numbers(path: str) -> frozenset[int]:
    """Numbers to leave out: a corpus folder, a manifest (each line's `numbers`), or a text file of integers."""
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.jsonl")
    numbers: set[int] = set()
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                numbers.update(int(n) for n in json.loads(line)["numbers"])
            else:
                numbers.update(int(n) for n in line.replace(",", " ").split())
    return frozenset(numbers)


def generate(
    out_dir: str,
    count: int,
    seed: int,
    workers: int | None = None,
    exclude: frozenset[int] = frozenset(),
    progress: bool = True,
) -> list[dict]:
    """Writes `out_dir/audio/*.flac` and `out_dir/manifest.jsonl`; returns the manifest rows in index order."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, count))
    jobs = [(out_dir, seed, index) for index in range(count)]
    rows: list[dict] = []
    start, every = time.monotonic(), max(1, count // 20)

    def report(done: int) -> None:
        if progress and (done % every == 0 or done == count):
            elapsed = time.monotonic() - start
            eta = elapsed / done * (count - done)
            print(f"corpus: {done}/{count} utterances, {elapsed:.0f} s, eta {eta:.0f} s", flush=True)

    if workers == 1:
        _set_exclude(exclude)
        for job in jobs:
            rows.append(make(job))
            report(len(rows))
    else:
        # spawn: the parent may hold torch (the `s2t` command imports every job), which does not like fork.
        with multiprocessing.get_context("spawn").Pool(workers, _set_exclude, (exclude,)) as pool:
            for row in pool.imap(make, jobs, chunksize=max(1, min(16, count // (workers * 8)))):
                rows.append(row)
                report(len(rows))
    manifest = os.path.join(out_dir, "manifest.jsonl")
    with open(manifest + ".tmp", "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(manifest + ".tmp", manifest)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for manifest.jsonl and audio/")
    parser.add_argument("--count", type=int, required=True, help="number of utterances")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: CPU count)")
    parser.add_argument(
        "--exclude-numbers",
        metavar="FILE_OR_MANIFEST",
        help="a manifest (or its folder, or a file of integers) whose numbers this corpus leaves out",
    )


def main(args) -> None:
    exclude = read_numbers(args.exclude_numbers) if args.exclude_numbers else frozenset()
    start = time.monotonic()
    rows = generate(args.out, args.count, args.seed, args.workers, exclude)
    hours = sum(r["duration"] for r in rows) / 3600
    print(
        f"corpus: {len(rows)} utterances ({hours:.2f} h of audio) in {args.out} in {time.monotonic() - start:.0f} s",
        file=sys.stdout,
        flush=True,
    )


# ------------------------------------------------------------------------------------------------------ subset


def read_manifest(folder: str) -> list[dict]:
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_manifest(folder: str, rows: list[dict]) -> None:
    manifest = os.path.join(folder, "manifest.jsonl")
    with open(manifest + ".tmp", "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(manifest + ".tmp", manifest)


def select(sizes: list[int], counts: list[int], count: int, max_bytes: int, multi: int = 0) -> list[int]:
    """Which rows a subset keeps (their indices, in order): the first `count - multi` rows of one number and the
    first `multi` rows of several numbers whose files hold at most `cap` bytes per number spoken, for the largest
    `cap` that keeps the total within `max_bytes`. So the subset keeps the corpus' order and mix of numbers, and
    leaves out its longest utterances only as far as the budget needs."""
    if not 0 <= multi <= count:
        raise ValueError(f"--multi {multi} is not within 0..{count}")
    best: list[int] | None = None
    for cap in sorted({size / n for size, n in zip(sizes, counts)}):
        single = [i for i, (size, n) in enumerate(zip(sizes, counts)) if n == 1 and size <= cap][: count - multi]
        several = [i for i, (size, n) in enumerate(zip(sizes, counts)) if n > 1 and size <= cap * n][:multi]
        if len(single) + len(several) == count and sum(sizes[i] for i in single + several) <= max_bytes:
            best = sorted(single + several)
    if best is None:
        raise ValueError(f"no {count} utterances ({multi} of several numbers) fit in {max_bytes} bytes")
    return best


def subset(src_dir: str, out_dir: str, count: int, max_bytes: int, multi: int = 0) -> list[dict]:
    """Copies the utterances of `src_dir` that `select` keeps to `out_dir` (same relative paths, rows unchanged)."""
    rows = read_manifest(src_dir)
    sizes = [os.path.getsize(os.path.join(src_dir, row["audio_filepath"])) for row in rows]
    kept = [rows[i] for i in select(sizes, [len(row["numbers"]) for row in rows], count, max_bytes, multi)]
    for row in kept:
        target = os.path.join(out_dir, row["audio_filepath"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(src_dir, row["audio_filepath"]), target)
    write_manifest(out_dir, kept)
    return kept


def add_subset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="src", required=True, help="a corpus folder (manifest.jsonl and its audio)")
    parser.add_argument("--out", required=True, help="folder for manifest.jsonl and audio/")
    parser.add_argument("--count", type=int, required=True, help="number of utterances")
    parser.add_argument("--max-mb", type=float, required=True, help="most audio to keep, in MB (10^6 bytes)")
    parser.add_argument("--multi", type=int, default=0, help="how many of them say several numbers (default: 0)")


def subset_main(args) -> None:
    rows = subset(args.src, args.out, args.count, round(args.max_mb * 1e6), args.multi)
    size = sum(os.path.getsize(os.path.join(args.out, r["audio_filepath"])) for r in rows)
    print(
        f"corpus: {len(rows)} utterances of {args.src} ({sum(r['duration'] for r in rows):.0f} s of audio, "
        f"{size / 1e6:.2f} MB) in {args.out}",
        flush=True,
    )


# --------------------------------------------------------------------------------------------------- long form

PAUSE_S = (0.3, 2.0)  # the length of a pause, before, between and after the utterances
PAUSE_DB = (-65.0, -50.0)  # RMS of a recording's pause noise, dBFS (one level and color per recording)
TEXT_FIELDS = ("text", "text_fr", "text_de", "text_es")


def read_pcm16(path: str) -> np.ndarray:
    """A corpus utterance's samples, exactly as stored (16 kHz mono PCM_16)."""
    info = soundfile.info(path)
    if (info.samplerate, info.channels, info.subtype) != (SAMPLE_RATE, 1, "PCM_16"):
        raise ValueError(
            f"{path}: {info.samplerate} Hz, {info.channels} channels, {info.subtype}; "
            f"long-form wants {SAMPLE_RATE} Hz mono PCM_16"
        )
    return soundfile.read(path, dtype="int16")[0]


def pause(rng: np.random.Generator, color: str, level_db: float) -> np.ndarray:
    """A pause: PAUSE_S seconds of low-level noise (never digital silence), int16."""
    length = round(rng.uniform(*PAUSE_S) * SAMPLE_RATE)
    noise = colored_noise(rng, length, color) * 10 ** (level_db / 20) * 32767
    return np.clip(np.round(noise), -32768, 32767).astype(np.int16)


def long_form(
    src_dir: str, out_dir: str, count: int, min_seconds: float, max_seconds: float, seed: int, progress: bool = True
) -> list[dict]:
    """Writes `count` recordings `out_dir/audio/long-form-SEED-NNN.flac` and `out_dir/manifest.jsonl`.

    One `numpy.random.default_rng(seed)` draws an order of the utterances of `src_dir` and, for each recording in
    turn, a length in [min_seconds, max_seconds], the color and level of its pause noise and the pauses; a recording
    takes the next utterances of that order, each followed by a pause, after a first pause, until it is at least its
    length long; an utterance that would make it longer than `max_seconds` is left for the next recording. No
    utterance is used twice. The utterances' samples are copied exactly, so `segments[k]` says where source utterance
    `source_id` lies, with its texts and numbers: samples `round(start_s * 16000)` to `round(end_s * 16000)` (end
    excluded) are its samples.
    """
    rows = read_manifest(src_dir)
    fields = [k for k in TEXT_FIELDS if all(k in row for row in rows)]
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(rows))]
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    out: list[dict] = []
    for number in range(count):
        target = rng.uniform(min_seconds, max_seconds) * SAMPLE_RATE
        color, level_db = NOISES[rng.integers(len(NOISES))], float(rng.uniform(*PAUSE_DB))
        pieces = [pause(rng, color, level_db)]
        total, segments = len(pieces[0]), []
        while total < target and order:
            row = rows[order[0]]
            audio = read_pcm16(os.path.join(src_dir, row["audio_filepath"]))
            gap = pause(rng, color, level_db)
            if total + len(audio) + len(gap) > max_seconds * SAMPLE_RATE:
                break
            order.pop(0)
            segments.append(
                {
                    "start_s": total / SAMPLE_RATE,
                    "end_s": (total + len(audio)) / SAMPLE_RATE,
                    **{k: row[k] for k in fields},
                    "numbers": row.get("numbers", []),
                    "source_id": row["id"],
                }
            )
            pieces += [audio, gap]
            total += len(audio) + len(gap)
        if total < min_seconds * SAMPLE_RATE:
            raise ValueError(
                f"long-form recording {number} is {total / SAMPLE_RATE:.1f} s, shorter than "
                f"{min_seconds} s: {src_dir} has too few utterances left or too long ones"
            )
        uid = f"long-form-{seed}-{number:03d}"
        relative = f"audio/{uid}.flac"
        soundfile.write(
            os.path.join(out_dir, relative), np.concatenate(pieces), SAMPLE_RATE, format="FLAC", subtype="PCM_16"
        )
        texts_ = {k: (" " if k == "text" else ", ").join(s[k] for s in segments) for k in fields}
        out.append(
            {
                "id": uid,
                "audio_filepath": relative,
                "duration": round(total / SAMPLE_RATE, 3),
                **texts_,
                "numbers": [n for s in segments for n in s["numbers"]],
                "segments": segments,
            }
        )
        if progress:
            print(f"long-form: {uid}: {total / SAMPLE_RATE:.1f} s, {len(segments)} utterances", flush=True)
    write_manifest(out_dir, out)
    return out


def add_long_form_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="src", required=True, help="a corpus folder (manifest.jsonl and its audio)")
    parser.add_argument("--out", required=True, help="folder for manifest.jsonl and audio/")
    parser.add_argument("--count", type=int, required=True, help="number of recordings")
    parser.add_argument("--min-seconds", type=float, default=60.0, help="shortest recording (default: 60)")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="longest recording (default: 180)")
    parser.add_argument("--seed", type=int, required=True)


def long_form_main(args) -> None:
    if not 0 < args.min_seconds <= args.max_seconds:
        raise SystemExit("s2t corpus long-form: want 0 < --min-seconds <= --max-seconds")
    rows = long_form(args.src, args.out, args.count, args.min_seconds, args.max_seconds, args.seed)
    print(
        f"long-form: {len(rows)} recordings ({sum(r['duration'] for r in rows):.0f} s of audio, "
        f"{sum(len(r['segments']) for r in rows)} utterances of {args.src}) in {args.out}",
        flush=True,
    )
