"""Clusters of records from their features (features.py): the matrix k-means runs on, k chosen by the silhouette
score (R&B, 2025: it predicted the final loss on 3 of 4 data sets), and groups too small for a reweight batch
merged into the nearest cluster of their source.

scikit-learn, not faiss: pools of up to ~1e6 records cluster on a CPU in minutes with MiniBatchKMeans on the
PCA-reduced features (k-means on 1e6 x 33 floats), and scikit-learn is one wheel on every platform with the
silhouette score and PCA beside it; faiss pays off for tens of millions of points or a GPU index, which one
machine's data-mixing pools do not reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scalebio_cli.errors import InputError

FULL_KMEANS_MAX = 20_000  # above this many records: MiniBatchKMeans (the full algorithm's cost grows with n * k)


@dataclass
class Clustering:
    labels: np.ndarray  # cluster of each record (numbered by mean response loss, lowest first)
    k: int
    centroids: np.ndarray  # [k, dims], in the matrix's space, in the labels' numbering
    scores: dict[int, float] = field(default_factory=dict)  # silhouette score of each k tried (k = auto)


def _standardise(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)


def _block(x: np.ndarray, pca_dims: int, seed: int) -> np.ndarray:
    """Standardised per dimension, reduced by PCA to `pca_dims` (0: all), scaled to a total variance of 1."""
    x = _standardise(x.astype(np.float64))
    if 0 < pca_dims < min(x.shape):
        from sklearn.decomposition import PCA

        x = PCA(n_components=pca_dims, random_state=seed).fit_transform(x)
    total = float(x.var(axis=0).sum())
    return x / np.sqrt(total) if total > 1e-12 else x


def feature_matrix(hidden: np.ndarray, loss: np.ndarray, loss_weight: float, prompt_weight: float, pca_dims: int,
                   seed: int) -> np.ndarray:
    """What k-means sees: the response's pooled hidden states (the right half of `hidden`) and the prompt's (the
    left half), each standardised, PCA-reduced and scaled to a total variance of 1, the prompt's times
    `prompt_weight` (0: left out); then the loss, centred, in nats, times `loss_weight`, as one more column.

    The prompt is weighed down by default: the response carries the topic as well as the quality of a record,
    while a prompt's templates (question wordings, one task's phrasing) can outweigh a corrupted answer.
    The loss is not standardised: a nat of response loss is a real difference whatever the pool, while dividing by
    the pool's spread would blow up a loss that hardly varies (a model that cannot tell the records apart) into
    as much distance as all the hidden states. At loss_weight 1, records 1 nat apart in loss are as far apart as
    two records a standard deviation apart in every response dimension."""
    width = hidden.shape[1] // 2
    blocks = [_block(hidden[:, width:], pca_dims, seed)]
    if prompt_weight > 0:
        blocks.append(prompt_weight * _block(hidden[:, :width], pca_dims, seed))
    centred = loss.astype(np.float64) - float(np.mean(loss)) if len(loss) else loss.astype(np.float64)
    return np.hstack([*blocks, loss_weight * centred[:, None]]).astype(np.float32)


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centroids) of k-means with k clusters (seeded; several starts, the best kept)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(x) > FULL_KMEANS_MAX:
        model = MiniBatchKMeans(n_clusters=k, batch_size=4096, n_init=3, random_state=seed)
    else:
        model = KMeans(n_clusters=k, n_init=4, random_state=seed)
    labels = model.fit_predict(x)
    return labels.astype(np.int64), model.cluster_centers_.astype(np.float64)


def silhouette(x: np.ndarray, labels: np.ndarray, sample: int, seed: int) -> float:
    """The silhouette score on a seeded sample of `sample` records (its cost grows with the square of n)."""
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(x, labels, sample_size=min(sample, len(x)), random_state=seed))


def choose(x: np.ndarray, loss: np.ndarray, k: int | None, sweep: list[int], sample: int, seed: int) -> Clustering:
    """Clusters of the rows of `x`: k of them, or (k None) the k of `sweep` with the best silhouette score."""
    n = len(x)
    if k is not None:
        labels, centroids = kmeans(x, min(k, n), seed) if n > 1 else (np.zeros(n, np.int64), x[:1].astype(float))
        return _by_loss(labels, centroids, loss, {})
    scores: dict[int, float] = {}
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for kk in sorted(set(sweep)):
        if not 2 <= kk < n:
            continue  # the silhouette is defined for 2 <= k <= n - 1
        labels, centroids = kmeans(x, kk, seed)
        if len(np.unique(labels)) < 2:
            continue  # identical points: k-means found fewer clusters than asked
        scores[kk] = silhouette(x, labels, sample, seed)
        if best is None or scores[kk] > best[0]:
            best = (scores[kk], labels, centroids)
    if best is None:  # too few (distinct) records for any k of the sweep: one cluster
        return Clustering(np.zeros(n, np.int64), 1, x.mean(axis=0, keepdims=True).astype(float), scores)
    return _by_loss(best[1], best[2], loss, scores)


def _by_loss(labels: np.ndarray, centroids: np.ndarray, loss: np.ndarray, scores: dict[int, float]) -> Clustering:
    """The clustering with clusters numbered by their mean response loss (g00: the lowest), empty ones dropped."""
    present = np.unique(labels)
    means = np.asarray([loss[labels == c].mean() for c in present])
    order = present[np.argsort(means, kind="stable")]
    renumber = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return Clustering(renumber[labels], len(order), centroids[order], scores)


def merge_small(labels: np.ndarray, source: np.ndarray, centroids: np.ndarray, min_size: int
                ) -> tuple[np.ndarray, list[dict[str, int]]]:
    """Within each source, fold every group (source x cluster) of fewer than `min_size` records, smallest first,
    into the group of the same source whose cluster centroid is nearest; a source that cannot reach min_size keeps
    one group. Returns the new labels and the merges made."""
    labels = labels.copy()
    merges = []
    for s in np.unique(source):
        mine = source == s
        while True:
            present, counts = np.unique(labels[mine], return_counts=True)
            if len(present) < 2 or counts.min() >= min_size:
                break
            small = int(present[np.argmin(counts)])
            others = [int(c) for c in present if c != small]
            into = min(others, key=lambda c: float(np.sum((centroids[c] - centroids[small]) ** 2)))
            merges.append({"source": int(s), "from": small, "into": into, "records": int(counts.min())})
            labels[mine & (labels == small)] = into
    return labels, merges


def refuse_small(labels: np.ndarray, source: np.ndarray, names: list[str], min_size: int) -> None:
    """group.small = refuse: every group under min_size named, with the ways out."""
    problems = []
    for s in np.unique(source):
        present, counts = np.unique(labels[source == s], return_counts=True)
        if len(present) < 2:
            continue
        problems += [f"group: {names[s]}/g{c:02d} would hold {n:,} records, fewer than group.min_size={min_size:,} "
                     "(one reweight batch); ask for fewer groups (--k), lower group.min_size, or set "
                     "group.small=merge" for c, n in zip(present, counts) if n < min_size]
    if problems:
        raise InputError(problems)
