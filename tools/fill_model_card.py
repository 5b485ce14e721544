#!/usr/bin/env python
"""Copy an evaluation's results.md into a model card, between the card's results markers.

The tables in the model cards are produced by each bundle's evaluate.json (results.md); this tool
pastes them verbatim so the card always shows exactly what the rerunnable command printed.

Usage: python tools/fill_model_card.py bundles/rem_sr/docs/README.md bundles/rem_sr/eval/evaluation/results.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.niftiio import atomic_write_text  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"


def fill(card: str, results: str, start: str = START, end: str = END) -> str:
    """`card` with the text between its `start` and `end` markers replaced by `results`.

    Raises:
        SystemExit: the card lacks either marker.
    """
    if start not in card or end not in card:
        raise SystemExit(f"error: the model card has no {start} ... {end} block")
    head, rest = card.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{results.strip()}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("card", type=Path)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    for path in (args.card, args.results):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found")
    atomic_write_text(fill(args.card.read_text(), args.results.read_text()), args.card)
    print(f"updated {args.card} from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
