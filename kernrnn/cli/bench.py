"""``kernrnn bench``: CPU speed against PyTorch, side by side (see :mod:`kernrnn.bench.cpu`)."""

from __future__ import annotations

import shlex
import sys


def _sizes(text: str):
    sizes = []
    for part in text.split(";") if ";" in text else text.split(" "):
        part = part.strip()
        if not part:
            continue
        vals = part.replace("x", ",").split(",")
        if len(vals) != 4 or not all(v.strip().isdigit() and int(v) > 0 for v in vals):
            raise ValueError(
                f"--sizes: each size must be B,T,I,H (four positive ints), got {part!r}")
        sizes.append(tuple(int(v) for v in vals))
    if not sizes:
        raise ValueError("--sizes: give at least one size B,T,I,H")
    return sizes


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="CPU speed: kernrnn vs PyTorch (float32), start-up time",
        description="Time kernrnn's CPU kernels and PyTorch (when installed) in one process, "
                    "interleaved; print medians, ratios, GFLOP/s and the fraction of a float32 "
                    "GEMM's rate measured in the same run.")
    p.add_argument("--cells", default="rnn,lstm,gru", help="comma-separated cell names")
    p.add_argument("--sizes", default=None,
                   help="sizes B,T,I,H separated by spaces or ';' "
                        "(default: 32,100,64,128 64,100,256,256 64,100,512,512 and the "
                        "small-batch grid B=1,8,16,32 at T=100, I=H=256)")
    p.add_argument("--no-small-batch", action="store_true",
                   help="leave the small-batch grid out of the default sizes")
    p.add_argument("--loop-cells", default="",
                   help="comma-separated cells also trained against the same cell written as "
                        "a PyTorch loop, eager and torch.compile'd (e.g. cifg; needs its plugin)")
    p.add_argument("--modes", default="forward,train", help="forward, train or both")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=2, help="threads for every pool")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall seconds (default) or the process's CPU seconds (with --threads 1: "
                        "per-core cost, robust on a shared machine)")
    p.add_argument("--settle", type=float, default=None, metavar="SECONDS",
                   help="pause after every timed call and reference GEMM, so no thread "
                        "pool is still spinning when the next one starts (default 0.15; "
                        "0: rounds 1 and 2's method)")
    p.add_argument("--no-torch", action="store_true", help="time kernrnn only")
    p.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    p.add_argument("--startup-only", action="store_true", help="only measure start-up")
    p.add_argument("--startup", action="store_true",
                   help="instead of comparing, show where a cell's first seconds go: phases "
                        "and every Numba compilation of its first training step and first "
                        "inference forward, in fresh processes with an empty kernel cache, as "
                        "a new (edited) cell, and warm (per cell, the first size; --json "
                        "writes the raw records)")
    p.add_argument("--markdown", metavar="FILE", help="also write a markdown report to FILE")
    p.add_argument("--note", default="", help="a line added to the markdown report")
    p.add_argument("--json", metavar="FILE", help="also write the raw timings as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw the time ratios as a bar chart")
    p.add_argument("--timeline", action="store_true",
                   help="instead of comparing, show where one kernrnn call's time goes: "
                        "timestamps of its parts (kernels per thread, GEMMs, set-up) for the "
                        "median of --repeats calls, per cell, size and mode")
    p.set_defaults(func=run)


def run(args) -> int:
    from kernrnn.backends.cpu import tiers
    from kernrnn.bench import cpu as bench

    tiers.set_enabled(False)  # every timed call runs the kernels, never the NumPy first tier
    from kernrnn.plugins import get_registry

    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    known = get_registry().names()
    for c in cells:
        if c not in known:
            raise ValueError(f"--cells: expected registered cells ({', '.join(known)}), "
                             f"got {c!r}")
    loop_cells = [c.strip() for c in args.loop_cells.split(",") if c.strip()]
    for c in loop_cells:
        if c not in bench.LOOP_CELLS or c not in known:
            raise ValueError(f"--loop-cells: expected registered cells with a PyTorch loop "
                             f"({', '.join(sorted(bench.LOOP_CELLS))}), got {c!r}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in bench.MODES:
            raise ValueError(f"--modes: expected forward and/or train, got {m!r}")
    sizes = _sizes(args.sizes) if args.sizes else \
        list(bench.SIZES) + ([] if args.no_small_batch else list(bench.SMALL_BATCH_SIZES))
    for name in ("repeats", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.settle is not None:
        if not 0 <= args.settle <= 10:
            raise ValueError(f"--settle must be between 0 and 10 seconds, got {args.settle}")
        bench.SETTLE_S = args.settle

    print(f"machine: {bench.machine()}; threads: {args.threads}", flush=True)
    if args.startup:
        import json

        from kernrnn.bench.startup import breakdown, format_breakdown

        size = _sizes(args.sizes)[0] if args.sizes else (32, 100, 64, 128)
        records = []
        for cell in cells:
            records.append(breakdown(cell, size, threads=args.threads))
            print(format_breakdown(records[-1]) + "\n", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
        return 0
    if args.timeline:
        from kernrnn.bench.timeline import format_timeline, step_timeline

        for cell in cells:
            for B, T, I, H in sizes:
                for mode in modes:
                    events = step_timeline(cell, B, T, I, H, mode, steps=args.repeats,
                                           warmup=args.warmup, threads=args.threads)
                    print(f"\n{cell} {B},{T},{I},{H} {mode} (median of {args.repeats} calls):")
                    print(format_timeline(events))
        return 0
    command = "kernrnn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith("kernrnn") else "kernrnn bench"
    cases = []
    if not args.startup_only:
        def progress(case):
            tail = "" if case.ratio is None else f", ratio {case.ratio:.2f} ({case.anchor})"
            print(f"  {case.cell} {case.B},{case.T},{case.I},{case.H} {case.mode}: kernrnn "
                  f"{case.kern_s * 1e3:.2f} ms{tail}", file=sys.stderr, flush=True)

        cases = bench.run_cases(cells, sizes, modes, repeats=args.repeats, warmup=args.warmup,
                                threads=args.threads, use_torch=not args.no_torch,
                                progress=progress, clock=args.clock)
        if loop_cells and not args.no_torch:
            cases += bench.run_loop_cases(loop_cells, sizes, repeats=args.repeats,
                                          warmup=args.warmup, threads=args.threads,
                                          progress=progress, clock=args.clock)
        if not any(c.torch for c in cases) and not args.no_torch:
            print("PyTorch is not installed: kernrnn times only "
                  "(pip install torch for the comparison)")
        print(bench.format_table(cases))
    startup = None
    if not args.no_startup:
        startup = bench.measure_startup(cells[0] if len(cells) == 1 else "lstm", sizes[0],
                                        threads=args.threads)
        print(bench.format_startup(startup))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(bench.markdown_report(cases, startup, command, args.threads, args.repeats,
                                          args.note, args.clock))
        print(f"wrote {args.markdown}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(bench.to_json(cases, startup))
    if args.plot:
        bench.plot_ratios(cases, args.plot, title=f"kernrnn / PyTorch time, float32, "
                          f"{args.threads} threads, {bench.machine()} (lower is better)")
        print(f"wrote {args.plot}")
    return 0
