#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser:
#   scripts/fuzz.sh [SECONDS] [TARGET...]   fuzz each target (default: all, SECONDS each,
#                                           default 600) on its corpus, then minimise it
#   scripts/fuzz.sh --cmin [TARGET...]      only minimise the committed corpora
#
# A finding is left in fuzz/artifacts/<target>/ and makes the script fail; reproduce it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# then fix it and copy the file into fuzz/corpus/<target>/, so that `cargo test` (stable,
# tests/corpus.rs) keeps it fixed. Needs nightly Rust and cargo-fuzz
# (`cargo install cargo-fuzz --locked`); CI does not.
#
# How the corpus stays lean: fuzz/corpus/<target>/ is committed, so it holds only inputs
# that add coverage. After every run, and whenever a parser changes (coverage moves with
# the code), `cargo fuzz cmin` (libFuzzer's -merge=1, counting edges only) replaces each
# corpus by a subset that covers the same edges; commit what it leaves (`--cmin` does only
# that step). A corpus is never left empty: if cmin fails or keeps nothing, the corpus is
# restored.
# tests/corpus.rs replays every file on stable and fails on an empty corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

cmin_only=0
if [ "${1:-}" = --cmin ]; then
    cmin_only=1
    shift
    seconds=0
else
    seconds=${1:-600}
    shift || true
fi
if ! [[ $seconds =~ ^[0-9]+$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...] | --cmin [TARGET...]   (SECONDS per target, default 600)" >&2
    exit 2
fi
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzzing needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 3
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzzing needs cargo-fuzz: cargo install cargo-fuzz --locked" >&2
    exit 3
fi

# Minimises corpus/$1 (run from fuzz/) to the inputs that add coverage; keeps a copy and
# puts it back when the minimisation fails or leaves nothing.
minimise() {
    local t=$1 keep
    keep=$(mktemp -d)
    cp -a "corpus/$t/." "$keep/"
    # -use_counters=0: an input is kept for a new edge, not for a new hit count of one
    # (with counters, thousands of JSON and YAML inputs each count as new coverage).
    if ! cargo +nightly fuzz cmin -O "$t" "corpus/$t" -- -use_counters=0 -rss_limit_mb=2048 -timeout=10 >/dev/null 2>&1 \
        || [ -z "$(find "corpus/$t" -type f -print -quit)" ]; then
        echo "   cmin failed for $t: corpus left as it was" >&2
        rm -rf "corpus/$t"
        mkdir -p "corpus/$t"
        cp -a "$keep/." "corpus/$t/"
    fi
    rm -rf "$keep"
}

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//')
fi

cd fuzz
cargo +nightly fuzz build -O
if [ $cmin_only = 1 ]; then
    echo "| target | corpus files before | after | bytes after |"
    echo "|---|---:|---:|---:|"
    for t in "${targets[@]}"; do
        before=$(find "corpus/$t" -type f | wc -l)
        minimise "$t"
        after=$(find "corpus/$t" -type f | wc -l)
        echo "| $t | $before | $after | $(du -sb "corpus/$t" | cut -f1) |"
    done
    exit 0
fi
summary=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=$(mktemp)
    echo "== $t: ${seconds}s"
    # -max_len: the largest input worth trying (a maximal frame, a big handshake).
    if cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$seconds" -max_len=70000 \
        -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        result=clean
    else
        result="FINDING (fuzz/artifacts/$t)"
        failed=1
        tail -40 "$log" >&2
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo '?')
    rm -f "$log"
    # Keep the corpus small: only inputs that add coverage.
    minimise "$t"
    files=$(find "corpus/$t" -type f | wc -l)
    summary+=("| $t | $seconds | $runs | $cov | $files | $result |")
    echo "   $runs executions, coverage $cov, corpus $files files: $result"
done

echo
echo "| target | seconds | executions | coverage (edges) | corpus files | result |"
echo "|---|---:|---:|---:|---:|---|"
printf '%s\n' "${summary[@]}"
exit $failed
