"""Subtitle text: SRT and WebVTT cues from (start s, end s, text), shared by the Serve endpoint and `s2t export`."""

from __future__ import annotations

from typing import Iterable


def timestamp(seconds: float, subtitle_format: str) -> str:
    """HH:MM:SS,mmm (srt) or HH:MM:SS.mmm (vtt)."""
    ms = round(seconds * 1000)
    h, m, s, ms = ms // 3_600_000, ms // 60_000 % 60, ms // 1000 % 60, ms % 1000
    return f"{h:02d}:{m:02d}:{s:02d}{',' if subtitle_format == 'srt' else '.'}{ms:03d}"


def subtitles(cues: Iterable[tuple[float, float, str]], subtitle_format: str) -> str:
    """Cues -> the whole SRT (numbered) or WebVTT (with its header) text."""
    blocks = []
    for number, (start, end, text) in enumerate(cues, start=1):
        span = f"{timestamp(start, subtitle_format)} --> {timestamp(end, subtitle_format)}"
        blocks.append((f"{number}\n" if subtitle_format == "srt" else "") + f"{span}\n{text}\n")
    return ("WEBVTT\n\n" if subtitle_format == "vtt" else "") + "\n".join(blocks)
