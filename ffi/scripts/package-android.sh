#!/usr/bin/env bash
# Builds an Android AAR of redline-ffi: jniLibs for arm64-v8a, armeabi-v7a and x86_64
# (cargo-ndk), plus the generated Kotlin bindings compiled into classes.jar.
#
# NOT RUN IN CI: this machine has no Android NDK. Needs ANDROID_NDK_HOME, cargo-ndk
# (`cargo install cargo-ndk`), the rustup targets below, kotlinc (ffi/scripts/kotlin-tools.sh)
# and JNA's jar for compiling. The app depends on JNA's Android AAR at run time:
#   implementation("net.java.dev.jna:jna:5.14.0@aar")
#   implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.8.1")
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${ANDROID_NDK_HOME:?set ANDROID_NDK_HOME to an installed NDK (r26 or later)}"
OUT=${OUT:-target/android}
API=${ANDROID_API:-24}

rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android
rm -rf "$OUT" && mkdir -p "$OUT/aar/jni" "$OUT/classes"
cargo ndk --platform "$API" \
  -t arm64-v8a -t armeabi-v7a -t x86_64 \
  -o "$OUT/aar/jni" \
  build -p redline-ffi --lib --release

# Bindings come from an unstripped host build of the same source (library mode).
bash ffi/scripts/bindings.sh
K=$(bash ffi/scripts/kotlin-tools.sh)
"$K/bin/kotlinc-jvm" -cp "/usr/share/java/jna.jar:$K/lib/kotlinx-coroutines-core-jvm.jar" \
  ffi/bindings/kotlin/org/redline/ffi/redline_ffi.kt -d "$OUT/classes"
(cd "$OUT/classes" && jar cf ../aar/classes.jar .)

cat > "$OUT/aar/AndroidManifest.xml" <<'XML'
<?xml version="1.0" encoding="utf-8"?>
<manifest xmlns:android="http://schemas.android.com/apk/res/android" package="org.redline.ffi">
    <uses-sdk android:minSdkVersion="24" />
    <uses-permission android:name="android.permission.INTERNET" />
</manifest>
XML
: > "$OUT/aar/R.txt"
# The .so files ship stripped (cargo-ndk builds release; strip the debug info here).
find "$OUT/aar/jni" -name '*.so' -exec "$ANDROID_NDK_HOME"/toolchains/llvm/prebuilt/*/bin/llvm-strip {} \;
(cd "$OUT/aar" && zip -qr ../redline-ffi.aar .)
ls -la "$OUT/redline-ffi.aar"
find "$OUT/aar/jni" -name '*.so' -exec ls -la {} \;
