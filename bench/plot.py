"""Added latency (relayed − direct, p50 and p99) against concurrent callers, one line pair per server.

    .venv/bin/python -m bench.plot bench/results/full.json [more.json ...] --out bench/results/added-latency.png

Several JSON files may be given (e.g. the app and an experiment); each configuration is labelled with
the run's label, the server and whether the callers offered permessage-deflate. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def series(
    report: dict,
) -> list[tuple[str, list[int], list[float], list[float], list[bool], list[bool]]]:
    out = []
    for cfg in report["configs"]:
        rows = [r for r in cfg["rows"] if r["added_ms"]["p99"] is not None]
        if not rows:
            continue
        label = f"{cfg['server']}, callers {'offer' if cfg['client_deflate'] else 'refuse'} deflate"
        if not cfg.get("negotiated"):
            label += " (none negotiated)"
        if report.get("frame_ms", 20) != 20:
            label += f", {report['frame_ms']:g} ms frames"
        if report.get("label"):
            label = f"{report['label']}: {label}"
        out.append(
            (
                label,
                [r["n"] for r in rows],
                [max(r["added_ms"]["p50"], 0.05) for r in rows],
                [max(r["added_ms"]["p99"], 0.05) for r in rows],
                [bool(r.get("meets_target")) for r in rows],
                # the harness strained or other processes busy: the point measures more than the relay
                [
                    not r.get("generator_ok", True) or (r.get("foreign_cpu_percent") or 0) > 30
                    for r in rows
                ],
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("json", nargs="+")
    p.add_argument("--out", default="bench/results/added-latency.png")
    p.add_argument("--title", default="Relay added latency per chunk (relayed − direct)")
    p.add_argument("--match", default="", help="only series whose label matches this regex")
    args = p.parse_args(argv)
    fig, ax = plt.subplots(figsize=(14, 6.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    i = 0
    for path in args.json:
        report = json.loads(Path(path).read_text())
        for label, n, p50, p99, ok, doubtful in series(report):
            if args.match and not re.search(args.match, label):
                continue
            c = colours[i % len(colours)]
            i += 1
            ax.plot(n, p99, "-o", color=c, label=f"{label} — p99")
            ax.plot(n, p50, "--", marker=".", color=c, alpha=0.7, label=f"{label} — p50")
            for x, y, good, bad_round in zip(n, p99, ok, doubtful, strict=True):
                if not good:
                    ax.plot([x], [y], "x", color="black", markersize=9)
                if bad_round:
                    ax.plot(
                        [x], [y], "o", markerfacecolor="none", markeredgecolor="grey", markersize=14
                    )
    ax.axhline(
        20, color="red", linewidth=1, linestyle=":", label="target p99 < 20 ms (≥ 200 callers)"
    )
    ax.axhline(10, color="orange", linewidth=1, linestyle=":", label="target p99 ≤ 10 ms at 50")
    ax.axhline(2, color="green", linewidth=1, linestyle=":", label="target p50 ≤ 2 ms at 50")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent callers (N), one service process")
    ax.set_ylabel("added latency, ms (log)")
    ax.set_title(
        args.title + "\n× = misses the target (p99 ≥ 20 ms, or chunks lost/reordered); "
        "grey ring = harness strained or machine busy (doubtful point)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
