"""The stages: each calls the library functions the stage commands call, and records artifacts, results, checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeguard.attacks import FinetuneConfig, finetune_attack
from edgeguard.attacks.extraction import extract, method_config
from edgeguard.bundle import Vault, load_bundle, save_bundle, stage_record
from edgeguard.data import default_ood, load_data
from edgeguard.defenses import capabilities, defense_label
from edgeguard.errors import CheckFailed
from edgeguard.evaluate import BenchConfig, accuracy_from, evaluate_accuracy, parity_from, predict_dataset
from edgeguard.evaluate.defense import measure_defense
from edgeguard.evaluate.destruction import plot_destruction, run_destruction
from edgeguard.importing import import_model
from edgeguard.pipeline.config import PipelineConfig
from edgeguard.progress import log
from edgeguard.protect import embed_watermark, verify_watermark
from edgeguard.protect.fragile import FragileStore, protect_fragile, verify_store
from edgeguard.protect.magicguard import MANIFEST_KEY, parity_atol, protect_magicguard
from edgeguard.quantize import quantize_bundle
from edgeguard.runtime import open_runner, remote_settings
from edgeguard.serve import ServeConfig, free_ports, launch
from edgeguard.verbs import bench_artifacts, export_bundle, train_bundle


@dataclass
class Context:
    cfg: PipelineConfig
    out: Path
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path; "bundle" is the owner's float model
    bundle: str | None = None  # the owner's current bundle (trained, then protected)
    base: str | None = None  # the trained bundle before any protection
    marked: str | None = None  # the watermarked bundle before MagicGuard (removal attacks target it)
    int8: str | None = None  # the quantized bundle, if the quantize stage ran
    results: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})


def stage_import(ctx: Context) -> None:
    """The user's own model instead of a trained one (config section ``import``), as ``edgeguard import`` does."""
    imp = ctx.cfg.import_
    if not imp.enabled:
        return

    res = import_model(imp.source, out=ctx.out / "bundle", input_shape=imp.input_shape, classes=imp.classes,
                       mean=imp.mean, std=imp.std, weights=imp.weights, factory_args=imp.factory_args, head=imp.head,
                       data=ctx.cfg.data)
    ctx.bundle = ctx.base = res.bundle
    ctx.results["import"] = res.to_json()


def stage_train(ctx: Context) -> None:
    cfg = ctx.cfg
    if cfg.import_.enabled:
        return

    res = train_bundle(cfg.data, cfg.model, cfg.train_config(), ctx.out / "bundle")
    ctx.bundle = ctx.base = res.bundle
    ctx.results["train"] = res.to_json()


def stage_watermark(ctx: Context) -> None:
    wm = ctx.cfg.watermark
    if not wm.enabled:
        return

    res = embed_watermark(ctx.bundle, ctx.out / "watermarked", wm.to_watermark_config(ctx.cfg.seed), key_seed=wm.key_seed)
    ctx.bundle = res.bundle
    ctx.results["watermark_embed"] = {k: v for k, v in res.to_json().items()}


def stage_magicguard(ctx: Context) -> None:
    """Guard the current bundle; fine-tune it and its stripped copy per recipe (the destruction table and plot)."""
    mg = ctx.cfg.magicguard
    if not mg.enabled:
        return

    ctx.marked = ctx.bundle
    res = protect_magicguard(ctx.bundle, ctx.out / "guarded", mg.to_magicguard_config(ctx.cfg.seed))
    ctx.bundle = res.bundle
    d = run_destruction(res.bundle, mg.destruction)
    plot = plot_destruction(d, ctx.out / "plots" / "magicguard_destruction.png")
    ctx.results["magicguard"] = {"protect": res.to_json(), "destruction": d.to_json(),
                                 "plot": str(plot.relative_to(ctx.out)) if plot else None}
    ctx.check("MagicGuard keeps the bundle's accuracy", abs(res.accuracy_after - res.accuracy_before) <= 0.001,
              f"test accuracy {res.accuracy_before:.4f} -> {res.accuracy_after:.4f} (limit 0.1 point), max |Δlogit| "
              f"{res.max_abs_change:.4f} (a = {mg.a:g})")
    for row in d.summary():
        sgd_spec = row["recipe"] == "SGD lr 0.001"  # the acceptance recipe (docs/magicguard.md)
        if row["model"] == "guarded" and sgd_spec:
            ctx.check(f"MagicGuard destroys under {row['recipe']}", row["destroyed"] == row["seeds"],
                      f"final accuracy {row['final_min']:.3f}-{row['final_max']:.3f} after {mg.destruction.steps} steps; "
                      f"{row['destroyed']}/{row['seeds']} seeds at <= 2x chance")
        if row["model"] == "unguarded" and sgd_spec:
            ctx.check(f"unguarded control survives {row['recipe']}", row["final_min"] >= 0.9,
                      f"final accuracy {row['final_min']:.3f}-{row['final_max']:.3f} (limit 0.90)")


