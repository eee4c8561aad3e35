"""The server under load, measured as its clients see it: streaming requests over HTTP at a Poisson rate (or
all at once), time to first token, time per output token, inter-token latency and throughput, against the
same requests through the offline LLM.generate in a process of its own.

    python benchmarks/bench_serving.py                                   # the embedded model, rates 8, 32, inf
    python benchmarks/bench_serving.py --num-prompts 64 --request-rate inf --output-len 32   # seconds
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --no-offline        # a running server

Without --base-url it starts `python nanoserve.py serve` on a free 127.0.0.1 port with the engine flags
after `--` (default: the embedded model, `--sched async`), waits for /health, and stops it at the end. The
requests: --num-prompts prompts of random token ids below --vocab (lengths drawn from --input-len, seed --seed), each
asking for exactly --output-len tokens (`ignore_eos`, greedy), sent to /v1/completions with `stream: true`
at each --request-rate (requests/s, Poisson arrivals; `inf` sends them all at once). The same requests go
through every rate, so a rate's numbers differ from another's only by the arrival pattern.

Per rate: requests that succeeded and failed, the duration (first send to last byte), request and output
token throughput, the CPU seconds per 1,000 output tokens of the server process (from /proc, when it is a
child of this script) and of this client (which shares the machine's cores with the server), and mean,
median and p99 of TTFT (send -> first text), TPOT ((last - first) / (tokens - 1),
per request), ITL (the gap between successive chunks, over all requests) and end-to-end latency, in ms.
Offline: LLM.generate of all the requests at once with the same engine flags, in a fresh process, after
a warm-up; the report prints served / offline output tok/s at the burst rate (the cost of HTTP, JSON and
the engine thread, when the arrival pattern is the same).
"""

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def workload(n: int, input_len: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*input_len))] for _ in range(n)]


# --- one request, as a streaming client sees it ------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> dict:
    body = dict(model=model, prompt=prompt, max_tokens=output_len, temperature=0, ignore_eos=True, stream=True,
                stream_options={"include_usage": True})  # fmt: skip
    start = time.perf_counter()
    chunks, tokens, error = [], 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    if event["choices"]:  # a chunk of new text (empty from a model without a tokenizer)
                        chunks.append(time.perf_counter())
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error is None and (not chunks or tokens != output_len):
        error = f"{tokens} tokens in {len(chunks)} chunks, asked for {output_len}"
    return dict(start=start, end=end, chunks=chunks, tokens=tokens, error=error)


