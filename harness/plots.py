"""Plots written by the harnesses (matplotlib is optional: without it, plots are skipped)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional


def running_ppl_plot(curves: Dict[str, List[float]], path: Path, title: str, window: int = 256,
                     marker: Optional[int] = None) -> Optional[Path]:
    """Cumulative and windowed perplexity against token position, one line pair per label
    (``marker``: a vertical line, e.g. at the model's trained context length)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for label, nlls in curves.items():
        total, cum = 0.0, []
        for i, x in enumerate(nlls):
            total += x
            cum.append(math.exp(total / (i + 1)))
        ax1.plot(range(1, len(cum) + 1), cum, label=label)
        if len(nlls) >= window:
            run = sum(nlls[:window])
            win = [math.exp(run / window)]
            for i in range(window, len(nlls)):
                run += nlls[i] - nlls[i - window]
                win.append(math.exp(run / window))
            ax2.plot(range(window, len(nlls) + 1), win, label=label)
    ax1.set(xlabel="tokens scored", ylabel="perplexity (cumulative)", title=title, yscale="log")
    ax2.set(xlabel="token position", ylabel=f"perplexity ({window}-token window)", yscale="log")
    for ax in (ax1, ax2):
        if marker is not None:
            ax.axvline(marker, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
