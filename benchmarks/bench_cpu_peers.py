"""CPU peers: nanoserve against transformers (static and continuous batching) and CTranslate2 on a CPU,
the same weights and the same requests, each system in a process of its own.

    python benchmarks/bench_cpu_peers.py                     # the default workloads: tens of minutes on 2 cores
    python benchmarks/bench_cpu_peers.py --models shakespeare --num-prompts 16 --output-len 8 --repeats 1  # seconds
    python benchmarks/bench_cpu_peers.py --systems nanoserve,ct2 --threads 4 --output-json peers.json
    python benchmarks/bench_cpu_peers.py --models shakespeare --systems nanoserve,ct2 --phases  # where the time goes

The models: `shakespeare`, the embedded nanoserve_models/shakespeare (4 layers, 256 wide, trained); `gpt2`, a random
GPT-2 124M (`GPT2LMHeadModel(GPT2Config())`, seed --seed, saved with save_pretrained into a temporary folder,
nothing downloaded); or the path of any Hugging Face GPT-2 folder. The default workloads (--num-prompts,
--input-len and --output-len replace them for every model named):

  shakespeare  256 requests, prompts of 16-64 random token ids, 64 output tokens each
  gpt2         32 and 128 requests, prompts of 32-128 random token ids, 32 output tokens each

Greedy, every output exactly --output-len tokens (EOS neither stops nor is masked). The systems, as a user
after throughput would set them up (the flags below change each setting):

  nanoserve  LLM.generate of all requests at once, --sched sync, max_num_seqs = the request count and a
             16384-token budget (--max-num-batched-tokens): a whole burst of prompts in one step
  ct2        CTranslate2's Generator.generate_batch, float32, intra_threads = --threads, the requests
             sorted by length into batches of 64 (--ct2-max-batch-size): fewer padded positions, and
             fewer prompt tokens left to its one-token-at-a-time constrained decoding
  hf-static  transformers' `generate` on left-padded batches of 64 (--hf-static-batch-size), in workload
             order (bench_e2e.run_hf_static; no end-of-sequence id, so EOS is chosen where it is the greedy
             pick and does not stop the request, as in the others)
  hf-cb      transformers' continuous batching manager, paged attention, nanoserve's token budget
             (bench_e2e.run_hf_cb; no CUDA graphs or async batching on a CPU)

Those defaults are each system's fastest of a few settings, measured on the shakespeare workload (output
tok/s, 2 runs each unless said, a quiet 2-core AMD EPYC): nanoserve sync with 16384 tokens 4,400, with 2048
3,930, async 3,760; ct2 with batches of 64 8,180-9,000 (3 runs), of 128 8,520, all at once 6,770 (1 run
each); hf-static with batches of 64 3,540, of 128 3,360, of 32 3,100, all at once 2,090; hf-cb with 2048 or
16384 tokens alike, within noise (64 requests of 32 tokens).

Every run is a fresh `python` process (so one system's threads and allocator cannot help or hurt the next)
with --threads torch threads, CTranslate2 intra threads and OMP/MKL threads. It loads the model, runs a
short untimed warm-up (--warmup-prompts requests of 4 tokens) and then the workload, timing only the
generation: wall time and the process's CPU time (user + sys of all its threads, `time.process_time`). Each
repeat runs the systems in order and then in reverse (A B C D D C B A). Reported per workload and system:
output tokens/s and CPU seconds per 1,000 output tokens (median ± half the spread over the runs), the peak
resident memory of the process, the share of requests whose tokens equal nanoserve's exactly (the worst
run), and nanoserve / each peer (the two measured in the same pass).

--phases splits nanoserve's and CTranslate2's time into the prefill and the decode steps: before the workload,
each times two runs that stop after one output token, on prompts of their own (as many as the workload's, of
the same lengths: no prefix cache serves one from another). The first is the first big step the process
takes (a cold allocator pays page faults), the second a prefill in a process that has run one; a decode
step is then (workload time - that prefill) / (output length - 1). The workload itself then runs in a
warmer process than without --phases, so compare its tok/s only with other --phases runs.

Run it on a quiet machine. CPU time is no shelter from a neighbour: a thread that waits at an OpenMP barrier
spins, so when another process takes a core the waiting threads burn CPU as well (CTranslate2 measured 10-20x
slower, in wall and CPU time alike, with one of two cores busy elsewhere). So each run also records how
many CPUs the other processes used meanwhile (/proc/stat less this run's own rusage); a run past 0.2 CPUs
is run once more (--retry-disturbed) and a workload that still had one says so in a WARNING line.
"""

