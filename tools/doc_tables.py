"""Rewrite the docs' generated parts from their registries: the README's methods (``sasr.methods.table``),
docs/options.md's options (``sasr.config.options_table``), docs/guide.md's metrics (``sasr.metrics.table``)
and command-line usage (``sasr.cli.usage``), and docs/methods.md's registries (``sasr.registry.table``). The
tests fail until the docs hold what these print.

    python tools/doc_tables.py
"""

from __future__ import annotations

from pathlib import Path

from sasr import metrics, registry
from sasr.cli import usage
from sasr.config import options_table
from sasr.methods import table as methods_table

ROOT = Path(__file__).resolve().parents[1]
# file -> (the first line of a generated part, what generates it); a part ends at its first blank line
PARTS = {
    ROOT / "README.md": {"| method | what a step does | paper |": methods_table},
    ROOT / "docs" / "options.md": {"| key | default | what it does |": options_table},
    ROOT / "docs" / "guide.md": {"| metric | what it is |": metrics.table, "sasr train [": usage},
    ROOT / "docs" / "methods.md": {"| registry | what a module registers there | in it |": registry.table},
}


def generated(text: str, start: str) -> str:
    """The generated part of ``text`` that begins with ``start`` (up to its first blank line or fence)."""
    i = text.index(start)
    ends = [j for j in (text.find("\n\n", i), text.find("\n```", i)) if j != -1]
    return text[i : min(ends, default=len(text.rstrip("\n")))]


def main() -> None:
    for path, parts in PARTS.items():
        text = path.read_text()
        for start, make in parts.items():
            text = text.replace(generated(text, start), make())
        path.write_text(text)
        print(f"rewrote {len(parts)} parts of {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