def stage_magicguard_fidelity(ctx: Context) -> None:
    """Guarded vs unguarded accuracy on the shipped forms: the FP32 ONNX and, when quantized, the INT8 ONNX."""
    if not ctx.cfg.magicguard.enabled:
        return

    data = load_data(ctx.cfg.data, ctx.cfg.evaluate.split)
    folder = ctx.out / "unguarded"
    pairs = [("FP32 ONNX", ctx.artifacts["onnx"], export_bundle(ctx.marked, folder / "model.onnx",
                                                                ctx.cfg.export.export_config()).path)]
    if ctx.int8 is not None:
        q = quantize_bundle(ctx.marked, folder / "int8", ctx.cfg.quantize.to_quantize_config(ctx.cfg.seed))
        pairs.append(("INT8 ONNX", ctx.artifacts["onnx_int8"], export_bundle(q.bundle, folder / "model_int8.onnx").path))
    rows = []
    for form, guarded, plain in pairs:
        accs = []
        for path in (guarded, plain):
            with open_runner(path) as r:
                accs.append(evaluate_accuracy(r, data).accuracy)
                if path == guarded:
                    nodes = (r.metadata.get(MANIFEST_KEY) or {}).get("nodes", [])
        rows.append({"form": form, "guarded": accs[0], "unguarded": accs[1], "fp32_nodes": nodes})
        ctx.check(f"MagicGuard keeps the {form} accuracy", abs(accs[0] - accs[1]) <= 0.001,
                  f"{accs[1]:.4f} unguarded -> {accs[0]:.4f} guarded (limit 0.1 point); guard nodes kept FP32: {len(nodes)}")
    ctx.results["magicguard"]["fidelity"] = rows


def stage_quantize(ctx: Context) -> None:
    q = ctx.cfg.quantize
    if not q.enabled:
        return

    res = quantize_bundle(ctx.bundle, ctx.out / "int8", q.to_quantize_config(ctx.cfg.seed))
    ctx.int8 = res.bundle
    ctx.results["quantize"] = res.to_json()


def stage_export(ctx: Context) -> None:
    ctx.artifacts["bundle"] = ctx.bundle
    res = export_bundle(ctx.bundle, ctx.out / "model.onnx", ctx.cfg.export.export_config())
    ctx.artifacts["onnx"] = res.path
    ctx.results["export"] = {"onnx": res.to_json()}
    if ctx.int8 is not None:
        res8 = export_bundle(ctx.int8, ctx.out / "model_int8.onnx", ctx.cfg.export.export_config())
        ctx.artifacts["onnx_int8"] = res8.path
        ctx.results["export"]["onnx_int8"] = res8.to_json()


