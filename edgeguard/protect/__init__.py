"""Protections: the backdoor watermark (Adi et al.); MagicGuard and fragile triggers come later."""

from edgeguard.protect.trigger_files import load_trigger_dir
from edgeguard.protect.triggers import TriggerSet, generate_triggers
from edgeguard.protect.watermark import (
    EmbedResult,
    WatermarkConfig,
    WatermarkVerification,
    embed_watermark,
    read_key,
    verify_watermark,
)

__all__ = [
    "EmbedResult",
    "TriggerSet",
    "WatermarkConfig",
    "WatermarkVerification",
    "embed_watermark",
    "generate_triggers",
    "load_trigger_dir",
    "read_key",
    "verify_watermark",
]
