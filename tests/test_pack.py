"""pack: execution order, alignment, a valid safetensors file, checksums verified while streaming."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import flat, nothing_left_open, open_fds, until_learned
from safetensors.torch import load_file

import layerstream as ls
from layerstream import zoo
from layerstream.errors import ChecksumError
from layerstream.format import parse_header, read_index
from layerstream.pack import PackError, pack, pack_folder
from layerstream.packfile import META_KEY, PAD_PREFIX, UnitTableCorrupt, unit_table
from layerstream.units import parse_block

SMALL_UNIT = 64 * 1024


class Packed:
    """A tiny model packed, with the eager model's outputs computed from the pack itself.

    Not from the original file: GEMV kernels round differently with differently aligned weights (the
    pack aligns every tensor to 64 bytes), so eager from the original and from the pack differ in the
    last bit while streaming equals eager from the same file exactly.
    """

    def __init__(self, s, out: str):
        self.s, self.path, self.spec, self.inputs, self.model = s, out, s.spec, s.inputs, s.model
        if all(t.is_floating_point() is False or t.dtype == torch.float32
               for t in load_file(out).values()):
            with torch.no_grad():
                self.expected = flat(ls.load_eager(s.model(), out)(*s.inputs))

    def check(self, out) -> None:
        got = flat(out)
        assert len(got) == len(self.expected)
        assert all(torch.equal(g, e) for g, e in zip(got, self.expected)), self.s.name


def packed(saved, tmp_path, name: str, **kw) -> tuple[str, Packed]:
    s = saved(name)
    out = str(tmp_path / f"{name}.packed.safetensors")
    pack(s.path, out, spec=s.spec, max_unit=SMALL_UNIT, **kw)
    return out, Packed(s, out)


def same_tensors(src: str, out: str, convert=None) -> None:
    a, b = load_file(src), load_file(out)  # the reference loader accepts the pack as it is
    assert set(b) - set(a) == {k for k in b if k.startswith(PAD_PREFIX)}
    for k, v in a.items():
        want = v.to(convert) if convert is not None and v.is_floating_point() else v
        assert b[k].dtype == want.dtype and torch.equal(b[k], want), k


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-resnet", "tiny-bert"])
def test_model_order_pack_streams_bit_exact(saved, tmp_path, name):
    out, s = packed(saved, tmp_path, name)
    same_tensors(s.s.path, out)
    idx = read_index(out)
    units = unit_table(idx)
    assert idx.data_start % 4096 == 0 and all(u.begin % 4096 == 0 for u in units)
    with ls.stream(s.model(), out, budget="150%", max_unit=SMALL_UNIT) as sm:
        until_learned(sm, lambda: s.check(sm(*s.inputs)))
        assert sm.verify and sm.report().arena_peak_bytes <= sm.budget_bytes
        # every byte of every tensor a unit binds is checked after its read
        for uid, lay in sm.layouts.items():
            # (a tensor cut into row blocks is checked whole as its blocks stream: lookup.py)
            covered = {n for n, _ in lay.tensor_offsets if (parse_block(n) or (n,))[0] in sm.split_digests}
            for c in sm.checks[uid]:
                covered |= {n for n, off in lay.tensor_offsets
                            if c.slot_off <= off and off + idx.tensors[n].nbytes <= c.slot_off + c.nbytes}
            assert covered == {n for n, _ in lay.tensor_offsets}, sm.cap.program.units[uid].name


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_each_streamed_unit_is_one_aligned_read(saved, tmp_path, name):
    out, s = packed(saved, tmp_path, name)
    with ls.stream(s.model(), out, budget="60%", max_unit=SMALL_UNIT) as sm:
        for _ in range(2):
            s.check(sm(*s.inputs))
        assert all(len(lay.extents) == 1 for lay in sm.layouts.values())


def test_name_order_without_a_model(saved, tmp_path):
    s = saved("tiny-bert")
    out = str(tmp_path / "bert.packed")
    r = pack(s.path, out, max_unit=SMALL_UNIT)
    assert r.order == "names" and r.units > 1
    same_tensors(s.path, out)
    s = Packed(s, out)
    names = [t for u in unit_table(read_index(out)) for t in u.tensors]
    layers = [int(n.split(".")[3]) for n in names if n.startswith("bert.encoder.layer.")]
    assert layers == sorted(layers)  # natural order: layer 2 before layer 10
    with ls.stream(s.model(), out, budget="50%", max_unit=SMALL_UNIT) as sm:
        for _ in range(3):
            s.check(sm(*s.inputs))


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_pack_streams_what_eager_computes_from_it(saved, tmp_path, dtype, torch_dtype):
    out, s = packed(saved, tmp_path, "tiny-llama", dtype=dtype)
    same_tensors(s.s.path, out, convert=torch_dtype)
    eager = ls.load_eager(s.model().to(torch_dtype), out)
    with torch.no_grad():
        want = flat(eager(*s.inputs))
    with ls.stream(s.model().to(torch_dtype), out, budget="50%", max_unit=SMALL_UNIT) as sm:
        for _ in range(3):
            got = flat(sm(*s.inputs))
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert os.path.getsize(out) < os.path.getsize(s.s.path) * 0.6


def test_sharded_folder_packs_to_a_folder(tmp_path):
    spec = zoo.get("tiny-gpt2")
    model = spec.build()
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="200KB")
    shards = [f for f in os.listdir(src) if f.endswith(".safetensors")]
    assert len(shards) >= 2
    r = pack_folder(str(src), str(tmp_path / "packed"))
    assert os.path.exists(tmp_path / "packed" / "config.json") and r.order == "names"
    merged = {}
    for f in shards:
        merged.update(load_file(src / f))
    got = load_file(tmp_path / "packed" / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in merged.items())


def test_refusals(saved, tmp_path):
    s = saved("tiny-gpt2")
    with pytest.raises(PackError, match="own input"):
        pack(s.path, s.path, force=True)
    out = tmp_path / "x.packed"
    out.write_bytes(b"keep me")
    with pytest.raises(PackError, match="--force"):
        pack(s.path, str(out))
    assert out.read_bytes() == b"keep me"
    with pytest.raises(PackError, match="float16"):
        pack(s.path, str(tmp_path / "y"), dtype="int4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match="no model.safetensors"):
        pack(str(tmp_path / "empty"), str(tmp_path / "z"))


@pytest.mark.parametrize("at", [0.0, 0.5, 0.99])
def test_interrupted_pack_leaves_nothing_that_looks_whole(saved, tmp_path, at):
    s = saved("tiny-gpt2")
    out = tmp_path / "out.safetensors"

    def progress(done, total):
        if done >= at * total:
            raise KeyboardInterrupt

    fds = open_fds()
    with pytest.raises(KeyboardInterrupt):
        pack(s.path, str(out), max_unit=SMALL_UNIT, progress=progress)
    assert os.listdir(tmp_path) == [] and open_fds() == fds


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_flipped_data_byte_in_each_unit_raises_checksum_error_then_recovers(saved, tmp_path):
    out, s = packed(saved, tmp_path, "tiny-gpt2")
    units = unit_table(read_index(out))
    with ls.stream(s.model(), out, budget="60%", max_unit=SMALL_UNIT) as sm:
        until_learned(sm, lambda: s.check(sm(*s.inputs)))  # the plan the flips below are made against
        ring = {t for u, _ in sm.plan.loads for t in sm.cap.program.units[u].tensors}
        streamed = [u for u in units if set(u.tensors) & ring]
        assert streamed
        for u in streamed:
            where = (u.begin + u.end) // 2
            flip(out, where)
            # The next call's first units are read during this call's tail, so a unit may have been read
            # before the flip: the call after the next reads every streamed unit after it.
            errors = [call(sm, s) for _ in range(2)]
            assert any(isinstance(e, ChecksumError) and "pack it again" in str(e) for e in errors), u.name
            flip(out, where)  # restored: within two calls (one may use a unit read while corrupt) it is exact
            if call(sm, s) is not None:
                s.check(sm(*s.inputs))
            assert sm.report().arena_peak_bytes <= sm.budget_bytes


def call(sm, s) -> BaseException | None:
    try:
        s.check(sm(*s.inputs))
    except ChecksumError as e:
        return e
    return None


def test_corrupt_resident_unit_is_caught_at_start_and_nothing_leaks(saved, tmp_path):
    out, s = packed(saved, tmp_path, "tiny-llama")
    u = unit_table(read_index(out))[-1]  # the final norm and head: every call uses them
    flip(out, u.begin + 3)  # a float's exponent byte
    model = s.model()
    with nothing_left_open(), pytest.raises(ChecksumError, match=u.name.split("+")[0]):
        ls.stream(model, out, budget="150%", max_unit=SMALL_UNIT)
    # the head is resident in row blocks, checked after every other resident tensor was bound: all unbound
    assert all(p.is_meta for p in model.parameters())
    with ls.stream(s.model(), out, budget="150%", max_unit=SMALL_UNIT, verify=False) as sm:
        got = flat(sm(*s.inputs))  # verification off: it runs, on the corrupted weight
        assert not all(torch.equal(g, e) for g, e in zip(got, s.expected))


def test_tampered_unit_table_is_named(saved, tmp_path):
    out, s = packed(saved, tmp_path, "tiny-gpt2")
    idx = read_index(out)
    with open(out, "rb") as f:
        f.seek(8)
        head = json.loads(f.read(idx.data_start - 8))
    size = os.path.getsize(out)
    table = json.loads(head["__metadata__"][META_KEY])

    def header(h: dict) -> object:  # padded to the original length, so the data still starts where it did
        raw = json.dumps(h).encode()
        return parse_header(out, raw + b" " * (idx.data_start - 8 - len(raw)), size)

    def with_table(t) -> object:
        return header({**head, "__metadata__": {**head["__metadata__"], META_KEY: json.dumps(t)}})

    tampered = [
        ({**table, "version": 99}, "version"),
        ({**table, "units": [["x", 0, 10, "zz", []]]}, "malformed"),
        ({**table, "units": [[*table["units"][0][:4], [["nope", "0" * 16]]]]}, "does not hold"),
        ({**table, "units": [[table["units"][0][0], 0, 4, *table["units"][0][3:]]]}, "lie in"),
        ({**table, "units": table["units"][1:2] + table["units"][:1]}, "file order"),
        ({**table, "units": table["units"][:1] * 2}, "two units"),
        ("not json", "not valid"),
    ]
    for t, says in tampered:
        idx2 = with_table(t) if not isinstance(t, str) else header({**head, "__metadata__": {META_KEY: t}})
        with pytest.raises(UnitTableCorrupt, match=says):
            unit_table(idx2)
    assert unit_table(with_table(table)) == unit_table(idx)


def _tiny_gpt2_config():
    from transformers import GPT2Config
    return GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=64)


def test_hf_folder_packs_in_model_order_and_streams_checked(tmp_path):
    from transformers import GPT2LMHeadModel

    from layerstream.cli import main
    torch.manual_seed(0)
    GPT2LMHeadModel(_tiny_gpt2_config()).eval().save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert main(["pack", str(tmp_path / "hf"), "-o", str(tmp_path / "p"), "--max-unit", "64KiB"]) == 0
    idx = read_index(tmp_path / "p" / "model.safetensors")
    assert [u.name for u in unit_table(idx)][0].startswith("transformer.w")  # the embeddings run first
    eager = GPT2LMHeadModel.from_pretrained(tmp_path / "p").eval()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = eager(ids).logits
    with ls.from_pretrained(tmp_path / "p", budget="60%", max_unit=SMALL_UNIT) as sm:
        for _ in range(4):
            assert torch.equal(sm(ids).logits, want)
        assert sm.verify and sum(len(c) for c in sm.checks.values()) > 0


def test_base_checkpoint_in_head_model_is_checked_under_the_model_names(tmp_path):
    from transformers import GPT2LMHeadModel, GPT2Model
    torch.manual_seed(0)
    GPT2Model(_tiny_gpt2_config()).eval().save_pretrained(tmp_path / "base")
    out = str(tmp_path / "base.packed.safetensors")
    pack(str(tmp_path / "base" / "model.safetensors"), out)
    with ls.init_empty_weights():
        head = GPT2LMHeadModel(_tiny_gpt2_config()).eval()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with ls.stream(head, out, budget="60%", max_unit=SMALL_UNIT) as sm:
        for _ in range(3):
            sm(ids)
        checked = {n for uid, lay in sm.layouts.items() for n, off in lay.tensor_offsets
                   if any(c.slot_off <= off < c.slot_off + c.nbytes for c in sm.checks[uid])
                   or parse_block(n) and parse_block(n)[0] in sm.split_digests}
        assert checked == {n for lay in sm.layouts.values() for n, _ in lay.tensor_offsets}
        assert all(n.startswith("transformer.") for n in checked)


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-t5"])
def test_pack_order_is_the_first_calls_guess(saved, tmp_path, name):
    """Registration order misses on a first call (ResNet's shortcut, T5's decoder); the pack's does not."""
    out, s = packed(saved, tmp_path, name)
    misses = {}
    for path in (s.s.path, out):
        with ls.stream(s.model(), path, budget=_min_budget(s, path) * 13 // 10, max_unit=16 * 1024) as sm:
            sm(*s.inputs)
            misses[path] = sm.report().demand_misses
    assert misses[out] == 0 < misses[s.s.path], misses


def _min_budget(s, path) -> int:
    try:
        ls.stream(s.model(), path, budget=1, max_unit=16 * 1024)
    except ls.BudgetError as e:
        return e.minimum_bytes
    raise AssertionError("a 1-byte budget was accepted")


def test_model_order_pack_of_a_base_checkpoint_keeps_the_file_names(tmp_path):
    """Ordering by a head model renames the base checkpoint's tensors while streaming; the pack keeps
    the names the file had, and packing a folder into itself is refused."""
    from transformers import GPT2LMHeadModel, GPT2Model

    from layerstream.zoo import ModelSpec
    torch.manual_seed(0)
    GPT2Model(_tiny_gpt2_config()).eval().save_pretrained(tmp_path / "base")
    src = str(tmp_path / "base" / "model.safetensors")
    spec = ModelSpec("head", lambda: GPT2LMHeadModel(_tiny_gpt2_config()).eval(),
                     lambda: (torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1)),), "")
    out = str(tmp_path / "base.packed.safetensors")
    r = pack(src, out, spec=spec, max_unit=SMALL_UNIT)
    assert r.order == "model"
    same_tensors(src, out)
    assert not any(n.startswith("transformer.") for n in read_index(out).tensors)
    with pytest.raises(PackError, match="folder being packed"):
        pack_folder(str(tmp_path / "base"), str(tmp_path / "base"))
