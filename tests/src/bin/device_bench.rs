//! Device benchmark: local write latency of typical field operations on a durable store,
//! and the open time of a device holding many documents.
//!
//! `cargo run --release -p redline-tests --bin device_bench -- [--writes N] [--docs N] [--json PATH]`
//!
//! Prints a table; with `--json` also writes one JSON object. Not a test: numbers on a
//! shared machine are noisy, so it reports percentiles over many operations.

use std::time::{Duration, Instant};

use redline_client::{
    Client, ClientConfig, NeedCategory, NewHousehold, NewNeed, NewTask, Priority, TaskKind,
    TaskStatus,
};
use redline_proto::{Day, MemberId, TeamId, ZoneId};

struct Args {
    writes: usize,
    docs: usize,
    json: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        writes: 300,
        docs: 500,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--writes" => args.writes = value()?.parse()?,
            "--docs" => args.docs = value()?.parse()?,
            "--json" => args.json = Some(value()?),
            "-h" | "--help" => {
                println!("device_bench [--writes N (300)] [--docs N (500)] [--json PATH]");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown option {other}; try --help"),
        }
    }
    Ok(args)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e6
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dir = tempfile::tempdir()?;
    let client = Client::open(
        dir.path().join("phone"),
        ClientConfig::new(MemberId::new("amira")?),
    )?;
    let team = TeamId::new("team-1")?;
    let day = Day::new("2026-11-29")?;
    let zone = ZoneId::new("zone-a")?;
    let household = client.add_household(
        &zone,
        NewHousehold {
            address: "Block 7".into(),
            residents: 2,
            ..Default::default()
        },
    )?;

    // Typical operations, round-robin, on one growing day ledger and one zone book.
    let mut samples: Vec<(&str, Duration)> = Vec::with_capacity(args.writes);
    let mut tasks = Vec::new();
    for i in 0..args.writes {
        let started = Instant::now();
        let op = match i % 5 {
            0 => {
                tasks.push(client.add_task(
                    &team,
                    &day,
                    NewTask::new(TaskKind::Screening, format!("Block {i}")),
                )?);
                "add_task"
            }
            1 => {
                client.add_to_tally(&team, &day, "samples_taken", 1)?;
                "add_to_tally"
            }
            2 => {
                client.check_in(&team, &day)?;
                "check_in"
            }
            3 => {
                let t = &tasks[tasks.len() - 1];
                client.set_task_status(&team, &day, t, TaskStatus::InProgress)?;
                "set_task_status"
            }
            _ => {
                client.add_need(
                    &zone,
                    NewNeed {
                        household: household.clone(),
                        category: NeedCategory::Food,
                        detail: "rice".into(),
                        priority: Priority::Priority,
                    },
                )?;
                "add_need"
            }
        };
        samples.push((op, started.elapsed()));
    }
    let mut all: Vec<Duration> = samples.iter().map(|(_, d)| *d).collect();
    all.sort();

    // Many documents: one ledger per day for `docs` days, then reopen.
    let many_dir = dir.path().join("many");
    {
        let c = Client::open(&many_dir, ClientConfig::new(MemberId::new("amira")?))?;
        let start = time::Date::from_calendar_date(2025, time::Month::January, 1)?;
        for i in 0..args.docs {
            let d = start + time::Duration::days(i as i64);
            let d = Day::new(format!(
                "{:04}-{:02}-{:02}",
                d.year(),
                u8::from(d.month()),
                d.day()
            ))?;
            c.add_task(&team, &d, NewTask::new(TaskKind::Inspection, "patrol"))?;
            c.add_to_tally(&team, &d, "samples_taken", 3)?;
        }
    }
    let started = Instant::now();
    let c = Client::open(&many_dir, ClientConfig::new(MemberId::new("amira")?))?;
    let open = started.elapsed();
    let ids = c.documents()?;
    let mut total = 0i64;
    for id in &ids {
        if let redline_proto::DocKind::Ledger(t, d) = id.kind() {
            total += c
                .day_totals(&t, &d)?
                .get("samples_taken")
                .copied()
                .unwrap_or(0);
        }
    }
    let open_and_read = started.elapsed();
    anyhow::ensure!(
        total == 3 * args.docs as i64,
        "read back {total}, expected {}",
        3 * args.docs
    );

    println!(
        "device benchmark ({} writes, durable sled store; {} documents reopened)",
        args.writes,
        ids.len()
    );
    println!("{:<28}{:>12}{:>12}", "operation", "p50 µs", "p99 µs");
    let mut by_op: Vec<&str> = samples.iter().map(|(o, _)| *o).collect();
    by_op.dedup();
    by_op.sort();
    by_op.dedup();
    let mut json = serde_json::Map::new();
    for op in &by_op {
        let mut d: Vec<Duration> = samples
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, d)| *d)
            .collect();
        d.sort();
        println!(
            "{:<28}{:>12.0}{:>12.0}",
            op,
            percentile(&d, 0.5),
            percentile(&d, 0.99)
        );
        json.insert(format!("{op}_p50_us"), percentile(&d, 0.5).into());
        json.insert(format!("{op}_p99_us"), percentile(&d, 0.99).into());
    }
    println!(
        "{:<28}{:>12.0}{:>12.0}",
        "all writes",
        percentile(&all, 0.5),
        percentile(&all, 0.99)
    );
    println!(
        "{:<28}{:>12.1} ms",
        format!("open, {} docs", ids.len()),
        open.as_secs_f64() * 1e3
    );
    println!(
        "{:<28}{:>12.1} ms",
        format!("open + read all {} docs", ids.len()),
        open_and_read.as_secs_f64() * 1e3
    );
    json.insert("local_write_p50_us".into(), percentile(&all, 0.5).into());
    json.insert("local_write_p99_us".into(), percentile(&all, 0.99).into());
    json.insert("docs".into(), ids.len().into());
    json.insert("open_ms".into(), (open.as_secs_f64() * 1e3).into());
    json.insert(
        "open_and_read_all_ms".into(),
        (open_and_read.as_secs_f64() * 1e3).into(),
    );
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {path}");
    }
    Ok(())
}
