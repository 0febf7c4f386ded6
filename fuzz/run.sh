#!/usr/bin/env bash
# Runs nomoat's fuzz targets with cargo fuzz (libFuzzer) and prints, per
# target, the executions, the time, the new inputs found and the crashes.
#
#   fuzz/run.sh [--runs N] [--seconds S] [--sanitizer none|address] [TARGET...]
#
# Default: every target, 60 seconds each. With --runs, each target stops
# after N executions (or S seconds, whichever comes first; --seconds 0 for
# no time limit). The code is safe
# Rust apart from a few dependencies, so the default sanitizer is none;
# --sanitizer address adds AddressSanitizer. New inputs go
# to fuzz/work/TARGET (not committed); a crash's input is left in
# fuzz/artifacts/TARGET/: fix the bug, then copy the input into
# fuzz/corpus/TARGET/ as regression-NAME so `cargo test` replays it.
#
# cargo fuzz needs a nightly compiler's flags; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain take them. Install it with `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")"

runs=-1
seconds=60
sanitizer=none
targets=()
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --sanitizer) sanitizer="$2"; shift 2 ;;
        -h|--help) sed -n 2,18p "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(ls fuzz_targets | sed 's/\.rs$//')
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=1

printf '%-20s %12s %8s %10s %8s %s\n' target executions seconds exec/s crashes "new inputs"
status=0
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "artifacts/$t"
    log="work/$t.log"
    before=$(ls "artifacts/$t" | wc -l)
    # Inputs up to 2 MB: the seeds include prompt-sized steps and files.
    set +e
    cargo fuzz run --release --sanitizer "$sanitizer" "$t" "work/$t" "corpus/$t" -- \
        -runs="$runs" -max_total_time="$seconds" -max_len=2097152 \
        -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    after=$(ls "artifacts/$t" | wc -l)
    done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
    execs=$(sed -E 's/^Done ([0-9]+) runs in ([0-9]+) second.*/\1/' <<<"$done_line")
    secs=$(sed -E 's/^Done ([0-9]+) runs in ([0-9]+) second.*/\2/' <<<"$done_line")
    if [[ -z "$done_line" ]]; then
        execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
        secs=$(grep -oE 'stat::elapsed_seconds: *[0-9]+' "$log" 2>/dev/null | grep -oE '[0-9]+$' | tail -1 || true)
    fi
    execs=${execs:-0}
    secs=${secs:-0}
    rate=$((secs > 0 ? execs / secs : execs))
    crashes=$((after - before))
    new=$(ls "work/$t" | wc -l)
    printf '%-20s %12s %8s %10s %8s %s\n' "$t" "$execs" "$secs" "$rate" "$crashes" "$new"
    if ((rc != 0)) || ((crashes > 0)); then
        status=1
        echo "  $t failed (exit $rc); the log: fuzz/$log" >&2
        grep -E 'panicked|ERROR|SUMMARY|deadly signal|Test unit written' "$log" | head -5 | sed 's/^/  /' >&2 || true
    fi
done
exit $status