def stage_evaluate(ctx: Context) -> None:
    """Accuracy of every artifact on the evaluation split, and parity of each against the bundle."""
    cfg = ctx.cfg.evaluate
    data = load_data(ctx.cfg.data, cfg.split)
    preds: dict[str, Any] = {}
    acc: dict[str, Any] = {}
    for name, path in ctx.artifacts.items():
        with open_runner(path) as r:
            probs, labels = predict_dataset(r, data)
            res = accuracy_from(
                probs, labels, r.info.classes, dataset=data.info.name, split=data.split,
                artifact=r.info.to_json(), min_accuracy=cfg.min_accuracy,
            )
        preds[name] = probs
        acc[name] = res.to_json()
        ctx.check(f"accuracy {name}", res.passed, f"{res.accuracy:.4f} on {data.info.name}/{data.split} (min {cfg.min_accuracy})")
    parity = {}
    atol = _parity_atol(ctx, cfg.parity_atol)
    for name in preds:
        if name == "bundle":
            continue
        p = parity_from(preds["bundle"], preds[name], atol=atol, a="bundle", b=name)
        parity[name] = p.to_json()
        if acc[name]["artifact"]["precision"] == "fp32":  # the same float model: must agree to the tolerance
            ctx.check(
                f"parity bundle vs {name}", p.passed,
                f"max |Δprob| {p.max_abs_diff:.2e} (tol {p.atol:g}), top-1 agreement {p.top1_agreement:.4f} on n={p.n}",
            )
        else:  # INT8: judged by its accuracy cost, the agreement is reported
            drop = acc["bundle"]["accuracy"] - acc[name]["accuracy"]
            limit = ctx.cfg.quantize.max_accuracy_drop
            ctx.check(f"{name} accuracy cost", drop <= limit,
                      f"{drop * 100:+.2f} points vs FP32 (limit {limit * 100:.1f}); top-1 agreement with FP32 {p.top1_agreement:.4f}")
    for name, path in ctx.artifacts.items():
        f = Path(path) / "model.pt" if Path(path).is_dir() else Path(path)
        acc[name]["bytes"] = f.stat().st_size
    ctx.results["evaluate"] = {"accuracy": acc, "parity": parity}


def _parity_atol(ctx: Context, atol: float) -> float:
    """A guarded model's outputs differ between runtimes by up to 2a (sin of large arguments; docs/magicguard.md)."""

    return parity_atol(load_bundle(ctx.bundle, verify=False).manifest, atol)


def stage_defenses(ctx: Context) -> None:
    """Each configured output defense: exported (fused, or host-side with its state file) on the FP32 bundle and the
    INT8 bundle, then measured against the same artifact's undefended view on the test split and an
    out-of-distribution set, with latency at batch 1 and 64 in the same run."""
    e = ctx.cfg.export
    if not e.defense:
        return

    test = load_data(ctx.cfg.data, ctx.cfg.evaluate.split)
    rows = []
    bench = BenchConfig(batch_sizes=(1, 64), warmup=3, iterations=e.defense_latency_iterations, seed=ctx.cfg.seed)
    sources = [("fp32", ctx.bundle)] + ([("int8", ctx.int8)] if ctx.int8 is not None and e.defense_int8 else [])
    folder = ctx.out / "defenses"
    folder.mkdir(exist_ok=True)
    ood_cfg = default_ood(test.info.input_shape)
    ood = load_data(ood_cfg, "test")
    for spec in e.defense:
        label = defense_label(spec.name, spec.params)
        host = False
        for precision, bundle in sources:
            if precision == "int8" and host:
                continue  # a host-side defense does not depend on the graph's precision
            stem = f"{e.defense.index(spec):02d}_{spec.name}{'' if precision == 'fp32' else '_int8'}"
            res = export_bundle(bundle, folder / f"{stem}.onnx", e.export_config(), defense=spec.name,
                                defense_params=spec.params)
            host = res.placement == "host"
            with open_runner(res.path) as defended, open_runner(res.path, undefended=True) as clean:
                m = measure_defense(defended, clean, test, ood, bench=bench, params=dict(spec.params), placement=res.placement)
            keeps = capabilities(spec.name, spec.params).preserves_top1
            row = {**m.row(), "defense": label, "precision": precision, "artifact": res.path,
                   "fusable": res.placement == "graph", "head_ops": list(res.head_ops),
                   "head_check_max_abs_diff": res.head_check_max_abs_diff, "preserves_top1": keeps,
                   "measurement": m.to_json()}
            rows.append(row)
            if keeps:
                ctx.check(f"{label} ({precision}) keeps the top-1", m.test.agreement == 1.0,
                          f"argmax agreement with the undefended model {m.test.agreement:.4f} on {m.test.n} test images")
    ctx.results["defenses"] = {"rows": rows, "ood": ood_cfg.to_dict()}


