"""The one exception type the CLI turns into a single sentence and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SasrError(Exception):
    """A user-facing error: bad input or a state the user must fix. Its message is one sentence."""


def nearest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when none is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, name: str, valid: Iterable[str]) -> SasrError:
    """An error for an unknown name that lists the valid ones and suggests the nearest."""
    valid = sorted(valid)
    return SasrError(f"unknown {kind} '{name}'{nearest(name, valid)}; valid: {', '.join(valid)}")
