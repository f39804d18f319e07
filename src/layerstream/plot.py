"""Pictures for people: the memory-latency frontier as a PNG (matplotlib, imported only here)."""
from __future__ import annotations

from .budget import fmt_bytes
from .plan.tradeoff import KNEE, Frontier


def plot_frontier(f: Frontier, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    mib = [p.budget_bytes / 2**20 for p in f.points]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(mib, [p.predicted_ms for p in f.points], "o-", label="predicted (the planner's choice)")
    measured = [(m, p.measured_ms) for m, p in zip(mib, f.points) if p.measured_ms is not None]
    if measured:
        ax.plot(*zip(*measured), "s--", label="measured")
    ax.plot(mib, [p.bound_ms for p in f.points], ":", color="gray", label="bound: max(compute, reads) + first read")
    ax.axhline(f.compute_ms, color="green", lw=1, label="all weights resident (compute)")
    ax.axhline(KNEE * f.compute_ms, color="green", lw=0.6, ls="--", label=f"{KNEE:.2f} x compute")
    if f.knee_bytes:
        ax.axvline(f.knee_bytes / 2**20, color="red", lw=1, label=f"knee: {fmt_bytes(f.knee_bytes)}")
    ax.set_xscale("log")
    ax.set_xlabel("weight-memory budget (MiB)")
    ax.set_ylabel("latency per call (ms)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
