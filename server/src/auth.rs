//! Who may connect: the relay's token key, token issuance, and the revocation list.
//!
//! - The key (32 random bytes) lives in `<data_dir>/secret/token.key`, readable by the
//!   owner only, created on first use. Tokens are HMAC-SHA256-signed with it (see
//!   [`redline_proto::token`]); replacing the key invalidates every token at once.
//! - Revocations are lines of token ids in `<data_dir>/revoked`. `redline-server token
//!   revoke` appends to it whether or not the relay runs (sled allows one process, a text
//!   file any number); a running relay notices the change within
//!   [`REVOCATION_POLL`] and closes the revoked token's connections.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redline_proto::token::{self, Claims, KEY_LEN, Role, TokenError, TokenId};
use redline_proto::{DeviceId, ErrorCode, MemberId, TeamId, ZoneId};
use tokio::sync::watch;

use crate::Error;

/// How often a running relay looks at the revocation list.
pub const REVOCATION_POLL: Duration = Duration::from_millis(100);

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("secret").join("token.key")
}

fn revoked_path(data_dir: &Path) -> PathBuf {
    data_dir.join("revoked")
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

/// Loads the relay's token key, creating it on first use.
pub fn load_or_create_key(data_dir: &Path) -> Result<[u8; KEY_LEN], Error> {
    let path = key_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            return bytes.try_into().map_err(|b: Vec<u8>| {
                Error::Tls(format!(
                    "token key {} has {} bytes, expected {KEY_LEN}",
                    path.display(),
                    b.len()
                ))
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read", &path)(e)),
    }
    let dir = path.parent().expect("key path has a parent");
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let key: [u8; KEY_LEN] = rand::random();
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&key).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    // Another process may have created it meanwhile: keep whichever landed first.
    if path.exists() {
        let _ = std::fs::remove_file(&tmp);
        return load_or_create_key(data_dir);
    }
    std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
    Ok(key)
}

/// What a new token grants.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The device that will hold it.
    pub device: DeviceId,
    /// Its member.
    pub member: MemberId,
    /// Its role.
    pub role: Role,
    /// Teams it may read and write.
    pub teams: Vec<TeamId>,
    /// Zones it may read and write.
    pub zones: Vec<ZoneId>,
    /// How long it is valid.
    pub ttl: Duration,
}

/// Issues a token signed with the key in `data_dir`.
pub fn issue(data_dir: &Path, request: TokenRequest) -> Result<(Claims, String), Error> {
    let key = load_or_create_key(data_dir)?;
    let issued = now_secs();
    let claims = Claims {
        id: TokenId::random(),
        device: request.device,
        member: request.member,
        role: request.role,
        teams: request.teams,
        zones: request.zones,
        issued,
        expires: issued.saturating_add(request.ttl.as_secs()),
    };
    let token = token::sign(&claims, &key);
    Ok((claims, token))
}

/// Adds `id` to the revocation list in `data_dir` (durably, before returning).
pub fn revoke(data_dir: &Path, id: TokenId) -> Result<(), Error> {
    std::fs::create_dir_all(data_dir).map_err(io("create", data_dir))?;
    let path = revoked_path(data_dir);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io("open", &path))?;
    writeln!(f, "{id}").map_err(io("write", &path))?;
    f.sync_all().map_err(io("sync", &path))
}

/// Reads the revocation list (missing file: nothing revoked). Lines that are not token
/// ids (comments, damage) are skipped.
pub fn revoked(data_dir: &Path) -> Result<HashSet<TokenId>, Error> {
    let path = revoked_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| TokenId::parse(l.split('#').next().unwrap_or("")).ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(io("read", &path)(e)),
    }
}

/// Why a device is turned away at the door.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// The code sent to the device.
    pub code: ErrorCode,
    /// The explanation sent to the device.
    pub text: String,
}

/// The running relay's view of tokens: the key, and the revocation list kept current.
pub struct Authority {
    key: [u8; KEY_LEN],
    data_dir: PathBuf,
    revoked: RwLock<HashSet<TokenId>>,
    /// Bumped whenever the revocation list changes.
    generation: watch::Sender<u64>,
}