def stage_extraction(ctx: Context) -> None:
    """Model extraction (the configured attack) against the shipped FP32 model, once per listed defense."""
    x = ctx.cfg.extraction
    if not x.enabled:
        return

    folder = ctx.out / "extraction"
    folder.mkdir(exist_ok=True)
    cfg = method_config(x.method, {"seed": ctx.cfg.seed, **x.options})
    rows = []
    for i, spec in enumerate(x.defenses):
        label = defense_label(spec.name, spec.params)
        victim = export_bundle(ctx.bundle, folder / f"victim_{i:02d}_{spec.name}.onnx", ctx.cfg.export.export_config(),
                               defense=spec.name, defense_params=spec.params).path
        res = extract(victim, None, x.method, cfg, eval_data=ctx.cfg.data)
        rows.append({"defense": label, **res.to_json()})
        log(f"extraction {x.method} vs {label}: fidelity {res.fidelity:.4f}, surrogate accuracy {res.surrogate_accuracy:.4f}")
    ctx.results["extraction"] = {"method": x.method, "config": cfg.to_dict(), "rows": rows}
    undefended = next((r for r in rows if r["defense"] == "none"), None)
    if undefended is not None:
        ctx.check(f"{x.method} extracts the undefended model above chance", undefended["fidelity"] > 2.0 / len(
            load_data(ctx.cfg.data, "test").info.classes), f"fidelity {undefended['fidelity']:.4f} with "
                  f"{undefended['queries_used']} queries")


def stage_bench(ctx: Context) -> None:
    b = ctx.cfg.bench
    if not b.enabled:
        return
    names = list(ctx.artifacts)
    cfg = b.library_config(BenchConfig, ctx.cfg.seed)
    res = bench_artifacts([ctx.artifacts[n] for n in names], cfg, names=names)
    ctx.results["bench"] = res.to_json()


def _watermark_row(ctx: Context, name: str, onnx_path: str, data) -> dict[str, Any]:
    """Clean accuracy and watermark verdict of one exported artifact, through its Runner."""

    with open_runner(onnx_path) as r:
        v = verify_watermark(r, Vault(Path(ctx.bundle) / "vault"), alpha=ctx.cfg.watermark.alpha)
        acc = evaluate_accuracy(r, data)
    return {"model": name, "artifact": onnx_path, "clean_accuracy": acc.accuracy, **{
        k: v.to_json()[k] for k in ("matches", "n", "trigger_accuracy", "p_value", "m_star", "alpha", "verdict")}}


def stage_verify_watermark(ctx: Context) -> None:
    """The watermark on the shipped ONNX (must be present), on the unmarked model (must be absent),
    and after each removal attack (reported as measured)."""
    if not ctx.cfg.watermark.enabled:
        return

    data = load_data(ctx.cfg.data, ctx.cfg.evaluate.split)
    rows = []
    unmarked = export_bundle(ctx.base, ctx.out / "unmarked.onnx", ctx.cfg.export.export_config())
    rows.append(_watermark_row(ctx, "no watermark", unmarked.path, data))
    ctx.check("watermark absent on the unmarked model", rows[-1]["verdict"] == "absent",
              f"{rows[-1]['matches']}/{rows[-1]['n']} matches (threshold {rows[-1]['m_star']})")
    rows.append(_watermark_row(ctx, "watermarked", ctx.artifacts["onnx"], data))
    ctx.check("watermark present on the shipped ONNX", rows[-1]["verdict"] == "present",
              f"{rows[-1]['matches']}/{rows[-1]['n']} matches, p-value {rows[-1]['p_value']:.3g}")
    if "onnx_int8" in ctx.artifacts:
        q = ctx.cfg.quantize
        rows.append(_watermark_row(ctx, f"watermarked, INT8 ({q.mode}, {q.target})", ctx.artifacts["onnx_int8"], data))
        ctx.check("watermark present on the INT8 ONNX", rows[-1]["verdict"] == "present",
                  f"{rows[-1]['matches']}/{rows[-1]['n']} matches, p-value {rows[-1]['p_value']:.3g}")
    a = ctx.cfg.attacks
    for mode in a.modes:
        cfg = FinetuneConfig(mode=mode, epochs=a.epochs, lr=a.lr, data_fraction=a.data_fraction, seed=ctx.cfg.seed)
        attacked = finetune_attack(ctx.marked or ctx.bundle, ctx.out / "attacks" / mode, cfg)
        onnx_path = export_bundle(attacked.bundle, ctx.out / "attacks" / f"{mode}.onnx", ctx.cfg.export.export_config()).path
        rows.append(_watermark_row(ctx, f"after {mode.upper()}", onnx_path, data))
    ctx.results["watermark"] = {"rows": rows, "attack": a.to_dict()}


