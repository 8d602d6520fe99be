"""Packing stage-two rows: several cases in one micro-batch row, no padding, no attention across cases.

A 7B on a large GPU idles on one ~600-token case per forward; `pack_by_length` bins the cases so each
micro-batch row holds up to `max_length` tokens. The bins are built once per epoch order-independently
(best-fit decreasing, like TRL's "bfd" strategy), so the same data gives the same bins on every run and
every rank, which resuming from a checkpoint relies on.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence


def pack_by_length(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of LENGTHS grouped into bins whose lengths sum to at most MAX_LENGTH (best-fit decreasing).

    Longest first, each item goes into the fullest bin that still has room for it, else a new bin.
    Ties keep index order, so the result is a pure function of (lengths, max_length). Bins are returned in
    the order they were opened (the longest cases' bins first), each bin's indices in ascending order.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    too_long = [(index, length) for index, length in enumerate(lengths) if length > max_length]
    if too_long:
        index, length = too_long[0]
        raise ValueError(f"item {index} has {length} tokens, more than max_length {max_length}")
    bins: list[list[int]] = []
    # (free space, bin number), kept sorted so the best fit is a binary search away
    free: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = bisect_left(free, (length, -1))
        if slot < len(free):
            room, number = free.pop(slot)
            bins[number].append(index)
            insort(free, (room - length, number))
        else:
            bins.append([index])
            insort(free, (max_length - length, len(bins) - 1))
    return [sorted(items) for items in bins]
