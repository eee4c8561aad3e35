"""The host path on its own: how long the engine's CPU work takes per step, and whether it keeps a GPU busy.

    python benchmarks/bench_host.py                     # GPT-2 124M shapes, sync vs async, sim:h100 and sim:h200
    python benchmarks/bench_host.py --repeats 5 --rows 256

The device is simulated (`--device sim:NAME`, nanoserve.SimDevice): each step waits the roofline time
of its real inputs on the named GPU and returns deterministic tokens, so everything timed here is the
engine's own host work — the scheduler, the runner's input preparation, the update, the trace events —
on this machine, against the device time a real GPU would need for the same step. A row prints, per
scheduler, the host milliseconds per step split into schedule / prepare / update (and, inside those,
the time spent recording events), the simulated device's busy share and the output throughput. Every
repeat runs the schedulers in both orders (A B B A); the medians are printed, with the spread.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoserve as ns  # noqa: E402
from nanoserve_entrypoints.cli import random_workload  # noqa: E402
from nanoserve_sched import SamplingParams  # noqa: E402
from nanoserve_viz.trace import Recorder  # noqa: E402

ROWS = {  # name -> (requests, max_num_seqs, input lengths, output lengths)
    "16": (32, 16, (100, 500), (100, 500)),
    "64": (128, 64, (100, 500), (100, 500)),
    "256": (256, 256, (100, 500), (100, 500)),
    "64 long": (64, 64, (800, 900), (100, 120)),
}


class TimedRecorder(Recorder):
    """A Recorder that also adds up the time spent in emit (the cost of the trace events)."""

    def __init__(self):
        super().__init__()
        self.emit_s = 0.0

    def emit(self, event):
        t = time.perf_counter()
        super().emit(event)
        self.emit_s += time.perf_counter() - t


def run(model: str, device: str, sched: str, row: str, seed: int = 0) -> dict:
    n, max_seqs, in_len, out_len = ROWS[row]
    llm = ns.LLM(model, load_format="dummy", device=device, sched=sched, max_num_seqs=max_seqs)
    llm.recorder = llm.scheduler.recorder = llm.runner.recorder = llm.runner.dev.recorder = TimedRecorder()
    work = random_workload(n, in_len, out_len, llm.model_config.vocab_size, seed)
    for d in work:
        llm.add_request(d["prompt_token_ids"], SamplingParams(max_tokens=d["max_tokens"], ignore_eos=True))
    cpu = time.process_time()
    for _ in llm.run():
        pass
    cpu = time.process_time() - cpu
    m = llm.metrics()
    split = m["step_ms"]["all"]
    steps = m["steps"]
    return dict(
        schedule=split["schedule"],
        prepare=split["prepare"],
        update=split["update"],
        events=1e3 * llm.recorder.emit_s / steps,
        host=split["schedule"] + split["prepare"] + split["update"],
        busy=m["device_busy_frac"],
        tok_s=m["output_throughput"],
        cpu_ms_per_step=1e3 * cpu / steps,
        steps=steps,
    )


def median_spread(xs):
    return statistics.median(xs), (max(xs) - min(xs)) / 2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help="a GPT-2 family shape (dummy weights are never built)")
    p.add_argument("--devices", default="sim:h100,sim:h200")
    p.add_argument("--scheds", default="sync,async")
    p.add_argument("--rows", default=",".join(ROWS), help=f"of: {', '.join(ROWS)}")
    p.add_argument("--repeats", type=int, default=3, help="each repeat runs the schedulers in both orders")
    args = p.parse_args(argv)
    scheds = args.scheds.split(",")
    import torch

    print(f"host: {torch.get_num_threads()} torch threads, torch {torch.__version__}; model {args.model} shapes")
    print("device: SIMULATED (roofline time per step of its real inputs, no model run)")
    for device in args.devices.split(","):
        print(f"\n{device}: host ms per step (of which trace events), simulated device busy, output tokens/s")
        head = f"{'batch':>8} {'sched':>6} {'host':>7} {'sched':>7} {'prep':>7} {'update':>7} {'events':>7}"
        print(head + f" {'busy %':>9} {'tok/s':>15} {'steps':>6}")
        for row in args.rows.split(","):
            got = {s: [] for s in scheds}
            for _ in range(args.repeats):
                for s in scheds + scheds[::-1]:  # both orders
                    got[s].append(run(args.model, device, s, row))
            for s in scheds:
                med = {k: statistics.median(r[k] for r in got[s]) for k in got[s][0]}
                busy, busy_sd = median_spread([100 * r["busy"] for r in got[s]])
                tok, tok_sd = median_spread([r["tok_s"] for r in got[s]])
                print(
                    f"{row:>8} {s:>6} {med['host']:7.3f} {med['schedule']:7.3f} {med['prepare']:7.3f} "
                    f"{med['update']:7.3f} {med['events']:7.3f} {busy:6.1f}±{busy_sd:<3.1f} {tok:9.0f}±{tok_sd:<5.0f} "
                    f"{med['steps']:6.0f}"
                )
            if len(scheds) == 2:
                ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(got[scheds[0]], got[scheds[1]])]
                r, sd = median_spread(ratios)
                print(f"{'':>8} {scheds[1]}/{scheds[0]} throughput {r:.2f}x (±{sd:.2f} over {len(ratios)} pairs)")


if __name__ == "__main__":
    main()
