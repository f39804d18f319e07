"""pack --quantize int8: int8 linear weights, dequantised in place in the arena, within the budget."""
from __future__ import annotations

import functools
import json
import os
import random
import struct

import pytest
import torch
from conftest import flat, until_learned
from hypothesis import given, settings
from hypothesis import strategies as st

import layerstream as ls
from layerstream import quantize as quantize_mod
from layerstream import zoo
from layerstream.errors import ChecksumError
from layerstream.format import FileIndex, FileTensor, read_index
from layerstream.layout import unit_layout
from layerstream.pack import PackError, pack
from layerstream.packfile import META_KEY, PackEntry, layout_pack, unit_table
from layerstream.quant import QuantTableCorrupt, quant_table, scale_name
from layerstream.quantize import dequantize, quantize_int8
from layerstream.runtime import dequant
from layerstream.units import Unit

SMALL_UNIT = 64 * 1024
# Measured on these random-init models (the int8 pack against the fp32 pack, both eager, 16 tokens): the
# largest logit difference is 1.3% (GPT-2) and 1.9% (Llama) of the largest |logit|, the mean 0.2% and 0.4%;
# next-token top-1 agrees on 16/16 and 15/16 positions. Asserted with margin:
MAX_REL_TOL, MEAN_REL_TOL, TOP1_MIN = 0.04, 0.01, 0.75

# Linear layers hold most of the weights here (small vocabularies), as in real LMs; tiny-gpt2's
# tied 512-token embedding would hold most of its bytes, and it stays float.
SPECS = {
    "gpt2": zoo.ModelSpec("q-gpt2", functools.partial(zoo._hf, "GPT2LMHeadModel", "GPT2Config", vocab_size=96,
                                                      n_embd=256, n_layer=2, n_head=4, n_positions=32,
                                                      use_cache=False),
                          lambda: (torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1)),),
                          "GPT-2 (Conv1D linears, tied lm_head)"),
    "llama": zoo.ModelSpec("q-llama", functools.partial(zoo._hf, "LlamaForCausalLM", "LlamaConfig", vocab_size=96,
                                                        hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2,
                                                        max_position_embeddings=32, use_cache=False),
                           lambda: (torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1)),),
                           "Llama (nn.Linear, untied lm_head)"),
}


class Pair:
    """A model saved once, packed as fp32 and as int8 (both in model order)."""

    def __init__(self, root, key: str):
        self.spec = SPECS[key]
        self.inputs = self.spec.example_inputs()
        self.src = str(root / f"{key}.safetensors")
        zoo.save_weights(self.spec, self.src)
        self.fp32, self.int8 = str(root / f"{key}.fp32.packed"), str(root / f"{key}.int8.packed")
        pack(self.src, self.fp32, spec=self.spec, max_unit=SMALL_UNIT)
        self.result = pack(self.src, self.int8, spec=self.spec, quantize="int8", max_unit=SMALL_UNIT)

    def model(self):
        return zoo.build_on_meta(self.spec.build)

    def eager(self, path: str):
        with torch.no_grad():
            return flat(ls.load_eager(self.model(), path)(*self.inputs))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {k: Pair(root, k) for k in SPECS}


# ---- the in-place expansion (pure layout, real torch) ---------------------------------------------

