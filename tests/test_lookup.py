"""Gathered embedding rows and linear row blocks (runtime/lookup.py), on real HF folders from configs.

A large embedding table reads only the rows a call looks up; a linear layer larger than the unit size
(a tied 8 MiB table here, under budgets below it) is computed in row blocks. Outputs and generated
tokens must equal transformers' own eager model, bit for bit, and the arena must stay in the budget.
"""
from __future__ import annotations

import pytest
import torch
import transformers

import layerstream as ls
from conftest import nothing_left_open, until_learned
from layerstream.checkpoint import read_checkpoint, shard_of
from layerstream.errors import ChecksumError
from layerstream.pack import pack_folder
from layerstream.units import parse_block

VOCAB = 16384  # x 128 x fp32 = the 8 MiB the gather threshold (capture.GATHER_MIN) asks for
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),  # tied head
    "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                              tie_word_embeddings=False),
}
TABLE = VOCAB * 128 * 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lookup")
    out = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg()).save_pretrained(root / name, max_shard_size="4MB")
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def eager(folders):
    return {n: transformers.AutoModelForCausalLM.from_pretrained(f).eval() for n, f in folders.items()}


def _prompt(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _read_planned(sm) -> int:
    """Bytes the plan's loads read per call (a gather unit's load reads nothing: its rows come on demand)."""
    return sum(sum(e.nbytes for e in sm.layouts[u].extents) for u, _ in sm.plan.loads)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_embedding_reads_only_the_rows_looked_up(folders, eager, name):
    ids = _prompt()
    with torch.no_grad():
        want = eager[name](ids).logits
    with ls.from_pretrained(folders[name], budget="60%") as sm:
        gathered = [u for u in sm.cap.program.units if u.mode == "gather"]
        assert len(gathered) == 1 and sm.sizes[gathered[0].uid] < TABLE / 3

        def exact() -> None:
            assert torch.equal(sm(ids).logits, want)

        until_learned(sm, exact)
        exact()  # a call of the plan kept, its ring filled by the call before
        r = sm.report()
        rows = len(set(ids.flatten().tolist()))
        extra = r.bytes_read_last_call - _read_planned(sm)
        assert 0 < extra <= rows * (128 * 4 + 2 * 4096)  # each row: its bytes and at most two pages more
        assert r.arena_peak_bytes <= r.budget_bytes


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_head_larger_than_the_budget_is_computed_in_row_blocks(folders, eager, name):
    ids = _prompt()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = eager[name].generate(ids, **kw)
    budget = 3 * 2**20  # under half the 8 MiB head
    with nothing_left_open(), ls.from_pretrained(folders[name], budget=budget) as sm:
        blocks = [u for u in sm.cap.program.units if u.mode == "block"]
        assert len(blocks) >= 3 and all(parse_block(t) for u in blocks for t in u.tensors)
        assert max(sm.sizes.values()) <= 2 * 2**20 < budget  # (the largest: the gather slot)
        assert torch.equal(sm.generate(ids, **kw), want)
        r = sm.report()
        assert r.arena_peak_bytes <= r.budget_bytes
        assert r.generation.steps == 8
        # Each block is timed by its own acquire (the cost model's steps), in row order, every call.
        prog = sm.cap.program  # (the order the first call recorded)
        waits = sm._exec.unit_waits
        assert [u for u, _, _ in waits] == [u for u in prog.steps if prog.units[u].mode == "block"]
        assert all(t0 <= t1 for _, t0, t1 in waits) and all(a[2] <= b[1] for a, b in zip(waits, waits[1:]))


def test_lookup_errors_are_clear(folders):
    with ls.from_pretrained(folders["llama"], budget="40%") as sm:
        with pytest.raises(IndexError, match=f"out of range for a table of {VOCAB} rows"):
            sm(torch.tensor([[1, VOCAB]]))
        out = sm(torch.tensor([[3, 4, 3]], dtype=torch.int32))  # int32 ids work; the failed call left nothing bound
        assert out.logits.shape == (1, 3, VOCAB)


def test_a_split_tensor_is_checked_as_its_blocks_stream(folders, tmp_path):
    out = str(tmp_path / "packed")
    pack_folder(folders["llama"], out)
    ids = _prompt()
    with ls.from_pretrained(out, budget=3 * 2**20) as sm:
        assert "lm_head.weight" in sm.split_digests
        want = sm(ids).logits
    index = read_checkpoint(out)
    t = index.tensors["lm_head.weight"]
    base, shard = shard_of(index, t.begin)
    with open(shard, "r+b") as f:  # flip a byte in the head's last row: the last block it checks
        f.seek(t.end - base - 61)
        b = f.read(1)
        f.seek(t.end - base - 61)
        f.write(bytes([b[0] ^ 0x40]))
    with ls.from_pretrained(out, budget=3 * 2**20) as sm:
        with pytest.raises(ChecksumError, match="lm_head"):
            sm(ids)
    with ls.from_pretrained(out, budget=3 * 2**20, verify=False) as sm:
        assert not torch.equal(sm(ids).logits, want)


def test_blocks_are_one_step_of_the_order_and_a_whole_budget_gathers_nothing(folders, eager):
    ids = _prompt()
    with torch.no_grad():
        want = eager["llama"](ids).logits
    with ls.from_pretrained(folders["llama"], budget=3 * 2**20) as sm:
        sm(ids)
        assert sm.cap.program.root_order.count("lm_head") == 1  # its row blocks are one call of it
    with ls.from_pretrained(folders["llama"], budget="120%") as sm:  # (100% is a little short of every slot)
        assert not any(u.mode == "gather" for u in sm.cap.program.units)  # the table fits: resident, no row reads
        for _ in range(4):
            assert torch.equal(sm(ids).logits, want)
        assert sm.report().bytes_read_last_call == 0