async def run_rate(url: str, model: str, prompts: list, output_len: int, rate: float, seed: int) -> list[dict]:
    """Send every prompt, the gaps between sends drawn from an exponential distribution of mean 1/rate."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(one_request(client, model, p, output_len)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


def summarise(results: list[dict], cpu_s: float | None, client_cpu_s: float | None = None) -> dict:
    ok = [r for r in results if r["error"] is None]
    ms = lambda xs: dict(mean=1e3 * statistics.fmean(xs), median=1e3 * statistics.median(xs),
                         p99=1e3 * quantile(xs, 0.99)) if xs else None  # fmt: skip
    duration = max(r["end"] for r in results) - min(r["start"] for r in results)
    out_tokens = sum(r["tokens"] for r in ok)
    return dict(
        completed=len(ok),
        failed=len(results) - len(ok),
        errors=sorted({r["error"] for r in results if r["error"]})[:5],
        duration_s=duration,
        request_throughput=len(ok) / duration,
        output_tok_s=out_tokens / duration,
        server_cpu_s_per_1k=1e3 * cpu_s / out_tokens if cpu_s is not None and out_tokens else None,
        client_cpu_s_per_1k=1e3 * client_cpu_s / out_tokens if client_cpu_s is not None and out_tokens else None,
        ttft_ms=ms([r["chunks"][0] - r["start"] for r in ok]),
        tpot_ms=ms([(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
        itl_ms=ms([b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]),
        e2e_ms=ms([r["end"] - r["start"] for r in ok]),
    )


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# --- the server and the offline run, each a process of its own ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine_args: list[str], port: int) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "nanoserve.py"), "serve", "--port", str(port), *engine_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not answer /health within 180 s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


OFFLINE = """
import json, sys, time
sys.path.insert(0, {root!r})
from nanoserve_entrypoints.cli import build_parser, engine_config
from dataclasses import asdict
import nanoserve as ns
args = build_parser().parse_args({engine_args!r})
llm = ns.LLM(**asdict(engine_config(args, args.sched)))
prompts = json.loads(sys.stdin.read())
params = ns.SamplingParams(temperature=0, max_tokens={output_len}, ignore_eos=True)
llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
t, c = time.perf_counter(), time.process_time()
outs = llm.generate(prompts, params, use_tqdm=False)
t, c = time.perf_counter() - t, time.process_time() - c
n = sum(len(o.outputs[0].token_ids) for o in outs)
print(json.dumps(dict(output_tok_s=n / t, cpu_s_per_1k=1e3 * c / n, duration_s=t)))
"""


def offline(engine_args: list[str], prompts: list, output_len: int) -> dict:
    code = OFFLINE.format(root=str(ROOT), engine_args=engine_args, output_len=output_len)
    run = subprocess.run([sys.executable, "-c", code], input=json.dumps(prompts), capture_output=True, text=True,
                         cwd=ROOT, timeout=1800)  # fmt: skip
    if run.returncode:
        raise SystemExit(f"the offline run failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# --- the report --------------------------------------------------------------------------------------------


def report(rate: float, s: dict) -> str:
    lines = [f"request rate {rate:g}/s: {s['completed']} completed, {s['failed']} failed, {s['duration_s']:.2f} s"]
    lines += [f"  {e}" for e in s["errors"]]
    cpu = f", server {s['server_cpu_s_per_1k']:.2f} CPU s/1k tokens" if s["server_cpu_s_per_1k"] else ""
    cpu += f", client {s['client_cpu_s_per_1k']:.2f}" if s.get("client_cpu_s_per_1k") else ""
    lines.append(f"  {s['request_throughput']:.2f} req/s, {s['output_tok_s']:.1f} output tok/s{cpu}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        if m := s[f"{name}_ms"]:
            lines.append(
                f"  {name.upper():5} ms  mean {m['mean']:8.2f}  median {m['median']:8.2f}  p99 {m['p99']:8.2f}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    engine_args = argv[argv.index("--") + 1 :] if "--" in argv else ["--sched", "async"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server (default: start one with the flags after --)")
    p.add_argument("--model", default=None, help="the served model's name (default: /v1/models' first)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", default="16:64", help="MIN:MAX prompt tokens")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--request-rate", default="8,32,inf", help="requests/s, comma-separated; inf: all at once")
    p.add_argument("--vocab", type=int, default=256, help="token ids drawn below this (any model has 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-offline", dest="offline", action="store_false", help="skip the offline LLM.generate run")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    rates = [float(r) for r in args.request_rate.split(",")]
    lo, hi = (int(x) for x in args.input_len.split(":"))

    proc = None
    if args.base_url is None:
        port = free_port()
        proc = start_server(engine_args, port)
        args.base_url = f"http://127.0.0.1:{port}"
    try:
        card = httpx.get(args.base_url + "/v1/models", timeout=10).json()["data"][0]
        model = args.model or card["id"]
        prompts = workload(args.num_prompts, (lo, hi), args.vocab, args.seed)
        print(f"{args.base_url} serving {model}: {args.num_prompts} requests of {lo}-{hi} random token ids, "
              f"{args.output_len} output tokens each, streamed; engine flags {' '.join(engine_args)}")  # fmt: skip
        asyncio.run(run_rate(args.base_url, model, prompts[:4], 4, float("inf"), args.seed))  # warm-up
        results = {}
        for rate in rates:
            cpu0, mine = cpu_seconds(proc.pid) if proc else None, time.process_time()
            runs = asyncio.run(run_rate(args.base_url, model, prompts, args.output_len, rate, args.seed))
            cpu = cpu_seconds(proc.pid) - cpu0 if proc else None
            results[rate] = summarise(runs, cpu, client_cpu_s=time.process_time() - mine)
            print(report(rate, results[rate]), flush=True)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    out = dict(engine_args=engine_args, workload=vars(args), rates={str(k): v for k, v in results.items()})
    if args.offline and proc is not None:
        out["offline"] = off = offline(engine_args, prompts, args.output_len)
        print(f"offline LLM.generate: {off['output_tok_s']:.1f} output tok/s, {off['cpu_s_per_1k']:.2f} CPU s/1k")
        if float("inf") in results:
            ratio = results[float("inf")]["output_tok_s"] / off["output_tok_s"]
            print(f"served (all at once) / offline output tok/s: {ratio:.2f}")
            out["served_over_offline"] = ratio
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(out, indent=1))
    return 0 if all(s["failed"] == 0 for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