@st.composite
def units(draw):
    """A unit of a quantized pack: int8 tensors (each followed by its scales) and float tensors, in any order."""
    entries, quant = [], {}
    for i, is_int8 in enumerate(draw(st.lists(st.booleans(), min_size=1, max_size=6).filter(any))):
        if is_int8:
            rows, cols, axis = draw(st.integers(1, 40)), draw(st.integers(1, 300)), draw(st.integers(0, 1))
            name = f"t{i}.weight"
            dtype = draw(st.sampled_from(["F32", "F16"]))
            entries += [PackEntry(name, "I8", (rows, cols), rows * cols),
                        PackEntry(scale_name(name), "F32", ((rows, cols)[axis],), 4 * (rows, cols)[axis])]
            quant[name] = {"scale": scale_name(name), "dtype": dtype, "axis": axis}
        else:
            dtype = draw(st.sampled_from(["F32", "F16", "I64"]))
            n = draw(st.integers(0, 3000))
            size = {"F32": 4, "F16": 2, "I64": 8}[dtype]
            entries.append(PackEntry(f"t{i}.bias", dtype, (n,), n * size))
    lead = draw(st.integers(0, 3)) * 4096  # the unit need not be the file's first
    lay = layout_pack([("pre", [PackEntry("pre", "U8", (lead,), lead)] if lead else []), ("u", entries)])
    data_start = 4096
    tensors = {n: FileTensor(n, e.dtype, e.shape, data_start + lay.offsets[n], data_start + lay.offsets[n] + e.nbytes)
               for n, e in lay.entries.items()}
    meta = {META_KEY: json.dumps({"version": 1, "units": [], "quant": quant})}
    index = FileIndex("synthetic", data_start + lay.data_bytes, data_start, tensors, meta)
    names = [e.name for e in entries if not e.name.endswith(".__scale__")]
    return index, names, random.Random(draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=150, deadline=None)
@given(units(), st.sampled_from([(7, 5), (2**20, 4 * 2**20)]))
def test_expanding_in_place_equals_expanding_apart(case, chunks):
    """Bit for bit, with chunks small (many per tensor) and large, and nothing written outside the slot."""
    index, names, rnd = case
    lay = unit_layout(Unit(0, "u", (), tuple(names), 0), index)
    assert lay.read_nbytes + lay.extents[0].slot_off <= lay.slot_nbytes and lay.extents[0].slot_off % 4096 == 0
    file = bytearray(rnd.randbytes(index.file_size))
    quant = quant_table(index)
    for q in quant.values():  # finite scales, so NaN != NaN cannot hide a difference
        s = index.tensors[q.scale]
        file[s.begin:s.end] = torch.rand(s.shape, generator=torch.Generator().manual_seed(rnd.randrange(99))).numpy().tobytes()
    want = {}
    for n in names:
        t = index.tensors[n]
        raw = torch.frombuffer(bytearray(file[t.begin:t.end]) or bytearray(1), dtype=torch.uint8)[:t.nbytes]
        if n in quant:
            q, s = quant[n], index.tensors[quant[n].scale]
            scale = torch.frombuffer(bytearray(file[s.begin:s.end]), dtype=torch.float32)
            dt = {"F32": torch.float32, "F16": torch.float16}[q.dtype]
            want[n] = dequantize(raw.view(torch.int8).view(t.shape), scale, q.axis, dt).view(torch.uint8).view(-1)
        else:
            want[n] = raw.clone()
    guard = 4096
    buf = torch.frombuffer(bytearray(rnd.randbytes(lay.slot_nbytes + 2 * guard)), dtype=torch.uint8)
    before = buf.clone()
    for x in (x for x in lay.extents if x.nbytes):
        buf[guard + x.slot_off:guard + x.slot_off + x.nbytes] = torch.frombuffer(
            bytearray(file[x.file_off:x.file_off + x.nbytes].ljust(x.nbytes, b"\0")), dtype=torch.uint8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize_mod, "CHUNK_ELEMS", chunks[0])
        mp.setattr(dequant, "MOVE_CHUNK", chunks[1])
        dequant.expand(buf, guard, lay.expand)
    for n, off in lay.tensor_offsets:
        got = buf[guard + off:guard + off + want[n].numel()]
        assert torch.equal(got, want[n]), n
    assert torch.equal(buf[:guard], before[:guard]) and torch.equal(buf[-guard:], before[-guard:])


