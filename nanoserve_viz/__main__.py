"""Replay a step log in the visualizer, or convert it for Perfetto.

python -m nanoserve_viz run.jsonl                        # written by: python nanoserve.py ... --trace run.jsonl
python -m nanoserve_viz run.jsonl --at end               # open at the last step
python -m nanoserve_viz run.jsonl --perfetto run.json    # Chrome/Perfetto traceEvents, for ui.perfetto.dev
python -m nanoserve_viz run.jsonl --screenshot shot.svg --size 120x36 --at end   # no terminal needed
"""

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanoserve_viz.trace import read_jsonl


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r} is not WIDTHxHEIGHT, e.g. 120x36") from None
    return w, h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanoserve_viz", description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a step log (JSONL) written by nanoserve.py --trace FILE.jsonl")
    p.add_argument("--at", default="start", help="start, end or a step number (default: start)")
    p.add_argument("--speed", type=float, default=None, help="replay speed in steps/s (default 20)")
    p.add_argument("--paused", action="store_true", help="open paused")
    p.add_argument("--perfetto", metavar="OUT.json", help="write a Chrome/Perfetto trace and exit")
    p.add_argument("--screenshot", metavar="OUT.svg", help="render one frame to an SVG file and exit")
    p.add_argument("--size", type=parse_size, default=(120, 36), help="terminal size for --screenshot")
    p.add_argument("--theme", default=None, help="a Textual theme, e.g. textual-light")
    args = p.parse_args(argv)
    try:
        events = read_jsonl(args.trace)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not events:
        print(f"error: {args.trace} holds no events; write one with nanoserve.py --trace FILE.jsonl", file=sys.stderr)
        return 2
    if args.perfetto:
        from nanoserve_viz.perfetto import write_perfetto

        write_perfetto(events, args.perfetto)
        print(f"wrote {args.perfetto}: open it at https://ui.perfetto.dev")
        return 0
    if args.at not in ("start", "end") and not args.at.isdigit():
        print(f"error: --at {args.at!r} is not start, end or a step number", file=sys.stderr)
        return 2

    from nanoserve_viz.app import VizApp

    app = VizApp(
        events=events,
        name=Path(args.trace).name,
        speed=args.speed,
        paused=args.paused or bool(args.screenshot),
        at=args.at,
    )
    if args.theme:
        app.theme = args.theme
    if args.screenshot:
        svg = render_svg(app, args.size)
        Path(args.screenshot).write_text(svg)
        print(f"wrote {args.screenshot}")
        return 0
    app.run()
    return app.return_code or 0  # 1 when the app itself failed (Textual has printed why)


def render_svg(app, size: tuple[int, int]) -> str:
    """Run `app` headless at `size` and return one frame as SVG.

    Also from inside a running event loop (a Jupyter cell): the app then runs on a thread of its own,
    since Textual starts an event loop of its own and one thread holds at most one.
    """

    async def shoot(pilot):
        await pilot.pause()
        pilot.app.exit(pilot.app.export_screenshot())

    run = lambda: app.run(headless=True, size=size, auto_pilot=shoot)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with ThreadPoolExecutor(1, thread_name_prefix="render_svg") as pool:
        return pool.submit(run).result()


if __name__ == "__main__":
    sys.exit(main())
