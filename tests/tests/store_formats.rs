//! Stores written by earlier releases open and keep working: a relay data dir and a
//! phone store written by the code of December 2026 (before the phone's store became
//! snapshot + appended chunks) are committed under `tests/fixtures/formats-2026-12/`.
//! Each test copies them to a temporary directory, opens them with today's code, reads
//! what was written, writes more, syncs, and reopens.
//!
//! `cargo test -p redline-tests --test store_formats -- --ignored write_fixtures`
//! rewrites the fixtures (only ever with the release whose format they pin).

use std::path::{Path, PathBuf};
use std::time::Duration;

use redline_client::{
    Client, ClientConfig, NeedCategory, NewHousehold, NewNeed, NewTask, Priority, TaskKind,
};
use redline_proto::token::Role;
use redline_proto::{Day, DeviceId, MemberId, TeamId, ZoneId};
use redline_server::auth::TokenRequest;
use redline_tests::{copy_dir, endpoint, start_relay};

const FIXTURES: &str = "tests/fixtures/formats-2026-12";
const DAY: &str = "2026-11-30";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../")
        .join(FIXTURES)
}

fn team() -> TeamId {
    TeamId::new("team-1").unwrap()
}

fn zone() -> ZoneId {
    ZoneId::new("z1").unwrap()
}

/// A phone on `relay` for the store in `dir`, with a fresh token for `device`.
fn open_phone(
    dir: &Path,
    relay: &redline_server::RelayHandle,
    device: &DeviceId,
) -> anyhow::Result<Client> {
    let (_, token) = redline_server::auth::issue(
        relay.data_dir(),
        TokenRequest {
            device: device.clone(),
            member: MemberId::new("amira")?,
            role: Role::Volunteer,
            teams: vec![team()],
            zones: vec![zone()],
            ttl: Duration::from_secs(86_400),
        },
    )?;
    let config = ClientConfig::new(MemberId::new("amira")?)
        .with_relay(endpoint(relay))
        .with_token(token)
        .with_teams(vec![team()])
        .with_zones(vec![zone()])
        .with_keep_days(36_500);
    Ok(Client::open(dir, config)?)
}

/// Git keeps no modes beyond the executable bit: give the relay's secret the modes it
/// insists on.
fn private_modes(relay_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(relay_dir, std::fs::Permissions::from_mode(0o700))?;
    let secret = relay_dir.join("secret");
    if secret.exists() {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(&secret)? {
            std::fs::set_permissions(entry?.path(), std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

#[tokio::test]
#[ignore = "rewrites the committed fixtures; run only with the release they pin"]
async fn write_fixtures() -> anyhow::Result<()> {
    let root = fixtures();
    let _ = std::fs::remove_dir_all(&root);
    let (relay_dir, phone_dir) = (root.join("relay"), root.join("phone"));
    std::fs::create_dir_all(&root)?;
    let relay = start_relay(&relay_dir).await?;
    let device = redline_tests::device_for(&phone_dir);
    let phone = open_phone(&phone_dir, &relay, &device)?;
    let day = Day::new(DAY)?;
    for i in 0..5 {
        phone.add_task(
            &team(),
            &day,
            NewTask::new(TaskKind::Screening, format!("block {i}")),
        )?;
    }
    for _ in 0..20 {
        phone.add_to_tally(&team(), &day, "screened", 3)?;
    }
    let home = phone.add_household(
        &zone(),
        NewHousehold {
            address: "Wall Street 4".into(),
            residents: 3,
            contact: None,
            flags: Vec::new(),
        },
    )?;
    phone.add_need(
        &zone(),
        NewNeed {
            household: home,
            category: NeedCategory::Medicine,
            detail: "insulin".into(),
            priority: Priority::Urgent,
        },
    )?;
    phone.sync().await?;
    // Written after the sync: only the phone holds these.
    for _ in 0..4 {
        phone.add_to_tally(&team(), &day, "screened", 1)?;
    }
    std::fs::write(root.join("device.txt"), device.to_string())?;
    drop(phone);
    relay.shutdown().await?;
    Ok(())
}

/// The phone and relay written by the release of December 2026 open, read, write and
/// sync with today's code, and what they hold survives a reopen.
#[tokio::test]
async fn a_phone_store_and_a_relay_dir_from_december_2026_keep_working() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (relay_dir, phone_dir) = (tmp.path().join("relay"), tmp.path().join("phone"));
    copy_dir(&fixtures().join("relay"), &relay_dir)?;
    copy_dir(&fixtures().join("phone"), &phone_dir)?;
    private_modes(&relay_dir)?;
    let device = DeviceId::new(std::fs::read_to_string(fixtures().join("device.txt"))?.trim())?;
    let day = Day::new(DAY)?;

    let relay = start_relay(&relay_dir).await?;
    let phone = open_phone(&phone_dir, &relay, &device)?;
    assert_eq!(
        phone.identity().device,
        device,
        "the store kept its identity"
    );
    let ledger = phone.ledger(&team(), &day)?.expect("the old ledger");
    assert_eq!(ledger.tasks.len(), 5);
    assert_eq!(phone.day_totals(&team(), &day)?.get("screened"), Some(&64));
    let needs = phone.households(&zone())?.expect("the old needs book");
    assert_eq!(needs.needs.len(), 1);

    // New writes land on the old store, and the sync delivers the old unsynced ones too.
    phone.add_to_tally(&team(), &day, "screened", 6)?;
    phone.sync().await?;
    let id = redline_proto::DocId::ledger(&team(), &day);
    assert_eq!(relay.heads(&id).await?, phone.heads(&id)?);
    let stored = relay.document(&id).await?.expect("relay holds the ledger");
    let totals = redline_client::ledger::view(&stored)?.tallies;
    assert_eq!(totals.get("screened"), Some(&70));
    drop(phone);

    // And all of it is there after a reopen.
    let phone = open_phone(&phone_dir, &relay, &device)?;
    assert_eq!(phone.day_totals(&team(), &day)?.get("screened"), Some(&70));
    assert_eq!(phone.heads(&id)?, relay.heads(&id).await?);
    relay.shutdown().await?;
    Ok(())
}