def _perturbed(bundle: str, out: Path, rel_std: float, seed: int) -> str:
    """A copy of ``bundle`` with Gaussian noise of ``rel_std`` times each weight tensor's std added to every weight."""
    import torch


    b = load_bundle(bundle)
    model = b.load_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * float(p.std()) * rel_std)
    stage = stage_record("weight_noise", None, relative_std=rel_std, seed=seed)
    return str(save_bundle(out, model, b.spec, stages=[*b.stages, stage], parent=b, keep_vault=False).path)


def stage_fragile(ctx: Context) -> None:
    """Fragile triggers on the shipped ONNX: enrol, re-verify (no false alarm), drift on INT8, tamper detection."""
    fr = ctx.cfg.fragile
    if not fr.enabled:
        return

    folder = ctx.out / "fragile"
    store_path = Path(ctx.bundle) / "vault" / "fragile"
    res = protect_fragile(ctx.artifacts["onnx"], store_path, fr.to_fragile_config(ctx.cfg.seed))
    store = FragileStore(store_path)
    rows = []

    def row(name: str, path: str, **extra: Any) -> dict[str, Any]:
        with open_runner(path) as r:
            v = verify_store(r, store)
        rows.append({"artifact": name, "path": path, "verdict": v.verdict, "acc_tri": v.acc_tri, "kept": v.kept,
                     "flipped": len(v.flipped), "max_deviation": v.max_deviation, "hash_matches": v.hash_matches, **extra})
        return rows[-1]

    with open_runner(ctx.artifacts["onnx"]) as r:
        verdicts = [verify_store(r, store).verdict for _ in range(fr.verifications)]
    shipped = row("shipped FP32 ONNX (enrolled)", ctx.artifacts["onnx"])
    ctx.check("fragile triggers intact on the shipped ONNX", verdicts.count("intact") == fr.verifications,
              f"{verdicts.count('intact')}/{fr.verifications} verifications intact, AccTri {shipped['acc_tri']:.3f} on "
              f"{res.kept}/{res.n} enrolled triggers")
    int8_enrol = None
    if "onnx_int8" in ctx.artifacts:
        row("INT8 ONNX, FP32 enrolment", ctx.artifacts["onnx_int8"])
        try:  # the same triggers enrolled on the INT8 artifact (its own labels)
            int8_enrol = protect_fragile(ctx.artifacts["onnx_int8"], store_path, key_sha256=res.trigger_sha256).to_json()
            row("INT8 ONNX (enrolled)", ctx.artifacts["onnx_int8"])
        except CheckFailed as e:
            int8_enrol = {"error": str(e)}
    data = ctx.cfg.data
    ft = finetune_attack(ctx.bundle, folder / "ftll", FinetuneConfig(mode="ftll", epochs=fr.finetune_epochs,
                                                                      lr=fr.finetune_lr, seed=ctx.cfg.seed))
    ft_onnx = export_bundle(ft.bundle, folder / "ftll.onnx", ctx.cfg.export.export_config()).path
    tampered = row(f"FTLL {fr.finetune_epochs} epoch, lr {fr.finetune_lr:g}, re-exported", ft_onnx,
                   test_accuracy=ft.test_accuracy)
    ctx.check("fragile triggers detect one epoch of fine-tuning", tampered["verdict"] == "modified",
              f"{tampered['verdict']}, AccTri {tampered['acc_tri']:.3f} ({tampered['flipped']} triggers flipped), max "
              f"|Δlog p| {tampered['max_deviation']:.2g} against a tolerance of {res.check.tolerance:.2g}")
    if fr.weight_noise > 0:
        noisy = _perturbed(ctx.bundle, folder / "noise", fr.weight_noise, ctx.cfg.seed)
        row(f"weight noise {fr.weight_noise:g} x std, re-exported", export_bundle(noisy, folder / "noise.onnx",
                                                                               ctx.cfg.export.export_config()).path)
    ctx.results["fragile"] = {"enrol": res.to_json(), "int8_enrol": int8_enrol, "rows": rows, "data": data.name,
                              "guarded": bool(ctx.cfg.magicguard.enabled)}


