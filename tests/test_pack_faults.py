"""Faults on packed files: cut at every unit boundary while streaming, and a fuzzed unit table."""
from __future__ import annotations

import json
import os
import random

import pytest
from conftest import reader_threads, until_learned
from test_bad_input import _call
from test_pack import SMALL_UNIT, packed

import layerstream as ls
from layerstream.format import FormatError, parse_header, read_index
from layerstream.packfile import META_KEY, unit_table


def test_cut_at_every_unit_boundary_while_streaming(saved, tmp_path):
    """Each cut fails exactly the calls that read past it, with a named error; restored, it runs again."""
    out, s = packed(saved, tmp_path, "tiny-gpt2")
    with open(out, "rb") as f:
        whole = f.read()
    units = unit_table(read_index(out))
    cuts = sorted({u.begin for u in units} | {u.end for u in units})
    with ls.stream(s.model(), out, budget="60%", max_unit=SMALL_UNIT) as sm:
        until_learned(sm, lambda: s.check(_call(sm, s.inputs)))  # the plan the cuts below are made against
        streamed_end = max(lay.data_end for u, _ in sm.plan.loads for lay in [sm.layouts[u]])
        failed = 0
        for cut in cuts:
            os.truncate(out, cut)
            errors = []
            for _ in range(2):  # the first may use units read before the cut
                try:
                    s.check(_call(sm, s.inputs))
                except ls.ReadError as e:
                    errors.append(e)
            if cut < streamed_end:
                assert errors and all(out in str(e) and "truncated" in str(e) for e in errors), cut
                failed += 1
            else:
                assert not errors
            with open(out, "r+b") as f:  # restored in place: the reader holds the same inode
                f.write(whole)
            for _ in range(2):
                try:
                    s.check(_call(sm, s.inputs))
                except ls.ReadError:
                    pass  # a unit prefetched while the file was short; the next call reads it again
            s.check(_call(sm, s.inputs))
            assert sm.report().arena_peak_bytes <= sm.budget_bytes
        assert failed >= len(cuts) // 2
    assert reader_threads() == []


def test_fuzzed_unit_table_raises_only_named_errors(saved, tmp_path):
    out, _ = packed(saved, tmp_path, "tiny-gpt2")
    idx = read_index(out)
    size = os.path.getsize(out)
    with open(out, "rb") as f:
        f.seek(8)
        head = json.loads(f.read(idx.data_start - 8))
    text = head["__metadata__"][META_KEY]
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    for _ in range(1500):
        b = list(text)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(b))
            op = rng.randrange(3)
            if op == 0:
                b[i] = rng.choice('0123456789[]",:abcdef-x ')
            elif op == 1:
                del b[i]
            else:
                b.insert(i, rng.choice("0123456789,[]"))
        h = {**head, "__metadata__": {**head["__metadata__"], META_KEY: "".join(b)}}
        raw = json.dumps(h).encode()
        raw += b" " * max(0, idx.data_start - 8 - len(raw))
        try:
            table = unit_table(parse_header(out, raw, size))
            outcomes["valid"] = outcomes.get("valid", 0) + 1
            assert table is not None
        except FormatError as e:
            assert out in str(e)
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        except BaseException as e:  # noqa: BLE001
            pytest.fail(f"unit_table raised {type(e).__name__}: {e} on {''.join(b)[:300]!r}")
    assert outcomes.get("UnitTableCorrupt", 0) > 500, outcomes
