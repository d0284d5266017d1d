"""Packing tokenized samples into rows of at most `capacity` tokens: best-fit-decreasing, refined
by a cutting-stock solve where that fits fewer rows (`pack`).

Each packed row keeps the lengths of its samples (`seq_lengths`); the collator turns them into
position_ids that restart at 0 for every sample, and transformers derives from those a
block-diagonal attention mask, so no sample attends to another (tests/test_packing.py proves it
by comparing logits).
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any


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


# Cutting-stock refinement: where best-fit-decreasing leaves rows short of the lower bound and
# the window holds few distinct lengths (chat data of similar prompts, where lengths that cluster
# just above a quarter of the row defeat BFD), the row patterns a linear program chooses pack
# tighter. Bounded: larger sets of lengths keep BFD's rows (BFD is near optimal there).
MAX_DISTINCT_LENGTHS = 64
MAX_PRICING_ROUNDS = 50
MILP_SECONDS = 2.0


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the samples in each row: best-fit-decreasing, refined by row patterns (a
    cutting-stock solve) when that fits fewer rows. Every sample in exactly one row."""
    bins = pack_best_fit(lengths, capacity)
    lower_bound = -(-sum(lengths) // capacity)
    if len(bins) <= lower_bound or len(set(lengths)) > MAX_DISTINCT_LENGTHS:
        return bins
    refined = pack_by_patterns(lengths, capacity, bins)
    return refined if refined is not None and len(refined) < len(bins) else bins


def pack_by_patterns(lengths: Sequence[int], capacity: int, start: list[list[int]]) -> list[list[int]] | None:
    """Gilmore-Gomory: a row pattern says how many samples of each length a row holds. Column
    generation finds the patterns the LP relaxation wants (pricing is a bounded knapsack over
    the duals), then an integer program over them picks how many rows of each; surplus places
    stay empty. None when the solver fails (BFD's rows are kept)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, linprog, milp

    count = Counter(lengths)
    sizes = sorted(count)
    index = {size: i for i, size in enumerate(sizes)}
    demand = np.array([count[size] for size in sizes])
    patterns = {tuple(_pattern([lengths[i] for i in row], index)) for row in start}
    patterns |= {tuple(_pattern([size] * min(count[size], capacity // size), index)) for size in sizes}
    columns = [list(p) for p in patterns]
    for _ in range(MAX_PRICING_ROUNDS):
        matrix = np.array(columns).T
        relaxed = linprog(np.ones(matrix.shape[1]), A_ub=-matrix, b_ub=-demand, bounds=(0, None), method="highs")
        if relaxed.status != 0:
            return None
        value, column = _best_pattern(sizes, list(demand), -relaxed.ineqlin.marginals, capacity)
        if value <= 1 + 1e-9 or column in columns:
            break
        columns.append(column)
    matrix = np.array(columns).T
    solved = milp(
        np.ones(matrix.shape[1]),
        constraints=LinearConstraint(matrix, lb=demand, ub=np.inf),
        integrality=np.ones(matrix.shape[1]),
        bounds=Bounds(0, np.inf),
        options={"time_limit": MILP_SECONDS},
    )
    if solved.x is None:
        return None
    members = defaultdict(list)
    for i, length in enumerate(lengths):
        members[length].append(i)
    rows = []
    for column, copies in zip(columns, np.round(solved.x).astype(int)):
        for _ in range(copies):
            row = [members[sizes[j]].pop() for j, n in enumerate(column) for _ in range(n) if members[sizes[j]]]
            if row:
                rows.append(row)
    return rows if sum(map(len, rows)) == len(lengths) else None


def _pattern(row_lengths: list[int], index: dict[int, int]) -> list[int]:
    column = [0] * len(index)
    for length in row_lengths:
        column[index[length]] += 1
    return column


def _best_pattern(sizes: list[int], counts: list[int], duals: Any, capacity: int) -> tuple[float, list[int]]:
    """The row pattern of the highest total dual value (a bounded knapsack, by binary splitting
    of each length's count into 0/1 items)."""
    import numpy as np

    pieces = []
    for i, (size, available) in enumerate(zip(sizes, counts)):
        take, chunk = min(available, capacity // size), 1
        while take > 0:
            n = min(chunk, take)
            pieces.append((i, n))
            take, chunk = take - n, chunk * 2
    best = np.zeros(capacity + 1)
    taken = []
    for i, n in pieces:
        weight, value = sizes[i] * n, duals[i] * n
        candidate = np.full(capacity + 1, -1.0)
        candidate[weight:] = best[: capacity + 1 - weight] + value
        took = candidate > best + 1e-12
        best = np.where(took, candidate, best)
        taken.append(took)
    load = int(np.argmax(best))
    value = float(best[load])
    column = [0] * len(sizes)
    for (i, n), took in zip(reversed(pieces), reversed(taken)):
        if took[load]:
            column[i] += n
            load -= sizes[i] * n
    return value, column
