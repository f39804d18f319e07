"""A bench result for people: a markdown table, a section of benchmarks/RESULTS.md, a PNG per model.

Pure formatting over the JSON that `bench` returns, so a saved result can be re-rendered without
running anything again (`write_results` is the only function here that writes files).
"""
from __future__ import annotations

import os
import re

from .budget import fmt_bytes

MEMORY_NOTE = ("memory = peak RSS + page-cache bytes of the files the system read (its weight file, or a peer's "
               "offload folder), measured after the run; every run starts with those files evicted from the cache")


def _budget(r: dict, weight_bytes: int) -> str:
    if r["system"] != "layerstream":
        return "–"
    return f"{fmt_bytes(r['budget_bytes'])} ({r['budget_bytes'] / weight_bytes:.0%})"


def _outputs(r: dict) -> str:
    if r["outputs_equal"]:
        return "yes"
    return f"NO (max diff {r['max_abs_diff']:.2g})"


def table(result: dict) -> str:
    """A markdown table of a bench result, eager first; skipped peers are listed with their reason."""
    runs = result["runs"]
    eager = runs[0]
    cold = any(r.get("mode") == "cold" for r in runs)
    head = ("| system | mode | budget | latency ms | bound ms | latency / bound | peak RSS | page cache "
            "| memory (RSS + cache) | memory saved / (weights − budget) | read per call | outputs equal |"
            + (" import s | build s |" if cold else ""))
    ncol = head.count("|") - 1
    rows = [head, "|" + "---|" * ncol]
    eager_mem = eager.get("memory_bytes", eager["peak_rss_bytes"])
    for r in runs:
        if r.get("skipped"):
            rows.append(f"| {r['system']} | {r['mode']} | skipped: {r['skipped']} |" + " – |" * (ncol - 3))
            continue
        mem = r.get("memory_bytes", r["peak_rss_bytes"])
        share = "–"
        if r["system"] == "layerstream" and result["weight_bytes"] > r["budget_bytes"]:
            share = f"{(eager_mem - mem) / (result['weight_bytes'] - r['budget_bytes']):.0%}"
        row = (f"| {r['system']} | {r.get('mode', 'warm')} | {_budget(r, result['weight_bytes'])} | "
               f"{r['latency_ms']:.1f} | {r['bound_ms']:.1f} | {r['latency_ms'] / r['bound_ms']:.2f} | "
               f"{fmt_bytes(r['peak_rss_bytes'])} | {fmt_bytes(r.get('page_cache_bytes', 0))} | {fmt_bytes(mem)} | "
               f"{share} | {fmt_bytes(r['bytes_read'] or 0)} | {_outputs(r)} |")
        if cold:
            row += (f" {r['import_s']:.2f} | {r['build_s']:.2f} |" if r.get("import_s") is not None
                    else f" – | {r['build_s']:.2f} |")
        rows.append(row)
    return "\n".join(rows)


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", model.removeprefix("zoo:")).strip("-")


def section(result: dict, command: str, png: str | None = None) -> str:
    """The markdown section of one bench invocation: heading, setting, table, picture, notes, command."""
    mode = result.get("mode", "warm")
    disk = f"{result['disk_read_bps'] / 1e9:.2f} GB/s" if result.get("disk_read_bps") else "not measured"
    lines = [f"### {result['model']}, {mode}" + (", with baselines" if result.get("baselines") else ""), "",
             f"Weights {fmt_bytes(result['weight_bytes'])}; device {result['device']}, {result['torch_threads']} torch "
             f"threads; disk {disk} (median of the measurements before each run). Latency is the median of "
             + ("the warm calls" if mode == "warm" else f"{result.get('repeat', 1)} cold starts")
             + f"; {MEMORY_NOTE}.", "", table(result), ""]
    prepared = [r for r in result["runs"] if r.get("prepare_s") is not None]
    for r in prepared:
        lines.append(f"- {r['system']}: preparing its offload folder took {r['prepare_s']:.2f} s "
                     f"(peak RSS {fmt_bytes(r['prepare_peak_rss_bytes'])}), apart from the timed calls.")
    for r in result["runs"]:
        if r.get("note"):
            lines.append(f"- {r['system']}: {r['note']}.")
    if prepared or any(r.get("note") for r in result["runs"]):
        lines.append("")
    if png:
        lines += [f"![{result['model']} {mode}: latency against memory]({png})", ""]
    lines += ["Reproduce:", "", "```", command, "```", ""]
    return "\n".join(lines)


def write_results(md_path: str, result: dict, command: str) -> tuple[str, str]:
    """Put this invocation's section into `md_path` (replacing the section of the same model and mode, so
    the file can be rebuilt model by model) and draw its PNG beside it. Returns (markdown, png) paths."""
    from .plot import plot_systems

    folder = os.path.dirname(os.path.abspath(md_path))
    os.makedirs(folder, exist_ok=True)
    key = f"{_slug(result['model'])}-{result.get('mode', 'warm')}" + ("-baselines" if result.get("baselines") else "")
    png = f"bench-{key}.png"
    plot_systems(result, f"{result['model']} ({result.get('mode', 'warm')}, {result['device']})",
                 os.path.join(folder, png))
    begin, end = f"<!-- bench {key} -->", f"<!-- end bench {key} -->"
    block = f"{begin}\n{section(result, command, png)}{end}\n"
    text = open(md_path).read() if os.path.exists(md_path) else "# Benchmark results\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = md_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, md_path)
    return md_path, os.path.join(folder, png)
