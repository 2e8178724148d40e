//! Who may connect: the relay's token key, token issuance, and the revocation list.
//!
//! - The key (32 random bytes) lives in `<data_dir>/secret/token.key`, readable by the
//!   owner only, created on first use. Tokens are HMAC-SHA256-signed with it (see
//!   [`redline_proto::token`]); replacing the key invalidates every token at once.
//! - Revocations are lines of token ids in a text file, `<data_dir>/revoked` unless
//!   `revoked_file` puts it elsewhere (outside the data dir's backups: restoring an older
//!   copy of the data dir must not un-revoke a token). `redline-server token revoke`
//!   appends to it whether or not the relay runs (sled allows one process, a text file
//!   any number); a running relay notices the change within [`REVOCATION_POLL`] and
//!   closes the revoked token's connections.
//! - A clock before [`CLOCK_FLOOR_SECS`] admits nobody, and a token issued later than
//!   the clock allows (beyond a few minutes of skew) is not valid yet.

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

/// Unix seconds now (0 if the clock reads before 1970).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// No clock that admits tokens reads earlier than this (2024-01-01): a relay whose clock
/// was reset (no battery, no time sync) would otherwise find every token unexpired.
pub const CLOCK_FLOOR_SECS: u64 = 1_704_067_200;

fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("secret").join("token.key")
}

/// Where the revocation list lives unless configured elsewhere: `<data_dir>/revoked`.
pub fn default_revoked_file(data_dir: &Path) -> PathBuf {
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

/// Creates `dir` (and its parents) readable by the owner only (0700 on Unix); an
/// existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io("create", dir))
}

/// Refuses a key file that other users can read: anyone who reads it can mint tokens.
fn check_key_permissions(path: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(io("inspect", path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::Config(format!(
                "the token key {} is readable by other users (mode {:o}): anyone who reads it can issue tokens. Run: chmod 600 {}",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Loads the relay's token key, creating it on first use (0600, in a 0700 directory).
/// A key file readable by others is refused with an error saying how to fix it.
pub fn load_or_create_key(data_dir: &Path) -> Result<[u8; KEY_LEN], Error> {
    let path = key_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            check_key_permissions(&path)?;
            return bytes.try_into().map_err(|b: Vec<u8>| {
                Error::tls_setup(format!(
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
    create_private_dir(data_dir)?;
    create_private_dir(dir)?;
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
    revoke_in(&default_revoked_file(data_dir), id)
}

/// Adds `id` to the revocation list at `path` (durably, before returning).
pub fn revoke_in(path: &Path, id: TokenId) -> Result<(), Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let path = path.to_path_buf();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io("open", &path))?;
    writeln!(f, "{id}").map_err(io("write", &path))?;
    f.sync_all().map_err(io("sync", &path))
}

/// Reads the revocation list at `path` (missing file: nothing revoked). Lines that are
/// not token ids (comments, damage) are skipped.
pub fn revoked(path: &Path) -> Result<HashSet<TokenId>, Error> {
    let path = path.to_path_buf();
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
    revoked_file: PathBuf,
    revoked: RwLock<HashSet<TokenId>>,
    /// Bumped whenever the revocation list changes.
    generation: watch::Sender<u64>,
}

impl Authority {
    /// Loads the key of `data_dir` (creating it) and the revocation list at
    /// `revoked_file`.
    pub fn open(data_dir: &Path, revoked_file: &Path) -> Result<Self, Error> {
        let key = load_or_create_key(data_dir)?;
        let list = revoked(revoked_file)?;
        Ok(Self {
            key,
            revoked_file: revoked_file.to_path_buf(),
            revoked: RwLock::new(list),
            generation: watch::channel(0).0,
        })
    }

    /// Checks a device's token: signature, expiry, revocation, and that it was issued to
    /// `device`.
    pub fn admit(&self, token: &str, device: &DeviceId) -> Result<Claims, Denied> {
        self.admit_at(token, device, now_secs())
    }

    /// [`admit`](Self::admit) with the clock reading `now` (Unix seconds). A clock
    /// before [`CLOCK_FLOOR_SECS`] admits nobody.
    pub fn admit_at(&self, token: &str, device: &DeviceId, now: u64) -> Result<Claims, Denied> {
        if now < CLOCK_FLOOR_SECS {
            return Err(Denied {
                code: ErrorCode::UNAUTHORIZED,
                text: format!(
                    "the relay's clock reads {now} (Unix seconds), before it could have issued any token; the operator must set the clock"
                ),
            });
        }
        let claims = token::verify(token, &self.key, now).map_err(|e| match e {
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
        let list = revoked(&self.revoked_file)?;
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
        let path = self.revoked_file.clone();
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
        let authority = Authority::open(dir.path(), &default_revoked_file(dir.path())).unwrap();
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
            Authority::open(dir.path(), &default_revoked_file(dir.path()))
                .unwrap()
                .admit(&t2, &phone)
                .is_ok()
        );
    }

    #[test]
    fn a_clock_before_its_floor_or_a_token_from_the_future_admits_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let (_, t) = issue(dir.path(), request()).unwrap();
        let authority = Authority::open(dir.path(), &default_revoked_file(dir.path())).unwrap();
        let phone = DeviceId::new("phone-1").unwrap();
        for now in [0, CLOCK_FLOOR_SECS - 1] {
            let denied = authority.admit_at(&t, &phone, now).unwrap_err();
            assert_eq!(denied.code, ErrorCode::UNAUTHORIZED);
            assert!(denied.text.contains("clock"), "{}", denied.text);
        }
        // Issued now, checked by a clock an hour behind: not valid yet.
        let early = now_secs() - 3_600;
        assert!(
            authority
                .admit_at(&t, &phone, early)
                .unwrap_err()
                .text
                .contains("clock")
        );
        assert!(authority.admit_at(&t, &phone, now_secs()).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn the_key_is_private_and_a_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        load_or_create_key(&data).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("secret")), 0o700);
        assert_eq!(mode(&key_path(&data)), 0o600);
        std::fs::set_permissions(key_path(&data), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_key(&data).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn an_expired_token_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = request();
        r.ttl = Duration::ZERO;
        let (_, t) = issue(dir.path(), r).unwrap();
        let authority = Authority::open(dir.path(), &default_revoked_file(dir.path())).unwrap();
        let denied = authority
            .admit(&t, &DeviceId::new("phone-1").unwrap())
            .unwrap_err();
        assert_eq!(denied.code, ErrorCode::TOKEN_EXPIRED);
    }
}
