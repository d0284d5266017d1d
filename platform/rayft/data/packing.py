"""Best-fit-decreasing packing of tokenized samples into rows of at most `capacity` tokens.

Each packed row keeps the lengths of its samples (`seq_lengths`); the collator turns them into
position_ids that restart at 0 for every sample, and transformers derives from those a
block-diagonal attention mask, so no sample attends to another (tests/test_packing.py proves it
by comparing logits).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the samples in each bin: longest first, each into the fullest bin it fits."""
    if any(length > capacity for length in lengths):
        raise ValueError(f"a sample is longer than the packing capacity {capacity}; truncate first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free_space: list[int] = []  # sorted remaining capacities, one entry per open bin
    bins_with_space: dict[int, list[int]] = defaultdict(list)  # remaining capacity -> bin ids
    for index in order:
        length = lengths[index]
        slot = bisect.bisect_left(free_space, length)
        if slot == len(free_space):
            bin_id, remaining = len(bins), capacity
            bins.append([])
        else:
            remaining = free_space.pop(slot)
            bin_id = bins_with_space[remaining].pop()
        bins[bin_id].append(index)
        remaining -= length
        if remaining > 0:
            bisect.insort(free_space, remaining)
            bins_with_space[remaining].append(bin_id)
    return bins


def packing_efficiency(lengths: Sequence[int], bins: list[list[int]], capacity: int) -> float:
    """Fraction of the rows' token slots that hold real tokens."""
    return sum(lengths) / (len(bins) * capacity) if bins else 0.0
