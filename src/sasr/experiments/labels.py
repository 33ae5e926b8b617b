"""The names of a comparison's table rows: a method, or another folder's runs of one (``compare --include``)."""

from __future__ import annotations

SEPARATOR = "@"  # METHOD@FOLDER; no method or option name holds it


def included_label(method: str, folder: str) -> str:
    """The row that holds ``method``'s runs from the comparison folder named ``folder``."""
    return f"{method}{SEPARATOR}{folder}"


def is_included(label: str) -> bool:
    """Whether a row holds the runs of another comparison folder."""
    return SEPARATOR in label


def method_of(label: str) -> str:
    """The method a row's runs were trained with."""
    return label.partition(SEPARATOR)[0]
