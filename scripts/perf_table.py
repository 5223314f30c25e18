#!/usr/bin/env python3
"""Markdown table of a perf/scenarios.sh results directory.

    scripts/perf_table.py perf/results/<timestamp>

Reads every top-level <scenario>.json written by `codi-loadgen run --json`
(a, b1, b100, c, d, e, f) and prints one row per scenario. The ramp steps of
scenario b (b-steps/*.json) get a second table, and the RSS samples of
scenario f (f-rss.csv) a one-line summary.

For b1/b100 the daemon/ceiling ratio comes from the separate
`codi-loadgen ceiling` run right after the ramp (<tag>-ceiling.json), marked
with "(sep.)"; elsewhere it is the loadgen's own `daemon_over_ceiling`.
"""
import csv
import json
import re
import sys
from pathlib import Path

SCENARIO_ORDER = ["a", "b1", "b100", "c", "d", "e", "f"]
DESCRIPTION = {
    "a": "1,000 clients, LogEntry, Unix",
    "b1": "ramp, batch 1 (last held)",
    "b100": "ramp, batch 100 (last held)",
    "c": "1 KB, batch 100, closed loop",
    "d": "mixed: queries, idle, pings",
    "e": "1,000 clients, LogEntry, TCP",
    "f": "overload, batch 100, window 64",
}


def ms(us):
    if us is None:
        return "–"
    v = us / 1000.0
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def num(x, fmt="{:,.0f}"):
    return "–" if x is None else fmt.format(x)


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"warning: cannot read {path}: {e}", file=sys.stderr)
        return None


def is_run(j):
    return isinstance(j, dict) and "latency" in j and "config" in j


def offered(j):
    c = j["config"]
    if not c.get("rate"):
        return "closed loop"
    return f"{c['rate']:,.0f}"


def ratio(j, tag, d):
    r = j.get("daemon_over_ceiling")
    if r is not None:
        return f"{r:.3f}"
    cj = d / f"{tag}-ceiling.json"
    if cj.exists():
        c = load(cj)
        if c and c.get("rows_per_s") and j.get("throughput_logs_per_s") is not None:
            return f"{j['throughput_logs_per_s'] / c['rows_per_s']:.3f} (sep.)"
    return "–"


HEADER = ("| scenario | offered logs/s | acked logs/s | MB/s | ack p50 ms | ack p99 ms "
          "| ack p99.9 ms | ack max ms | ping p99 ms | daemon CPU % | loadgen CPU % "
          "| daemon peak RSS MiB | daemon/ceiling | stored==acked |")
SEP = "|" + "---|" * HEADER.count("|")[:-1] if False else "|" + "|".join(["---"] * (HEADER.count("|") - 1)) + "|"


def row(label, j, tag, d):
    ack = j["latency"]["ack"]
    ping = j["latency"].get("ping") or {}
    rss = (j.get("daemon") or {}).get("peak_rss_kib")
    ok = j.get("stored_equals_acked")
    c = j.get("counts") or {}
    stored, acked, unanswered = j.get("stored"), c.get("entries_accepted"), c.get("entries_unanswered") or 0
    if ok:
        verdict = "yes"
    elif ok is False and stored is not None and acked is not None and acked < stored <= acked + unanswered:
        verdict = f"stored > acked by {stored - acked:,} (≤ {unanswered:,} unanswered at drain end)"
    elif ok is False:
        verdict = f"**NO** (stored {stored}, acked {acked})"
    else:
        verdict = "–"
    return "| " + " | ".join([
        label,
        offered(j),
        num(j.get("throughput_logs_per_s")),
        num(j.get("payload_mb_per_s"), "{:.2f}"),
        ms(ack.get("p50_us")),
        ms(ack.get("p99_us")),
        ms(ack.get("p999_us")),
        ms(ack.get("max_us")),
        ms(ping.get("p99_us")) if ping.get("count") else "–",
        num((j.get("daemon") or {}).get("cpu_percent"), "{:.0f}"),
        num((j.get("loadgen") or {}).get("cpu_percent"), "{:.0f}"),
        "–" if rss is None else f"{rss / 1024:.1f}",
        ratio(j, tag, d),
        verdict,
    ]) + " |"


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    d = Path(sys.argv[1])
    runs = {}
    for p in sorted(d.glob("*.json")):
        j = load(p)
        if is_run(j):
            runs[p.stem] = j
    if not runs:
        print(f"no loadgen JSON in {d}", file=sys.stderr)
        return 1
    order = [s for s in SCENARIO_ORDER if s in runs] + sorted(s for s in runs if s not in SCENARIO_ORDER)

    machine = d / "machine.txt"
    if machine.exists():
        lines = machine.read_text().splitlines()
        keep = [l for l in lines if re.match(r"(date|nproc|cpu|uptime|commit|duration):", l)]
        print("\n".join(f"    {l}" for l in keep))
        print()

    print(HEADER)
    print(SEP)
    for s in order:
        j = runs[s]
        label = f"{s}: {DESCRIPTION[s]}" if s in DESCRIPTION else s
        c = j["config"]
        extra = f" ({c.get('clients')} cl, batch {c.get('batch')}, {c.get('duration_s'):g} s, {c.get('transport')})"
        print(row(label + extra, j, s, d))

    steps = d / "b-steps"
    if steps.is_dir():
        ramp = load(d / "b-ramp.json") if (d / "b-ramp.json").exists() else {}
        print()
        print("Ramp (scenario b): a step holds while ack p99 <= 1 s and acked >= 90 % of offered.")
        for k, v in (ramp or {}).items():
            h = v.get("held_rate")
            print(f"- {k}: last rate that held {num(h) if h is not None else 'none'} logs/s "
                  f"(stopped at {v.get('stopped_at')}; steps of {v.get('step_s')} s)")
        print()
        print(HEADER.replace("| scenario |", "| step |"))
        print(SEP)
        def key(p):
            m = re.match(r"batch(\d+)-r(\d+)$", p.stem)
            return (int(m.group(1)), int(m.group(2))) if m else (1 << 30, 0)
        for p in sorted(steps.glob("*.json"), key=key):
            j = load(p)
            if is_run(j):
                print(row(p.stem, j, p.stem, steps))

    csvp = d / "f-rss.csv"
    if csvp.exists():
        rows = list(csv.DictReader(csvp.open()))
        if rows:
            r = [int(x["vmrss_kib"]) / 1024 for x in rows]
            half = r[len(r) // 2:]
            print()
            print(f"Scenario f daemon RSS ({len(r)} samples, 1/s, f-rss.csv): first {r[0]:.1f} MiB, "
                  f"max {max(r):.1f} MiB, last {r[-1]:.1f} MiB; second half {min(half):.1f}-{max(half):.1f} MiB.")

    status = d / "status.txt"
    if status.exists():
        bad = [l for l in status.read_text().splitlines()
               if re.search(r"exit=(?!0\b)\d+", l)]
        if bad:
            print()
            print("Non-zero exits: " + "; ".join(bad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
