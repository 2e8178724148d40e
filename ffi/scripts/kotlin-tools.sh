#!/usr/bin/env bash
# Installs what the Kotlin JVM test needs, if missing: JNA (Debian's libjna-java) and
# the Kotlin compiler (npm's kotlin-compiler, which ships kotlinc-jvm and
# kotlinx-coroutines-core-jvm.jar). Prints the kotlinc directory.
set -euo pipefail
KOTLIN_VERSION=2.4.20
if [ ! -f /usr/share/java/jna.jar ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libjna-java >&2
fi
TOOLS=${REDLINE_TOOLS:-$HOME/.cache/redline-tools}
K="$TOOLS/kotlinc-$KOTLIN_VERSION"
if [ ! -x "$K/bin/kotlinc-jvm" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "kotlin-compiler@$KOTLIN_VERSION" >/dev/null \
    && tar xzf "kotlin-compiler-$KOTLIN_VERSION.tgz")
  mkdir -p "$TOOLS" && rm -rf "$K" && mv "$tmp/package" "$K" && rm -rf "$tmp"
  chmod +x "$K"/bin/*
fi
echo "$K"
