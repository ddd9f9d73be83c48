"""The metric names a PromQL expression reads, for checking dashboards and rules against a live
scrape. A small lexer, not a parser: it drops strings, label matchers `{...}`, ranges `[...]` and
`by/without/on/ignoring/group_*(...)` label lists, then keeps identifiers that are not functions,
keywords or aggregation operators. Recording-rule names (with a colon) are returned too."""

from __future__ import annotations

import re

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Numbers and durations (0.99, 1e3, 5m), not digits inside a name (p99_5m).
_NUMBER = re.compile(r"(?<![a-zA-Z0-9_:])\d+(?:\.\d+)?(?:e[+-]?\d+)?[a-zA-Z]*")
KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                      "bool", "offset", "atan2", "inf", "nan", "Inf", "NaN", "sum", "min", "max", "avg",
                      "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
                      "limitk", "limit_ratio"})


def metric_names(expr: str) -> set[str]:
    s = _STRING.sub(" ", expr)
    # Grafana's variables ($__rate_interval, $layer) are not metrics.
    s = re.sub(r"\$\{?[a-zA-Z_]+\}?", " ", s)
    while True:  # nested subqueries: innermost brackets first
        t = _RANGE.sub(" ", _BRACES.sub(" ", s))
        if t == s:
            break
        s = t
    s = _LABEL_LIST.sub(" ", s)
    s = _NUMBER.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        name = m.group(0)
        rest = s[m.end():].lstrip()
        if name in KEYWORDS or rest.startswith("("):  # a function or aggregation call
            continue
        names.add(name)
    return names
