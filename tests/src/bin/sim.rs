//! The deterministic simulation, seed after seed (see `redline_tests::sim`).
//!
//! `cargo run --release -p redline-tests --bin sim -- [--seeds N] [--seed S] [--phones N]
//! [--ops N] [--loss P] [--relay-crashes N] [--bug ack-before-flush|cursor-without-data] [--json PATH]`
//!
//! Runs seeds `S..S+N` (one at a time, or on `--jobs` threads), prints one line per seed
//! and a summary; the first failing seed is printed with the command that replays it,
//! and the exit status is 1. `--seed S` alone replays one seed.

use std::time::Instant;

use clap::Parser;
use redline_tests::sim::{Bug, SimConfig, run};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of a relay and many phones")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Honest phones.
    #[arg(long, default_value_t = 200)]
    phones: usize,
    /// Phones per team.
    #[arg(long, default_value_t = 16)]
    team_size: usize,
    /// Operations per phone.
    #[arg(long, default_value_t = 300)]
    ops: u32,
    /// Virtual seconds the day's writes spread over.
    #[arg(long, default_value_t = 600)]
    day_secs: u64,
    /// Probability a message needs a retransmission.
    #[arg(long, default_value_t = 0.10)]
    loss: f64,
    /// Probability a message's connection is cut.
    #[arg(long, default_value_t = 0.002)]
    cut: f64,
    /// Relay crashes per seed.
    #[arg(long, default_value_t = 5)]
    relay_crashes: u32,
    /// Phone crashes per seed.
    #[arg(long, default_value_t = 10)]
    phone_crashes: u32,
    /// Share of phones on protocol version 1.
    #[arg(long, default_value_t = 0.25)]
    old_phones: f64,
    /// Photos attached during the day (each push goes up on an upload stream).
    #[arg(long, default_value_t = 2)]
    photos: u32,
    /// Inject a bug (`ack-before-flush`, `cursor-without-data`) to see the checks catch it.
    #[arg(long)]
    bug: Option<String>,
    /// Threads running seeds side by side.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Write a JSON summary here.
    #[arg(long)]
    json: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bug = match args.bug.as_deref() {
        None => None,
        Some(name) => match Bug::named(name) {
            Some(bug) => Some(bug),
            None => {
                anyhow::bail!("unknown bug {name:?} (known: ack-before-flush, cursor-without-data)")
            }
        },
    };
    let config = SimConfig {
        phones: args.phones,
        team_size: args.team_size,
        ops: args.ops,
        day_secs: args.day_secs,
        loss: args.loss,
        cut: args.cut,
        relay_crashes: args.relay_crashes,
        phone_crashes: args.phone_crashes,
        old_phones: args.old_phones,
        photos: args.photos,
        bug,
        ..SimConfig::default()
    };
    println!(
        "{} phones x {} ops, {:.0}% loss, {} relay crashes; seeds {}..{}",
        config.phones,
        config.ops,
        config.loss * 100.0,
        config.relay_crashes,
        args.seed,
        args.seed + args.seeds
    );
    let started = Instant::now();
    let seeds: Vec<u64> = (args.seed..args.seed + args.seeds).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..args.jobs.max(1) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(&seed) = seeds.get(k) else { break };
                    let t = Instant::now();
                    let r = run(seed, &config);
                    let secs = t.elapsed().as_secs_f64();
                    match &r {
                        Ok(rep) => println!(
                            "seed {seed}: ok in {secs:.1} s ({:.0} virtual s, {} changes, {} acked, {} messages, {} relay crashes, {} cuts, {} resyncs, {} forgeries refused, {} upload streams, {} photos acked) digest {}",
                            rep.virtual_secs,
                            rep.changes_written,
                            rep.changes_acked,
                            rep.messages,
                            rep.relay_crashes,
                            rep.cuts,
                            rep.resyncs,
                            rep.forged_refused,
                            rep.uploads,
                            rep.photos_acked,
                            rep.digest
                        ),
                        Err(f) => println!("{f}"),
                    }
                    results.lock().expect("results").push((seed, secs, r));
                }
            });
        }
    });
    let results = results.into_inner().expect("results");
    let failed: Vec<u64> = results
        .iter()
        .filter(|(_, _, r)| r.is_err())
        .map(|(s, _, _)| *s)
        .collect();
    let total = started.elapsed().as_secs_f64();
    let worst = results.iter().map(|(_, t, _)| *t).fold(0.0, f64::max);
    println!(
        "{} seeds, {} failed, {total:.1} s wall ({:.2} s per seed, worst {worst:.1} s)",
        results.len(),
        failed.len(),
        total / results.len().max(1) as f64
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "phones": config.phones,
            "ops": config.ops,
            "loss": config.loss,
            "relay_crashes": config.relay_crashes,
            "seeds": results.len(),
            "failed": failed,
            "wall_s": total,
            "per_seed_s": total / results.len().max(1) as f64,
            "worst_seed_s": worst,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        std::process::exit(1)
    }
}
