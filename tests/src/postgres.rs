//! A real PostgreSQL server for tests, started by the test itself: `initdb` in a
//! temporary directory, `pg_ctl start` on a free loopback port, stopped (immediately)
//! and removed when dropped. As root (CI containers), the server runs as the `postgres`
//! user, which PostgreSQL requires.
//!
//! [`TestPostgres::start_or_skip`] returns `None` (with a loud message) only when
//! PostgreSQL is not installed and `CI` is not set; in CI a missing or broken
//! PostgreSQL fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// A PostgreSQL server of a test.
pub struct TestPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// Run server commands as this user (`None`: as ourselves).
    run_as: Option<String>,
    next_db: AtomicU32,
    /// Further `-c name=value` settings of the server.
    settings: Vec<String>,
}

/// The directory holding `initdb` and `pg_ctl`: `REDLINE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian), else `pg_config --bindir`.
pub fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("REDLINE_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    bin.join("initdb").exists().then_some(bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl TestPostgres {
    /// Starts a server, or says loudly why it cannot (`None`) when not in CI.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        match Self::start() {
            Ok(pg) => Some(pg),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!(
                    "\n*** SKIPPED {test}: PostgreSQL cannot be started here: {e:#}\n\
                     *** (install the `postgresql` package; CI does, and fails instead)\n"
                );
                None
            }
            Err(e) => panic!("{test}: PostgreSQL cannot be started: {e:#}"),
        }
    }

    /// Creates a cluster in a temporary directory and starts it on a free loopback
    /// port.
    pub fn start() -> anyhow::Result<Self> {
        let pg = Self::init()?;
        pg.start_server()?;
        Ok(pg)
    }

    /// A server that accepts TLS connections only, with the certificate and key given
    /// (PEM); returns it and the path of `ca_pem` written beside it, for clients.
    pub fn start_tls(
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
    ) -> anyhow::Result<(Self, PathBuf)> {
        let mut pg = Self::init()?;
        let data = pg.data_dir();
        std::fs::write(data.join("server.crt"), cert_pem)?;
        std::fs::write(data.join("server.key"), key_pem)?;
        // Loopback only, and only over TLS: a plain connection is refused.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        )?;
        let ca = pg.dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        if pg.run_as.is_some() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(pg.dir.path())
                .status()?;
            if !status.success() {
                bail!("cannot give the certificate to the postgres user");
            }
        }
        pg.settings.push("ssl=on".into());
        pg.start_server()?;
        Ok((pg, ca))
    }

    /// A new cluster, not started.
    fn init() -> anyhow::Result<Self> {
        let bin = find_bin().context("no PostgreSQL server binaries (initdb) found")?;
        let dir = tempfile::Builder::new().prefix("redline-pg").tempdir()?;
        let run_as = is_root().then(|| "postgres".to_string());
        if run_as.is_some() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                bail!("cannot give {} to the postgres user", dir.path().display());
            }
        }
        let pg = Self {
            bin,
            dir,
            port: free_port()?,
            run_as,
            next_db: AtomicU32::new(0),
            settings: Vec::new(),
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-A",
                "trust",
                "-U",
                "redline",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of the server's programs (as the `postgres` user when we are root).
    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let exe = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the server (again, after [`crash`](Self::crash)).
    pub fn start_server(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            path_str(self.dir.path())?
        );
        for s in &self.settings {
            options.push_str(" -c ");
            options.push_str(s);
        }
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-o",
                &options,
                "-l",
                path_str(&log)?,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .with_context(|| {
            format!(
                "server log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        Ok(())
    }

    /// Kills the server the hard way (`pg_ctl stop -m immediate`: no checkpoint, like a
    /// power cut for the server process). Start it again with
    /// [`start_server`](Self::start_server).
    pub fn crash(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", "immediate", "-w", "stop"],
        )?;
        Ok(())
    }

    /// The server's main process (from `postmaster.pid`).
    pub fn server_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The server's temporary directory.
    pub fn dir_path(&self) -> &Path {
        self.dir.path()
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://redline@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub fn fresh_database(&self) -> anyhow::Result<String> {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("redline_test_{n}");
        let port = self.port.to_string();
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "redline", &name])
            .output()
            .context("running createdb")?;
        if !out.status.success() {
            bail!("createdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(self.url(&name))
    }

    /// Runs SQL through `psql` on database `db`; returns its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "redline",
                "-d",
                db,
                "-At",
                "-c",
                sql,
            ])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 temporary path")
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Ok(data) = self.data_dir().into_os_string().into_string() {
            let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        }
    }
}

/// CPU seconds (user + system) of process `pid` and every process below it.
pub fn process_tree_cpu_seconds(pid: u32) -> f64 {
    let tck = 100.0; // Linux reports /proc times in USER_HZ, 100 on every supported arch.
    let mut total = 0.0;
    let mut parents = vec![pid];
    let procs: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ppid: u32 = f.get(1)?.parse().ok()?;
            let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some((p, ppid, ticks / tck))
        })
        .collect();
    while let Some(parent) = parents.pop() {
        for (p, ppid, cpu) in &procs {
            if *p == parent {
                total += cpu;
            }
            if *ppid == parent {
                parents.push(*p);
            }
        }
    }
    total
}
