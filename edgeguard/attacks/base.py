"""The attack registry: removal attacks (``family="removal"``) and extraction attacks (``family="extraction"``)."""

from edgeguard.registry import Registry

ATTACKS = Registry("attack")
