"""Nested mappings as dotted keys: ``{'a': {'b': 1}}`` is ``{'a.b': 1}`` (configs, tracker parameters)."""

from __future__ import annotations

from typing import Any


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every leaf of a nested mapping; an empty mapping is a leaf."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
