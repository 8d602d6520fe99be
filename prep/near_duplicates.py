"""Exact and near-duplicate case texts: groups within one file, copies of training cases in a test file.

Near means a Jaccard similarity of at least `threshold` between the texts' sets of character n-grams
(NearDuplicates: n = 5, threshold 0.8 by default). Candidate pairs come from MinHash signatures banded for
locality-sensitive hashing (Broder 1997; Leskovec, Rajaraman and Ullman, "Mining of Massive Datasets", ch. 3);
every candidate is then checked against the exact Jaccard of its n-gram sets, so a pair counts only when it
really reaches the threshold. The bands are chosen so a pair exactly at the threshold becomes a candidate with
probability at least RECALL: MinHash's estimate only decides what is checked, never what is reported.
Exact means the same text after trimming whitespace at the ends; exact copies are found by that text alone.
Groups are the connected components (union-find) of exact and near pairs, so a chain of near pairs is one group.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NUM_PERM = 128               # MinHash permutations: the estimate's standard error is about 0.035 at J = 0.8
RECALL = 0.999               # chance that a pair exactly at the threshold is checked at all
SLACK_SIGMAS = 6.0           # a candidate whose estimate is further below the threshold is not checked
_MIX = np.uint64(0x9E3779B97F4A7C15)
_PRIME = np.uint64(1099511628211)
_EMPTY = np.iinfo(np.uint64).max


@dataclass(frozen=True)
class NearDuplicates:
    """Which texts count as near duplicates: character NGRAM sets with a Jaccard similarity of THRESHOLD or more."""

    ngram: int = 5
    threshold: float = 0.8

    def __post_init__(self) -> None:
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or self.ngram < 1:
            raise ValueError(f"key 'split.near_duplicates.ngram': must be a whole number of 1 or more, got {self.ngram!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"key 'split.near_duplicates.threshold': must be in (0, 1], got {self.threshold!r}")


def exact_text(text: str) -> str:
    """The text two cases must share to be exact copies."""
    return text.strip()


def ngrams(text: str, n: int) -> set[str]:
    """The character n-grams of TEXT (trimmed); a text shorter than N is its own single n-gram."""
    text = exact_text(text)
    if len(text) <= n:
        return {text} if text else set()
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|A ∩ B| / |A ∪ B|; two empty sets are identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _splitmix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: spreads a rolling hash's bits so the permutations below see uniform values."""
    z = values + _MIX
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of TEXT's character n-grams (as ngrams() makes them), unique, computed with numpy."""
    text = exact_text(text)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) == 0:
        return np.empty(0, dtype=np.uint64)
    width = min(n, len(codes))
    rolled = np.zeros(len(codes) - width + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(width):     # polynomial hash of each window, modulo 2**64
            rolled = rolled * _PRIME + codes[k:k + len(rolled)]
        return np.unique(_splitmix(rolled))


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2 ** 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)   # odd: a bijection
    b = rng.integers(0, 2 ** 63, size=num_perm, dtype=np.uint64)
    return a, b


def signatures(hashes: Sequence[np.ndarray], num_perm: int = NUM_PERM, seed: int = 1) -> np.ndarray:
    """MinHash signatures, one row per text: for each of NUM_PERM permutations x -> a*x + b (mod 2**64), the
    least permuted n-gram hash. An empty text's row is all 2**64 - 1 (it matches nothing by estimate)."""
    a, b = _permutations(num_perm, seed)
    out = np.full((len(hashes), num_perm), _EMPTY, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for row, values in enumerate(hashes):
            if len(values):
                out[row] = (values[:, None] * a[None, :] + b[None, :]).min(axis=0)
    return out


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """MinHash's estimate of the Jaccard similarity: the share of permutations whose minima agree."""
    return float(np.mean(sig_a == sig_b))


def bands_for(threshold: float, num_perm: int = NUM_PERM, recall: float = RECALL) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest chance candidates) such that a pair at THRESHOLD shares at
    least one band with probability RECALL or more: 1 - (1 - t**rows)**bands >= recall."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            best = (bands, rows)
    return best


def _buckets(sigs: np.ndarray, bands: int, rows: int) -> list[dict[bytes, list[int]]]:
    tables: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
    for index, sig in enumerate(sigs):
        if sig[0] == _EMPTY:
            continue
        for band in range(bands):
            tables[band][sig[band * rows:(band + 1) * rows].tobytes()].append(index)
    return tables


def _plausible(pairs: list[tuple[int, int]], sigs_a: np.ndarray, sigs_b: np.ndarray,
               threshold: float) -> list[tuple[int, int]]:
    """The candidate pairs whose MinHash estimate is within SLACK_SIGMAS standard errors of the threshold: a band
    shared by chance (common phrasing in clinical templates) is dropped before the exact check, a true pair
    almost never (below one in a million at six standard errors)."""
    if not pairs:
        return []
    first, second = (np.array(side) for side in zip(*pairs))
    estimates = (sigs_a[first] == sigs_b[second]).mean(axis=1)
    slack = SLACK_SIGMAS * (threshold * (1 - threshold) / sigs_a.shape[1]) ** 0.5
    return [pair for pair, estimate in zip(pairs, estimates) if estimate >= threshold - slack]


class _Texts:
    """Texts with their n-gram sets made once, when a candidate pair first needs them."""

    def __init__(self, texts: Sequence[str], n: int):
        self.texts, self.n, self._sets = texts, n, {}

    def grams(self, index: int) -> set[str]:
        if index not in self._sets:
            self._sets[index] = ngrams(self.texts[index], self.n)
        return self._sets[index]


