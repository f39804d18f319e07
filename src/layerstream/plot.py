"""Pictures for people: the memory-latency frontier and bench results as PNGs (matplotlib, imported only here)."""
from __future__ import annotations

from .budget import fmt_bytes
from .plan.tradeoff import KNEE, Frontier


def plot_frontier(f: Frontier, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    mib = [p.budget_bytes / 2**20 for p in f.points]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot([m for m, p in zip(mib, f.points) if p.fitted_at is None],
            [p.predicted_ms for p in f.points if p.fitted_at is None], "o-", label="predicted (the planner's choice)")
    fitted = [(m, p.predicted_ms) for m, p in zip(mib, f.points) if p.fitted_at is not None]
    if fitted:
        ax.plot(*zip(*fitted), "*", color="red", ms=11, label="the knee, predicted by costs fitted at it")
    measured = [(m, p.measured_ms) for m, p in zip(mib, f.points) if p.measured_ms is not None]
    if measured:
        ax.plot(*zip(*measured), "s--", label="measured")
    beside = [(m, p.eager_ms) for m, p in zip(mib, f.points) if p.eager_ms is not None]
    if beside:
        ax.plot(*zip(*beside), "x", color="black", ms=4, label="eager, its calls alternating with each point's")
    ax.plot(mib, [p.bound_ms for p in f.points], ":", color="gray", label="bound: max(compute, reads)")
    ax.axhline(f.compute_ms, color="green", lw=1, label="all weights resident (compute)")
    ax.axhline(KNEE * (f.knee_compute_ms or f.compute_ms), color="green", lw=0.6, ls="--",
               label=f"{KNEE:.2f} x compute" + (" (costs fitted at the knee)" if f.knee_compute_ms else ""))
    if f.eager_ms:
        ax.axhline(f.eager_ms, color="black", lw=0.8, ls="-.", label="eager, measured (a run of its own)")
    if f.knee_bytes:
        ax.axvline(f.knee_bytes / 2**20, color="red", lw=1, label=f"knee: {fmt_bytes(f.knee_bytes)}")
    ax.set_xscale("log")
    ax.set_xlabel("weight-memory budget (MiB)")
    ax.set_ylabel("latency per call (ms)")
    _finish(fig, ax, title, path)


_MARKERS = {"eager": "o", "load-then-run": "D", "accelerate-disk": "^", "diffusers-group-disk": "v", "layerstream": "s"}


def plot_systems(result: dict, title: str, path: str) -> None:
    """One bench invocation as latency against memory (RSS + page cache), one marker per system.

    Each point's bound sits below it as a gray tick: the gap is what that system leaves on the table.
    Layerstream's budgets are joined by a line and labelled, so the frontier it offers is visible.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    runs = [r for r in result["runs"] if not r.get("skipped")]
    for system, marker in _MARKERS.items():
        pts = [r for r in runs if r["system"] == system]
        if not pts:
            continue
        mem = [r.get("memory_bytes", r["peak_rss_bytes"]) / 2**20 for r in pts]
        lat = [r["latency_ms"] for r in pts]
        style = "-" if system == "layerstream" and len(pts) > 1 else ""
        wrong = not all(r["outputs_equal"] for r in pts)  # hollow: its outputs are not the eager model's
        ax.plot(mem, lat, marker + style, ms=7, mfc="none" if wrong else None,
                label=f"{system} ({pts[0].get('mode', 'warm')})" + (", outputs differ" if wrong else ""))
        ax.plot(mem, [r["bound_ms"] for r in pts], "_", color="gray", ms=12)
        if system == "layerstream":
            for m, y, r in zip(mem, lat, pts):
                ax.annotate(fmt_bytes(r["budget_bytes"]), (m, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.plot([], [], "_", color="gray", ms=12, label="bound of each run")
    mems = [r.get("memory_bytes", r["peak_rss_bytes"]) for r in runs]
    if mems and max(mems) > 8 * min(mems):
        ax.set_xscale("log")
    ax.set_xlabel("memory: peak RSS + page cache (MiB)")
    ax.set_ylabel("latency (ms); cold: from loading to the first output")
    _finish(fig, ax, title, path)


def _finish(fig, ax, title: str, path: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
