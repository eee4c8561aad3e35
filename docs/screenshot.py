"""Make the README's screenshot of the visualizer from the app itself: a small run, replayed headless,
exported as SVG by Textual, converted to PNG when cairosvg is installed.

    python docs/screenshot.py                              # the embedded model, writes docs/viz.svg, docs/viz.png
    python docs/screenshot.py --model /path/to/gpt2-folder --sched async --size 120x36

The run: 16 requests (half share a 24-token prefix), chunked prefill, a KV cache small enough to
preempt; the frame shown is about 60% into the run, when every panel has something to say.
"""

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def record_run(model: str, sched: str, load_format: str):
    import torch

    import nanoserve as ns
    from nanoserve_sched import SamplingParams

    torch.set_num_threads(1)
    kw = dict(sched=sched, load_format=load_format, block_size=8, num_gpu_blocks_override=48)
    llm = ns.LLM(model, max_num_seqs=8, max_num_batched_tokens=64, **kw)
    rng = random.Random(0)
    vocab = llm.model_config.vocab_size - 1
    prefix = [rng.randrange(vocab) for _ in range(24)]
    for i in range(16):
        prompt = (prefix if i % 2 else []) + [rng.randrange(vocab) for _ in range(rng.randint(8, 60))]
        llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=rng.randint(12, 48), ignore_eos=True))
    for _ in llm.run():
        pass
    events = llm.recorder.events
    events[0].config["model"] = Path(model).name  # the RunInfo: a name, not this machine's path
    return events


def svg_to_png(svg: str, out: Path, width: int = 1600) -> bool:
    try:
        import cairosvg
    except (ImportError, OSError):
        return False
    # Textual's SVG asks for the Fira Code web font; offline, name a monospace font that is installed
    svg = svg.replace('"Fira Code"', '"DejaVu Sans Mono"').replace(
        "Fira Code, monospace", "DejaVu Sans Mono, monospace"
    )
    cairosvg.svg2png(bytestring=svg.encode(), write_to=str(out), output_width=width)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "nanoserve_models" / "shakespeare"))
    p.add_argument("--load-format", default="auto")
    p.add_argument("--sched", default="sync")
    p.add_argument("--size", default="120x36")
    p.add_argument("--at", type=float, default=0.6, help="where in the run, as a fraction of its steps")
    p.add_argument("--out", default=str(ROOT / "docs" / "viz"), help="path without extension")
    args = p.parse_args()

    from nanoserve_viz.__main__ import parse_size, render_svg
    from nanoserve_viz.app import VizApp

    events = record_run(args.model, args.sched, args.load_format)
    steps = sum(type(e).__name__ == "StepScheduled" for e in events)
    app = VizApp(events=events, name=f"{args.sched} run", paused=True, at=int(args.at * steps))
    svg = render_svg(app, parse_size(args.size))
    Path(args.out + ".svg").write_text(svg)
    print(f"wrote {args.out}.svg")
    if svg_to_png(svg, Path(args.out + ".png")):
        print(f"wrote {args.out}.png")
    else:
        print("no PNG: pip install cairosvg (it needs the cairo library), or convert the SVG with rsvg-convert")


if __name__ == "__main__":
    main()
