#!/usr/bin/env python
"""Convergence experiments: config variants trained side by side with several seeds, and the
report (tables of AP50/AP per evaluation, seconds per iteration, PNG curves) in docs/convergence.md.

    python tools/convergence.py run --spec docs/convergence/face_sample.json --out output/convergence
    python tools/convergence.py run --spec ... --variants plain groups --seeds 1 --parallel 2
    python tools/convergence.py report --spec ... --out output/convergence \
        --markdown docs/convergence/face_sample_tables.md --plot docs/images/convergence_face.png
    python tools/convergence.py ema --spec ... --out output/convergence --variants sample

``ema`` evaluates the final EMA and the final training weights of each finished EMA run (what
the same run gives without the average) and writes OUT/final_weights_ap.json.

``run`` skips runs that already finished (``model_final.pth`` present). ``report`` measures each
variant's seconds per iteration alone (``--speed-iters``, or reads ``--speeds JSON``) for the
wall-clock axis.
"""

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import detr_tools  # noqa: F401  (first: silences Detectron2's import-time jit warning)
from detr_tools.benchmark import cpu_name
from detr_tools.convergence import (
    collect,
    final_weights_ap,
    load_spec,
    markdown_report,
    measure_speed,
    plot_curves,
    pretrain_summary,
    reaching_table,
    run_dir,
    run_experiment,
)

logger = logging.getLogger("convergence")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[convergence] %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("run", "report", "ema"))
    parser.add_argument("--spec", required=True, help="experiment spec (JSON)")
    parser.add_argument("--out", default="output/convergence", help="folder of the runs")
    parser.add_argument("--variants", nargs="*", help="subset of the spec's variants")
    parser.add_argument("--seeds", nargs="*", type=int, help="subset of the spec's seeds")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--baseline", default="plain", help="variant the overheads refer to")
    parser.add_argument("--speeds", help="JSON of variant -> s/iteration (instead of measuring)")
    parser.add_argument("--speed-iters", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--markdown", help="write the tables here")
    parser.add_argument(
        "--reach",
        type=float,
        help="also tabulate the first iteration at which each run reached this value of the "
        "first metric on the first eval set (e.g. 90 for AP50 90)",
    )
    parser.add_argument("--plot", help="PNG of AP50 vs iterations and minutes (first eval set)")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    if args.command == "run":
        run_experiment(spec, args.out, args.variants, args.seeds, args.parallel, args.threads)
        return 0
    if args.command == "ema":
        path = Path(args.out) / "final_weights_ap.json"
        table = json.loads(path.read_text()) if path.exists() else {}
        for variant in args.variants or list(spec["variants"]):
            for seed in args.seeds or spec["seeds"]:
                run = run_dir(args.out, variant, seed)
                if (run / "model_final.pth").exists():
                    table.setdefault(variant, {})[str(seed)] = scores = final_weights_ap(run)
                    logger.info(f"{variant} seed {seed}: {json.dumps(scores)}")
        path.write_text(json.dumps(table, indent=1))
        return 0
    results = collect(spec, args.out)
    if args.variants:
        results = {k: v for k, v in results.items() if k in args.variants}
    if args.speeds:
        with open(args.speeds) as f:
            speeds = json.load(f)
    else:
        speeds = measure_speed(spec, list(results), args.speed_iters, args.baseline)
        with open(f"{args.out}/speeds.json", "w") as f:
            json.dump(speeds, f, indent=1)
    text = markdown_report(spec, results, speeds, args.baseline)
    if args.reach is not None:
        text += "\n" + reaching_table(spec, results, args.reach)
    summary = pretrain_summary(spec, args.out)
    text = (
        f"Made by `python tools/convergence.py {shlex.join(argv or sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, {cpu_name()}, from the runs in "
        f"`{args.out}`.\n\n" + (summary + "\n" if summary else "") + text
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.plot:
        plot_curves(spec, results, speeds, spec["eval_sets"][0], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
