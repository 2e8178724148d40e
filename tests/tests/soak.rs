//! The 30-second soak in CI: 200 devices syncing in a loop against a relay process. The
//! long version is `cargo run --release -p redline-tests --bin soak -- --seconds 600`.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_for_thirty_seconds() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let r = redline_tests::soak::run(dir.path(), 200, Duration::from_secs(30)).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    // Transport stalls are retried by the device and lose nothing (convergence below);
    // anything else (a refusal, a protocol error) is a bug. Rare stalls are tolerated
    // here and reported: 1-2 of ~4,800 syncs on a loaded 2-core CI machine, not yet
    // diagnosed (see ARCHITECTURE, known limits).
    let transient: u64 = r
        .errors
        .iter()
        .filter(|(k, _)| k.starts_with("network") || *k == "timeout")
        .map(|(_, n)| n)
        .sum();
    let other: u64 = r.errors.values().sum::<u64>() - transient;
    assert_eq!(other, 0, "unexpected errors: {:?}", r.errors);
    assert!(
        transient * 1000 <= r.syncs.max(1),
        "too many stalls: {:?} in {} syncs",
        r.errors,
        r.syncs
    );
    assert!(r.converged, "every device ends with the relay's state");
    assert!(r.syncs >= 200, "devices kept syncing: {}", r.syncs);
    assert!(
        r.rss_end_kib < r.rss_start_kib * 2 + 64 * 1024,
        "relay memory grew from {} KiB to {} KiB",
        r.rss_start_kib,
        r.rss_end_kib
    );
    Ok(())
}
