"""Seeded, class-stratified subsets and splits of a label array."""

from collections.abc import Sequence

import numpy as np

from deltavision.errors import DataError


def stratified_order(labels: np.ndarray, seed: int | Sequence[int]) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` whose every prefix is class-proportional.

    Each class is shuffled, and its k-th sample (of n) gets the rank ``(k + 0.5) / n``; sorting
    by rank (random tie-break) interleaves the classes so that the first m indices hold each
    class in proportion to its size, within one sample.
    """
    rng = np.random.default_rng(seed)  # an int, or a sequence of ints for independent streams
    labels = np.asarray(labels)
    ranks = np.empty(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        ranks[members] = (np.arange(len(members)) + 0.5) / len(members)
    tie_break = rng.random(len(labels))
    return np.lexsort((tie_break, ranks))


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int | Sequence[int]) -> np.ndarray:
    """Sorted indices of a class-stratified random subset of at most ``limit`` samples.

    ``None`` (or a limit at least the dataset size) keeps every index.
    """
    if limit is not None and limit <= 0:
        raise DataError(f"A sample limit must be a positive number, got {limit}.")
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    return np.sort(stratified_order(labels, seed)[:limit])


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_indices, val_indices)``, with about ``val_fraction`` of each class in val."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    order = stratified_order(labels, seed)
    n_val = int(round(len(labels) * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
