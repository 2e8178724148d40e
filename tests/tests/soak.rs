//! The 30-second soak in CI: 200 devices syncing in a loop against a relay process. The
//! long version is `cargo run --release -p redline-tests --bin soak -- --seconds 600`.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_for_thirty_seconds() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let r = redline_tests::soak::run(dir.path(), 200, Duration::from_secs(30)).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    // Every sync succeeds: a handshake stalled by lost datagrams is replaced within the
    // sync (counted in `reconnects`), and the relay's large socket buffers keep datagrams
    // from being dropped in the first place.
    assert!(r.errors.is_empty(), "sync errors: {:?}", r.failures);
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
