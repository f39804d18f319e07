"""`layerstream bench`: page-cache accounting, cold starts and the peers, end to end through the CLI.

Real files, real processes: every configuration runs in a fresh interpreter exactly as a user's bench
does. The model is zoo:twice (no transformers import, so a process starts in seconds); its 50 KB of
weights need a budget above their size because every tensor is read 4 KiB aligned.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
from torch import nn

from layerstream import zoo
from layerstream.benchreport import write_results
from layerstream.cli import main
from layerstream.measure import evict_page_cache, page_cache_bytes
from layerstream.meta import build_empty
from layerstream.peers import PeerError, block_path, tied_parameters

MiB = 2**20


def _write(path, nbytes: int) -> str:
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())
    return str(path)


def test_page_cache_bytes_follows_reads_and_eviction(tmp_path):
    path = _write(tmp_path / "w.bin", 16 * MiB + 123)  # a partial last page too
    evict_page_cache(path)
    assert page_cache_bytes(path) <= 64 * 1024, "evicted file still cached"
    with open(path, "rb") as f:  # a buffered read goes through the cache
        while f.read(MiB):
            pass
    assert page_cache_bytes(path) >= 16 * MiB - 64 * 1024
    assert page_cache_bytes(path) <= os.path.getsize(path)
    evict_page_cache(path)
    assert page_cache_bytes(path) <= 64 * 1024


def test_page_cache_bytes_of_a_folder_sums_its_files(tmp_path):
    a = _write(tmp_path / "a.bin", 2 * MiB)
    os.mkdir(tmp_path / "sub")
    b = _write(tmp_path / "sub" / "b.bin", 3 * MiB)
    open(tmp_path / "empty.bin", "wb").close()
    for p in (a, b):
        evict_page_cache(p)
    with open(b, "rb") as f:
        f.read()
    assert page_cache_bytes(tmp_path) == page_cache_bytes([a, b]) == page_cache_bytes(b) >= 3 * MiB - 64 * 1024
    with pytest.raises(FileNotFoundError, match="no such file"):
        page_cache_bytes(tmp_path / "missing")


def _bench(tmp_path, name: str, *args: str) -> dict:
    weights = tmp_path / f"{name}.safetensors"
    zoo.save_weights(zoo.get(name), weights)
    out = tmp_path / "bench.json"
    rc = main(["bench", f"zoo:{name}", "--weights", str(weights), "--budget", "200KB", "--repeat", "1",
               "--json", str(out), *args])
    result = json.loads(out.read_text())
    assert rc == 0, result
    return result


COMMON = ("latency_ms", "bound_ms", "peak_rss_bytes", "page_cache_bytes", "memory_bytes", "import_s", "build_s",
          "outputs_equal", "max_abs_diff")


def test_bench_cold_with_baselines(tmp_path):
    md = tmp_path / "bench" / "RESULTS.md"
    result = _bench(tmp_path, "twice", "--mode", "cold", "--baselines", "--results", str(md))
    runs = {r["system"]: r for r in result["runs"]}
    assert list(runs) == ["eager", "load-then-run", "accelerate-disk", "diffusers-group-disk", "layerstream"]
    assert result["mode"] == "cold" and runs["eager"]["mode"] == "warm"
    weights = result["weight_bytes"]
    for system in ("load-then-run", "layerstream"):
        r = runs[system]
        assert r["mode"] == "cold" and r["outputs_equal"], r
        assert all(r[k] is not None for k in COMMON + ("first_output_s", "cold_bound_ms", "disk_read_bps")), r
        assert r["bound_ms"] == r["cold_bound_ms"] >= max(runs["eager"]["latency_ms"], weights / r["disk_read_bps"] * 1e3)
        assert r["memory_bytes"] == r["peak_rss_bytes"] + r["page_cache_bytes"]
    # load-then-run reads through safetensors' mmap: its file stays cached. layerstream reads with
    # O_DIRECT where the filesystem allows it (buffered readers drop pages after reading).
    assert runs["load-then-run"]["page_cache_bytes"] >= weights * 0.9
    assert runs["layerstream"]["page_cache_bytes"] <= 64 * 1024
    assert runs["layerstream"]["first_unit_bytes"] > 0
    eager = runs["eager"]  # warm: the reference outputs and compute time
    assert all(eager[k] is not None for k in COMMON) and eager["bound_ms"] == eager["latency_ms"]
    assert eager["page_cache_bytes"] >= weights * 0.9  # eager's mmap leaves the file cached, as load-then-run's
    for peer in ("accelerate-disk", "diffusers-group-disk"):
        r = runs[peer]
        lib = peer.split("-")[0]
        if importlib.util.find_spec(lib) is None:
            assert "pip install -e '.[bench]'" in r["skipped"]
            continue
        assert "skipped" not in r, r
        assert r["outputs_equal"] and r["prepare_s"] > 0 and r["page_cache_bytes"] > 0, r
        assert all(r[k] is not None for k in COMMON + ("first_output_s", "cold_bound_ms")), r
    text = md.read_text()
    assert "| layerstream | cold |" in text and "layerstream bench zoo:twice --mode cold --baselines" in text
    assert (md.parent / "bench-twice-cold-baselines.png").stat().st_size > 0
    before = text.count("<!-- bench twice-cold-baselines -->")
    write_results(str(md), result, "layerstream bench zoo:twice --mode cold --baselines")  # again: replaced
    assert before == md.read_text().count("<!-- bench twice-cold-baselines -->") == 1


def test_peer_helpers_name_what_they_find():
    with pytest.raises(PeerError, match="no ModuleList or Sequential"):
        block_path(nn.Linear(2, 2))
    gpt2 = build_empty(zoo.get("tiny-gpt2").build)
    assert block_path(gpt2) == ["transformer"]  # diffusers must be told where the layers are
    assert tied_parameters(gpt2) == ["lm_head.weight"]


def test_bench_workload_mode_with_baselines(tmp_path):
    """`bench WORKLOAD.toml --mode workload --baselines`: per model the bench fields, totals that add up."""
    paths = {}
    for name in ("twice", "tiny-resnet"):
        paths[name] = tmp_path / f"{name}.safetensors"
        zoo.save_weights(zoo.get(name), paths[name])
    toml = tmp_path / "work.toml"
    toml.write_text("\n".join([
        'budget = "200KB"', 'cycle = ["a", "b", "a"]', 'max_unit = "16KiB"',
        "[[model]]", 'name = "a"', 'model = "zoo:twice"', f'weights = "{paths["twice"]}"',
        "[[model]]", 'name = "b"', 'model = "zoo:tiny-resnet"', f'weights = "{paths["tiny-resnet"]}"']))
    out = tmp_path / "w.json"
    assert main(["bench", str(toml), "--mode", "workload", "--baselines", "--repeat", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = {r["system"]: r for r in result["runs"]}
    assert list(runs) == ["layerstream", "load-then-run", "eager"] and result["budget_bytes"] == 200_000
    per_model = ("latency_ms", "latency_ms_all", "bound_ms", "bytes_read", "disk_read_bps", "peak_rss_bytes",
                 "arena_peak_bytes", "demand_misses", "outputs_equal", "compute_ms")
    for system, r in runs.items():
        by = {m["name"]: m for m in r["models"]}
        assert list(by) == ["a", "b"] and r["outputs_equal"], r
        for m in r["models"]:
            assert all(m[k] is not None for k in per_model if not (system == "eager" and k == "disk_read_bps")), m
            assert m["outputs_equal"] and m["calls"] == len(m["latency_ms_all"])
        # a runs twice per cycle (summed in cycle order: a + b + a, equal to 2a + b up to rounding)
        assert r["bound_ms"] == pytest.approx(2 * by["a"]["bound_ms"] + by["b"]["bound_ms"], rel=1e-12)
        assert r["bytes_read"] == 2 * by["a"]["bytes_read"] + by["b"]["bytes_read"]
        assert r["cycle_over_bound"] == r["cycle_ms"] / r["bound_ms"]
        assert r["peak_rss_bytes"] >= max(m["peak_rss_bytes"] for m in r["models"])
        assert len(r["cycles_ms"]) == 2 + (result["learning_cycles"] if system == "layerstream" else 1)
    ls = runs["layerstream"]
    assert ls["budget_bytes"] == 200_000 and all(m["arena_peak_bytes"] <= 200_000 for m in ls["models"])
    # The two models' slots (232 KiB) do not fit 200 KB together, so the cycle streams; which model's units
    # the workload planner keeps resident depends on the costs measured (one may stay whole: seen here)
    assert sum(m["bytes_read"] for m in ls["models"]) > 0 and all(m["reader"] for m in ls["models"])
    assert runs["load-then-run"]["bytes_read"] == 2 * runs["load-then-run"]["models"][0]["weight_bytes"] \
        + runs["load-then-run"]["models"][1]["weight_bytes"]
    assert result["speedup"]["load-then-run"] == runs["load-then-run"]["cycle_ms"] / ls["cycle_ms"]
    eager = {m["name"]: m for m in runs["eager"]["models"]}
    for r in runs.values():  # one compute per model, the fastest eager time measured, under every bound
        for m in r["models"]:
            assert m["compute_ms"] <= eager[m["name"]]["latency_ms"] and m["bound_ms"] >= m["compute_ms"]
            assert m["compute_ms"] == eager[m["name"]]["compute_ms"]
