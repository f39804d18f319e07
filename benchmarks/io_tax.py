"""The read tax on this machine: how much slower torch computes while a file is read beside it.

Times a fixed matmul workload alone, then with one reader thread reading the weight file with O_DIRECT
(the streaming reader's way) at several chunk sizes, and with torch on one thread pinned apart from the
reader. Reports, per case, the compute time against the time alone, the read speed reached, the tax per
MB read and the slowdown per second of reading, plus the guest's own CPU accounting (steal: time the
host gave a vCPU's core to something else) alone and while reading, and which CPUs took the
block-device interrupts. Every figure comes from this one invocation.

    .venv/bin/python benchmarks/io_tax.py --json benchmarks/io-tax.json

A tax that is a fixed slowdown while the disk is busy (not a cost per byte or per request) shows as a
tax per MB that falls as the read speed rises, and as a slowdown that does not depend on the chunk size;
and reads that take turns with the compute (one before each matmul, none beside it) cost it nothing.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import threading
import time

import torch

from layerstream.models import resolve, weights_for

ITERS = 60  # 1024x1024 matmuls per timed compute (about 2 s on the 2-vCPU VM with 2 threads)


def _compute(a, b, n: int = ITERS) -> float:
    t = time.perf_counter()
    for _ in range(n):
        torch.mm(a, b)
    return time.perf_counter() - t


def _reader(path: str, chunk: int, stop: threading.Event, out: list, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # this thread only
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    off = n = 0
    try:
        while not stop.is_set():
            n += os.preadv(fd, [buf], off)
            off = (off + chunk) % (size - chunk)
            off -= off % 4096
    finally:
        os.close(fd)
        buf.close()
    out.append(n)


def _irqs() -> dict[str, list[int]]:
    """Block-device interrupt counts per CPU (virtio-blk request queues, NVMe queues)."""
    out = {}
    with open("/proc/interrupts") as f:
        cpus = len(f.readline().split())
        for line in f:
            parts = line.split()
            if any(k in line for k in ("virtio1-req", "-req.", "nvme")) and len(parts) > cpus:
                out[parts[-1]] = [int(x) for x in parts[1:1 + cpus]]
    return out


def _stat() -> dict[str, list[int]]:
    with open("/proc/stat") as f:
        return {ln.split()[0]: [int(x) for x in ln.split()[1:9]] for ln in f if ln.startswith("cpu") and ln[3] != " "}


def _with_reads(path: str, chunk: int, a, b, alone: float, reader_cpu: int | None) -> dict:
    stop, out = threading.Event(), []
    th = threading.Thread(target=_reader, args=(path, chunk, stop, out, reader_cpu))
    irq0, st0 = _irqs(), _stat()
    th.start()
    time.sleep(0.05)  # the reader is running before compute starts
    t0 = time.perf_counter()
    c = _compute(a, b)
    wall = time.perf_counter() - t0 + 0.05
    stop.set()
    th.join()
    irq1, st1 = _irqs(), _stat()
    mb = out[0] / 1e6
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    cpu = {k: {n: b1 - b0 for n, b0, b1 in zip(names, st0[k], st1[k]) if b1 - b0} for k in st1}
    steal = {k: (st1[k][7] - st0[k][7]) / max(1, sum(st1[k]) - sum(st0[k])) for k in st1}
    return {"chunk_bytes": chunk, "steal_share": steal, "compute_s": c, "alone_s": alone, "slowdown": c / alone - 1,
            "read_mb_per_s": mb / wall, "tax_ms_per_mb": (c - alone) / (mb * c / wall) * 1e3,
            "irqs": {k: [y - x for x, y in zip(irq0.get(k, []), v)] for k, v in irq1.items()},
            "cpu_ticks": cpu}


def _alternating(path: str, chunk: int, a, b, alone: float) -> dict:
    """The same compute, with one read of `chunk` bytes before each matmul and none beside it: the reads
    and the computes take turns, as in a serial call."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    off, compute, reading = 0, 0.0, 0.0
    try:
        for _ in range(ITERS):
            t = time.perf_counter()
            os.preadv(fd, [buf], off)
            reading += time.perf_counter() - t
            off = (off + chunk) % (size - chunk)
            off -= off % 4096
            compute += _compute(a, b, 1)
    finally:
        os.close(fd)
        buf.close()
    return {"chunk_bytes": chunk, "compute_s": compute, "alone_s": alone, "slowdown": compute / alone - 1,
            "read_s": reading, "read_mb_per_s": chunk * ITERS / 1e6 / reading}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="zoo:gpt2-large", help="whose weight file to read (large: no wrap)")
    p.add_argument("--chunk", action="append", type=int, help="read sizes in bytes (default 256 KiB-16 MiB)")
    p.add_argument("--json")
    a = p.parse_args()
    path = str(weights_for(a.model, resolve(a.model), None))
    chunks = a.chunk or [256 * 1024, 2**20, 4 * 2**20, 16 * 2**20]
    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    result = {"file": path, "cpus": os.cpu_count(), "iters": ITERS, "cases": []}
    threads0 = torch.get_num_threads()
    for threads, compute_cpus, reader_cpu in ((threads0, None, None), (1, {0}, 1)):
        if compute_cpus and (os.cpu_count() or 1) < 2:
            continue
        torch.set_num_threads(threads)
        if compute_cpus:
            os.sched_setaffinity(0, compute_cpus)
        _compute(x, y, 20)  # warm up
        st0 = _stat()
        alone = min(_compute(x, y) for _ in range(3))
        st1 = _stat()
        result.setdefault("alone_steal_share", {})[f"threads {threads}"] = {
            k: (st1[k][7] - st0[k][7]) / max(1, sum(st1[k]) - sum(st0[k])) for k in st1}
        for chunk in chunks if not compute_cpus else [2**20]:
            for _ in range(2):
                case = _with_reads(path, chunk, x, y, alone, reader_cpu)
                case.update(threads=threads, compute_cpus=sorted(compute_cpus) if compute_cpus else "any",
                            reader_cpu=reader_cpu if reader_cpu is not None else "any")
                result["cases"].append(case)
                print(f"threads {threads} compute on {case['compute_cpus']} reader on {case['reader_cpu']}, "
                      f"chunk {chunk >> 10} KiB: {case['compute_s']:.2f} s against {alone:.2f} s alone "
                      f"(+{case['slowdown']:.0%}) reading {case['read_mb_per_s']:.0f} MB/s: "
                      f"{case['tax_ms_per_mb']:.2f} ms per MB; steal " + ", ".join(f"{k} {v:.0%}" for k, v in case["steal_share"].items()), flush=True)
        if compute_cpus:
            os.sched_setaffinity(0, set(range(os.cpu_count())))
        else:  # reads taking turns with compute, never beside it
            for chunk in chunks:
                case = _alternating(path, chunk, x, y, alone)
                result.setdefault("alternating", []).append(case)
                print(f"threads {threads}, a {chunk >> 10} KiB read before each matmul, none beside it: compute "
                      f"{case['compute_s']:.2f} s against {alone:.2f} s alone (+{case['slowdown']:.0%}), reads "
                      f"{case['read_mb_per_s']:.0f} MB/s", flush=True)
    torch.set_num_threads(threads0)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
