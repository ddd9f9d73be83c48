"""Engine snapshots for the monitoring tests, built from EngineStats's own fields so that a field
added to it needs no change here or in the tests that use them."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from engine.llm_engine import EngineStats


def _zero(annotation: Any) -> Any:
    """The empty value of a field's type: 0 for int, () for a tuple, None for an optional."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return None if type(None) in args else _zero(args[0])
    return (origin or annotation)()


def engine_stats(**values: Any) -> EngineStats:
    """An EngineStats with `values` and, for every other field, its default or else the zero of its
    type (an idle engine that has done nothing); a name EngineStats lacks is a TypeError."""
    hints = typing.get_type_hints(EngineStats)
    zeros = {f.name: _zero(hints[f.name]) for f in dataclasses.fields(EngineStats)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return EngineStats(**{**zeros, **values})

