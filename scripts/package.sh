#!/usr/bin/env bash
# Builds the Debian package: target/debian/tunbus_<version>_<arch>.deb, holding the binary
# (and its ioppytest-agent name), man pages and shell completions generated from the CLI's
# own definitions, the systemd unit tunbus-agent@.service and an example configuration.
#   scripts/package.sh                  build the release binary and package it
#   scripts/package.sh --binary PATH    package this binary instead (the tests use theirs)
#   --out DIR                           where the .deb goes [target/debian]
#   --fast                              no compression (tests)
# Needs dpkg-deb (Debian's dpkg) and gzip. Install: apt install ./target/debian/tunbus_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
binary="" out="target/debian" compress="-Zxz"
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --fast) compress="-Znone"; shift ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "package.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
for tool in dpkg-deb gzip; do
    command -v "$tool" >/dev/null || { echo "package.sh: $tool is missing (apt-get install dpkg gzip)" >&2; exit 1; }
done
if [ -z "$binary" ]; then
    cargo build --release --locked --bin agent
    binary=target/release/agent
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
root=$(mktemp -d "${TMPDIR:-/tmp}/tunbus-deb.XXXXXX")
trap 'rm -rf "$root"' EXIT

install -D -m 0755 "$binary" "$root/usr/bin/agent"
# Debug information stays in the build tree (the release profile keeps it for perf).
if command -v strip >/dev/null; then strip --strip-debug "$root/usr/bin/agent"; fi
ln -s agent "$root/usr/bin/ioppytest-agent"
"$binary" manpages "$root/usr/share/man/man1" >/dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$binary" completions bash > "$root/usr/share/bash-completion/completions/agent"
"$binary" completions zsh > "$root/usr/share/zsh/vendor-completions/_agent"
"$binary" completions fish > "$root/usr/share/fish/vendor_completions.d/agent.fish"
install -D -m 0644 "dist/tunbus-agent@.service" "$root/lib/systemd/system/tunbus-agent@.service"
install -D -m 0644 docs/agent.example.toml "$root/usr/share/doc/tunbus/examples/agent.example.toml"
install -D -m 0644 README.md "$root/usr/share/doc/tunbus/README.md"
printf 'tunbus\nLicense: MIT (see Cargo.toml)\n' > "$root/usr/share/doc/tunbus/copyright"
install -d -m 0755 "$root/etc/tunbus"

install -d "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: tunbus
Version: $version
Architecture: $arch
Maintainer: tunbus developers <tunbus@localhost>
Installed-Size: $(du -sk "$root" | cut -f1)
Depends: iproute2
Suggests: rabbitmq-server
Section: net
Priority: optional
Description: IP packets between hosts over a RabbitMQ message bus
 Each host runs an agent that owns a multi-queue TUN interface and carries its
 packets through RabbitMQ to the agent that owns the destination. Speaks the
 ioppytest agent's wire too (installed as ioppytest-agent).
CONTROL
mkdir -p "$out"
deb="$out/tunbus_${version}_${arch}.deb"
dpkg-deb --root-owner-group "$compress" --build "$root" "$deb" >/dev/null
echo "$deb"
