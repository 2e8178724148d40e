//! What the CLI suites share: the two binaries, tokens, logins and phones against a
//! relay process.
#![allow(dead_code)]

use std::path::Path;

use assert_cmd::Command as Cmd;
use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::{MemberId, TeamId, ZoneId};
use redline_tests::faults::{RelayProcess, server_exe};

pub fn server() -> Cmd {
    Cmd::new(server_exe())
}

pub fn redline(config: &Path) -> Cmd {
    let mut c = Cmd::cargo_bin("redline").unwrap();
    c.env("REDLINE_CONFIG", config).env_remove("REDLINE_TOKEN");
    c
}

/// `redline login` against `relay` with `token`, its profile in `config`.
pub fn log_in(config: &Path, relay: &RelayProcess, token: &str) -> Cmd {
    let mut c = redline(config);
    c.args(["login", "--relay", &relay.addr.to_string(), "--pin"])
        .arg(&relay.fingerprint)
        .args(["--token", token]);
    c
}

pub fn issue(relay_dir: &Path, member: &str, device: &str, role: &str) -> String {
    let out = server()
        .args(["token", "issue", "--data-dir"])
        .arg(relay_dir)
        .args([
            "--member", member, "--device", device, "--role", role, "--team", "team-1", "--zones",
            "z1",
        ])
        .assert()
        .success();
    String::from_utf8(out.get_output().stdout.clone())
        .unwrap()
        .trim()
        .to_string()
}

pub fn phone(dir: &Path, relay: &RelayProcess, member: &str, token: String) -> Client {
    let config = ClientConfig::new(MemberId::new(member).unwrap())
        .with_relay(RelayEndpoint::new(relay.addr, &relay.fingerprint))
        .with_token(token)
        .with_teams(vec![TeamId::new("team-1").unwrap()])
        .with_zones(vec![ZoneId::new("z1").unwrap()]);
    Client::open(dir, config).unwrap()
}

pub fn stdout(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8_lossy(&a.get_output().stdout).into_owned()
}

/// `redline-server init` in `relay_dir`, then the relay as a process on a free port.
pub fn init_and_start(relay_dir: &Path) -> RelayProcess {
    server()
        .args(["init", "--org", "district-9", "--data-dir"])
        .arg(relay_dir)
        .assert()
        .success();
    RelayProcess::start(relay_dir, ([127, 0, 0, 1], 0).into()).unwrap()
}

/// A household at "Block 7" in `zone`, recorded on `phone`; its id.
pub fn block_7(phone: &Client, zone: &ZoneId) -> String {
    phone
        .add_household(
            zone,
            redline_client::NewHousehold {
                address: "Block 7".into(),
                residents: 2,
                contact: None,
                flags: vec![],
            },
        )
        .unwrap()
}

/// The lead "lena" logged in with `redline login`; the profile's path.
pub fn lead_logged_in(dir: &Path, relay_dir: &Path, relay: &RelayProcess) -> std::path::PathBuf {
    let config = dir.join("lead.toml");
    log_in(
        &config,
        relay,
        &issue(relay_dir, "lena", "laptop-lena", "lead"),
    )
    .assert()
    .success();
    config
}
