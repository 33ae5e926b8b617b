"""Rewrite the README's generated tables from their registries: the options (``sasr.config.options_table``)
and the metrics (``sasr.metrics.table``). The tests fail until the README holds what these print.

    python tools/readme_tables.py
"""

from __future__ import annotations

from pathlib import Path

from sasr import metrics
from sasr.config import options_table

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES = {"| key | default | what it does |": options_table, "| metric | what it is |": metrics.table}


def main() -> None:
    text = README.read_text()
    for header, table in TABLES.items():
        start = text.index(header)
        end = text.index("\n\n", start)
        text = text[:start] + table() + text[end:]
    README.write_text(text)
    print(f"rewrote {len(TABLES)} tables in {README}")


if __name__ == "__main__":
    main()
