"""``modelguard_s``: ModelGuard-S, the quantising defense of Tang et al., USENIX Security 2024.

ModelGuard ("Information-Theoretic Defense Against Model Extraction Attacks") bounds what an attacker can
learn from the answers by answering from a small set of probability vectors.  Every class ``c`` owns an
ordered codebook ``C_c`` of vectors whose argmax is ``c``; a query ``p = softmax(z)`` of class
``c = argmax p`` is answered with a codeword of ``C_c`` within L1 distance ``epsilon`` of ``p``
(docs/defenses.md).  Consequences: top-1 is always kept, the L1 distortion is at most ``epsilon`` for a
covered query, and every answer is one of finitely many vectors.

Two placements (``online``):

- ``online=False`` (default): a *frozen* codebook, built offline from the deployed model's own outputs
  on (a seeded subset of) the owner's training images by a greedy eps-cover (docs/defenses.md; k-means with
  L1 assignment and mean update, then the farthest point becomes a new centroid while any point is farther
  than ``epsilon``).  The lookup is branch-free torch (Softmax, ArgMax, Gather, Abs, ReduceSum,
  LessOrEqual, Where, ArgMin, GatherElements), so it is fused into the exported graph.  A query with no
  codeword within ``epsilon`` (a *miss*) gets the nearest codeword of its own class, which keeps top-1 but
  may break the eps bound (the official code's ``frozen`` behaviour); a class without any codeword gets
  ``one-hot(argmax p)`` (never the raw vector, never a codeword of another class).  ``forward_with_flag``
  also returns a per-row flag, 1.0 on a miss, so the host can log coverage.
- ``online=True``: the paper's ordered incremental quantisation on the host.  Rows are processed one at a
  time in order; a hit returns the codeword, a miss appends ``p`` itself as a new codeword and returns it
  (flag 1.0).  Codebooks only grow, so with ``assign="first"`` identical inputs give bit-identical outputs
  forever.  The registered builder starts from the offline cover; :meth:`ModelGuardS.empty` is the paper's
  empty start.  Online growth is not capped by ``max_codewords`` (that bounds the offline build only).

``assign="first"`` is the paper's first fit in insertion order (consistent, but a larger mean distortion);
``assign="nearest"`` (the default here) returns the nearest codeword within eps, the lowest distortion a
frozen cover offers; online it is the paper's non-ordered mode, whose answers can change as codebooks grow.

Layout: buffers ``codebook`` float32 [K, M, K] (class, insertion order, probabilities; zero padded) and
``valid`` float32 [K, M].  ``load_state_dict`` resizes both to the stored M, so a module from
:meth:`ModelGuardS.empty` loads any saved state (the host sidecar saves ``state_dict()``; the registry
entry's ``restore`` rebuilds from it).  In online mode the buffers are refreshed from the host-side stores
whenever ``state_dict()`` is taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from edgeguard.config import Config, require
from edgeguard.defenses.base import DEFENSES, Defense, DefenseContext, load_state, one_hot_of, softmax_np
from edgeguard.defenses.codebook import (
    _BIG,
    CodebookReport,
    build_codebook_report,
)
from edgeguard.errors import BadInput
from edgeguard.progress import log


@dataclass(frozen=True)
class ModelGuardSConfig(Config):
    epsilon: float = 1.0  # L1 distortion budget per query
    assign: Literal["nearest", "first"] | None = None  # default: nearest (frozen), first fit (online, the paper's)
    online: bool = False  # host-side growing codebooks (the paper's setting) instead of a fused frozen one
    max_samples: int = 20000  # training images whose outputs build the codebook (seeded subset)
    max_codewords: int = 256  # per class, offline build only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.assign is None:  # online answers stay consistent only with first fit (docs/defenses.md)
            object.__setattr__(self, "assign", "first" if self.online else "nearest")
        require(0 <= self.seed < 2**31, f"modelguard_s seed must lie in [0, 2^31) (got {self.seed})")
        require(0.0 < self.epsilon <= 2.0,
                f"modelguard_s epsilon must lie in (0, 2], the L1 range of probability vectors (got {self.epsilon})")
        require(self.max_samples >= 1, f"modelguard_s max_samples must be at least 1 (got {self.max_samples})")
        require(self.max_codewords >= 1,
                f"modelguard_s max_codewords must be at least 1 (got {self.max_codewords})")


# --- the defense ---------------------------------------------------------------------------------------


class ModelGuardS(Defense):

    @classmethod
    def placement_for(cls, cfg) -> str:
        return "host" if cfg is not None and cfg.online else "graph"  # an online codebook keeps growing: host

    keeps_top1 = True  # by construction: the argmax is kept
    name = "modelguard_s"
    emits_flag = True
    cfg: ModelGuardSConfig

    def __init__(self, cfg: ModelGuardSConfig, num_classes: int, codebooks: list[np.ndarray] | None = None):
        super().__init__(cfg, num_classes)
        k = self.num_classes
        books = _check_codebooks(codebooks if codebooks is not None else [np.zeros((0, k))] * k, k)
        m = max(1, max(len(b) for b in books))
        cb = torch.zeros(k, m, k, dtype=torch.float32)
        valid = torch.zeros(k, m, dtype=torch.float32)
        for cls, b in enumerate(books):
            cb[cls, :len(b)] = torch.from_numpy(b)
            valid[cls, :len(b)] = 1.0
        self.register_buffer("codebook", cb)
        self.register_buffer("valid", valid)
        self.build_report: CodebookReport | None = None
        self._queries = 0
        self._flagged = 0
        self._stores_from_buffers()

    # construction helpers

    @classmethod
    def from_codebook(cls, cfg: ModelGuardSConfig, num_classes: int, codebooks: list[np.ndarray]) -> ModelGuardS:
        """A module over the given per-class codebooks (row order = insertion order); eval mode."""
        return cls(cfg, num_classes, codebooks).eval()

    @classmethod
    def empty(cls, cfg: ModelGuardSConfig, num_classes: int) -> ModelGuardS:
        """No codewords yet: the online start state, or a shell for ``load_state_dict`` (which resizes M)."""
        return cls(cfg, num_classes, None).eval()

    # state

    def _stores_from_buffers(self) -> None:
        """Host-side per-class stores (float64 copies of the float32 codewords) for online mode."""
        cb, valid = self.codebook.detach().cpu().numpy(), self.valid.detach().cpu().numpy() > 0
        self._stores = [cb[c][valid[c]].astype(np.float64) for c in range(self.num_classes)]
        self._counts = [len(s) for s in self._stores]
        self._dirty = False

    def _buffers_from_stores(self) -> None:
        if not self._dirty:
            return
        k = self.num_classes
        m = max(1, max(self._counts))
        cb = torch.zeros(k, m, k, dtype=torch.float32)
        valid = torch.zeros(k, m, dtype=torch.float32)
        for c in range(k):
            n = self._counts[c]
            cb[c, :n] = torch.from_numpy(self._stores[c][:n].astype(np.float32))
            valid[c, :n] = 1.0
        self.codebook, self.valid = cb, valid
        self._dirty = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._buffers_from_stores()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        cb, valid = state_dict.get(prefix + "codebook"), state_dict.get(prefix + "valid")
        k = self.num_classes
        if cb is not None and valid is not None and cb.dim() == 3 and cb.shape[0] == k and cb.shape[2] == k \
                and tuple(valid.shape) == tuple(cb.shape[:2]):
            dev = self.codebook.device  # resize M to the stored one; super() then copies the values
            self.codebook = torch.zeros(tuple(cb.shape), dtype=torch.float32, device=dev)
            self.valid = torch.zeros(tuple(valid.shape), dtype=torch.float32, device=dev)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._stores_from_buffers()

    def codebooks(self) -> list[np.ndarray]:
        """Current per-class codebooks, float32 (M_c, K), in insertion order."""
        if self.cfg.online:
            return [s[:n].astype(np.float32) for s, n in zip(self._stores, self._counts, strict=True)]
        return [self.codebook[c][self.valid[c] > 0].cpu().numpy().copy() for c in range(self.num_classes)]

    def codebook_size(self) -> int:
        """Total number of codewords over all classes."""
        return int(sum(self._counts)) if self.cfg.online else int(self.valid.sum().item())

    def stats(self) -> dict[str, Any]:
        per_class = [len(b) for b in self.codebooks()]
        out: dict[str, Any] = {"codewords": int(sum(per_class)), "codewords_per_class": per_class,
                               "online": self.cfg.online}
        if self.cfg.online:
            out.update(queries=self._queries, flagged=self._flagged)
        if self.build_report is not None:
            r = self.build_report
            out.update(build_points=r.points, build_uncovered=r.uncovered, build_seconds=round(r.seconds, 3))
        return out

    # forward

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_flag(logits, x)[0]

    def forward_with_flag(self, logits: torch.Tensor, x: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, flag): flag is 1.0 on a miss (no codeword within eps; online: a new codeword was created)."""
        if self.cfg.online:
            return self._online(logits)
        return self._frozen(logits)

    def _frozen(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spec 9.1, branch-free: every row runs the same ops, misses are selected with masks."""
        k, m = self.codebook.shape[0], self.codebook.shape[1]
        eps = float(self.cfg.epsilon)
        p = torch.softmax(logits.float(), dim=-1)  # the tail stays fp32 (a no-op for fp32 logits)
        c = torch.argmax(p, dim=-1)  # (B,)
        cb = torch.index_select(self.codebook, 0, c)  # (B, M, K)
        valid = torch.index_select(self.valid, 0, c)  # (B, M)
        d = (cb - p.unsqueeze(1)).abs().sum(-1)  # (B, M)
        hit = (d <= eps).to(p.dtype) * valid
        any_hit = hit.amax(-1, keepdim=True)  # (B, 1)
        nearest = (d + _BIG * (1.0 - valid)).argmin(-1, keepdim=True)  # nearest valid codeword of class c
        if self.cfg.assign == "first":  # strictly distinct scores: the first hit in insertion order
            pos = torch.linspace(0.0, float(m - 1), m, dtype=p.dtype).view(1, m)  # a constant, no Range op
            first = (pos + float(m) * (1.0 - hit)).argmin(-1, keepdim=True)
            idx = torch.where(any_hit > 0, first, nearest)
        else:  # the nearest valid codeword is a hit iff any codeword is
            idx = nearest
        q = cb.gather(1, idx.unsqueeze(-1).expand(-1, 1, k)).squeeze(1)  # (B, K)
        has_codeword = valid.amax(-1, keepdim=True)
        q = torch.where(has_codeword > 0, q, one_hot_of(c.unsqueeze(-1), k, p))
        return q, 1.0 - any_hit.squeeze(-1)

    @torch.no_grad()
    def _online(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's ordered incremental quantisation, one row at a time, on the host."""
        p32 = torch.softmax(logits.detach().float(), dim=-1).cpu().numpy()
        q = np.empty_like(p32)
        flag = np.zeros(len(p32), dtype=np.float32)
        for r, row in enumerate(p32):
            c = int(row.argmax())
            y = row.astype(np.float64)
            i = self._lookup(c, y)
            if i < 0:
                i = self._append(c, y)
                flag[r] = 1.0
            q[r] = self._stores[c][i]
        self._queries += len(p32)
        self._flagged += int(flag.sum())
        return torch.from_numpy(q).to(logits.device), torch.from_numpy(flag).to(logits.device)

    def _lookup(self, c: int, y: np.ndarray) -> int:
        n = self._counts[c]
        if n == 0:
            return -1
        d = np.abs(self._stores[c][:n] - y).sum(1)
        hit = d <= self.cfg.epsilon
        if not hit.any():
            return -1
        return int(hit.argmax()) if self.cfg.assign == "first" else int(np.where(hit, d, np.inf).argmin())

    def _append(self, c: int, y: np.ndarray) -> int:
        n, store = self._counts[c], self._stores[c]
        if n == len(store):  # amortised growth
            grown = np.zeros((max(8, 2 * len(store)), self.num_classes))
            grown[:n] = store[:n]
            self._stores[c] = store = grown
        store[n] = y
        self._counts[c] = n + 1
        self._dirty = True
        return n

    # oracle

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        return self.reference_with_flag(logits)[0]

    def reference_with_flag(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NumPy float64 oracle with the flag.  Online: replays the rows on a copy of the current codebooks."""
        p = softmax_np(logits)
        eps, first = float(self.cfg.epsilon), self.cfg.assign == "first"
        books = [[row.astype(np.float64) for row in b] for b in self.codebooks()]
        q = np.zeros_like(p)
        flag = np.zeros(len(p))
        for r, y in enumerate(p):
            c = int(np.argmax(y))
            book = books[c]
            d = np.array([np.sum(np.abs(w - y)) for w in book])
            hits = [i for i in range(len(book)) if d[i] <= eps]
            if hits:
                q[r] = book[hits[0] if first else min(hits, key=lambda i: (d[i], i))]
            elif self.cfg.online:
                book.append(y.copy())
                q[r], flag[r] = y, 1.0
            elif book:
                q[r], flag[r] = book[int(np.argmin(d))], 1.0
            else:
                q[r, c], flag[r] = 1.0, 1.0
        return q, flag


def _check_codebooks(codebooks: list[np.ndarray], k: int) -> list[np.ndarray]:
    if len(codebooks) != k:
        raise BadInput(f"modelguard_s needs one codebook per class ({k}), got {len(codebooks)}")
    out = []
    for c, b in enumerate(codebooks):
        b = np.asarray(b, dtype=np.float32).reshape(-1, k) if np.size(b) else np.zeros((0, k), np.float32)
        if not np.isfinite(b).all() or (len(b) and (b.argmax(1) != c).any()):
            raise BadInput(f"modelguard_s codebook of class {c} must hold finite vectors whose argmax is {c}")
        out.append(np.ascontiguousarray(b))
    return out


def _clean_outputs(ctx: DefenseContext, cfg: ModelGuardSConfig) -> np.ndarray:
    if ctx.train_images is None or ctx.clean_predict is None:
        raise BadInput("modelguard_s builds its codebook from the protected model's training data; none was given")
    images, _ = ctx.train_images()
    images = torch.as_tensor(images)
    n = len(images)
    if n == 0:
        raise BadInput("modelguard_s builds its codebook from the protected model's training data; none was given")
    idx = np.sort(np.random.default_rng(cfg.seed).choice(n, size=min(n, cfg.max_samples), replace=False))
    idx_t = torch.from_numpy(idx)
    step = 5000  # bounds the copy of selected images; clean_predict batches further itself
    chunks = [np.asarray(ctx.clean_predict(images[idx_t[s:s + step]]), dtype=np.float64)
              for s in range(0, len(idx), step)]
    probs = np.concatenate(chunks, axis=0)
    if probs.shape != (len(idx), ctx.num_classes):
        raise BadInput(f"modelguard_s expected ({len(idx)}, {ctx.num_classes}) probabilities from the protected "
                       f"model, got {probs.shape}")
    return probs


def restore_modelguard_s(cfg: ModelGuardSConfig, ctx: DefenseContext, state: Mapping[str, torch.Tensor]) -> ModelGuardS:
    """Rebuild from a saved ``state_dict()`` (the host sidecar of ``online=true``): no training data needed."""
    return load_state(ModelGuardS.empty(cfg, ctx.num_classes), state)


@DEFENSES.register("modelguard_s", config=ModelGuardSConfig, restore=restore_modelguard_s)
def build_modelguard_s(cfg: ModelGuardSConfig, ctx: DefenseContext) -> ModelGuardS:
    probs = _clean_outputs(ctx, cfg)
    report = build_codebook_report(probs, cfg.epsilon, cfg.max_codewords)
    module = ModelGuardS.from_codebook(cfg, ctx.num_classes, report.codebooks)
    module.build_report = report
    sizes = [len(b) for b in report.codebooks]
    log(f"modelguard_s: {report.size} codewords (per class {min(sizes)}-{max(sizes)}) at eps={cfg.epsilon:g} "
        f"from {len(probs)} training outputs in {report.seconds:.1f}s", quiet=ctx.quiet)
    short = [c for c, u in enumerate(report.uncovered) if u]
    if short:
        log(f"modelguard_s: max_codewords={cfg.max_codewords} stopped the cover of class(es) {short}; "
            f"{sum(report.uncovered)} training outputs stay farther than eps (nearest codeword, flagged)",
            quiet=ctx.quiet)
    return module
