//! The field-day scenario at small size: the relay in a child process, devices working
//! offline, a reconnect storm, verification against the relay, live latency and a no-op
//! reconnect. The benchmark binary runs the same code at full size.

use redline_tests::fieldday::{self, FieldDayConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_field_day_converges_and_measures_itself() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = FieldDayConfig {
        teams: 2,
        devices_per_team: 3,
        zones: 3,
        households_per_zone: 5,
        ops_per_device: 20,
        seed: 7,
        live_samples: 5,
        noop_docs: 50,
        relay_exe: env!("CARGO_BIN_EXE_fieldday").into(),
        work_dir: dir.path().to_path_buf(),
        postgres: None,
        relays: 1,
        spread: fieldday::Spread::Team,
        apply_batches: true,
    };
    // `run` fails if a converged device differs from the relay's copies.
    let r = fieldday::run(&cfg, |line| println!("{line}")).await?;
    println!("{}", fieldday::table(&r));
    assert!(r.converged, "the small day converges");
    assert_eq!(r.devices, 6);
    // Each phone applies what its 2 teammates made (every document of a team is shared
    // by the whole team): at most 2 x 20 changes each.
    assert!(
        r.device_applied_changes > 0 && r.device_applied_changes <= 6 * 2 * 20,
        "{}",
        r.device_applied_changes
    );
    assert!(r.device_cpu_s > 0.0 && r.device_apply_per_change_us > 0.0);
    assert!(r.relay_cpu_per_change_us > 0.0);
    assert_eq!(r.changes, 6 * 20);
    assert!(r.relay_cpu_s > 0.0 && r.floor_cpu_s > 0.0);
    assert!(
        r.wire_bytes > r.compressed_change_bytes,
        "the wire carries at least the changes"
    );
    assert_eq!(r.noop_reconnect_round_trips, 1);
    assert!(r.noop_reconnect_bytes < 2048);
    assert!(r.relay_peak_rss_bytes > 0);
    assert!(r.live_p50_ms > 0.0 && r.live_p99_ms >= r.live_p50_ms);
    // The floor in batches: one figure per batch size, in the JSON and the table.
    let json = serde_json::to_value(&r)?;
    for k in fieldday::APPLY_BATCHES {
        let key = format!("apply_batch_{k}_s");
        let s = json[&key].as_f64();
        assert!(s.is_some_and(|s| s > 0.0), "{key}: {s:?}");
    }
    assert!(fieldday::table(&r).contains("floor in batches of"));
    Ok(())
}

/// The same small day with two relays over a real PostgreSQL (started by the test):
/// half the phones on each, and the live probe crosses from one relay to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_field_day_on_postgres_converges() -> anyhow::Result<()> {
    let Some(pg) =
        redline_tests::postgres::TestPostgres::start_or_skip("a_small_field_day_on_postgres")
    else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let cfg = FieldDayConfig {
        teams: 2,
        devices_per_team: 3,
        zones: 3,
        households_per_zone: 5,
        ops_per_device: 20,
        seed: 8,
        live_samples: 5,
        noop_docs: 50,
        relay_exe: env!("CARGO_BIN_EXE_fieldday").into(),
        work_dir: dir.path().to_path_buf(),
        postgres: Some(fieldday::PostgresTarget {
            url: pg.fresh_database()?,
            server_pid: pg.server_pid(),
        }),
        relays: 2,
        // Each team's phones on both relays: every document is written through both,
        // so the relays conflict and take in each other's commits.
        spread: fieldday::Spread::Device,
        apply_batches: false,
    };
    let r = fieldday::run(&cfg, |line| println!("{line}")).await?;
    println!("{}", fieldday::table(&r));
    assert!(r.converged, "the small day converges on PostgreSQL");
    assert_eq!(
        (r.storage.as_str(), r.relays, r.spread.as_str()),
        ("postgres", 2, "device")
    );
    // The database's CPU is read from its processes (too little to count in so small a
    // storm; the benchmark reports it).
    assert!(
        pg.server_pid().is_some(),
        "the database server's pid is known"
    );
    assert_eq!(r.noop_reconnect_round_trips, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_steady_load_measures_the_relay_and_live_latency() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = redline_tests::steady::SteadyConfig {
        phones: 6,
        devices_per_team: 3,
        seconds: 3,
        every: std::time::Duration::from_millis(500),
        seed: 3,
        relay_exe: env!("CARGO_BIN_EXE_fieldday").into(),
        work_dir: dir.path().to_path_buf(),
    };
    let r = redline_tests::steady::run(&cfg, |line| println!("{line}")).await?;
    println!("{}", redline_tests::steady::table(&r));
    assert_eq!(r.phones, 6);
    // Six phones, a write each every 0.5 s, for 3 s.
    assert!(r.writes >= 6 * 5, "{} writes", r.writes);
    // Two teams' leads probe every 0.5 s; their teammates see (nearly) every probe.
    assert!(r.live_samples >= 2 * 4, "{} probes seen", r.live_samples);
    assert!(r.live_p99_ms >= r.live_p50_ms && r.live_p50_ms > 0.0);
    assert!(r.relay_cpu_share > 0.0 && r.bytes_per_phone_per_minute > 0.0);
    assert!(r.relay_peak_rss_bytes > 0);
    Ok(())
}
