//! Runs the Kotlin test (`ffi/tests/kotlin/RedlineTest.kt`) on the JVM against this
//! build's library, through freshly generated bindings, with the real relay binary.
//! Installs JNA and kotlinc if missing (`ffi/scripts/kotlin-tools.sh`). Also checks that
//! the committed bindings in `ffi/bindings/` match what this build generates.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn generate(bindgen: &str, lib: &Path, language: &str, out: &Path) {
    run(
        Command::new(bindgen)
            .args(["generate", "--library"])
            .arg(lib)
            .args(["--language", language, "--no-format", "--out-dir"])
            .arg(out),
        &format!("uniffi-bindgen ({language})"),
    );
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                all.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    all.sort();
    all
}

#[test]
fn kotlin_on_the_jvm_drives_the_library() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let lib = ["libredline_ffi.so", "libredline_ffi.dylib"]
        .iter()
        .map(|n| deps.join(n))
        .find(|p| p.exists())
        .expect("the cdylib next to this test (cargo builds it with the crate)");
    let relay = deps.parent().unwrap().join("redline-server");
    assert!(
        relay.exists(),
        "{} is missing: run the workspace tests (cargo test --workspace builds it)",
        relay.display()
    );
    let bindgen = env!("CARGO_BIN_EXE_uniffi-bindgen");
    let scratch = tempfile::tempdir().unwrap();

    // The committed bindings are what this build generates.
    for language in ["kotlin", "swift"] {
        let out = scratch.path().join(format!("gen-{language}"));
        generate(bindgen, &lib, language, &out);
        assert!(
            files(&out) == files(&root.join("bindings").join(language)),
            "ffi/bindings/{language} is out of date: run ffi/scripts/bindings.sh and commit"
        );
    }

    let tools = run(
        Command::new("bash").arg(root.join("scripts/kotlin-tools.sh")),
        "installing the Kotlin tools",
    );
    let kotlinc = PathBuf::from(tools.trim());
    let classpath = format!(
        "/usr/share/java/jna.jar:{}",
        kotlinc
            .join("lib/kotlinx-coroutines-core-jvm.jar")
            .display()
    );
    let generated = scratch
        .path()
        .join("gen-kotlin/org/redline/ffi/redline_ffi.kt");
    let jar = scratch.path().join("redline-test.jar");
    let started = Instant::now();
    run(
        Command::new(kotlinc.join("bin/kotlinc-jvm"))
            .args(["-Werror", "-cp", &classpath])
            .arg(&generated)
            .arg(root.join("tests/kotlin/RedlineTest.kt"))
            .arg("-d")
            .arg(&jar),
        "kotlinc",
    );
    let compiled = started.elapsed();
    let started = Instant::now();
    let output = run(
        Command::new("java")
            .arg(format!("-Djna.library.path={}", deps.display()))
            .arg("-cp")
            .arg(format!(
                "{}:{classpath}:{}",
                jar.display(),
                kotlinc.join("lib/kotlin-stdlib.jar").display()
            ))
            .arg("RedlineTestKt")
            .arg(&relay)
            .arg(scratch.path().join("run")),
        "the Kotlin test",
    );
    println!("{output}");
    println!(
        "kotlinc {:.1} s, Kotlin test run {:.1} s",
        compiled.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(output.contains("all Kotlin checks passed"));
}

/// The one part of the Swift side that runs here: the generated C header compiles and a
/// call through it links against, and runs in, this build's library.
#[test]
fn swift_c_header_compiles_links_and_calls() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let scratch = tempfile::tempdir().unwrap();
    let main = scratch.path().join("main.c");
    std::fs::write(
        &main,
        r#"#include <stdio.h>
#include "RedlineFFIFFI.h"
int main(void) {
    RustCallStatus status = {0};
    uint16_t v = uniffi_redline_ffi_fn_func_protocol_version(&status);
    printf("protocol %u status %d\n", v, status.code);
    return (v == 2 && status.code == 0) ? 0 : 1;
}
"#,
    )
    .unwrap();
    let exe = scratch.path().join("swift-header-check");
    run(
        Command::new("cc")
            .args(["-D_Nullable=", "-D_Nonnull=", "-I"])
            .arg(root.join("bindings/swift"))
            .arg(&main)
            .arg("-o")
            .arg(&exe)
            .arg("-L")
            .arg(&deps)
            .arg("-lredline_ffi"),
        "cc with the Swift bindings' C header",
    );
    let out = run(
        Command::new(&exe).env("LD_LIBRARY_PATH", &deps),
        "the C program",
    );
    assert_eq!(out.trim(), "protocol 2 status 0");
}