def stage_serve(ctx: Context) -> None:
    """The shipped FP32 ONNX behind ``edgeguard serve`` on loopback: the watermark verdict and KnockoffNets through
    the server, each beside the same check on the file; Triton's own row count against the attack's budget."""
    s = ctx.cfg.serve
    if not s.enabled:
        return
    onnx_path = ctx.artifacts["onnx"]
    x = ctx.cfg.extraction
    options = {k: v for k, v in x.options.items() if k not in ("budget", "epochs")}
    cfg = method_config("knockoff", {"seed": ctx.cfg.seed, **options, "budget": s.budget, "epochs": s.epochs})
    rows = {}
    with launch(onnx_path, ServeConfig(max_batch=s.max_batch, **dict(zip(("http_port", "grpc_port", "metrics_port"),
                                                                        free_ports(3), strict=True)))) as srv:
        url = srv.http if s.protocol == "http" else srv.grpc
        log(f"serve: {onnx_path} at {url}")
        with remote_settings(access_token=srv.token):
            if ctx.cfg.watermark.enabled:
                vault = Vault(Path(ctx.bundle) / "vault")
                for where, target in (("file", onnx_path), ("server", url)):
                    with open_runner(target) as r:
                        v = verify_watermark(r, vault, alpha=ctx.cfg.watermark.alpha)
                    rows[f"watermark_{where}"] = {k: v.to_json()[k] for k in ("matches", "n", "p_value", "verdict")}
                f, r_ = rows["watermark_file"], rows["watermark_server"]
                ctx.check("watermark verdict through Triton equals the file's",
                          (f["verdict"], f["matches"], f["p_value"]) == (r_["verdict"], r_["matches"], r_["p_value"]),
                          f"server {r_['verdict']} {r_['matches']}/{r_['n']} (p {r_['p_value']:.3g}), "
                          f"file {f['verdict']} {f['matches']}/{f['n']}")
            on_file = extract(onnx_path, None, "knockoff", cfg, eval_data=ctx.cfg.data)
            served = extract(url, None, "knockoff", cfg, eval_data=ctx.cfg.data, reference=onnx_path)
        took = srv.stop()
    rows["knockoff_file"], rows["knockoff_server"] = on_file.to_json(), served.to_json()
    rows["stop_seconds"] = round(took, 2)
    counted = (served.server or {}).get("inference_rows")
    ctx.check("Triton counted exactly the attack's queries", counted == served.queries_used <= s.budget,
              f"{counted} rows at the server, {served.queries_used} queries sent, budget {s.budget}")
    ctx.check("KnockoffNets through Triton matches the file", abs(served.fidelity - on_file.fidelity) <= 0.02,
              f"fidelity {served.fidelity:.4f} through the server, {on_file.fidelity:.4f} on the file")
    ctx.check("the server drained and exited within 10 s of SIGTERM", took < 10, f"{took:.2f} s")
    ctx.results["serve"] = {"url": url, "protocol": s.protocol, **rows}


STAGES: list[tuple[str, Callable[[Context], None]]] = [
    ("import", stage_import),
    ("train", stage_train),
    ("watermark", stage_watermark),
    ("magicguard", stage_magicguard),
    ("quantize", stage_quantize),
    ("export", stage_export),
    ("evaluate", stage_evaluate),
    ("magicguard_fidelity", stage_magicguard_fidelity),
    ("fragile", stage_fragile),
    ("verify", stage_verify_watermark),
    ("defenses", stage_defenses),
    ("extraction", stage_extraction),
    ("bench", stage_bench),
    ("serve", stage_serve),
]
