"""The PromQL name extractor on the shapes our dashboard and rules use."""

from __future__ import annotations

import pytest

from monitoring.promql import metric_names


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="ray", x=~"y|z"}[5m])))', {"a_bucket"}),
    ("sum(w) > 0 and deriv(sum(w)[5m:30s]) > 0", {"w"}),
    ("sum by (layer, shard) (rate(a_total[$__rate_interval])) / ignoring (shard) group_left "
     "sum by (layer) (rate(b[5m]))", {"a_total", "b"}),
    ("nextserve:ttft_seconds:p99_5m > 5 and on () count(x offset 1h) > 1e3",
     {"nextserve:ttft_seconds:p99_5m", "x"}),
])
def test_metric_names(expr, names):
    assert metric_names(expr) == names
