"""What an embedding lookup reads: the row reads of one 128-token prompt, per gathered table.

Streams the zoo model's HF folder (generate_bench.folder_for) at a budget, wraps the executor's row
reader (Executor.read_now, which only lookups call) to attribute each read to its table, runs one call.

    .venv/bin/python benchmarks/gather_rows.py zoo:gpt-neo-1.3b --budget 25% --json benchmarks/gather-rows-gpt-neo-1.3b.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import folder_for  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="zoo:gpt-neo-1.3b")
    p.add_argument("--budget", default="25%")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--json")
    a = p.parse_args()
    import layerstream as ls

    ids = torch.randint(0, 50000, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    with ls.from_pretrained(folder_for(a.model), budget=a.budget) as sm:
        ex, tables = sm._exec, {}
        read_now = ex.read_now

        def counted(load, chunks):
            name = sm.cap.program.units[load.uid].name
            tables[name] = tables.get(name, 0) + sum(c[2] for c in chunks)
            return read_now(load, chunks)

        ex.read_now = counted
        sm(ids)
        sizes = {t.name: t.nbytes for t in sm.cap.program.tensors}
        out = {"model": a.model, "prompt": a.prompt, "unique_ids": len(set(ids.flatten().tolist())),
               "tables": {n: {"table_bytes": sizes[sm.cap.program.units[u.uid].tensors[0]], "rows_read_bytes": b}
                          for n, b in tables.items() for u in sm.cap.program.units if u.name == n}}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
