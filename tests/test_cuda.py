"""The CUDA path: pinned staging, a copy stream, events. Skipped where torch sees no CUDA device."""
from __future__ import annotations

import pytest
import torch

import layerstream as ls
from conftest import TINY, flat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SMALL_UNIT = 16 * 1024


def cuda_eager(s):
    model = ls.load_eager(s.model(), s.path).to("cuda")
    with torch.no_grad():
        return flat(model(*[x.to("cuda") for x in s.inputs]))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("share", ["min", "25%", "100%"])
def test_cuda_streamed_equals_cuda_eager(saved, name, share):
    s = saved(name)
    expected = cuda_eager(s)
    budget = share
    if share == "min":
        with pytest.raises(ls.BudgetError) as e:
            ls.stream(s.model(), s.path, budget=1, device="cuda", max_unit=SMALL_UNIT)
        budget = e.value.minimum_bytes
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    try:
        sm = ls.stream(s.model(), s.path, budget=budget, device="cuda", max_unit=SMALL_UNIT)
    except ls.BudgetError as e:  # the share is below the minimum for this cut
        sm = ls.stream(s.model(), s.path, budget=e.minimum_bytes, device="cuda", max_unit=SMALL_UNIT)
    with sm:
        # only the arena (and the model's small non-persistent buffers) is allocated on the device;
        # the caching allocator rounds every block up to 512 bytes
        buffers = sum(-(-b.numel() * b.element_size() // 512) * 512 for b in sm.model.buffers() if b.is_cuda)
        assert torch.cuda.memory_allocated() - before <= -(-sm._arena.nbytes // 512) * 512 + buffers
        assert sm._arena.nbytes <= sm.budget_bytes
        for _ in range(4):
            got = flat(sm(*[x.to("cuda") for x in s.inputs]))
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                assert g.is_cuda and g.shape == e.shape
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        r = sm.report()
        assert r.arena_peak_bytes <= r.budget_bytes and r.arena_bytes <= r.budget_bytes
        if share == "min":
            assert r.loads_per_call > 0


def test_cuda_reads_go_through_pinned_staging(saved):
    s = saved("tiny-gpt2")
    with ls.stream(s.model(), s.path, budget="40%", device="cuda", max_unit=SMALL_UNIT) as sm:
        for _ in range(3):
            sm(*[x.to("cuda") for x in s.inputs])
        assert sm._stage is not None and sm._stage.host.buf.is_pinned()
        assert sm._stage.copy_stream != torch.cuda.current_stream()
        assert sm.report().loads_per_call > 0
