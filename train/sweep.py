"""Hyperparameter sweep: one training run per combination of settings, then a table of their best dev scores.

    python -m train.sweep --out runs/sweep --grid label_smoothing=0,0.1 --grid dropout=0.3,0.5 \\
        -- --data ../shared/data/flickr8k --epochs 12 --augment-views 4

Everything after `--` goes to every run (any `python -m train.train` flag). Each run lives in OUT/<its settings>,
e.g. OUT/dropout=0.3,label_smoothing=0. Runs go one after another (each already uses every core). A finished run
(its checkpoint has all its epochs) is skipped and an interrupted one resumes, so the same command continues a sweep after
a crash. `--table` only prints the table of the runs found in OUT, including runs started by hand there.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path

from train.checkpoint import trainer_state
from train.config import TrainConfig, parse_args, setting_types

# Settings that say where or how a run executes, not what it learns: never shown as a difference between runs.
NOT_SETTINGS = {"out", "threads", "progress", "device", "feature_cache", "data", "images"}


def parse_grid(items: list[str]) -> dict[str, list]:
    """["dropout=0.3,0.5", ...] -> {"dropout": [0.3, 0.5]}, each value of the TrainConfig field's type."""
    types = setting_types()
    grid: dict[str, list] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--grid {item!r}: expected NAME=V1,V2,... e.g. dropout=0.3,0.5")
        if name not in types or name in NOT_SETTINGS:
            raise ValueError(f"--grid {item!r}: {name!r} is not a training setting; see python -m train.train --help")
        kind = types[name]
        parsed = []
        for v in values.split(","):
            v = v.strip()
            try:
                parsed.append({"true": True, "false": False}[v.lower()] if kind is bool else kind(v))
            except (KeyError, ValueError):
                raise ValueError(f"--grid {item!r}: {v!r} is not a valid {kind.__name__} for {name}") from None
        grid[name] = parsed
    return grid


def combinations(grid: dict[str, list]) -> list[dict]:
    names = sorted(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))] or [{}]


def run_name(overrides: dict) -> str:
    """The run's folder name: its settings, with any path (e.g. init=runs/xe/best) kept to one folder level."""
    text = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(overrides.items()))
    return text.replace("/", "_").replace("\\", "_") or "base"


def flags(overrides: dict) -> list[str]:
    argv = []
    for k, v in overrides.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag if v else "--no-" + k.replace("_", "-")] if isinstance(v, bool) else [flag, str(v)]
    return argv


def finished(run: Path) -> bool:
    state = trainer_state(run)
    cfg = state.get("train_config", {})
    return bool(cfg) and state.get("epoch", 0) >= cfg.get("epochs", 0) + cfg.get("scst_epochs", 0)


def summarize(out: Path) -> list[dict]:
    """One row per run folder under `out` that has logged an epoch: its settings and its best dev epoch."""
    rows = []
    for run in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists()):
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if not history:
            continue
        best = max(history, key=lambda r: r["CIDEr-D"])
        # Settings a run's code did not have yet read as today's defaults.
        settings = {**asdict(TrainConfig()), **trainer_state(run).get("train_config", {})}
        rows.append({"run": run.name, "settings": settings, "epochs": len(history),
                     "best": best, "finished": finished(run), "seconds": sum(r.get("seconds", 0) for r in history)})
    return rows


def format_rows(rows: list[dict]) -> str:
    """Markdown: the settings that differ between the runs, then each run's best epoch by dev CIDEr-D."""
    keys = sorted({k for r in rows for k in r["settings"]} - NOT_SETTINGS)
    differ = [k for k in keys if len({json.dumps(r["settings"].get(k)) for r in rows}) > 1]
    head = ["run", *differ, "best epoch", "BLEU-4", "CIDEr-D", "ROUGE-L", "distinct", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -r["best"]["CIDEr-D"]):
        b = r["best"]
        epoch = f"{b['epoch']} of {r['epochs']}" + ("" if r["finished"] else " (unfinished)")
        cells = [r["run"], *(str(r["settings"].get(k, "")) for k in differ), epoch, f"{b['BLEU-4']:.3f}",
                 f"{b['CIDEr-D']:.3f}", f"{b['ROUGE-L']:.3f}", f"{b['distinct']:.1%}", f"{r['seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep folder: one run folder per combination")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2", help="a setting and its values (repeatable)")
    p.add_argument("--table", action="store_true", help="only print the table of the runs in OUT")
    args = p.parse_args(own)
    out = Path(args.out)
    try:
        grid = parse_grid(args.grid)
        if "--out" in common or "--resume" in common:
            raise ValueError("--out and --resume belong to the sweep, not after `--`")
        if not args.table:
            out.mkdir(parents=True, exist_ok=True)
            combos = combinations(grid)
            for i, overrides in enumerate(combos, 1):
                run = out / run_name(overrides)
                if finished(run):
                    print(f"[{i}/{len(combos)}] {run.name}: finished earlier, skipped", file=sys.stderr)
                    continue
                resume = (run / "checkpoint").exists() or (run / "checkpoint.old").exists()
                print(f"[{i}/{len(combos)}] {run.name}{' (resuming)' if resume else ''}", file=sys.stderr)
                cfg, resume = parse_args([*common, *flags(overrides), "--out", str(run), *(["--resume"] if resume else [])])
                from train.train import train  # the loop, only where a run trains

                if train(cfg, resume=resume).get("interrupted"):
                    print("interrupted: run the same command again to continue the sweep", file=sys.stderr)
                    return 130
        if not out.is_dir():
            raise FileNotFoundError(f"{out} does not exist: nothing to summarise")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = summarize(out)
    print(format_rows(rows) if rows else f"no runs with a logged epoch in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