def test_quantize_rounds_per_output_channel():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-0.3, 0.1, 0.2]])
    q, s = quantize_int8(w, 0)
    assert s.tolist() == pytest.approx([1.0, 2 / 127, 0.3 / 127])  # an all-zero row keeps scale 1
    assert q[1].tolist() == [64, -127, 32] and q[0].tolist() == [0, 0, 0]
    qt, st_ = quantize_int8(w.t().contiguous(), 1)  # Conv1D: [in, out], a scale per column
    assert torch.equal(qt, q.t()) and torch.equal(st_, s)


# ---- streaming an int8 pack ------------------------------------------------------------------------

@pytest.mark.parametrize("key", list(SPECS))
def test_streamed_int8_equals_eager_on_the_int8_pack_and_reads_a_quarter(pairs, key):
    p = pairs[key]
    want = p.eager(p.int8)
    read = {}
    for path in (p.fp32, p.int8):
        with ls.stream(p.model(), path, budget="25%") as sm:
            def call() -> None:
                got = flat(sm(*p.inputs))
                if path == p.int8:
                    assert all(torch.equal(g, w) for g, w in zip(got, want)), key

            until_learned(sm, call)
            call()  # a call of the plan kept, its ring filled by the call before
            r = sm.report()
            assert r.loads_per_call > 0 and r.arena_peak_bytes <= r.budget_bytes and sm.verify
            read[path] = r.bytes_read_last_call
    assert read[p.int8] < 0.35 * read[p.fp32], read  # measured 0.26-0.30 (scales, biases, 4 KiB rounding)
    assert p.result.quantized > 0 and p.result.quant_bytes_out < 0.27 * p.result.quant_bytes_in


@pytest.mark.parametrize("key", list(SPECS))
def test_int8_logits_are_close_to_fp32(pairs, key):
    p = pairs[key]
    (a,), (b,) = p.eager(p.fp32), p.eager(p.int8)
    diff, top = (a - b).abs(), a.abs().max()
    assert diff.max() <= MAX_REL_TOL * top and diff.mean() <= MEAN_REL_TOL * top
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= TOP1_MIN


def test_what_is_quantized(pairs):
    q = quant_table(read_index(pairs["gpt2"].int8))
    assert "lm_head.weight" not in q and "transformer.wte.weight" not in q  # tied: stays float
    assert q["transformer.h.0.mlp.c_fc.weight"].axis == 1  # Conv1D: [in, out], a scale per column
    q = quant_table(read_index(pairs["llama"].int8))
    assert q["lm_head.weight"].axis == 0 and "model.embed_tokens.weight" not in q  # untied lm_head: int8
    idx = read_index(pairs["llama"].int8)
    for u in unit_table(idx):  # every scale right after its tensor, in the same unit
        for n in u.tensors:
            if n in q:
                assert u.tensors[u.tensors.index(n) + 1] == q[n].scale


# ---- faults ----------------------------------------------------------------------------------------

def _edit_quant(src: str, dst: str, edit) -> None:
    """Copy `src` to `dst` with its quant table edited in place (the header keeps its length)."""
    with open(src, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8:8 + n])
    table = json.loads(head["__metadata__"][META_KEY])
    edit(table["quant"])
    head["__metadata__"][META_KEY] = json.dumps(table, separators=(",", ":"))
    raw = json.dumps(head, separators=(",", ":")).encode()
    assert len(raw) <= n
    with open(dst, "wb") as f:
        f.write(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])


def _set(name, key, value):
    def edit(q):
        q[name][key] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set("model.layers.0.mlp.up_proj.weight", "scale", "model.layers.0.mlp.up_proj.weight.__scalX__"),
     "does not hold"),
    (_set("model.layers.0.mlp.up_proj.weight", "axis", 1), "one F32 scale per output channel"),
    (_set("model.layers.0.mlp.up_proj.weight", "dtype", "I8"), "must be"),
    (lambda q: q.update({"model.norm.weight": {"scale": "lm_head.weight.__scale__", "dtype": "F32", "axis": 0}}),
     "stored as F32"),
    (lambda q: q.update({"lm_head.weight": 3}), "must be"),
])
def test_a_tampered_quant_table_is_refused_by_name(pairs, tmp_path, edit, match):
    p = pairs["llama"]
    bad = str(tmp_path / "bad.packed")
    _edit_quant(p.int8, bad, edit)
    with pytest.raises(QuantTableCorrupt, match=match):
        ls.stream(p.model(), bad, budget="25%")
    with pytest.raises(QuantTableCorrupt, match="pack it again"):
        ls.load_eager(p.model(), bad)


