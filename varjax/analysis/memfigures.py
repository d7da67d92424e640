"""Figures of the memorization checks (membership inference, extraction), one function each,
drawn from already computed results like `varjax.analysis.figures` (kept apart for its size).

Shape letters: N samples, H, W pixels.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from varjax import membership as mia
from varjax.analysis.figures import _figure


def roc_curves(scores: dict[str, tuple[np.ndarray, np.ndarray]], lower: dict[str, bool],
               labels: dict[str, str], title: str = "Membership inference: ROC") -> Figure:
    """ROC curves of members vs non-members (varjax.membership.roc), linear and with a log FPR axis.

    Args:
      scores: {name: (member values, non-member values)}; lower: {name: members lower};
      labels: {name: legend text}.
    """
    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2)
    for name, (m, n) in scores.items():
        fpr, tpr = mia.roc(m, n, lower[name])
        auc = mia.auc(m, n, lower[name])
        for ax in axes:
            # Straight segments, as the AUC's trapezoids: a tie group is a diagonal run.
            ax.plot(fpr, tpr, lw=1.2, label=f"{labels[name]} (AUC {auc:.3f})")
    for ax in axes:
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[1].set_xlim(left=1e-3)
    axes[1].axvline(mia.FPR, color="0.4", lw=0.8)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    return fig


def side_by_side(originals: np.ndarray, generated: np.ndarray, captions: list[str], title: str,
                 ncols: int = 4) -> Figure:
    """Pairs (decode of the true tokens | the greedy generation) in a grid.

    Args:
      originals, generated: float (N, H, W, 3) in [0, 1]; captions: N strings.
    """
    n = len(captions)
    rows = max(1, -(-n // ncols))
    fig = _figure(2.6 * ncols, 1.55 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, ncols)).reshape(rows, ncols)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            gap = np.ones((originals.shape[1], 2, 3))
            ax.imshow(np.concatenate([originals[i], gap, generated[i]], axis=1), interpolation="nearest")
            ax.set_title(captions[i], fontsize=7)
    fig.suptitle(title + "  (left: decode of the true tokens | right: generated)", fontsize=10)
    return fig
