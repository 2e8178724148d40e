//! A phone as its own process, for crash tests: counts up a tally, one durable write at a
//! time, printing `wrote N` after each write returns (and `synced N` after each sync in
//! `sync` mode). The test kills it with SIGKILL at random moments and checks the store.
//!
//! Usage: device_child STORE RELAY_ADDR PIN TOKEN write|sync

use std::io::Write;

use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::{MemberId, TeamId};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 6,
        "usage: device_child STORE RELAY_ADDR PIN TOKEN write|sync"
    );
    let sync = args[5] == "sync";
    let member = redline_proto::token::peek(&args[4])?.member;
    let config = ClientConfig::new(MemberId::new(member.as_str())?)
        .with_relay(RelayEndpoint::new(args[2].parse()?, &args[3]))
        .with_token(&args[4])
        .with_teams(vec![TeamId::new("team-1")?]);
    let client = Client::open(&args[1], config)?;
    let (team, day) = (TeamId::new("team-1")?, redline_tests::today());
    let me = client.identity().device.to_string();
    let mut n = client
        .ledger(&team, &day)?
        .and_then(|v| {
            v.tallies_by_member
                .get(member.as_str())
                .and_then(|t| t.get("count").copied())
        })
        .unwrap_or(0);
    let mut out = std::io::stdout().lock();
    writeln!(out, "start {n} {me}")?;
    loop {
        client.add_to_tally(&team, &day, "count", 1)?;
        n += 1;
        writeln!(out, "wrote {n}")?;
        out.flush()?;
        if sync && client.sync().await.is_ok() {
            writeln!(out, "synced {n}")?;
            out.flush()?;
        }
    }
}
