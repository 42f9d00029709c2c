"""A user's metric module, as named in METRICS_MODULES (used by the protocol tests)."""

import numpy as np

from datasource.metrics import metric


@metric("top_decile_hit_rate", input="score", tasks=("binary_classification",), unit="percentunit")
def top_decile_hit_rate(y_true, y_score):
    """Share of positives among the 10% highest scores."""
    if len(y_true) < 10:
        return float("nan")
    top = np.argsort(-y_score)[: len(y_score) // 10]
    return float(np.mean(y_true[top]))
