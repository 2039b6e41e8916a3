"""Per-trigger pixel refinement: the last resort for the triggers the shared generator left off their key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from edgeguard.protect.fragile.generator import FragileConfig

from edgeguard.progress import log
from edgeguard.training import TensorData, TrainConfig, fit


def row_variance(p: torch.Tensor) -> torch.Tensor:
    """Var(P): per-row variance over classes around 1/M, averaged over rows (= torch.var(P, unbiased=False))."""
    return ((p - 1.0 / p.shape[1]) ** 2).mean()


def _margins(logits: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Logit (= log-probability) margin of the key class over its strongest rival; negative when it is not top-1."""
    rival = logits.masked_fill(F.one_hot(key, logits.shape[1]).bool(), float("-inf")).max(1).values
    return logits.gather(1, key[:, None])[:, 0] - rival


class _Pixels(nn.Module):
    """Per-trigger pixels ``sigmoid(w)``, straight-through rounded to the stored uint8 grid when ``uint8``."""

    def __init__(self, start: torch.Tensor, uint8: bool):
        super().__init__()
        self.w = nn.Parameter(torch.logit(start.clamp(0.5 / 255, 1 - 0.5 / 255)))
        self.uint8 = uint8

    def forward(self) -> torch.Tensor:
        u = torch.sigmoid(self.w)
        return u + (torch.round(u * 255) / 255 - u).detach() if self.uint8 else u


class _KeepBest:
    """fit hook: every 10 steps each trigger keeps the latest (``latest``; else the first) image with a margin >=
    gamma/2, else its best-margin one; training stops once every margin is >= gamma/2."""

    def __init__(self, model: nn.Module, pixels: _Pixels, k: torch.Tensor, gamma: float, latest: bool):
        self.model, self.pixels, self.k, self.gamma, self.latest = model, pixels, k, gamma, latest
        with torch.no_grad():
            self.x = pixels().detach().clone()
            self.m = _margins(model(self.x), k)

    @property
    def done(self) -> bool:
        return bool((self.m >= self.gamma / 2).all())

    def on_step_end(self, state) -> None:
        if state.step % 10:
            return
        with torch.no_grad():
            x = self.pixels()
            m = _margins(self.model(x), self.k)
        ok, was = m >= self.gamma / 2, self.m >= self.gamma / 2
        # with a·Var the latest image past gamma/2 is the flattest; without, the first is the nearest a tie
        better = (ok & (~was | self.latest)) | (~was & (m > self.m))
        self.x[better], self.m[better] = x[better], m[better]
        state.stop = self.done


def _pixel_search(model: nn.Module, start: torch.Tensor, k: torch.Tensor, cfg: FragileConfig, a: float, gamma: float,
                  *, latest: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Adam on per-trigger pixels (the one training loop, one step per "epoch") from ``start`` towards keys ``k``
    with CE + a·Var + b·relu(gamma - m); returns each trigger's kept image (:class:`_KeepBest`, ``start``
    included), its margin and the steps taken."""
    pixels = _Pixels(start, cfg.uint8)
    best = _KeepBest(model, pixels, k, gamma, latest)
    if best.done or cfg.refine_steps == 0:
        return best.x, best.m, 0
    b = cfg.floor if cfg.floor > 0 else 50.0

    def step(state, x, y) -> torch.Tensor:
        logits = model(pixels())
        return (F.cross_entropy(logits, k) + a * row_variance(torch.softmax(logits, 1))
                + b * F.relu(gamma - _margins(logits, k)).mean())

    res = fit(pixels, TensorData(torch.zeros(1), torch.zeros(1)),
              TrainConfig(epochs=cfg.refine_steps, batch_size=1, optimizer="adam", lr=cfg.refine_lr, weight_decay=0.0,
                          schedule="none", seed=cfg.seed), step=step, hooks=[best], desc="fragile refinement", quiet=True)
    return best.x, best.m, res.steps


def _refine(model: nn.Module, imgs: torch.Tensor, key: torch.Tensor, cfg: FragileConfig, a: float, gamma: float,
            *, quiet: bool | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Optimise the pixels of the triggers that miss their key (or sit within gamma/4 of a tie) one by one.

    A shared generator over a batch of latents can stall with a few triggers on the wrong side of a boundary;
    per-trigger pixels have no such coupling.  Loss per trigger: CE + a·Var + b·relu(gamma - m)
    (:func:`_pixel_search`); no trigger ends with a smaller margin than it came with.

    A graph whose INT8 fake-quant maps inputs onto a coarse lattice of outputs (an imported VGG behind QAT and a
    fused defense: margins in steps of about 0.05, the straight-through gradient blind to them) can leave a
    trigger stuck where it started, held in the flat region by a·Var.  Those still off their key get a second
    search without the Var term (CE and the floor only), started from the trigger (any key) nearest to their key
    class plus uint8 noise of +-2 levels (counted as ``restarted``); it stops as soon as the margin reaches
    gamma/2, so these triggers too end next to a boundary.  The triggers that were right from the start are left
    bit-identical."""

    x0 = imgs.float() / 255 if cfg.uint8 else imgs.clone()
    with torch.no_grad():
        m0 = _margins(model(x0), key)
    todo = torch.nonzero(m0 < gamma / 4).flatten()
    if len(todo) == 0:
        return imgs, {"triggers": 0, "steps": 0, "restarted": 0}
    log(f"fragile generator: refining the pixels of {len(todo)}/{len(key)} triggers (min margin {float(m0.min()):.3g})",
        quiet=quiet)
    x, margins = x0.clone(), m0.clone()
    x[todo], margins[todo], steps = _pixel_search(model, x0[todo], key[todo], cfg, a, gamma)
    stuck = todo[margins[todo] <= 0]
    if len(stuck):
        noise = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            logits = model(x)
            starts = []
            for i in stuck.tolist():
                near = _margins(logits, torch.full((len(x),), int(key[i])))
                near[i] = float("-inf")
                j = int(near.argmax())
                jitter = torch.randint(-2, 3, x[j].shape, generator=noise).float() / 255
                starts.append((x[j] + jitter).clamp(0, 1))
        log(f"fragile generator: {len(stuck)} triggers still off their key; restarting them from the nearest trigger",
            quiet=quiet)
        xs, ms, more = _pixel_search(model, torch.stack(starts), key[stuck], cfg, 0.0, gamma, latest=False)
        gain = ms > margins[stuck]  # a restart that does worse than where the trigger was is dropped
        x[stuck[gain]], margins[stuck[gain]] = xs[gain], ms[gain]
        steps += more
    out = imgs.clone()
    out[todo] = torch.round(x[todo] * 255).to(torch.uint8) if cfg.uint8 else x[todo]
    return out, {"triggers": int(len(todo)), "steps": steps, "restarted": int(len(stuck))}

