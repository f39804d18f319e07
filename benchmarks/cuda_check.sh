#!/usr/bin/env bash
# What a session with a lent GPU runs (see the device tool): tests, copy bandwidth, benchmarks.
set -u
export PYTHONPATH=$PWD/src LAYERSTREAM_CACHE=/tmp/lscache OUT=${OUT:-/tmp/out}
python3 - <<'PY'
import torch, time
print("torch", torch.__version__, torch.cuda.get_device_name(0))
n = 512 << 20
h = torch.empty(n, dtype=torch.uint8, pin_memory=True); d = torch.empty(n, dtype=torch.uint8, device="cuda")
s = torch.cuda.Stream()
for _ in range(2):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.cuda.stream(s): d.copy_(h, non_blocking=True)
    s.synchronize(); dt = time.perf_counter() - t
print(f"pinned H2D copy: {n / dt / 1e9:.1f} GB/s")
PY
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_stream.py 2>&1 | tail -3
for m in vit-b16 gpt2-large; do
  python3 -m layerstream.cli bench zoo:$m --device cuda --budget 10% --budget 25% --repeat 10 --json $OUT/$m-cuda.json 2>&1 | grep -E "^\||disk|error|Error" | tail -6
done