import argparse
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SYSTEMS = ("nanoserve", "ct2", "hf-static", "hf-cb")
MODELS = {  # name -> (request counts, prompt lengths, output length); a folder gets the first row's
    "shakespeare": ((256,), (16, 64), 64),
    "gpt2": ((32, 128), (32, 128), 32),
}
PEERS = {"ct2": ("ctranslate2", "transformers"), "hf-static": ("transformers",), "hf-cb": ("transformers",)}
INSTALL = 'pip install -e ".[bench]"'
PHASES = ("nanoserve", "ct2")  # the systems --phases splits into prefill and decode
BUSY_CPUS = 0.2  # other processes' load (in CPUs, over a run) past which the numbers are called disturbed


def token_ids(out) -> list[int]:
    """The generated tokens of one nanoserve output, before and after it takes vLLM's shape."""
    return out.outputs[0].token_ids if hasattr(out, "outputs") else out.output_token_ids


def missing(system: str) -> str | None:
    """Why a system cannot run here (a package it needs is not installed), or None."""
    absent = [m for m in PEERS.get(system, ()) if importlib.util.find_spec(m) is None]
    return f"{' and '.join(absent)} not installed: {INSTALL}" if absent else None


# -----------------------------------------------------------------------------
# one run, in its own process: load, warm up, time the workload


def timed(generate, spec: dict, work: dict, warm: dict) -> dict:
    """Warm up, then time `generate(work)` (wall and CPU seconds). With --phases, first time two runs that
    stop after one output token, each on prompts of its own (as many as the workload's, of the same
    lengths, so that no prefix cache serves one from another): the first big step of the process, and a
    prefill in a process that has run one; then (workload time - that prefill) / (output_len - 1) is a
    decode step."""
    generate(warm)
    phases = {}
    for key, prompts in zip(("first_prefill_s", "prefill_s"), spec.get("phase_prompts") or ()):
        t = time.perf_counter()
        generate(dict(prompts=prompts, output_len=1))
        phases[key] = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    outputs = generate(work)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    if phases and work["output_len"] > 1:
        phases["decode_step_ms"] = 1e3 * (wall - phases["prefill_s"]) / (work["output_len"] - 1)
    return dict(outputs=outputs, wall_s=wall, cpu_s=cpu, **phases)


