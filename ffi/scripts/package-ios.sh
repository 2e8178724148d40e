#!/usr/bin/env bash
# Builds RedlineFFI.xcframework: static libraries for iOS devices (aarch64-apple-ios) and
# the simulator (aarch64-apple-ios-sim + x86_64-apple-ios, merged with lipo), with the
# generated C header and module map; the Swift bindings (ffi/bindings/swift/RedlineFFI.swift)
# are added to the app or a Swift package next to it.
#
# NOT RUN IN CI: needs macOS with Xcode (xcodebuild, lipo) and the iOS SDKs; this Linux
# machine has neither. What CI does check on this side: the Swift bindings are generated
# from this build and committed (ffi/tests/kotlin_jvm.rs compares them).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-target/ios}
rustup target add aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios
for t in aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios; do
  cargo build -p redline-ffi --lib --release --target "$t"
done
bash ffi/scripts/bindings.sh
rm -rf "$OUT" && mkdir -p "$OUT/headers" "$OUT/sim"
cp ffi/bindings/swift/RedlineFFIFFI.h "$OUT/headers/"
cp ffi/bindings/swift/RedlineFFIFFI.modulemap "$OUT/headers/module.modulemap"
lipo -create \
  target/aarch64-apple-ios-sim/release/libredline_ffi.a \
  target/x86_64-apple-ios/release/libredline_ffi.a \
  -output "$OUT/sim/libredline_ffi.a"
xcodebuild -create-xcframework \
  -library target/aarch64-apple-ios/release/libredline_ffi.a -headers "$OUT/headers" \
  -library "$OUT/sim/libredline_ffi.a" -headers "$OUT/headers" \
  -output "$OUT/RedlineFFI.xcframework"
cp ffi/bindings/swift/RedlineFFI.swift "$OUT/"
echo "built $OUT/RedlineFFI.xcframework (+ $OUT/RedlineFFI.swift)"
