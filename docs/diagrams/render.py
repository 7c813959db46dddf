"""Render the Graphviz sources of the docs' diagrams to the SVG files the docs include.

The SVGs are committed, so building the docs needs no ``dot`` binary (CI does not install
Graphviz).  After editing a ``.dot`` file here, re-render and commit both::

    apt-get install graphviz        # for the ``dot`` command
    python docs/diagrams/render.py  # writes NAME.svg next to each NAME.dot
    python docs/diagrams/render.py --check   # exit 1 if an SVG is stale
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def render(source: Path) -> bytes:
    return subprocess.run(
        ["dot", "-Tsvg", source.name], cwd=HERE, check=True, capture_output=True
    ).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the SVGs are current")
    args = parser.parse_args()
    if shutil.which("dot") is None:
        print("render.py: `dot` is not installed: apt-get install graphviz", file=sys.stderr)
        return 2
    stale = 0
    for source in sorted(HERE.glob("*.dot")):
        target = source.with_suffix(".svg")
        svg = render(source)
        if args.check:
            if not target.exists() or target.read_bytes() != svg:
                print(f"stale: {target.name} (run docs/diagrams/render.py)")
                stale += 1
        else:
            target.write_bytes(svg)
            print(f"wrote {target.relative_to(HERE.parent.parent)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
