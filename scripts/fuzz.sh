#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target of fuzz/ (default: all, SECONDS each, default 600) on its committed
# corpus, then minimises the corpus (cargo fuzz cmin). A finding is left in
# fuzz/artifacts/<target>/ and makes the script fail; reproduce it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# then fix it and copy the file into fuzz/corpus/<target>/, so that `cargo test` (stable,
# tests/corpus.rs) keeps it fixed. Needs nightly Rust and cargo-fuzz; CI does not.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-600}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (SECONDS per target, default 600)" >&2
    exit 2
fi
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzzing needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 3
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzzing needs cargo-fuzz: cargo install cargo-fuzz" >&2
    exit 3
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//')
fi

cd fuzz
cargo +nightly fuzz build -O
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
    cargo +nightly fuzz cmin -O "$t" "corpus/$t" >/dev/null 2>&1 || true
    files=$(find "corpus/$t" -type f | wc -l)
    summary+=("| $t | $seconds | $runs | $cov | $files | $result |")
    echo "   $runs executions, coverage $cov, corpus $files files: $result"
done

echo
echo "| target | seconds | executions | coverage (edges) | corpus files | result |"
echo "|---|---:|---:|---:|---:|---|"
printf '%s\n' "${summary[@]}"
exit $failed
