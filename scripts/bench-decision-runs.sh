#!/usr/bin/env bash
# Times the online decision many times over a stretch of minutes, to see past a shared machine's noise.
#
#   scripts/bench-decision-runs.sh [RUNS] [SLEEP_S] [BINARY]
#
# Each round: `switchyard bench decision --repeat 9 --json` on all cores (its decision median on all threads
# and on one thread), then the one-thread decision pinned to CPU 0 alone, then pinned to CPUs 0 and 1 at once
# (two processes): if the two slow each other, the machine's two CPUs share one core's time. Prints one line per
# round and a summary (min, median, max, runs at or above the 5 ms target). Needs `taskset` and python3.
set -euo pipefail
runs="${1:-40}"
pause="${2:-15}"
bin="${3:-./target/release/switchyard}"
[ -x "$bin" ] || { echo "no switchyard binary at $bin: run 'cargo build --release' first" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset not found (util-linux)" >&2; exit 1; }
log="$(mktemp)"
trap 'rm -f "$log" "$log".*' EXIT
field() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['$1'], 2))"; }
one() { taskset -c "$1" env RAYON_NUM_THREADS=1 "$bin" bench decision --repeat 9 --json | field decision_median_ms; }
for r in $(seq 1 "$runs"); do
    j="$("$bin" bench decision --repeat 9 --json)"
    all="$(field decision_median_ms <<<"$j")"
    single="$(field decision_one_thread_median_ms <<<"$j")"
    alone="$(one 0)"
    one 0 >"$log.0" &
    one 1 >"$log.1"
    wait
    echo "$(date +%H:%M:%S) all-threads $all one-thread $single pinned-alone $alone pinned-together $(cat "$log.0") $(cat "$log.1")" |
        tee -a "$log"
    if [ "$r" -lt "$runs" ]; then sleep "$pause"; fi
done
python3 - "$log" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
cols = {"decision, all threads": [float(r[2]) for r in rows], "decision, one thread": [float(r[4]) for r in rows],
        "one thread pinned, alone": [float(r[6]) for r in rows],
        "one thread pinned, two at once": [float(r[8]) for r in rows] + [float(r[9]) for r in rows]}
for name, v in cols.items():
    over = f", {sum(x >= 5.0 for x in v)} of {len(v)} at or above 5 ms" if name == "decision, all threads" else ""
    print(f"{name}: min {min(v):.2f} median {statistics.median(v):.2f} max {max(v):.2f} ms{over}")
EOF
