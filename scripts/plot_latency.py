#!/usr/bin/env python3
"""Latency percentile plot of a perf/scenarios.sh results directory.

    scripts/plot_latency.py perf/results/<timestamp> [--out FILE] [--service] [--query]

Reads <dir>/<scenario>-hist/ack.hgrm (and ping.hgrm) for every scenario and
writes <dir>/latency.png: x = percentile on the usual HdrHistogram scale
1/(1-p) (50 %, 90 %, 99 %, 99.9 %, 99.99 % ...), y = latency in ms (log
scale). One solid line per scenario for the ack latency (from the scheduled
send time), a dashed line of the same colour for its ping round trips, and
with --service / --query dotted / dash-dot lines for the ack service time
and the query latency. Histograms with no samples are skipped.

Requires matplotlib (scripts/requirements-perf.txt).
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

ORDER = ["a", "b1", "b100", "c", "d", "e", "f"]
LABEL = {
    "a": "a: 1k clients, Unix",
    "b1": "b1: ramp batch 1",
    "b100": "b100: ramp batch 100",
    "c": "c: 1 KB, closed loop",
    "d": "d: mixed",
    "e": "e: 1k clients, TCP",
    "f": "f: overload",
}
STYLE = {"ack": "-", "ping": "--", "service": ":", "query": "-."}


def read_hgrm(path):
    """[(percentile, value_ms)] from an HdrHistogram percentile table.

    The final row (percentile 1.0) has no finite 1/(1-p); it is kept as the
    max and drawn at the last finite x, one decade further."""
    pts = []
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) < 3 or line.lstrip().startswith(("#", "Value")):
            continue
        try:
            value, pct = float(f[0]), float(f[1])
        except ValueError:
            continue
        pts.append((pct, value))
    return pts


def to_xy(pts):
    xs, ys = [], []
    max_val = None
    for pct, v in pts:
        if pct >= 1.0:
            max_val = v
            continue
        xs.append(1.0 / (1.0 - pct))
        ys.append(max(v, 1e-3))
    if max_val is not None and xs:
        xs.append(xs[-1] * 10 ** 0.25)
        ys.append(max(max_val, 1e-3))
    return xs, ys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--out", type=Path, help="default <dir>/latency.png")
    ap.add_argument("--service", action="store_true", help="also plot the ack service time")
    ap.add_argument("--query", action="store_true", help="also plot the query latency")
    ap.add_argument("--no-ping", action="store_true", help="leave the ping lines out")
    args = ap.parse_args()

    hists = {p.name[:-len("-hist")]: p for p in args.dir.glob("*-hist") if p.is_dir()}
    if not hists:
        print(f"no <scenario>-hist directories in {args.dir}", file=sys.stderr)
        return 1
    names = [n for n in ORDER if n in hists] + sorted(n for n in hists if n not in ORDER)
    kinds = ["ack"] + ([] if args.no_ping else ["ping"]) + (["service"] if args.service else []) \
        + (["query"] if args.query else [])

    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    max_x = 10.0
    drawn = 0
    for i, name in enumerate(names):
        colour = colours[i % len(colours)]
        for kind in kinds:
            f = hists[name] / f"{kind}.hgrm"
            if not f.exists():
                continue
            pts = read_hgrm(f)
            n = sum(1 for _ in pts)
            xs, ys = to_xy(pts)
            if n == 0 or not xs:
                continue
            label = f"{LABEL.get(name, name)} — {kind}"
            ax.plot(xs, ys, STYLE[kind], color=colour, linewidth=1.8 if kind == "ack" else 1.2,
                    label=label)
            max_x = max(max_x, xs[-1])
            drawn += 1
    if not drawn:
        print("no histogram with samples", file=sys.stderr)
        return 1

    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [2, 10, 100, 1000, 10000, 100000, 1000000]
    tick_labels = {2: "50%", 10: "90%", 100: "99%", 1000: "99.9%", 10000: "99.99%",
                   100000: "99.999%", 1000000: "99.9999%"}
    ticks = [t for t in ticks if t <= max_x * 1.01] or [2, 10]
    ax.set_xlim(1, max(max_x * 1.1, 12))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: tick_labels.get(int(round(x)), "")))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(
        lambda y, _: f"{y:g}" if y >= 1 else f"{y:.3g}"))
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", axis="y", alpha=0.15)
    ax.set_xlabel("percentile (last point of each line = max)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(f"codi-monitor latency by percentile — {args.dir.name}\n"
                 "ack: from the scheduled send time (open loop); ping: round trip on its own connection",
                 fontsize=11)
    ax.legend(fontsize=8, loc="lower right", ncol=1 if drawn <= 8 else 2)
    fig.tight_layout()
    out = args.out or args.dir / "latency.png"
    fig.savefig(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
