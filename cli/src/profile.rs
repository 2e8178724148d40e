//! The lead's login: which relay, which certificate, which token, where the local store
//! is. Kept in a TOML file: `--config`, `REDLINE_CONFIG`, or
//! `$XDG_CONFIG_HOME/redline/config.toml` (`~/.config/redline/config.toml`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use redline_client::{Client, ClientConfig, RelayEndpoint};
use redline_proto::{MemberId, OrgId, TeamId, ZoneId};
use serde::{Deserialize, Serialize};

/// What `redline login` saves.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The relay's UDP address.
    pub relay: String,
    /// Its certificate's SHA-256 fingerprint.
    pub pin: String,
    /// The device token.
    pub token: String,
    /// The organisation whose roster to receive.
    pub org: Option<String>,
    /// Teams whose ledgers to receive (from the token unless given).
    pub teams: Vec<String>,
    /// Zones whose households books to receive (from the token unless given).
    pub zones: Vec<String>,
    /// Ledger days kept on this machine.
    pub keep_days: u32,
    /// The local store.
    pub store: PathBuf,
}

/// Where the profile lives.
pub fn path(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .context("cannot find a config directory: pass --config or set REDLINE_CONFIG")?;
    Ok(base.join("redline").join("config.toml"))
}

/// The exit code when nobody is logged in.
pub const NOT_LOGGED_IN: u8 = 3;

impl Profile {
    /// Reads the profile at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|_| {
            crate::Failure::new(
                NOT_LOGGED_IN,
                format!(
                    "not logged in ({} not found): run `redline login --relay ADDR --pin FINGERPRINT --token TOKEN`",
                    path.display()
                ),
            )
        })?;
        toml::from_str(&text).with_context(|| format!("reading {}", path.display()))
    }

    /// Writes the profile to `path` (owner-only: it holds the token).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = toml::to_string_pretty(self)?;
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Opens the local store with this profile.
    pub fn client(&self) -> anyhow::Result<Client> {
        let claims = redline_proto::token::peek(&self.token)?;
        let addr = self
            .relay
            .parse()
            .with_context(|| format!("relay address {:?}: expected ip:port", self.relay))?;
        let mut config = ClientConfig::new(MemberId::new(claims.member.as_str())?)
            .with_relay(RelayEndpoint::new(addr, &self.pin))
            .with_token(&self.token)
            .with_teams(
                self.teams
                    .iter()
                    .map(TeamId::new)
                    .collect::<Result<_, _>>()?,
            )
            .with_zones(
                self.zones
                    .iter()
                    .map(ZoneId::new)
                    .collect::<Result<_, _>>()?,
            )
            .with_keep_days(self.keep_days);
        if let Some(org) = &self.org {
            config = config.with_org(OrgId::new(org)?);
        }
        Client::open(&self.store, config)
            .with_context(|| format!("opening the local store {}", self.store.display()))
    }
}
