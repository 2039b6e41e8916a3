"""The owner's store of trigger sets and per-artifact enrolments: ``VAULT/fragile``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeguard.bundle import Vault
from edgeguard.errors import BadInput
from edgeguard.protect.fragile.enrol import FragileVerification, _numerics, check_record, verify
from edgeguard.protect.fragile.generator import FragileKey

FOLDER = "fragile"  # inside the owner vault: VAULT/fragile


class FragileStore:
    """Trigger sets and per-artifact enrolments in a :class:`~edgeguard.bundle.Vault` folder (hashed index).

    ``key-<sha12>``: the trigger images (exact dtype) and their labels; ``enrol-<sha12>``: one record per enrolled
    artifact (by the artifact's sha256), each hashed over its own content."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.vault = Vault(self.path)

    @classmethod
    def find(cls, vault: str | Path) -> FragileStore | None:
        """The fragile store of an owner vault (``VAULT/fragile``), or ``vault`` itself when it is one."""
        p = Path(vault)
        for cand in (p / FOLDER, p):
            store = cls(cand)
            if (cand / store.vault.INDEX).is_file() and store.records():
                return store
        return None

    def put_key(self, key: FragileKey) -> str:
        name = f"key-{key.sha256[:12]}"
        if name not in self.vault:
            self.vault.put_tensors(name, {"images": key.images, "key": key.key})
        return name

    def get_key(self, sha256: str) -> FragileKey:
        t = self.vault.get_tensors(f"key-{sha256[:12]}")
        if set(t) != {"images", "key"}:
            raise BadInput(f"the fragile key {sha256[:12]} in {self.path} is not a trigger set")
        key = FragileKey(t["images"], t["key"], {})
        if key.sha256 != sha256:
            raise BadInput(f"the fragile key {sha256[:12]} in {self.path} does not hash to its name; the vault was modified")
        return key

    def put_record(self, record: dict[str, Any]) -> str:
        name = f"enrol-{record['fingerprint']['sha256'][:12]}"
        self.vault.put_json(name, record)
        return name

    def records(self) -> list[dict[str, Any]]:
        return [check_record(self.vault.get_json(n), f"{self.path}/{n}.json")
                for n in self.vault.names() if n.startswith("enrol-")]

    def select(self, info) -> dict[str, Any]:
        """The enrolment to verify ``info`` against: the same file, else one with the same numerics, else any one
        for the same classes and input (drift)."""
        records = self.records()
        if not records:
            raise BadInput(f"{self.path} holds no fragile enrolment")
        for r in records:
            if r["fingerprint"]["sha256"] == info.sha256:
                return r
        fits = [r for r in records if r["fingerprint"]["classes"] == list(info.classes)]
        if not fits:
            fp = records[0]["fingerprint"]
            raise BadInput(f"the fragile enrolments in {self.path} are for a {len(fp['classes'])}-class model, not for "
                           f"{info.path} ({info.num_classes} classes); pass the vault of this model")
        same = [r for r in fits if {k: r["fingerprint"][k] for k in ("backend", "precision", "device")} == _numerics(info)]
        return (same or fits)[-1]


def verify_store(runner, store: FragileStore) -> FragileVerification:
    record = store.select(runner.info)
    return verify(runner, record, store.get_key(record["trigger_sha256"]))

