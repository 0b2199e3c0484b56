"""Rewrite the README's generated blocks (flag table, metric table) from the code they document.

    python scripts/update_readme.py      (or: make readme)

tests/test_options.py fails when a block differs from what this writes.
"""

from __future__ import annotations

from pathlib import Path

from transinv.metric_registry import markdown_table
from transinv.options import flag_reference

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = {"flags": flag_reference, "metrics": markdown_table}


def main() -> None:
    text = README.read_text()
    for marker, make in BLOCKS.items():
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{make()}\n{end}{after}"
    README.write_text(text)
    print(f"updated {README.name}: {', '.join(BLOCKS)}")


if __name__ == "__main__":
    main()
