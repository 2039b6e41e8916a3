"""The attack registry: removal attacks (``family="removal"``) now, extraction attacks later."""

from edgeguard.registry import Registry

ATTACKS = Registry("attack")
