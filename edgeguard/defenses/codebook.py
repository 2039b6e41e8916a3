"""ModelGuard-S's offline codebook: per class, an L1 k-means cover of the clean training outputs in which every output
lies within epsilon of a codeword (the paper's section 3.3).  The defense that uses it: :mod:`edgeguard.defenses.modelguard_s`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgeguard.errors import BadInput

# The offline cover aims at ``epsilon - COVER_MARGIN`` so that float32 rounding at run time never flags a
# training output that the float64 build covered.
COVER_MARGIN = 1e-5
KMEANS_TOL = 1e-3  # stop k-means when no centroid moves more than this (L2), docs/defenses.md
KMEANS_MAX_ITER = 100
_BIG = 8.0  # larger than any L1 distance between probability vectors (<= 2)




@dataclass
class CodebookReport:
    """What :func:`build_codebook_report` built: per-class codebooks and how well they cover the data."""

    codebooks: list[np.ndarray]
    points: list[int]  # training outputs per class (by the model's argmax)
    uncovered: list[int]  # points farther than eps from every (float32) codeword: max_codewords cut the cover
    dropped: list[int] = field(default_factory=list)  # centroids dropped for a changed argmax (float32 ties)
    seconds: float = 0.0

    @property
    def size(self) -> int:
        return int(sum(len(b) for b in self.codebooks))


def l1_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n, K), (m, K) -> (n, m) L1 distances, one loop over the shorter of m and K (cache friendly)."""
    if 4 * len(c) < x.shape[1]:
        return np.stack([np.abs(x - row).sum(1) for row in c], axis=1)
    out = np.abs(x[:, :1] - c[:, 0][None, :])
    tmp = np.empty_like(out)
    for j in range(1, x.shape[1]):
        np.subtract(x[:, j:j + 1], c[:, j][None, :], out=tmp)
        np.abs(tmp, out=tmp)
        out += tmp
    return out


class _L1KMeans:
    """k-means with L1 assignment and mean update over one class's outputs, warm-started between rounds.

    Exact (the same assignments as recomputing every distance), but with Hamerly's bounds, valid for any
    metric: ``u`` bounds the distance to the assigned centroid from above, ``l`` the distance to every other
    centroid from below, so a point is re-examined only when a centroid near it moved or was added.  That
    makes adding one centroid cost O(nK) plus the points it actually affects, instead of a full n x m x K
    pass per iteration.
    """

    def __init__(self, x: np.ndarray):
        self.x = x
        self.c = x.mean(0, keepdims=True)
        self.a = np.zeros(len(x), dtype=np.int64)
        self.u = np.abs(x - self.c).sum(1)
        self.lo = np.full(len(x), np.inf)

    def add(self, point: np.ndarray) -> None:
        self.c = np.concatenate([self.c, point[None]], axis=0)
        self.lo = np.minimum(self.lo, np.abs(self.x - point).sum(1))

    def _assign(self) -> None:
        c, m = self.c, len(self.c)
        if m > 1:
            cc = l1_distances(c, c)
            np.fill_diagonal(cc, np.inf)
            half = 0.5 * cc.min(1)
        else:
            half = np.full(1, np.inf)
        bound = np.maximum(half[self.a], self.lo)
        cand = np.flatnonzero(self.u > bound)
        if len(cand) == 0:
            return
        self.u[cand] = np.abs(self.x[cand] - c[self.a[cand]]).sum(1)  # tighten, then look again
        cand = cand[self.u[cand] > bound[cand]]
        if len(cand) == 0:
            return
        d = l1_distances(self.x[cand], c)
        best = d.argmin(1)
        rows = np.arange(len(cand))
        self.a[cand], self.u[cand] = best, d[rows, best]
        d[rows, best] = np.inf
        self.lo[cand] = d.min(1)

    def _update(self) -> float:
        """Mean update; drops empty clusters; returns the largest centroid move (L2, inf after a drop)."""
        m, k = len(self.c), self.x.shape[1]
        counts = np.bincount(self.a, minlength=m)
        sums = np.stack([np.bincount(self.a, weights=self.x[:, j], minlength=m) for j in range(k)], axis=1)
        keep = counts > 0
        new = sums[keep] / counts[keep, None]
        move1 = np.abs(new - self.c[keep]).sum(1)  # L1 moves for the bounds
        moved = float(np.sqrt(((new - self.c[keep]) ** 2).sum(1)).max())
        if not keep.all():
            self.a = (np.cumsum(keep) - 1)[self.a]
            moved = np.inf
        self.c = new
        self.u += move1[self.a]
        if len(new) > 1:
            top = np.argsort(move1)[-2:]
            other = np.where(self.a == top[-1], move1[top[0]], move1[top[-1]])
        else:
            other = np.zeros(len(self.x))
        self.lo -= other
        return moved

    def run(self, max_iter: int = KMEANS_MAX_ITER) -> np.ndarray:
        """Iterate to convergence; returns each point's exact distance to its nearest centroid."""
        for _ in range(max_iter):
            self._assign()
            if self._update() <= KMEANS_TOL:
                break
        self._assign()
        self.u = np.abs(self.x - self.c[self.a]).sum(1)
        return self.u


def _cover_class(x: np.ndarray, eps: float, max_codewords: int) -> np.ndarray:
    """Greedy eps-cover of one class's outputs (docs/defenses.md): the centroids, in creation order.

    Stops early, leaving points farther than ``eps``, when ``max_codewords`` centroids are not enough.
    """
    if len(x) == 0:
        return np.zeros((0, x.shape[1]))
    km = _L1KMeans(x)
    for _ in range(4 * max_codewords + 16):  # each round adds one centroid; k-means may drop a few
        dmin = km.run()
        far = int(dmin.argmax())
        if dmin[far] <= eps or len(km.c) >= max_codewords:
            break
        km.add(x[far])
    return km.c


def build_codebook_report(probs: np.ndarray, eps: float, max_codewords: int = 256) -> CodebookReport:
    """Per-class greedy eps-covers of ``probs`` (N, K); codewords float32, each with argmax = its class."""
    t0 = time.perf_counter()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise BadInput(f"modelguard_s builds its codebook from (N, K) probabilities with K >= 2, "
                       f"got shape {probs.shape}")
    k = probs.shape[1]
    labels = probs.argmax(1)
    books, points, uncovered, dropped = [], [], [], []
    for cls in range(k):
        x = probs[labels == cls]
        c32 = _cover_class(x, eps - COVER_MARGIN, max_codewords).astype(np.float32)
        ok = c32.argmax(1) == cls  # means of argmax-c vectors keep c; a float32 tie could break it
        book = np.ascontiguousarray(c32[ok]).reshape(-1, k)
        books.append(book)
        dropped.append(int((~ok).sum()))
        points.append(int(len(x)))
        if len(x):  # the float32 codewords as deployed; > 0 only where max_codewords (or a drop) cut the cover
            d = l1_distances(x, book.astype(np.float64)).min(1) if len(book) else np.full(len(x), np.inf)
            uncovered.append(int((d > eps).sum()))
        else:
            uncovered.append(0)
    return CodebookReport(books, points, uncovered, dropped, time.perf_counter() - t0)


def build_codebook(probs: np.ndarray, eps: float, max_codewords: int = 256) -> list[np.ndarray]:
    """One (M_c, K) float32 array per class: a greedy eps-cover (L1) of the outputs whose argmax is c."""
    return build_codebook_report(probs, eps, max_codewords).codebooks