def run_nanoserve(spec: dict, work: dict, warm: dict) -> dict:
    from bench_e2e import greedy

    import nanoserve as ns

    settings = dict(sched=spec["sched"], max_num_seqs=spec["max_num_seqs"])
    settings["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    llm = ns.LLM(spec["model_dir"], dtype="float32", device="cpu", **settings)

    def generate(w):
        outs = llm.generate(w["prompts"], greedy(w["output_len"]), use_tqdm=False)
        if errors := [o.error for o in outs if o.error]:
            raise RuntimeError(f"{len(errors)} requests failed in nanoserve: {errors[0]}")
        return [list(token_ids(o)) for o in outs]

    r = timed(generate, spec, work, warm)
    settings.update(num_blocks=llm.num_blocks, block_size=llm.config.block_size, attention=llm.config.attention)
    return dict(r, settings=settings)


def run_ct2(spec: dict, work: dict, warm: dict) -> dict:
    import ctranslate2

    opts = dict(compute_type=spec["ct2_compute_type"], intra_threads=spec["threads"], inter_threads=1)
    gen = ctranslate2.Generator(spec["ct2_dir"], device="cpu", **opts)
    batching = dict(max_batch_size=spec["ct2_max_batch_size"], include_prompt_in_result=False)

    def generate(w):  # tokens are the ids written as strings (see convert_ct2); end_token=[]: EOS does not stop
        prompts = [[str(t) for t in p] for p in w["prompts"]]
        res = gen.generate_batch(prompts, max_length=w["output_len"], sampling_topk=1, end_token=[], **batching)
        return [r.sequences_ids[0] for r in res]

    return dict(timed(generate, spec, work, warm), settings={**opts, **batching})


def run_hf(spec: dict, work: dict, warm: dict) -> dict:
    import torch
    from bench_e2e import hf_attention, run_hf_cb, run_hf_static
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(spec["model_dir"]).float().eval()
    cpu = torch.device("cpu")
    # bench_e2e's runners take one max_tokens per request
    as_e2e = lambda w: dict(prompts=w["prompts"], max_tokens=[w["output_len"]] * len(w["prompts"]))
    if spec["system"] == "hf-static":
        size = spec["hf_static_batch_size"] or len(work["prompts"])
        run_hf_static(model, as_e2e(warm), cpu, size)
        return run_hf_static(model, as_e2e(work), cpu, size)
    args = (cpu, hf_attention(cpu, "auto"), False, False, spec["hf_timeout"], spec["max_num_batched_tokens"])
    run_hf_cb(model, as_e2e(warm), *args)
    return run_hf_cb(model, as_e2e(work), *args)


def peak_rss_mib() -> float:
    """This process's peak resident memory since its exec (VmHWM). Not getrusage's ru_maxrss: on Linux that
    carries over from the parent that forked us, which holds a model too."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec_path: str):
    """The --child entry point: one system on one workload; the result goes to the spec's "result" path."""
    spec = json.loads(Path(spec_path).read_text())
    if spec["system"] != "ct2":
        import torch

        torch.set_num_threads(spec["threads"])
    work = dict(prompts=spec["prompts"], output_len=spec["output_len"])
    warm = dict(prompts=spec["warm_prompts"], output_len=spec["warm_output_len"])
    run = {"nanoserve": run_nanoserve, "ct2": run_ct2}.get(spec["system"], run_hf)
    r = run(spec, work, warm)
    r["peak_rss_mib"] = peak_rss_mib()
    keep = ("outputs", "wall_s", "cpu_s", "settings", "notes", "peak_rss_mib", "generated_tokens", "prefill_s")
    keep += ("first_prefill_s", "decode_step_ms")
    Path(spec["result"]).write_text(json.dumps({k: r[k] for k in keep if k in r}))


def machine_cpu_s() -> float:
    """CPU seconds all processes on this machine have used since boot (/proc/stat's first line)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def spawn(spec: dict, folder: Path, timeout: float) -> dict:
    """Run one spec in a fresh interpreter with the thread counts pinned; its result, or its error. Also
    how many CPUs other processes kept busy meanwhile: a neighbour's load slows every system, some more."""
    path, spec["result"] = folder / "spec.json", str(folder / "result.json")
    Path(spec["result"]).unlink(missing_ok=True)
    path.write_text(json.dumps(spec))
    n = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path)]
    t, machine, ours = time.perf_counter(), machine_cpu_s(), children_cpu_s()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s (--run-timeout)")
    others = (machine_cpu_s() - machine - (children_cpu_s() - ours)) / (time.perf_counter() - t)
    if p.returncode != 0 or not Path(spec["result"]).exists():
        lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
        return dict(error=f"exit code {p.returncode}: " + (lines[-1] if lines else "no output")[:400])
    return {**json.loads(Path(spec["result"]).read_text()), "others_cpus": max(0.0, others)}


# -----------------------------------------------------------------------------
# the models: folders every system reads, and their CTranslate2 conversions