def near_pairs(texts: Sequence[str], settings: NearDuplicates) -> list[tuple[int, int, float]]:
    """Pairs of indices (i < j) whose texts' exact n-gram Jaccard is at least the threshold, with that Jaccard."""
    sigs = signatures([ngram_hashes(text, settings.ngram) for text in texts])
    bands, rows = bands_for(settings.threshold)
    candidates = set()
    for table in _buckets(sigs, bands, rows):
        for members in table.values():
            candidates.update((i, j) for k, i in enumerate(members) for j in members[k + 1:])
    sets = _Texts(texts, settings.ngram)
    pairs = []
    for i, j in _plausible(sorted(candidates), sigs, sigs, settings.threshold):
        similarity = jaccard(sets.grams(i), sets.grams(j))
        if similarity >= settings.threshold:
            pairs.append((i, j, similarity))
    return pairs


def duplicate_groups(texts: Sequence[str], settings: NearDuplicates) -> list[list[int]]:
    """Groups (two or more indices each, sorted; largest first) of texts linked by exact or near copies."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        root_i, root_j = find(i), find(j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)

    first: dict[str, int] = {}
    for index, text in enumerate(texts):
        union(first.setdefault(exact_text(text), index), index)
    for i, j, _ in near_pairs(texts, settings):
        union(i, j)
    members: dict[int, list[int]] = defaultdict(list)
    for index in range(len(texts)):
        members[find(index)].append(index)
    return sorted((group for group in members.values() if len(group) > 1), key=lambda group: (-len(group), group))


def group_of(ids: Sequence[int], texts: Sequence[str], settings: NearDuplicates) -> dict[int, int]:
    """Each id in a duplicate group -> the group's smallest id (ids alone in no group are left out)."""
    groups = {}
    for group in duplicate_groups(texts, settings):
        first = min(ids[index] for index in group)
        groups.update((ids[index], first) for index in group)
    return groups


def group_summary(ids: Sequence[int], texts: Sequence[str], settings: NearDuplicates, examples: int = 5) -> dict:
    """Duplicate groups for a records summary: how many, how many cases they hold, the largest, a few by id."""
    groups = [[ids[index] for index in group] for group in duplicate_groups(texts, settings)]
    exact = len(texts) - len({exact_text(text) for text in texts})
    return {"ngram": settings.ngram, "threshold": settings.threshold, "groups": len(groups),
            "cases_in_groups": sum(map(len, groups)), "exact_duplicate_texts": exact,
            "largest": len(groups[0]) if groups else 0, "examples": groups[:examples]}


@dataclass(frozen=True)
class Copy:
    """A test text that copies a training text: exactly, or with an n-gram Jaccard of `jaccard`."""

    test_index: int
    train_index: int
    jaccard: float
    exact: bool


def copies(train: Sequence[str], test: Sequence[str], settings: NearDuplicates) -> list[Copy]:
    """For each test text that is an exact or near copy of a training text, its closest training text
    (an exact copy first), in test order."""
    exact = {}
    for index, text in enumerate(train):
        exact.setdefault(exact_text(text), index)
    train_sigs = signatures([ngram_hashes(text, settings.ngram) for text in train])
    bands, rows = bands_for(settings.threshold)
    tables = _buckets(train_sigs, bands, rows)
    test_sigs = signatures([ngram_hashes(text, settings.ngram) for text in test])
    train_sets, test_sets = _Texts(train, settings.ngram), _Texts(test, settings.ngram)
    found = []
    for index, (text, sig) in enumerate(zip(test, test_sigs)):
        if exact_text(text) in exact:
            found.append(Copy(index, exact[exact_text(text)], 1.0, True))
            continue
        if sig[0] == _EMPTY:
            continue
        candidates = {j for band, table in enumerate(tables)
                      for j in table.get(sig[band * rows:(band + 1) * rows].tobytes(), ())}
        candidates = [j for _, j in _plausible([(index, j) for j in sorted(candidates)], test_sigs, train_sigs,
                                               settings.threshold)]
        scored = [(jaccard(test_sets.grams(index), train_sets.grams(j)), -j) for j in candidates]
        best = max(scored, default=None)
        if best is not None and best[0] >= settings.threshold:
            found.append(Copy(index, -best[1], best[0], False))
    return found


def contamination(train_ids: Sequence[int], train: Sequence[str], test_ids: Sequence[int], test: Sequence[str],
                  settings: NearDuplicates, listed: int | None = None) -> dict:
    """The report on TEST against TRAIN: counts, shares of the test cases, and the copies by id (the first
    LISTED of them; all when None), each with its closest training case and their Jaccard."""
    found = copies(train, test, settings)
    exact = sum(copy.exact for copy in found)
    near = len(found) - exact
    share = (lambda count: round(count / len(test), 4) if test else 0.0)
    rows = [{"test_id": test_ids[copy.test_index], "train_id": train_ids[copy.train_index],
             "jaccard": round(copy.jaccard, 4), "exact": copy.exact} for copy in found]
    return {"ngram": settings.ngram, "threshold": settings.threshold, "test_cases": len(test),
            "exact_copies": exact, "near_copies": near, "exact_share": share(exact), "near_share": share(near),
            "contaminated_share": share(len(found)), "copies": rows if listed is None else rows[:listed]}


def contamination_line(report: dict) -> str:
    """The report's one-line form (the last line launch.records --against prints)."""
    return f"exact_copies={report['exact_copies']} near_copies={report['near_copies']} test_cases={report['test_cases']}"
