# Shared by the A/B scripts in perf/: checks the release binaries and
# writes the machine and run description to $OUT/machine.txt (and stdout).
# Source it after setting ROOT, BIN and OUT; pass the run's parameters.

# perf_preamble "rate=... clients=..."
perf_preamble() {
    mkdir -p "$OUT"
    local b
    for b in codi-monitor codi-loadgen; do
        [[ -x $BIN/$b ]] || { echo "missing $BIN/$b: cargo build --release --bins" >&2; exit 2; }
    done
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "nproc: $(nproc)"
        grep MemTotal /proc/meminfo
        echo "load: $(cat /proc/loadavg)"
        echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "$1"
    } | tee "$OUT/machine.txt"
}
