"""NIAH heatmap: needle depth (rows, 0% at the top) x context length (columns), cell = mean score.

Red (0) through yellow to green (100), the usual needle-in-a-haystack colours; the average over all
cells is in the title. matplotlib is optional: without it :func:`heatmap` returns ``None``.

Redraw a finished run's plot::

    python niah/plot.py outputs/niah/smollm2-135m__passkey__lacache_b0.5_S14_O0/results.csv
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

COLORS = ["#F0496E", "#EBB839", "#0CD79F"]


def cell_means(rows: Iterable[dict]) -> Dict[Tuple[int, float], float]:
    """``{(context_length, depth): mean score}`` over the rows (CSV rows or dicts with those keys)."""
    acc = defaultdict(list)
    for row in rows:
        acc[(int(row["context_length"]), float(row["depth"]))].append(float(row["score"]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def average(means: Dict[Tuple[int, float], float]) -> float:
    """Mean over cells (the official ``scores.mean().mean()`` when every cell has the same tests)."""
    return sum(means.values()) / len(means) if means else float("nan")


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def depth_text(depth: float) -> str:
    return f"{depth:g}"


def tick_labels(lengths: List[int], depths: List[float], labels: Optional[Dict[int, str]] = None,
                depth_labels: Optional[Dict[float, str]] = None) -> Tuple[List[str], List[str]]:
    """``(column labels, row labels)`` of the heatmap: ``labels`` / ``depth_labels`` where they name a
    length / depth, else :func:`length_label` / :func:`depth_text` (``0, 10, ...``)."""
    columns = [(labels or {}).get(n) or length_label(n) for n in lengths]
    rows = [(depth_labels or {}).get(d) or depth_text(d) for d in depths]
    return columns, rows


def heatmap(rows: Iterable[dict], path: Path, title: str, labels: Optional[Dict[int, str]] = None,
            depth_labels: Optional[Dict[float, str]] = None) -> Optional[Path]:
    """Write the heatmap of ``rows`` to ``path``; ``None`` (nothing written) when matplotlib is missing.

    ``labels``: column label per context length, ``depth_labels``: row label per depth (see :func:`tick_labels`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        return None
    means = cell_means(rows)
    lengths = sorted({k[0] for k in means})
    depths = sorted({k[1] for k in means})
    grid: List[List[float]] = [[means.get((n, d), float("nan")) for n in lengths] for d in depths]
    cmap = LinearSegmentedColormap.from_list("niah", COLORS)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(lengths)), max(3.0, 0.8 + 0.45 * len(depths))))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto", interpolation="nearest")
    columns, row_names = tick_labels(lengths, depths, labels, depth_labels)
    ax.set_xticks(range(len(lengths)), columns)
    ax.set_yticks(range(len(depths)), row_names)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    if len(lengths) * len(depths) <= 400:
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks([x - 0.5 for x in range(1, len(lengths))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(depths))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(im, ax=ax, label="score")
    ax.set_title(f"{title}\naverage score {average(means):.2f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    import csv

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_file():
        print("error: usage: python niah/plot.py path/to/results.csv (writes heatmap.png beside it)", file=sys.stderr)
        return 2
    csv_path = Path(args[0])
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = heatmap(rows, csv_path.with_name("heatmap.png"), csv_path.parent.name)
    print(out if out else "matplotlib is not installed: no heatmap")
    return 0 if out else 1


if __name__ == "__main__":
    sys.exit(main())
