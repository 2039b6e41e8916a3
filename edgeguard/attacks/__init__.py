"""Attacks: one registry, ``ATTACKS``; entries are tagged ``family="removal"`` or ``"extraction"``."""

from edgeguard.attacks import extraction, removal  # noqa: F401  (registers the entries)
from edgeguard.attacks.base import ATTACKS
from edgeguard.attacks.removal import MODES, AttackResult, FinetuneConfig, finetune_attack

__all__ = ["ATTACKS", "MODES", "AttackResult", "FinetuneConfig", "finetune_attack"]
