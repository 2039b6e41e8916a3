"""Self-destruction under fine-tuning: clean and trigger accuracy over fine-tuning steps, guarded vs unguarded.

The attacker holds the owner's full training set and fine-tunes every layer with plain cross-entropy (spec
magicguard.md section 3), with each recipe (optimizer, learning rate) and seed.  The guarded model is the bundle as
shipped; the unguarded control is the same weights with the guard stripped.  Accuracy is measured on the bundle's
test split and on the watermark triggers (when the vault holds them) every ``eval_every`` steps, through the one
training loop (:func:`edgeguard.training.fit`) with a checkpoint hook.  A run whose loss stops being finite ends
there (``diverged_at``) and its later points repeat the wreck's accuracy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeguard.bundle import bundle_data_config, load_bundle
from edgeguard.config import Config, require
from edgeguard.data import load_data
from edgeguard.errors import BadInput
from edgeguard.evaluate.plots import pyplot, save_panels
from edgeguard.progress import log
from edgeguard.protect.magicguard import strip
from edgeguard.protect.watermark import VAULT_RECORD, read_key
from edgeguard.training import TensorData, TrainConfig, fit, model_accuracy


@dataclass(frozen=True)
class Recipe(Config):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        require(self.optimizer in ("sgd", "adam"), f"recipe optimizer must be sgd or adam (got {self.optimizer!r})")
        require(self.lr > 0, "recipe lr must be positive")

    @property
    def label(self) -> str:
        return f"{self.optimizer.upper() if self.optimizer == 'sgd' else 'Adam'} lr {self.lr:g}"


@dataclass(frozen=True)
class DestructionConfig(Config):
    recipes: tuple = (Recipe("sgd", 1e-3), Recipe("sgd", 1e-2), Recipe("adam", 1e-4), Recipe("adam", 1e-3))
    steps: int = 200
    eval_every: int = 25
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 64  # the CIFAR attack recipe of the reference code
    augment: Literal["none", "shift", "crop_flip"] = "none"

    def __post_init__(self) -> None:
        recipes = []
        for r in self.recipes:
            require(isinstance(r, (dict, Recipe)), f"destruction recipes must be {{optimizer, lr}} mappings, got {r!r:.60}")
            recipes.append(r if isinstance(r, Recipe) else Recipe.from_mapping(r, what="destruction.recipes"))
        object.__setattr__(self, "recipes", tuple(recipes))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        require(recipes, "destruction needs at least one recipe")
        require(self.seeds, "destruction needs at least one seed")
        require(self.steps >= 1 and self.eval_every >= 1, "destruction steps and eval_every must be >= 1")

    def params(self) -> dict[str, Any]:
        out = super().params()
        out["recipes"] = [r.params() for r in self.recipes]
        return out

    def checkpoints(self) -> list[int]:
        return sorted({0, *range(self.eval_every, self.steps, self.eval_every), self.steps})


@dataclass
class _Checkpoints:
    """fit hook: accuracy at the configured steps (step 0 is measured before training)."""

    at: list[int]
    test: Any
    triggers: TensorData | None
    points: list[dict[str, Any]] = field(default_factory=list)

    def measure(self, model, step: int) -> None:
        p = {"step": step, "accuracy": round(model_accuracy(model, self.test), 6)}
        if self.triggers is not None:
            p["trigger_accuracy"] = round(model_accuracy(model, self.triggers), 6)
        self.points.append(p)

    def on_step_end(self, state) -> None:
        if state.step in self.at:
            self.measure(state.model, state.step)  # model_accuracy restores train mode


@dataclass(frozen=True)
class DestructionResult:
    bundle: str
    guard: dict[str, Any]
    config: dict[str, Any]
    chance: float
    runs: tuple[dict[str, Any], ...]  # one per recipe x seed x model: {recipe, seed, model, points, diverged_at}
    passed: bool = True

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "runs": list(self.runs), "summary": self.summary()}

    def summary(self) -> list[dict[str, Any]]:
        """Per recipe and model: final and worst accuracy over seeds, and how many seeds ended at <= 2x chance."""
        rows = []
        keys = dict.fromkeys((r["recipe"], r["model"]) for r in self.runs)
        for recipe, model in keys:
            runs = [r for r in self.runs if r["recipe"] == recipe and r["model"] == model]
            finals = [r["points"][-1]["accuracy"] for r in runs]
            row = {"recipe": recipe, "model": model, "seeds": len(runs), "start": runs[0]["points"][0]["accuracy"],
                   "final_min": min(finals), "final_max": max(finals),
                   "destroyed": sum(f <= 2 * self.chance for f in finals),
                   "diverged": sum(r["diverged_at"] is not None for r in runs)}
            if "trigger_accuracy" in runs[0]["points"][-1]:
                row["trigger_final_max"] = max(r["points"][-1]["trigger_accuracy"] for r in runs)
            rows.append(row)
        return rows

    def table(self) -> str:
        steps = [p["step"] for p in self.runs[0]["points"]]
        head = "| recipe | model | seed | " + " | ".join(f"step {s}" for s in steps) + " | trigger (final) |"
        lines = [head, "|" + "---|" * (4 + len(steps))]
        for r in self.runs:
            accs = " | ".join(f"{p['accuracy'] * 100:.1f}" for p in r["points"])
            trig = f"{r['points'][-1]['trigger_accuracy'] * 100:.0f}" if "trigger_accuracy" in r["points"][-1] else "-"
            div = f" (diverged at {r['diverged_at']})" if r["diverged_at"] is not None else ""
            lines.append(f"| {r['recipe']} | {r['model']}{div} | {r['seed']} | {accs} | {trig} |")
        return "\n".join(lines)


def _finetune_curve(model, train, test, triggers, recipe: Recipe, cfg: DestructionConfig, seed: int) -> dict[str, Any]:
    hook = _Checkpoints(cfg.checkpoints(), test, triggers)
    hook.measure(model, 0)
    tcfg = TrainConfig(epochs=cfg.steps, batch_size=cfg.batch_size, optimizer=recipe.optimizer, lr=recipe.lr,
                       momentum=recipe.momentum, weight_decay=recipe.weight_decay, schedule="none", augment=cfg.augment,
                       max_steps=cfg.steps, seed=seed)
    res = fit(model, train, tcfg, hooks=[hook], desc="fine-tune", quiet=True, stop_on_divergence=True)
    if res.diverged_at is not None:  # the wreck (weights before the non-finite step) stands for the remaining points
        hook.measure(model, res.diverged_at)
        wreck = hook.points.pop()
        hook.points += [{**wreck, "step": s} for s in hook.at if s > hook.points[-1]["step"]]
    return {"points": hook.points, "diverged_at": res.diverged_at}


def run_destruction(source: str | Path, cfg: DestructionConfig | None = None) -> DestructionResult:
    """Fine-tune the guarded bundle ``source`` and its stripped copy under every recipe and seed."""

    cfg = cfg or DestructionConfig()
    bundle = load_bundle(source)
    if not bundle.spec.guard:
        raise BadInput(f"{source} carries no MagicGuard (protect it first: edgeguard protect magicguard)")
    data_cfg = bundle_data_config(bundle)
    train, test = load_data(data_cfg, "train"), load_data(data_cfg, "test")
    if train.num_classes != bundle.spec.num_classes or train.info.input_shape != bundle.spec.input_shape:
        raise BadInput(f"the bundle's dataset {train.info.name!r} no longer fits the model")
    triggers = None
    if VAULT_RECORD in bundle.vault:
        key, _ = read_key(bundle.vault)
        triggers = TensorData(key.as_float(), key.labels)
    runs = []
    for recipe in cfg.recipes:
        for seed in cfg.seeds:
            for name in ("guarded", "unguarded"):
                model = bundle.load_model()
                if name == "unguarded":
                    strip(model)
                run = _finetune_curve(model, train, test, triggers, recipe, cfg, seed)
                runs.append({"recipe": recipe.label, "optimizer": recipe.optimizer, "lr": recipe.lr, "seed": seed,
                             "model": name, **run})
                log(f"destruction: {recipe.label} seed {seed} {name}: accuracy "
                    f"{run['points'][0]['accuracy']:.3f} -> {run['points'][-1]['accuracy']:.3f}")
    return DestructionResult(str(bundle.path), dict(bundle.spec.guard), cfg.to_dict(), 1.0 / bundle.spec.num_classes,
                             tuple(runs))


def plot_destruction(result: DestructionResult | dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy vs fine-tuning steps, one panel per recipe: guarded (red) and unguarded (blue), one line per seed;
    trigger accuracy dashed.  Returns None where matplotlib is missing."""

    plt = pyplot()
    if plt is None:
        return None
    runs = result.runs if isinstance(result, DestructionResult) else result["runs"]
    chance = result.chance if isinstance(result, DestructionResult) else result["chance"]
    recipes = list(dict.fromkeys(r["recipe"] for r in runs))
    fig, axes = plt.subplots(1, len(recipes), figsize=(3.6 * len(recipes), 3.2), squeeze=False, sharey=True)
    for ax, recipe in zip(axes[0], recipes, strict=True):
        for r in (r for r in runs if r["recipe"] == recipe):
            color = "tab:red" if r["model"] == "guarded" else "tab:blue"
            steps = [p["step"] for p in r["points"]]
            ax.plot(steps, [p["accuracy"] for p in r["points"]], color=color, alpha=0.8,
                    label=f"{r['model']} (test)" if r["seed"] == runs[0]["seed"] else None)
            if "trigger_accuracy" in r["points"][0]:
                ax.plot(steps, [p["trigger_accuracy"] for p in r["points"]], color=color, ls="--", alpha=0.6,
                        label=f"{r['model']} (triggers)" if r["seed"] == runs[0]["seed"] else None)
        ax.axhline(chance, color="gray", lw=0.8, ls=":")
        ax.set_title(recipe, fontsize=9)
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylim(-0.02, 1.02)
    return save_panels(fig, axes, path, "accuracy")
