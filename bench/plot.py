"""Plot an echo benchmark result: msgs/s and p99 latency of each server, side by side.

    python bench/echo.py --json result.json
    python bench/plot.py result.json -o echo.svg        # or .png; needs matplotlib

The input is what ``bench/echo.py --json`` writes; the plot shows each server's best run
(its ``best`` table): ioserver's variants first, then the references in the order
``echo.py`` runs them.  The title gives the configuration, so a figure is never read
without it.  ``pip install -e '.[docs]'`` installs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REFERENCES = ("asyncio", "uvloop-streams", "uvloop-protocol", "trio")
IOSERVER_COLOUR = "#2a6fb0"
REFERENCE_COLOUR = "#9a9a9a"


def load(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The result's configuration and its best runs, ioserver's variants first."""
    result = json.loads(path.read_text())
    best: dict[str, dict[str, Any]] = result["best"]
    if not best:
        raise SystemExit(f"{path}: no server completed a run; nothing to plot")
    ours = [name for name in best if name not in REFERENCES]
    theirs = [name for name in REFERENCES if name in best]
    return result, [best[name] for name in ours + theirs]


def plot(path: Path, output: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Reproducible SVG: no date, fixed ids, so a re-run on the same data changes nothing.
    plt.rcParams["svg.hashsalt"] = "ioserver-bench"
    plt.rcParams["svg.fonttype"] = "none"

    result, runs = load(path)
    config = result["config"]
    names = [run["server"] for run in runs]
    colours = [REFERENCE_COLOUR if name in REFERENCES else IOSERVER_COLOUR for name in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")

    throughput = [run["msgs_s"] / 1000 for run in runs]
    bars = left.barh(names, throughput, color=colours)
    left.bar_label(bars, labels=[f"{value:,.1f}k" for value in throughput], padding=3)
    left.set_xlabel("thousand round trips per second (higher is better)")
    left.set_title("throughput")
    left.invert_yaxis()
    left.set_xlim(0, max(throughput) * 1.25)

    p99 = [run["p99_us"] / 1000 for run in runs]
    bars = right.barh(names, p99, color=colours)
    right.bar_label(bars, labels=[f"{value:.2f} ms" for value in p99], padding=3)
    right.set_xlabel("p99 round-trip latency, ms (lower is better)")
    right.set_title("p99 latency")
    right.invert_yaxis()
    right.set_xlim(0, max(p99) * 1.3)

    figure.suptitle(
        title
        or (
            f"echo, {config['conns']} connections x {config['size']} B, "
            f"{config['seconds']:g} s measured, best of {config['rounds']} round(s); "
            f"Python {result['python']}, {result['cpus']} CPUs"
        )
    )
    metadata = {"Date": None} if output.suffix == ".svg" else {}
    figure.savefig(output, metadata=metadata, dpi=100)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a JSON file written by bench/echo.py --json")
    parser.add_argument(
        "-o", "--output", type=Path, help="the image to write (.svg or .png); default: RESULT.svg"
    )
    parser.add_argument("--title", help="the figure's title (default: the configuration)")
    args = parser.parse_args()
    plot(args.result, args.output or args.result.with_suffix(".svg"), args.title)


if __name__ == "__main__":
    main()
