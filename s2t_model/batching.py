"""Length-sorted batches under a frame budget (fairseq's max_tokens): padding, not speech, is what a naive batch pays
for."""

from __future__ import annotations

import torch

# Padded feature frames per generation batch when none is given. A CPU is compute-bound at any batch size, so a
# modest budget (24,000 frames: 24 utterances of 10 s) bounds padding and memory at no cost. A GPU is bound by kernel
# launches until batches are large, so its default is 192,000 frames (192 utterances of 10 s); RTFx at 64 and 256
# utterances a batch: docs/benchmarks.md (`bash bench/gpu.sh`).
CPU_MAX_FRAMES = 24_000
GPU_MAX_FRAMES = 192_000


def default_max_frames(device: torch.device | str) -> int:
    return GPU_MAX_FRAMES if torch.device(device).type == "cuda" else CPU_MAX_FRAMES


def frame_budget_batches(num_frames: list[int], max_frames: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Indices sorted longest first, cut so that every batch's padded size (size x its longest) stays <= max_frames.

    An item longer than the budget on its own still gets a batch of one: the budget bounds padding, it never drops
    input.
    """
    order = sorted(range(len(num_frames)), key=lambda i: -num_frames[i])
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        # Sorted longest first, so the batch's first item sets its padded length.
        if (
            batch
            and (len(batch) + 1) * num_frames[batch[0]] <= max_frames
            and (max_batch_size is None or len(batch) < max_batch_size)
        ):
            batch.append(i)
        else:
            batches.append([i])
    return batches
