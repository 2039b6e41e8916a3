"""``attack finetune|extract``: removal by fine-tuning, and model extraction through the artifact's Runner."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.api import MODES
from edgeguard.cli.options import (
    ARTIFACT,
    BUNDLE,
    DATA_ROOT,
    DATASET,
    JSON_OUT,
    REMOTE,
    SEED,
    KeyValue,
    _data_config,
    _registry_names,
    emit,
    merge_flags,
)
from edgeguard.errors import BadInput


@click.group("attack")
def attack_group() -> None:
    """Attacks against protected models: removal (finetune) and model extraction (extract)."""


@attack_group.command("finetune")
@BUNDLE
@click.option("--mode", type=click.Choice(list(MODES)), required=True,
              help="Fine-tune / retrain the last layer / all layers (rt*: the last layer is re-initialised).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Attacked bundle to write (no vault).")
@click.option("--epochs", type=int, default=None, help="Default 20, as the reference.")
@click.option("--lr", type=float, default=None, help="Default 0.01.")
@click.option("--batch-size", type=int, default=None)
@click.option("--data-fraction", type=float, default=None, help="Share of the attacker's data used (default 1.0).")
@click.option("--attack-dataset", type=click.Choice(_registry_names("dataset")), default=None,
              help="Attacker's dataset (default: the bundle's own training data).")
@DATA_ROOT
@click.option("--freeze-bn", is_flag=True, default=None, help="Keep BatchNorm statistics fixed (strict *LL).")
@SEED
@JSON_OUT
def attack_finetune_cmd(bundle, mode, out, epochs, lr, batch_size, data_fraction, attack_dataset, data_root,
                        freeze_bn, seed, json_path):
    """Removal attack by fine-tuning: FTLL, FTAL, RTLL, RTAL."""
    from edgeguard.api import FinetuneConfig, finetune_attack

    cfg = merge_flags(FinetuneConfig, "attack finetune", mode=mode, epochs=epochs, lr=lr, batch_size=batch_size,
                      data_fraction=data_fraction, dataset=attack_dataset, data_root=data_root, freeze_bn=freeze_bn,
                      seed=seed)
    res = finetune_attack(bundle, out, cfg)
    emit(res, json_path)


@attack_group.command("extract")
@ARTIFACT
@click.option("--method", required=True,
              help="Extraction attack: " + ", ".join(_registry_names("extraction")) + ".")
@click.option("--budget", type=int, required=True, help="Queries to the artifact (counted at its Runner).")
@click.option("--query-set", default=None, help="Attacker's query pool, a dataset name (default: synthetic, shaped like the victim's input).")
@click.option("--query-option", "query_options", type=KeyValue(), multiple=True, help="Query-pool dataset option k=v.")
@click.option("--query-root", type=click.Path(path_type=Path), default=None, help="Folder of an on-disk query pool.")
@click.option("--surrogate", default=None, help="Attacker's architecture (default smallcnn).")
@click.option("--epochs", type=int, default=None, help="Surrogate training epochs (default 20).")
@click.option("--hard-label", is_flag=True, default=None, help="The API returns only the top-1 label.")
@click.option("--param", "params", type=KeyValue(), multiple=True, help="Method option k=v (repeatable).")
@DATASET
@DATA_ROOT
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Surrogate bundle to write (with attack.json).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="A served victim (URL): the local file it serves, on which fidelity is measured (no extra queries).")
@SEED
@JSON_OUT
@REMOTE
def attack_extract_cmd(artifact, method, budget, query_set, query_options, query_root, surrogate, epochs, hard_label,
                       params, dataset, data_root, out, reference, seed, json_path):
    """Model extraction: query ARTIFACT as a client would (probabilities only, counted budget), train a surrogate,
    and report its accuracy and fidelity on the victim's test split (--dataset, default digits)."""
    from edgeguard.api import extract, method_config

    named = {"budget": budget, "query_set": query_set, "query_options": dict(query_options) or None,
             "query_root": str(query_root) if query_root else None, "surrogate": surrogate, "epochs": epochs,
             "hard_label": hard_label, "seed": seed}
    twice = sorted(k for k, v in named.items() if v is not None and k in dict(params))
    if twice:
        raise BadInput(f"--param {twice[0]}=... repeats --{twice[0].replace('_', '-')}: give it once")
    cfg = merge_flags(method_config(method, dict(params)), f"attack extract --method {method}", **named)
    res = extract(artifact, out, method, cfg, eval_data=_data_config(dataset, str(data_root) if data_root else None, ()),
                  reference=reference)
    emit(res, json_path)
