"""Int8 streaming: generate() from an fp32 pack against an int8 pack at one budget, and what int8 costs.

Saves the zoo model's seed-0 weights once as a Hugging Face folder (as generate_bench.py does), packs
it twice in model order (fp32, and `--quantize int8`), then in this one process, for each pack:
streams it at the budget, runs generate's learning calls, and times a greedy generate of N tokens from
a 128-token prompt (tokens/s, bytes read per decoded token, the disk bound). The accuracy cost, int8
against fp32: max and mean |logit difference| on the prompt, and top-1 agreement of the next token at
every generated position, teacher-forced on the fp32 tokens (both models read prompt + fp32 tokens).
Streamed fp32 equals eager fp32 bit for bit, so the fp32 pack stands for the fp32 model.

    .venv/bin/python benchmarks/quant_bench.py zoo:gpt2-large --budget 25% --new-tokens 32 \
        --json benchmarks/quant-gpt2-large.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import folder_for  # noqa: E402  (one way to make the model's folder)


def packs_for(folder: str, spec, force: bool) -> dict[str, str]:
    """The folder packed as fp32 and as int8 (made once, beside it)."""
    from layerstream.pack import describe, pack_folder

    out = {}
    for kind, quantize in (("fp32", None), ("int8", "int8")):
        path = out[kind] = f"{folder}-packed-{kind}"
        if force or not os.path.exists(os.path.join(path, "model.safetensors")):
            print(f"packing {folder} -> {path} ...", file=sys.stderr, flush=True)
            print(describe(pack_folder(folder, path, spec=spec, quantize=quantize, force=True)), file=sys.stderr)
    return out


def run(path: str, ids, budget: str, new_tokens: int) -> tuple[dict, list[int]]:
    import layerstream as ls
    from layerstream.checkpoint import read_checkpoint, shard_paths
    from layerstream.measure import disk_read_bps

    bps = disk_read_bps(max(shard_paths(read_checkpoint(path)), key=os.path.getsize))[0]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with ls.from_pretrained(path, budget=budget) as sm:
        sm.generate(ids, max_new_tokens=4, pad_token_id=0)  # the learning calls: order, timing, serial
        t = time.perf_counter()
        out = sm.generate(ids, **kw)
        gen_s = time.perf_counter() - t
        r, st = sm.report(), sm.report().generation
        res = {"tokens_per_s": st.tokens_per_s, "decode_tokens_per_s": st.decode_tokens_per_s,
               "first_token_ms": st.first_token_ms, "bytes_read_per_token": st.streamed_bytes_per_token,
               "generate_s": gen_s, "disk_read_bps": bps, "budget_bytes": r.budget_bytes,
               "arena_peak_bytes": r.arena_peak_bytes, "weight_bytes": r.weight_bytes, "planner": r.planner,
               "file_bytes": os.path.getsize(os.path.join(path, "model.safetensors"))}
        if bps and st.streamed_bytes_per_token:
            res["bound_tokens_per_s"] = bps / st.streamed_bytes_per_token
    return res, out[0, ids.shape[1]:].tolist()


def teacher_forced_logits(path: str, seq, budget: str):
    import layerstream as ls

    with ls.from_pretrained(path, budget=budget) as sm:
        return sm(seq).logits[0].float()  # (T, vocab)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="zoo:gpt2-large", help="a zoo causal LM (zoo:gpt2-large, zoo:gpt-neo-1.3b)")
    p.add_argument("--budget", default="25%", help="weight memory for both packs (default 25%%)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate (default 32)")
    p.add_argument("--force", action="store_true", help="pack again even if the packs exist")
    p.add_argument("--json", help="write the results as JSON to this file")
    a = p.parse_args()

    import torch
    from transformers import AutoConfig

    from layerstream.models import folder_spec

    folder = folder_for(a.model)
    packs = packs_for(folder, folder_spec(folder), a.force)
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    ids = torch.randint(0, vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    runs, tokens = {}, {}
    for kind, path in packs.items():
        print(f"{kind}: generate {a.new_tokens} tokens at {a.budget} ...", file=sys.stderr, flush=True)
        runs[kind], tokens[kind] = run(path, ids, a.budget, a.new_tokens)
    seq = torch.cat([ids, torch.tensor([tokens["fp32"][:-1]], dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        lf, lq = (teacher_forced_logits(packs[k], seq, a.budget) for k in ("fp32", "int8"))
    diff = (lf[:a.prompt] - lq[:a.prompt]).abs()
    gen = slice(a.prompt - 1, seq.shape[1])  # the positions whose next token was generated
    accuracy = {
        "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
        "max_abs_logit_fp32": lf[:a.prompt].abs().max().item(),
        "top1_agreement": (lq[gen].argmax(-1) == torch.tensor(tokens["fp32"])).float().mean().item(),
        "fp32_teacher_forced_matches_greedy": lf[gen].argmax(-1).tolist() == tokens["fp32"],
        "generated_tokens_equal": tokens["int8"] == tokens["fp32"]}
    result = {"model": a.model, "budget": a.budget, "prompt": a.prompt, "new_tokens": a.new_tokens, "runs": runs,
              "accuracy": accuracy, "speedup_tokens_per_s": runs["int8"]["tokens_per_s"] / runs["fp32"]["tokens_per_s"],
              "bytes_read_ratio": runs["int8"]["bytes_read_per_token"] / max(runs["fp32"]["bytes_read_per_token"], 1)}
    print(f"\n{a.model} at {a.budget}, {a.prompt}-token prompt, {a.new_tokens} greedy tokens\n")
    print("| pack | file MB | tokens/s | decode tokens/s | bound tokens/s | MB read per token | arena peak MB |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in runs.items():
        bound = f"{r['bound_tokens_per_s']:.2f}" if r.get("bound_tokens_per_s") else "-"
        print(f"| {kind} | {r['file_bytes'] / 1e6:.0f} | {r['tokens_per_s']:.2f} | {r['decode_tokens_per_s']:.2f} | "
              f"{bound} | {(r['bytes_read_per_token'] or 0) / 1e6:.1f} | {r['arena_peak_bytes'] / 1e6:.0f} |")
    print(f"\nint8/fp32: tokens/s x{result['speedup_tokens_per_s']:.2f}, bytes read per token "
          f"x{result['bytes_read_ratio']:.2f}; logits on the prompt: max |diff| {accuracy['max_abs_logit_diff']:.4f} "
          f"(max |logit| {accuracy['max_abs_logit_fp32']:.2f}), mean {accuracy['mean_abs_logit_diff']:.5f}; "
          f"top-1 agreement {accuracy['top1_agreement']:.1%} over {a.new_tokens} teacher-forced positions")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
