"""A language model under a budget smaller than its largest layer: GPT-Neo-1.3B at 256 MB.

Its tied 412 MB embedding table and 67 MB MLP projections are each larger than the units a 256 MB
budget allows: the table is read row by row for the prompt's lookups and streamed in row blocks for
the head, the projections in row blocks. Generates a few greedy tokens from the zoo model's HF folder
(generate_bench.folder_for) and compares them with eager's; reports the arena's peak and the time.

    .venv/bin/python benchmarks/small_budget_check.py zoo:gpt-neo-1.3b --budget 256MB --json OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import folder_for  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="zoo:gpt-neo-1.3b")
    p.add_argument("--budget", default="256MB")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    import transformers

    import layerstream as ls

    folder = folder_for(a.model)
    ids = torch.randint(0, 50000, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    with ls.from_pretrained(folder, budget=a.budget) as sm:
        got = sm.generate(ids, **kw)
        r = sm.report()
        units = sm.cap.program.units
        out = {"model": a.model, "budget_bytes": r.budget_bytes, "weight_bytes": r.weight_bytes,
               "arena_peak_bytes": r.arena_peak_bytes, "largest_slot_bytes": max(sm.sizes.values()),
               "block_units": sum(u.mode == "block" for u in units),
               "gather_units": sum(u.mode == "gather" for u in units),
               "streamed_s": time.perf_counter() - t0, "bytes_read": r.bytes_read,
               "decode_tokens_per_s": r.generation.decode_tokens_per_s}
    eager = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    want = eager.generate(ids, **kw)
    out["tokens_equal"] = bool(torch.equal(got, want))
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
