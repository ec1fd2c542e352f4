"""``python -m fusionlab.report <sweep or run dirs...> [--out DIR] [--metric NAME] [--wandb]``."""
from __future__ import annotations

import argparse
import sys

from fusionlab.errors import FusionlabError


def _pair(text: str) -> tuple[str, str]:
    x, sep, y = text.partition(",")
    if not sep or not x or not y:
        raise argparse.ArgumentTypeError(f"--heatmap {text!r}: write two override keys as X,Y "
                                         "(e.g. ensemble.topk,ensemble.drop)")
    return x.strip(), y.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusionlab.report", description=
                                "Tabulate every metrics.json below the given dirs, with the runs' Hydra overrides "
                                "as columns; write report.md, report.csv and plots.")
    p.add_argument("dirs", nargs="+", help="run dirs, multirun sweep dirs, or any dir above them")
    p.add_argument("--out", default=None, help="output dir (default: <dir>/report for one dir, ./report for several)")
    p.add_argument("--metric", default=None, help="metric for the heatmaps (default: the sweep's objective, "
                                                  "else accuracy)")
    p.add_argument("--heatmap", type=_pair, action="append", default=None, metavar="X,Y",
                   help="override keys for a heatmap (repeatable; default: ensemble.topk,ensemble.drop and "
                        "distill.lam,distill.temperature when swept)")
    p.add_argument("--wandb", action="store_true", help="also log the table and plots as one W&B run")
    p.add_argument("--wandb-project", default="fusionlab")
    p.add_argument("--wandb-mode", default=None, choices=["online", "offline"],
                   help="default: online if WANDB_API_KEY is set, else offline")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fusionlab.report import build_report, push_to_wandb, sweep_group

    try:
        report = build_report(args.dirs, args.out, metric=args.metric, heatmaps=args.heatmap)
        run_id = None
        if args.wandb:
            run_id = push_to_wandb(report, project=args.wandb_project, mode=args.wandb_mode,
                                   group=sweep_group(report))
    except FusionlabError as err:
        print(f"fusionlab.report: error: {err}", file=sys.stderr)
        return 2
    ok = sum(r.get("status") == "ok" for r in report.rows)
    print(f"{len(report.rows)} runs ({ok} ok) -> {report.out_dir}")
    for name, path in report.files.items():
        print(f"  {name}: {path}")
    if run_id:
        print(f"  wandb run: {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
