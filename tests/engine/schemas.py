"""Hypothesis strategies for JSON schemas of the kinds clients send for structured outputs
(objects with required and optional properties, arrays, enums, consts, bounded strings and
numbers, anyOf, nesting), bounded so a random-weight model can finish them in a few hundred
tokens: strings and arrays have a maximum length, nesting is shallow."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=6)
SCALARS = st.one_of(st.integers(-1000, 1000), st.booleans(), st.none(),
                    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=5))


@st.composite
def _string(draw: st.DrawFn) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "string"}
    hi = draw(st.integers(0, 8))
    s["maxLength"] = hi
    if draw(st.booleans()):
        s["minLength"] = draw(st.integers(0, hi))
    return s


@st.composite
def _integer(draw: st.DrawFn) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer"}
    lo = draw(st.integers(-10**6, 10**6))
    if draw(st.booleans()):
        s["minimum"] = lo
    if draw(st.booleans()):
        s["maximum"] = lo + draw(st.integers(0, 10**6))
    return s


LEAVES = st.one_of(
    _string(), _integer(), st.just({"type": "number"}), st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(SCALARS, min_size=1, max_size=4, unique_by=repr).map(lambda v: {"enum": v}),
    SCALARS.map(lambda v: {"const": v}),
)


@st.composite
def _object(draw: st.DrawFn, children: st.SearchStrategy) -> dict[str, Any]:
    props = draw(st.dictionaries(NAMES, children, min_size=1, max_size=3))
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
    s: dict[str, Any] = {"type": "object", "properties": props, "required": required}
    if draw(st.booleans()):
        s["additionalProperties"] = False
    return s


@st.composite
def _array(draw: st.DrawFn, children: st.SearchStrategy) -> dict[str, Any]:
    hi = draw(st.integers(1, 3))
    return {"type": "array", "items": draw(children), "minItems": draw(st.integers(0, hi)), "maxItems": hi}


def _compound(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(_object(children), _array(children),
                     st.lists(children, min_size=2, max_size=3).map(lambda v: {"anyOf": v}))


SCHEMAS = st.recursive(LEAVES, _compound, max_leaves=5)
# A top level as clients send it: mostly an object.
TOP_SCHEMAS = st.one_of(_object(SCHEMAS), SCHEMAS)