def test_a_flipped_byte_of_int8_weights_fails_its_checksum(pairs, tmp_path):
    p = pairs["gpt2"]
    t = read_index(p.int8).tensors["transformer.h.1.mlp.c_fc.weight"]
    bad = tmp_path / "flipped.packed"
    data = bytearray(open(p.int8, "rb").read())
    data[(t.begin + t.end) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="c_fc"):
        with ls.stream(p.model(), str(bad), budget="25%") as sm:
            for _ in range(2):
                sm(*p.inputs)


def test_quantize_without_a_model_is_refused(pairs, tmp_path, capsys):
    from layerstream.cli import main
    p = pairs["gpt2"]
    out = str(tmp_path / "q.packed")
    with pytest.raises(PackError, match="needs the model"):
        pack(p.src, out, quantize="int8")
    assert main(["pack", p.src, "-o", out, "--quantize", "int8"]) == 2
    assert "--model zoo:NAME" in capsys.readouterr().err and not os.path.exists(out)
    with pytest.raises(PackError, match="int4"):
        pack(p.src, out, spec=p.spec, quantize="int4")


# ---- a Hugging Face folder, from the command line ----------------------------------------------------

def test_cli_packs_a_folder_int8_and_generate_streams_it(tmp_path, capsys):
    from layerstream.cli import main
    from layerstream.pretrained import empty_from_folder

    torch.manual_seed(0)
    model = SPECS["gpt2"].build()
    model.config.use_cache = True
    model.save_pretrained(tmp_path / "hf", max_shard_size="2MB")
    out = str(tmp_path / "int8")
    assert main(["pack", str(tmp_path / "hf"), "-o", out, "--quantize", "int8", "--max-unit", "256KiB"]) == 0
    assert "8 linear weights stored as int8" in capsys.readouterr().out
    ids = SPECS["gpt2"].example_inputs()[0][:, :8]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    eager, _ = empty_from_folder(out, None, None)
    ls.load_eager(eager, out)
    with torch.no_grad():
        want = eager.generate(ids, **kw)
    with ls.from_pretrained(out, budget="30%") as sm:
        assert torch.equal(sm.generate(ids, **kw), want)
        assert sm.report().loads_per_call > 0 and sm.report().arena_peak_bytes <= sm.budget_bytes


def test_int8_pack_of_a_head_model_streams_into_its_base_model(pairs):
    """Names differ by a prefix (model.layers... -> layers...): the quant table follows the renaming."""
    p = pairs["llama"]
    spec = zoo.ModelSpec("q-llama-base", functools.partial(zoo._hf, "LlamaModel", "LlamaConfig", vocab_size=96,
                                                           hidden_size=256, intermediate_size=768,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, max_position_embeddings=32,
                                                           use_cache=False), p.spec.example_inputs, "")
    with torch.no_grad():
        want = flat(ls.load_eager(zoo.build_on_meta(spec.build), p.int8)(*p.inputs))
    with ls.stream(zoo.build_on_meta(spec.build), p.int8, budget="30%") as sm:
        assert "layers.0.mlp.up_proj.weight" in quant_table(sm.index)
        for _ in range(2):
            assert all(torch.equal(g, w) for g, w in zip(flat(sm(*p.inputs)), want))
        assert sm.report().loads_per_call > 0 and sum(len(c) for c in sm.checks.values()) > 0