def random_gpt2(folder: Path, seed: int) -> Path:
    """A random GPT-2 124M, saved as any Hugging Face GPT-2 folder is (safetensors)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config()).eval().save_pretrained(folder, safe_serialization=True)
    return folder


class IdVocabulary:
    """What CTranslate2's converter reads from a tokenizer, with every token id written as its own string:
    the prompts go in and the outputs come out as ids (`sequences_ids`), no tokenizer involved."""

    def __init__(self, config):
        self.vocab = {str(i): i for i in range(config.vocab_size)}
        self.bos_token, self.eos_token = str(config.bos_token_id), str(config.eos_token_id)
        self.unk_token = self.eos_token  # GPT-2 has no unknown token; every id is in the vocabulary

    def get_vocab(self) -> dict:
        return self.vocab


def convert_ct2(model_dir: Path, out: Path) -> Path:
    """The folder in CTranslate2's format, float32, with the id vocabulary above."""
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoConfig

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return IdVocabulary(AutoConfig.from_pretrained(model_name_or_path))

    Converter(str(model_dir)).convert(str(out), quantization="float32", force=True)
    return out


def prepare_model(name: str, tmp: Path, seed: int, with_ct2: bool, index: int) -> dict:
    if name == "gpt2":
        if missing("hf-static"):
            raise SystemExit(f"--models gpt2: the random GPT-2 is made with transformers, {missing('hf-static')}")
        folder = random_gpt2(tmp / "gpt2", seed)
    else:
        folder = ROOT / "nanoserve_models" / "shakespeare" if name == "shakespeare" else Path(name)
        if not (folder / "config.json").exists():
            raise SystemExit(f"--models {name}: not shakespeare, gpt2 or a Hugging Face model folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    ct2_dir = convert_ct2(folder, tmp / f"ct2-{index}") if with_ct2 else None
    return dict(name=name, dir=folder, ct2_dir=ct2_dir, config=config)


# -----------------------------------------------------------------------------
# the runs and the report


def random_prompts(n: int, lengths: tuple[int, int], vocab_size: int, seed: int) -> list[list[int]]:
    """n prompts of random token ids, their lengths uniform in [lengths[0], lengths[1]]."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def length_range(text: str) -> tuple[int, int]:
    """--input-len: '32:128' -> (32, 128); '64' -> (64, 64)."""
    lo, _, hi = text.partition(":")
    try:
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length or a MIN:MAX range, e.g. 32:128") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def workloads(args, model: dict) -> list[dict]:
    """The workloads of one model: its defaults, with the length and count flags over them."""
    counts, in_len, out_len = MODELS.get(model["name"], next(iter(MODELS.values())))
    counts, in_len, out_len = args.num_prompts or counts, args.input_len or in_len, args.output_len or out_len
    cfg = model["config"]
    if in_len[1] + out_len > cfg["n_positions"]:
        raise SystemExit(f"{model['name']}: prompts up to {in_len[1]} + {out_len} output tokens exceed its context")
    short = model["name"] if model["name"] in MODELS else Path(model["name"]).name
    result = []
    for n in counts:
        desc = dict(requests=n, input_len=list(in_len), output_len=out_len, seed=args.seed, model=str(model["dir"]))
        desc.update(vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"], n_embd=cfg["n_embd"])
        prompts = random_prompts(n, in_len, cfg["vocab_size"], args.seed)
        warm = random_prompts(args.warmup_prompts, in_len, cfg["vocab_size"], args.seed + 1)
        # other prompts than the workload's: a prefix cache must not serve the workload from them
        phase = [random_prompts(n, in_len, cfg["vocab_size"], args.seed + k) for k in (2, 3)] if args.phases else None
        w = dict(name=f"{short} x{n}", desc=desc, model=model, prompts=prompts, warm_prompts=warm, phase_prompts=phase)
        result.append(w)
    return result


def run_spec(args, w: dict, system: str) -> dict:
    n = len(w["prompts"])
    return dict(
        system=system,
        model_dir=str(w["model"]["dir"]),
        ct2_dir=str(w["model"]["ct2_dir"]),
        prompts=w["prompts"],
        output_len=w["desc"]["output_len"],
        warm_prompts=w["warm_prompts"],
        warm_output_len=4,
        phase_prompts=w["phase_prompts"] if system in PHASES else None,
        threads=args.threads,
        sched=args.sched,
        max_num_seqs=args.max_num_seqs or n,
        max_num_batched_tokens=args.max_num_batched_tokens,
        ct2_max_batch_size=args.ct2_max_batch_size,
        ct2_compute_type="float32",
        hf_static_batch_size=args.hf_static_batch_size,
        hf_timeout=args.run_timeout,
    )


def measure(args, w: dict, systems: list[str], tmp: Path) -> dict:
    """Every system's runs on one workload: `repeats` times in order and reversed."""
    from bench_e2e import agreement

    runs = {s: [] for s in systems}
    passes = [systems if i % 2 == 0 else systems[::-1] for i in range(2 * args.repeats)]
    want = len(w["prompts"]) * w["desc"]["output_len"]

    def run(i, s):
        r = spawn(run_spec(args, w, s), tmp, args.run_timeout)
        if "outputs" in r:
            got = sum(map(len, r["outputs"]))
            if got != want:
                r["error"] = f"{got} output tokens, not {want}"
            r.update(output_tokens=got, tok_s=got / r["wall_s"], cpu_s_per_1k=1e3 * r["cpu_s"] / got)
        return {"pass": i, **r}

    for i, order in enumerate(passes):
        for s in order:
            label = f"  {w['name']}  pass {i + 1}/{len(passes)}  {s:<10}"
            r = run(i, s)
            for k in range(args.retry_disturbed):  # a neighbour's load in the middle of a run: run it again
                if r.get("others_cpus", 0) <= BUSY_CPUS:
                    break
                print(f"{label}disturbed, once more: {one_line(r)}", flush=True)
                r = {**run(i, s), "disturbed_runs_before": k + 1}
            runs[s].append(r)
            print(f"{label}{one_line(r)}", flush=True)
    ref_name = next((s for s in systems if any("outputs" in r for r in runs[s])), None)
    ref = next((r["outputs"] for r in runs.get(ref_name, []) if "outputs" in r), None)
    for rs in runs.values():
        for r in rs:
            if "outputs" in r:
                r["agreement"] = agreement(r.pop("outputs"), ref)
    return dict(reference=ref_name, runs=runs, summary=summarize(runs, ref_name))


def one_line(r: dict) -> str:
    if r.get("error"):
        return f"FAILED: {r['error']}"
    tokens = f"{r['tok_s']:9.1f} output tok/s, {r['cpu_s_per_1k']:.3f} CPU s per 1k tokens"
    return f"{tokens}; other processes {r['others_cpus']:.2f} CPUs"


def summarize(runs: dict, ref: str | None) -> dict:
    """Per system: medians and spreads over its good runs; nanoserve (the reference) / it, pass by pass."""
    from bench_host import median_spread

    out = {}
    good = {s: {r["pass"]: r for r in rs if "tok_s" in r and not r.get("error")} for s, rs in runs.items()}
    for s, rs in runs.items():
        ok = list(good[s].values())
        errors = [r["error"] for r in rs if r.get("error")]
        out[s] = dict(runs=len(rs), failed=len(errors), error=errors[0] if errors else None)
        if not ok:
            continue
        out[s].update(settings=ok[0]["settings"], notes=ok[0].get("notes", []))
        for key in ("tok_s", "cpu_s_per_1k", "first_prefill_s", "prefill_s", "decode_step_ms"):
            if all(key in r for r in ok):
                out[s][key], out[s][key + "_spread"] = median_spread([r[key] for r in ok])
        out[s]["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in ok)
        out[s]["others_cpus_max"] = max(r["others_cpus"] for r in ok)
        for key in ("same_tokens", "same_first_token"):  # the worst run: a difference shows
            out[s][key] = min(r["agreement"][key] for r in ok)
        pairs = [(good[ref][i], r) for i, r in good[s].items() if ref in good and i in good[ref]]
        if s != ref and pairs:
            out[s]["ratio_tok_s"] = median_spread([a["tok_s"] / b["tok_s"] for a, b in pairs])
            out[s]["ratio_cpu_per_token"] = median_spread([a["cpu_s_per_1k"] / b["cpu_s_per_1k"] for a, b in pairs])
            out[s]["pairs"] = len(pairs)
            for key in ("first_prefill_s", "prefill_s", "decode_step_ms"):
                if key in out[s] and key in out[ref]:
                    out[s]["ratio_" + key] = median_spread([a[key] / b[key] for a, b in pairs])
    return out


def environment(threads: int) -> dict:
    """The machine and every version a reader needs to reproduce the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    from bench_e2e import cpu_name

    env = dict(cpu=cpu_name(), cpus=len(os.sched_getaffinity(0)), threads=threads, python=platform.python_version())
    env["torch"] = torch.__version__
    for package in ("transformers", "ctranslate2"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    return env


def print_workload(w: dict, result: dict, skipped: dict):
    d, ref = w["desc"], result["reference"]
    print(
        f"\n{w['name']}: {d['model']} ({d['n_layer']} layers, {d['n_embd']} wide, vocabulary {d['vocab_size']}), "
        f"{d['requests']} requests, prompts {d['input_len'][0]}-{d['input_len'][1]} tokens, "
        f"output {d['output_len']} tokens (seed {d['seed']}), greedy, EOS ignored"
    )
    print(f"{'system':<11}{'output tok/s':>19}{'CPU s/1k tok':>18}{'peak RSS':>11}  {'same tokens as ' + str(ref):<28}")
    for s, r in result["summary"].items():
        if "tok_s" not in r:
            print(f"{s:<11}{'-':>19}{'-':>18}{'-':>11}  FAILED in all {r['runs']} runs: {r['error']}")
            continue
        tok = f"{r['tok_s']:.1f} ± {r['tok_s_spread']:.1f}"
        cpu = f"{r['cpu_s_per_1k']:.3f} ± {r['cpu_s_per_1k_spread']:.3f}"
        agree = f"{100 * r['same_tokens']:.1f}% (first token {100 * r['same_first_token']:.0f}%)"
        agree = "reference" if s == ref and r["same_tokens"] == 1 else agree
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        print(f"{s:<11}{tok:>19}{cpu:>18}{r['peak_rss_mib']:>7.0f} MiB  {agree:<28}{settings}")
        failed = [f"FAILED in {r['failed']} of {r['runs']} runs: {r['error']}"] if r["failed"] else []
        for note in r["notes"] + failed:
            print(f"{'':<11}note: {note}")
        if "prefill_s" in r:
            step = ""
            if "decode_step_ms" in r:
                step = f"; a decode step {r['decode_step_ms']:.1f} ± {r['decode_step_ms_spread']:.1f} ms"
            print(
                f"{'':<11}phases: the first prefill of {d['requests']} prompts {r['first_prefill_s']:.3f} ± "
                f"{r['first_prefill_s_spread']:.3f} s, the next {r['prefill_s']:.3f} ± "
                f"{r['prefill_s_spread']:.3f} s{step}"
            )
    for s, why in skipped.items():
        print(f"{s:<11}{'-':>19}{'-':>18}{'-':>11}  skipped: {why}")
    busy = max((r.get("others_cpus_max", 0) for r in result["summary"].values()), default=0)
    if busy > BUSY_CPUS:
        print(f"WARNING: other processes kept up to {busy:.2f} CPUs busy during these runs; rerun on a quiet machine")
    for s, r in result["summary"].items():
        if "ratio_tok_s" in r:
            (t, t_sd), (c, c_sd) = r["ratio_tok_s"], r["ratio_cpu_per_token"]
            print(
                f"{ref} / {s}: {t:.2f}x output tok/s (± {t_sd:.2f}), {c:.2f}x CPU s per token (± {c_sd:.2f}), "
                f"over {r['pairs']} runs of the same passes"
            )
            parts = [("first_prefill_s", "the first prefill's time"), ("prefill_s", "the next's")]
            parts.append(("decode_step_ms", "a decode step's"))
            if got := [(r["ratio_" + k], what) for k, what in parts if "ratio_" + k in r]:
                print(f"{ref} / {s}: " + ", ".join(f"{x:.2f}x {what} (± {sd:.2f})" for (x, sd), what in got))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="shakespeare, gpt2 (random 124M) or folders")
    p.add_argument("--num-prompts", default=None, help="request counts, comma-separated (default: per model)")
    p.add_argument("--input-len", type=length_range, default=None, help="MIN:MAX prompt tokens (default: per model)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens of every request (default: per model)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="which to run, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="each repeat runs the systems in both orders")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="per system (default: the CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-prompts", type=int, default=8, help="untimed requests of 4 tokens run first")
    p.add_argument("--sched", default="sync", help="nanoserve's scheduler")
    p.add_argument(
        "--phases",
        action="store_true",
        help="nanoserve and ct2: also time the prefill alone (other prompts, one output token), and so a decode step",
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="nanoserve (default: the request count)")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384, help="nanoserve's and hf-cb's step budget")
    p.add_argument("--ct2-max-batch-size", type=int, default=64, help="ct2: requests per batch (0: all)")
    p.add_argument("--hf-static-batch-size", type=int, default=64, help="hf-static: requests per batch (0: all)")
    p.add_argument(
        "--retry-disturbed",
        type=int,
        default=1,
        help=f"run again (this many times at most) a run during which other processes used > {BUSY_CPUS} CPUs",
    )
    p.add_argument("--run-timeout", type=float, default=900, help="seconds one run (one process) may take")
    p.add_argument("--output-json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one spec file
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if bad := set(args.systems) - set(SYSTEMS):
        p.error(f"--systems: unknown {sorted(bad)}; choose from {', '.join(SYSTEMS)}")
    if args.num_prompts:
        try:
            args.num_prompts = tuple(int(n) for n in args.num_prompts.split(","))
        except ValueError:
            p.error(f"--num-prompts {args.num_prompts!r}: request counts, comma-separated, e.g. 32,128")
    if min(args.threads, args.repeats, args.output_len or 1, *(args.num_prompts or [1])) < 1:
        p.error("--threads, --repeats, --output-len and --num-prompts must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    skipped = {s: why for s in args.systems if (why := missing(s))}
    systems = [s for s in args.systems if s not in skipped]
    env = environment(args.threads)
    print(
        f"CPU {env['cpu']}, {env['cpus']} CPUs, {args.threads} thread(s) per system; torch {env['torch']}, "
        f"transformers {env['transformers'] or '-'}, ctranslate2 {env['ctranslate2'] or '-'}; python {env['python']}"
    )
    print(f"each run in its own process; {args.repeats} repeat(s) in both orders; median ± half the spread")
    print("nanoserve / peer: above 1x output tok/s nanoserve is faster, above 1x CPU s per token it spends more")
    for s, why in skipped.items():
        print(f"{s}: skipped, {why}")
    report = dict(env=env, args={k: v for k, v in vars(args).items() if k != "child"}, skipped=skipped, workloads={})
    with tempfile.TemporaryDirectory(prefix="bench_cpu_peers-") as tmp:
        tmp = Path(tmp)
        for i, name in enumerate(args.models.split(",")):
            model = prepare_model(name.strip(), tmp, args.seed, "ct2" in systems, i)
            for w in workloads(args, model):
                result = measure(args, w, systems, tmp)
                report["workloads"][w["name"]] = dict(workload=w["desc"], **result)
                print_workload(w, result, skipped)
                if args.output_json:
                    Path(args.output_json).write_text(json.dumps(report, indent=1, default=str))
    failed = [s for w in report["workloads"].values() for s, r in w["summary"].items() if r["failed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
