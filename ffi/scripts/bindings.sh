#!/usr/bin/env bash
# Generates the Kotlin and Swift bindings of redline-ffi (UniFFI library mode) into
# ffi/bindings/kotlin and ffi/bindings/swift. Run after changing the FFI's API and commit
# the result; the Kotlin JVM test checks that the committed bindings are current.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -p redline-ffi --lib --bin uniffi-bindgen
lib=target/debug/libredline_ffi.so
[ -f "$lib" ] || lib=target/debug/libredline_ffi.dylib
rm -rf ffi/bindings/kotlin ffi/bindings/swift
for language in kotlin swift; do
  target/debug/uniffi-bindgen generate --library "$lib" --language "$language" \
    --out-dir "ffi/bindings/$language" --no-format
done
echo "bindings written to ffi/bindings/{kotlin,swift}"
