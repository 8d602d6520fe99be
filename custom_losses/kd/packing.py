"""Packing stage-two rows: several cases in one micro-batch row, no padding, no attention across cases.

A 7B on a large GPU idles on one short case per forward; `pack_by_length` bins the cases so each
micro-batch row holds up to `max_length` tokens. The bins are built once per epoch order-independently
(best-fit decreasing, like TRL's "bfd" strategy), so the same data gives the same bins on every run and
every rank, which resuming from a checkpoint relies on.

A packed row is a `build_kd_features` dict whose fields are its cases' fields concatenated, plus
`seq_lengths` (tokens of each case) and `answer_lengths` (answer tokens of each case, the tail of its
tokens: the soft-label fields hold answer positions only). An unpacked feature is a row of one case;
`row_segments` reads both, so `custom_losses.kd.trainer.KDDataCollator` has one code path. The collator
gives every row position ids restarting at 0 per case and no attention mask: transformers then builds a
block-diagonal causal mask for sdpa and eager (masking_utils.find_packed_sequence_indices), and
flash_attention_2 runs varlen on a single flattened row (`kd_padding_free`).
"""
from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from typing import Any

# The fields of a build_kd_features dict: per token (input_ids, labels) and per answer token (the rest).
TOKEN_FIELDS = ("input_ids", "labels")
ANSWER_FIELDS = ("kd_topk_ids", "kd_topk_logprobs", "kd_weights", "kd_in_diseases")


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


def row_segments(feature: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(tokens, answer tokens) of each case in a row; an unpacked feature is one case."""
    seq_lengths = feature.get("seq_lengths") or [len(feature["input_ids"])]
    answer_lengths = feature.get("answer_lengths") or [len(feature["kd_weights"])]
    if len(seq_lengths) != len(answer_lengths) or sum(seq_lengths) != len(feature["input_ids"]):
        raise ValueError(f"a packed row's seq_lengths {list(seq_lengths)} and answer_lengths {list(answer_lengths)} "
                         f"do not describe its {len(feature['input_ids'])} tokens")
    return list(zip(seq_lengths, answer_lengths))


def pack_features(features: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """build_kd_features dicts (or packed rows) -> one packed row: every field concatenated in order, plus
    seq_lengths and answer_lengths. Nothing is dropped or truncated; the caller chose what fits."""
    row: dict[str, list] = {name: [] for name in (*TOKEN_FIELDS, *ANSWER_FIELDS, "seq_lengths", "answer_lengths")}
    for feature in features:
        segments = row_segments(feature)
        for name in (*TOKEN_FIELDS, *ANSWER_FIELDS):
            row[name].extend(feature[name])
        row["seq_lengths"].extend(length for length, _ in segments)
        row["answer_lengths"].extend(answer for _, answer in segments)
    return row


class PackedDataset:
    """A map-style dataset of packed rows over FEATURES (a `datasets.Dataset` or a list of build_kd_features
    dicts): row i holds the cases of bin i of pack_by_length(lengths, max_length), packed when it is read, so the
    soft labels stay in FEATURES' Arrow storage (3000 cases x 128 top-k would not fit as Python lists)."""

    def __init__(self, features, max_length: int):
        self.features = features
        lengths = features["input_ids"] if hasattr(features, "column_names") else [f["input_ids"] for f in features]
        self.lengths = [len(ids) for ids in lengths]
        self.bins = pack_by_length(self.lengths, max_length)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, list]:
        return pack_features([self.features[case] for case in self.bins[index]])

    def __iter__(self):
        return (self[index] for index in range(len(self)))