impl Authority {
    /// Loads the key (creating it) and the revocation list of `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let key = load_or_create_key(data_dir)?;
        let list = revoked(data_dir)?;
        Ok(Self {
            key,
            data_dir: data_dir.to_path_buf(),
            revoked: RwLock::new(list),
            generation: watch::channel(0).0,
        })
    }

    /// Checks a device's token: signature, expiry, revocation, and that it was issued to
    /// `device`.
    pub fn admit(&self, token: &str, device: &DeviceId) -> Result<Claims, Denied> {
        let claims = token::verify(token, &self.key, now_secs()).map_err(|e| match e {
            TokenError::Expired { .. } => Denied {
                code: ErrorCode::TOKEN_EXPIRED,
                text: e.to_string(),
            },
            _ if token.is_empty() => Denied {
                code: ErrorCode::UNAUTHORIZED,
                text: "no device token: ask an operator for one (redline-server token issue)"
                    .into(),
            },
            other => Denied {
                code: ErrorCode::UNAUTHORIZED,
                text: other.to_string(),
            },
        })?;
        if self.is_revoked(&claims.id) {
            return Err(Denied {
                code: ErrorCode::TOKEN_REVOKED,
                text: format!(
                    "token {} was revoked; ask your lead for a new one",
                    claims.id
                ),
            });
        }
        if claims.device != *device {
            return Err(Denied {
                code: ErrorCode::UNAUTHORIZED,
                text: format!(
                    "this token was issued to device {}, not {device}",
                    claims.device
                ),
            });
        }
        Ok(claims)
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &TokenId) -> bool {
        self.revoked.read().expect("revocations lock").contains(id)
    }

    /// A receiver that changes whenever the revocation list does.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Re-reads the revocation list; tells watchers if it changed.
    pub fn reload(&self) -> Result<(), Error> {
        let list = revoked(&self.data_dir)?;
        let mut current = self.revoked.write().expect("revocations lock");
        if *current != list {
            *current = list;
            drop(current);
            self.generation.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    /// Polls the revocation list until `stop` fires.
    pub async fn watch_file(&self, mut stop: watch::Receiver<bool>) {
        let path = revoked_path(&self.data_dir);
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        };
        let mut last = stamp(&path);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(REVOCATION_POLL) => {}
                _ = stop.changed() => return,
            }
            let now = stamp(&path);
            if now != last {
                last = now;
                if let Err(e) = self.reload() {
                    tracing::warn!("cannot read the revocation list: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> TokenRequest {
        TokenRequest {
            device: DeviceId::new("phone-1").unwrap(),
            member: MemberId::new("ana").unwrap(),
            role: Role::Volunteer,
            teams: vec![TeamId::new("t1").unwrap()],
            zones: vec![],
            ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn issued_tokens_are_admitted_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let (claims, t) = issue(dir.path(), request()).unwrap();
        let authority = Authority::open(dir.path()).unwrap();
        let phone = DeviceId::new("phone-1").unwrap();
        assert_eq!(authority.admit(&t, &phone).unwrap(), claims);
        let other = DeviceId::new("phone-2").unwrap();
        assert_eq!(
            authority.admit(&t, &other).unwrap_err().code,
            ErrorCode::UNAUTHORIZED
        );
        assert_eq!(
            authority.admit("", &phone).unwrap_err().code,
            ErrorCode::UNAUTHORIZED
        );
        revoke(dir.path(), claims.id).unwrap();
        let w = authority.watch();
        authority.reload().unwrap();
        assert!(w.has_changed().unwrap());
        assert_eq!(
            authority.admit(&t, &phone).unwrap_err().code,
            ErrorCode::TOKEN_REVOKED
        );
        // The key persists: a restarted relay admits the same tokens.
        let (_, t2) = issue(dir.path(), request()).unwrap();
        assert!(
            Authority::open(dir.path())
                .unwrap()
                .admit(&t2, &phone)
                .is_ok()
        );
    }

    #[test]
    fn an_expired_token_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = request();
        r.ttl = Duration::ZERO;
        let (_, t) = issue(dir.path(), r).unwrap();
        let authority = Authority::open(dir.path()).unwrap();
        let denied = authority
            .admit(&t, &DeviceId::new("phone-1").unwrap())
            .unwrap_err();
        assert_eq!(denied.code, ErrorCode::TOKEN_EXPIRED);
    }
}
