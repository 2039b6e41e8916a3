"""``protect watermark|magicguard|fragile``: embed a protection (the owner's secrets go to the vault)."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.cli.options import ARTIFACT, BUNDLE, DEVICE, JSON_OUT, SEED, emit, merge_flags


@click.group("protect")
def protect_group() -> None:
    """Embed a protection into a bundle (the owner's secrets go to BUNDLE/vault/)."""


@protect_group.command("watermark")
@BUNDLE
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Watermarked bundle to write.")
@click.option("--trigger-dir", type=click.Path(path_type=Path), default=None, help="Trigger images (WatermarkNN layout).")
@click.option("--labels", type=click.Path(path_type=Path), default=None, help="Labels file paired with --trigger-dir.")
@click.option("--n-triggers", type=int, default=None, help="Generate this many abstract triggers (default 100).")
@click.option("--renderer", type=click.Choice(["center_crop", "resize"]), default=None,
              help="How trigger files become model-sized images (default center_crop, as the reference code).")
@click.option("--mode", type=click.Choice(["pretrained", "fromscratch"]), default=None)
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--trigger-batch", type=int, default=None, help="Triggers appended to every clean batch (default 16).")
@click.option("--alpha", type=float, default=None, help="Significance of the verdict (default 1e-3).")
@click.option("--key-seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Seed of a generated key (default: a random secret).")
@SEED
@JSON_OUT
def protect_watermark_cmd(bundle, out, trigger_dir, labels, n_triggers, renderer, mode, epochs, lr, trigger_batch,
                          alpha, key_seed, seed, json_path):
    """Embed a backdoor watermark (Adi et al. 2018) with a secret trigger set."""
    from edgeguard.api import WatermarkConfig, embed_watermark

    cfg = merge_flags(
        WatermarkConfig, "protect watermark", trigger_dir=str(trigger_dir) if trigger_dir else None,
        labels=str(labels) if labels else None, n_triggers=n_triggers, renderer=renderer, mode=mode, epochs=epochs,
        lr=lr, trigger_batch=trigger_batch, alpha=alpha, seed=seed,
    )
    res = embed_watermark(bundle, out, cfg, key_seed=key_seed)
    emit(res, json_path)


@protect_group.command("magicguard")
@BUNDLE
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Guarded bundle to write.")
@click.option("--a", "a", type=float, default=None, help="Amplitude: the largest change of any guarded value (default 0.01).")
@click.option("--w", "w", type=float, default=None, help="Frequency; a*w is the gradient amplitude (default 1e4, a*w = 100).")
@click.option("--site", default=None, help="'logits' (default) or the dotted name of a layer whose output is guarded.")
@click.option("--ratio", type=float, default=None, help="Share of units guarded, mask drawn once from --seed (default 1.0).")
@click.option("--variant", type=click.Choice(["sine", "staircase", "reversal"]), default=None,
              help="sine (default, the method); staircase (no gradient: freezes); reversal (gradient ascent).")
@SEED
@JSON_OUT
def protect_magicguard_cmd(bundle, out, a, w, site, ratio, variant, seed, json_path):
    """Insert MagicGuard (y = x + a*sin(w*x)): fine-tuning the guarded model destroys it.

    No training: a graph edit, checked for fidelity (top-1 unchanged, logits moved by at most a) before the bundle is
    written.  Quantization keeps the guard in FP32 and QAT runs in owner mode; exports list the guard's nodes for
    FP32 pinning.  An informed attacker can delete the guard: see the README's limitations.
    """
    from edgeguard.api import MagicGuardConfig, protect_magicguard

    cfg = merge_flags(MagicGuardConfig, "protect magicguard", a=a, w=w, site=site, ratio=ratio, variant=variant,
                      seed=seed)
    res = protect_magicguard(bundle, out, cfg)
    emit(res, json_path)


@protect_group.command("fragile")
@ARTIFACT
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Fragile store to write, VAULT/fragile (default for a bundle: BUNDLE/vault/fragile).")
@click.option("--surrogate", type=click.Path(path_type=Path), default=None,
              help="Differentiable model to generate against (default: the artifact itself; needed for .engine).")
@click.option("--key", "key_sha256", default=None, help="Enrol a trigger set already in --out (its sha256 prefix) instead of generating.")
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Triggers (default 100).")
@click.option("--a", "a", type=click.FloatRange(min=0), default=None, help="Weight of Var(P) (default: from --margin).")
@click.option("--margin", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Target log-probability margin of the key class, sets a (default 0.2).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Generator steps (default 300, as the paper's epochs).")
@click.option("--variant", type=click.Choice(["full", "cla", "var", "non"]), default=None,
              help="full: CE + a*Var (default, the method); cla: CE only; var: Var only; non: untrained generator.")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Enrolment runs per batch size (default 10).")
@click.option("--batch-sizes", default=None, help="Enrolment batch sizes, comma-separated (default 1,100).")
@DEVICE
@SEED
@JSON_OUT
def protect_fragile_cmd(artifact, out, surrogate, key_sha256, n, a, margin, steps, variant, repeats, batch_sizes, device,
                        seed, json_path):
    """Fragile triggers (Yin et al. 2022): generate triggers next to the decision boundaries of ARTIFACT and enrol
    them on it (the artifact's own labels, stability and margin filters), so that `verify` detects any modification.

    The model is never changed.  Enrol every artifact you ship (FP32 ONNX, INT8, each engine): a different backend
    or precision is reported as drift, not tampering.
    """
    from edgeguard.api import EnrolConfig, FragileConfig, protect_fragile

    cfg = merge_flags(FragileConfig, "protect fragile", n=n, a=a, margin=margin, steps=steps, variant=variant, seed=seed)
    enrol_cfg = merge_flags(EnrolConfig, "enrolment", repeats=repeats, batch_sizes=batch_sizes)
    res = protect_fragile(artifact, out, cfg, enrol_cfg, surrogate=surrogate, key_sha256=key_sha256, device=device)
    emit(res, json_path)
