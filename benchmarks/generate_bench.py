"""Decoding a causal LM from a Hugging Face folder: streamed generate() against eager, tokens/s against the bound.

Saves the zoo model's seed-0 weights once as a Hugging Face folder (config.json + safetensors shards),
then runs, each in a fresh process: eager (transformers' from_pretrained, all weights in memory) and
layerstream.from_pretrained at each budget, every one generating the same greedy tokens from the same
prompt. The bound of a streamed run is the disk's speed (measured with the streaming reader right
before it) divided by the bytes it streams per token.

    .venv/bin/python benchmarks/generate_bench.py zoo:gpt-neo-1.3b --budget 25% --budget 50% \
        --new-tokens 32 --json benchmarks/generate-gpt-neo-1.3b.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def folder_for(ref: str) -> str:
    from layerstream.eager import load_eager
    from layerstream.models import resolve, weights_for
    from layerstream.zoo import build_on_meta

    spec = resolve(ref)
    weights = str(weights_for(ref, spec, None))
    folder = weights.replace(".safetensors", "") + "-hf"
    if not os.path.exists(os.path.join(folder, "config.json")):
        print(f"saving {weights} as a Hugging Face folder {folder} ...", file=sys.stderr, flush=True)
        model = load_eager(build_on_meta(spec.build), weights)
        model.config.use_cache = True
        model.save_pretrained(folder, max_shard_size="2GB")
    return folder


def worker(cfg: dict) -> dict:
    import torch

    import layerstream as ls
    from layerstream.measure import peak_rss_bytes

    from transformers import AutoConfig

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, AutoConfig.from_pretrained(cfg["folder"]).vocab_size, (1, cfg["prompt"]), generator=g)
    kw = dict(max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"], do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    if cfg["system"] == "eager":
        # Built from the config and loaded whole (as `bench` does): transformers' own from_pretrained
        # ran this model's prefill 1.5x slower here, and decoding 8x slower, than the same weights loaded so.
        from transformers import AutoConfig, AutoModelForCausalLM
        with ls.init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg["folder"])).eval()
        ls.load_eager(model, cfg["folder"])
        load_s = time.perf_counter() - t0
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, pad_token_id=0)  # warm up
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, pad_token_id=0)
            first_s = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            gen_s = time.perf_counter() - t
        res = {"tokens_per_s": cfg["new_tokens"] / gen_s, "generate_s": gen_s, "first_token_ms": first_s * 1e3,
               "decode_tokens_per_s": (cfg["new_tokens"] - 1) / max(gen_s - first_s, 1e-9)}
    else:
        sm = ls.from_pretrained(cfg["folder"], budget=cfg["budget"])
        load_s = time.perf_counter() - t0
        sm.generate(ids, max_new_tokens=4, pad_token_id=0)  # the learning calls: order, timing, serial
        t = time.perf_counter()
        out = sm.generate(ids, **kw)
        gen_s = time.perf_counter() - t
        st = sm.report().generation
        res = {"tokens_per_s": st.tokens_per_s, "decode_tokens_per_s": st.decode_tokens_per_s,
               "first_token_ms": st.first_token_ms, "streamed_bytes_per_token": st.streamed_bytes_per_token,
               "kv_cache_bytes": st.kv_cache_bytes, "generate_s": gen_s, "budget_bytes": sm.budget_bytes,
               "arena_peak_bytes": sm.report().arena_peak_bytes, "planner": sm.report().planner}
        sm.close()
    res.update(system=cfg["system"], budget=cfg.get("budget"), load_s=load_s, peak_rss_bytes=peak_rss_bytes(),
               tokens=out[0, cfg["prompt"]:].tolist())
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--budget", action="append")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json")
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    from layerstream.checkpoint import read_checkpoint, shard_paths
    from layerstream.measure import disk_read_bps

    folder = folder_for(a.model)
    biggest = max(shard_paths(read_checkpoint(folder)), key=os.path.getsize)
    runs = []
    for cfg in [{"system": "eager"}] + [{"system": "layerstream", "budget": b} for b in a.budget or ["25%", "50%"]]:
        cfg.update(folder=folder, prompt=a.prompt, new_tokens=a.new_tokens)
        bps = disk_read_bps(biggest)[0] if cfg["system"] != "eager" else None
        print(f"{cfg['system']} {cfg.get('budget') or ''} ..." + (f" (disk {bps / 1e9:.2f} GB/s)" if bps else ""),
              file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, a.model, "--worker", json.dumps(cfg)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["disk_read_bps"] = bps
        if bps and r.get("streamed_bytes_per_token"):
            r["bound_tokens_per_s"] = bps / r["streamed_bytes_per_token"]
            r["decode_over_bound"] = r["decode_tokens_per_s"] / r["bound_tokens_per_s"]
        r["tokens_equal"] = r["tokens"] == runs[0]["tokens"] if runs else True
        runs.append(r)
    print("| system | budget | tokens/s | decode tokens/s | bound tokens/s | decode / bound | MiB per token | "
          "peak RSS | tokens equal |\n|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['system']} | {r.get('budget') or '–'} | {r['tokens_per_s']:.2f} | "
              f"{r.get('decode_tokens_per_s') or 0:.2f} | {r.get('bound_tokens_per_s') or 0:.2f} | "
              f"{r.get('decode_over_bound') or 0:.2f} | {(r.get('streamed_bytes_per_token') or 0) / 2**20:.0f} | "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {'yes' if r['tokens_equal'] else 'NO'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "folder": folder, "prompt": a.prompt, "new_tokens": a.new_tokens,
                       "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
