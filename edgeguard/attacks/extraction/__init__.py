"""Model-extraction attacks against deployed artifacts (registered in ``ATTACKS`` with ``family="extraction"``)."""

from edgeguard.attacks.extraction import adaptive, art_bridge, datafree, jbda, knockoff  # noqa: F401  (register)
from edgeguard.attacks.extraction.base import (
    BudgetExceeded,
    ExtractionConfig,
    ExtractionContext,
    QueryOracle,
    query_all,
    train_surrogate,
)
from edgeguard.attacks.extraction.driver import ExtractionResult, extract, method_config

__all__ = ["BudgetExceeded", "ExtractionConfig", "ExtractionContext", "ExtractionResult", "QueryOracle", "extract",
           "method_config", "query_all", "train_surrogate"]
