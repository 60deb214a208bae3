#!/usr/bin/env bash
# Checks that tunbus builds where Linux's TUN, namespaces and ioctls do not exist (issue
# 23): `cargo check` (compile, no link) of the library and the agent for
# x86_64-unknown-freebsd, a non-Linux Unix with kqueue as macOS has. The Linux-only parts
# (`tun/`, `sys/`'s TUN ioctls and setns, TCP_USER_TIMEOUT) sit behind
# cfg(target_os = "linux") and say "needs Linux" at run time elsewhere; the userspace path
# (`agent connect --userspace`) uses none of them. ring's C and assembly build with this
# machine's gcc (the object format is ELF either way). Not checked here: macOS itself (its
# SDK is needed for ring's C) and Windows. Called by scripts/test.sh; installs the
# target's standard library with rustup when it can, and says so when it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-freebsd
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  echo "check-portable: installing the $target standard library (rustup target add $target)" >&2
  if ! timeout 300 rustup target add "$target" >/dev/null 2>&1; then
    echo "check-portable: SKIPPED: cannot install the $target standard library here (no rustup, or no network to its servers)" >&2
    exit 0
  fi
fi
export CC_x86_64_unknown_freebsd="${CC_x86_64_unknown_freebsd:-cc}"
export AR_x86_64_unknown_freebsd="${AR_x86_64_unknown_freebsd:-ar}"
# Warnings are errors for tunbus (dependencies' lints are capped by cargo).
RUSTFLAGS="-D warnings" cargo check --locked --quiet --lib --bins --target "$target"
echo "check-portable: the library and the agent build for $target (no Linux-only call outside cfg(target_os = \"linux\"))" >&2
