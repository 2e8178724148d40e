//! The workspace's `uniffi-bindgen`: generates Kotlin and Swift bindings from the built
//! library (library mode). `ffi/scripts/bindings.sh` runs it.

fn main() {
    uniffi::uniffi_bindgen_main()
}
