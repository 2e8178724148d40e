//! Fault injection for the reliability tests: a lossy UDP proxy between devices and the
//! relay, a storage wrapper whose writes can be made to fail, and the relay as a real
//! child process that can be killed (`SIGKILL`) or stopped (`SIGTERM`).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use redline_proto::{DeviceId, DocId};
use redline_server::Error;
use redline_server::storage::{
    ActorBindings, DeviceRecords, Documents, KeyValue, QuarantineStore, RelayStorage, SledStorage,
    StoredDoc, Uploads,
};
use tokio::net::UdpSocket;

/// What the proxy does to datagrams, in both directions.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Probability of dropping a datagram.
    pub drop: f64,
    /// Probability of sending a datagram twice.
    pub duplicate: f64,
    /// Fixed delay added to every datagram.
    pub delay: Duration,
    /// Extra random delay up to this much: datagrams overtake each other (reordering).
    pub jitter: Duration,
    /// Drop everything (a phone in a dead zone).
    pub blackhole: bool,
    /// Withhold, device to relay, every datagram carrying a QUIC Handshake packet for the
    /// next this-many connections: the device completes its handshake, the relay never
    /// does (a lost `Finished`, as a full socket buffer causes under load).
    pub stall_handshakes: usize,
}

/// Counts of what the proxy did.
#[derive(Debug, Default)]
pub struct ProxyCounts {
    /// Datagrams forwarded.
    pub forwarded: AtomicU64,
    /// Dropped (by `drop` or `blackhole`).
    pub dropped: AtomicU64,
    /// Sent twice.
    pub duplicated: AtomicU64,
    /// Upstream address changes.
    pub rebinds: AtomicU64,
}

struct ProxyState {
    faults: Faults,
    /// Bumped by [`UdpProxy::change_address`]: each client's upstream socket is replaced.
    generation: u64,
    /// Connections (by the relay's connection id) whose handshake is being withheld.
    stalled: HashSet<Vec<u8>>,
}

/// The destination connection id of the first Handshake packet among the QUIC packets
/// coalesced in `datagram` (long headers are not encrypted up to their length field).
fn handshake_dcid(mut datagram: &[u8]) -> Option<Vec<u8>> {
    fn varint(b: &[u8]) -> Option<(usize, usize)> {
        let first = *b.first()?;
        let n = 1usize << (first >> 6);
        let rest = b.get(1..n)?;
        let v = rest
            .iter()
            .fold(u64::from(first & 0x3f), |v, x| (v << 8) | u64::from(*x));
        Some((usize::try_from(v).ok()?, n))
    }
    while datagram.first().is_some_and(|b| b & 0x80 != 0) {
        let kind = (datagram[0] >> 4) & 0x03;
        let dcid_len = usize::from(*datagram.get(5)?);
        let dcid = datagram.get(6..6 + dcid_len)?;
        let mut at = 6 + dcid_len;
        at += 1 + usize::from(*datagram.get(at)?);
        match kind {
            2 => return Some(dcid.to_vec()),
            3 => return None,
            0 => {
                let (token, n) = varint(datagram.get(at..)?)?;
                at += n + token;
            }
            _ => {}
        }
        let (len, n) = varint(datagram.get(at..)?)?;
        datagram = datagram.get(at + n + len..)?;
    }
    None
}

/// A UDP proxy on loopback in front of the relay.
pub struct UdpProxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    /// What happened.
    pub counts: Arc<ProxyCounts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
    state: Arc<Mutex<ProxyState>>,
    counts: Arc<ProxyCounts>,
) {
    let (copies, delay) = {
        let s = state.lock().expect("proxy lock");
        let f = &s.faults;
        let mut rng = rand::rng();
        if f.blackhole || rng.random_bool(f.drop.clamp(0.0, 1.0)) {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let copies = if rng.random_bool(f.duplicate.clamp(0.0, 1.0)) {
            2
        } else {
            1
        };
        let jitter = if f.jitter.is_zero() {
            Duration::ZERO
        } else {
            f.jitter.mul_f64(rng.random::<f64>())
        };
        (copies, f.delay + jitter)
    };
    if copies == 2 {
        counts.duplicated.fetch_add(1, Ordering::Relaxed);
    }
    let send = async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        for _ in 0..copies {
            let _ = socket.send_to(&data, to).await;
        }
        counts.forwarded.fetch_add(1, Ordering::Relaxed);
    };
    if delay.is_zero() {
        send.await;
    } else {
        tokio::spawn(send);
    }
}

/// Whether a device-to-relay datagram is withheld by `stall_handshakes`.
fn withheld(state: &Mutex<ProxyState>, datagram: &[u8]) -> bool {
    let Some(dcid) = handshake_dcid(datagram) else {
        return false;
    };
    let mut s = state.lock().expect("proxy lock");
    if s.stalled.contains(&dcid) {
        return true;
    }
    if s.faults.stall_handshakes > 0 {
        s.faults.stall_handshakes -= 1;
        s.stalled.insert(dcid);
        return true;
    }
    false
}

impl UdpProxy {
    /// Starts a proxy on 127.0.0.1 forwarding to `relay`.
    pub async fn start(relay: SocketAddr) -> anyhow::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let state = Arc::new(Mutex::new(ProxyState {
            faults: Faults::default(),
            generation: 0,
            stalled: HashSet::new(),
        }));
        let counts = Arc::new(ProxyCounts::default());
        let (s, c) = (state.clone(), counts.clone());
        let task = tokio::spawn(async move {
            // Per client: its upstream socket and the generation it was made in.
            let mut upstreams: HashMap<SocketAddr, (Arc<UdpSocket>, u64)> = HashMap::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, client)) = front.recv_from(&mut buf).await else {
                    return;
                };
                let generation = s.lock().expect("proxy lock").generation;
                let fresh = upstreams.get(&client).is_none_or(|(_, g)| *g != generation);
                if fresh {
                    let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    let up = Arc::new(up);
                    if upstreams.contains_key(&client) {
                        c.rebinds.fetch_add(1, Ordering::Relaxed);
                    }
                    // Relay -> client, through the front socket. Old upstreams keep
                    // reading: the relay may answer on the old path for a while.
                    let (up2, front2, s2, c2) = (up.clone(), front.clone(), s.clone(), c.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok((n, _)) = up2.recv_from(&mut buf).await {
                            forward(
                                front2.clone(),
                                client,
                                buf[..n].to_vec(),
                                s2.clone(),
                                c2.clone(),
                            )
                            .await;
                        }
                    });
                    upstreams.insert(client, (up, generation));
                }
                if withheld(&s, &buf[..n]) {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let up = upstreams[&client].0.clone();
                forward(up, relay, buf[..n].to_vec(), s.clone(), c.clone()).await;
            }
        });
        Ok(Self {
            addr,
            state,
            counts,
            task,
        })
    }

    /// Where devices send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the faults.
    pub fn set(&self, faults: Faults) {
        self.state.lock().expect("proxy lock").faults = faults;
    }

    /// From the next datagram on, each client reaches the relay from a new address and
    /// port (a phone switching networks, as the relay sees it).
    pub fn change_address(&self) {
        self.state.lock().expect("proxy lock").generation += 1;
    }
}

/// Storage whose writes fail while [`FaultyStorage::failing`] is set (a full or broken
/// disk); reads keep working.
pub struct FaultyStorage<S: RelayStorage = SledStorage> {
    inner: Arc<S>,
    /// While true, every write fails.
    pub failing: Arc<AtomicBool>,
    /// Writes refused so far.
    pub refused: Arc<AtomicU64>,
    /// Each document write takes this many milliseconds longer (a slow disk).
    commit_delay_ms: Arc<AtomicU64>,
    /// While true, a flush reports success without making anything durable (a disk
    /// that lies about its cache: the relay acknowledges before the data is safe).
    lying_flush: Arc<AtomicBool>,
}

impl<S: RelayStorage> FaultyStorage<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, failing: Arc<AtomicBool>, refused: Arc<AtomicU64>) -> Self {
        Self::over(Arc::new(inner), failing, refused)
    }

    /// Wraps `inner`, which the caller keeps a handle to (to crash it, say).
    pub fn over(inner: Arc<S>, failing: Arc<AtomicBool>, refused: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            failing,
            refused,
            commit_delay_ms: Arc::new(AtomicU64::new(0)),
            lying_flush: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Makes flushes lie while `lying` holds true (see the field).
    pub fn with_lying_flush(mut self, lying: Arc<AtomicBool>) -> Self {
        self.lying_flush = lying;
        self
    }

    /// Slows every document write down by what `ms` holds (changeable at any time).
    pub fn with_commit_delay(mut self, ms: Arc<AtomicU64>) -> Self {
        self.commit_delay_ms = ms;
        self
    }

    fn check(&self) -> Result<(), Error> {
        if self.failing.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(Error::Storage(
                "injected fault: no space left on device".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl<S: RelayStorage> Documents for FaultyStorage<S> {
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }
    fn blocks(&self) -> bool {
        self.inner.blocks()
    }
    fn describe(&self) -> String {
        format!("{} (with injected faults)", self.inner.describe())
    }
    fn ping(&self) -> Result<(), Error> {
        self.inner.ping()
    }
    fn last_seq(&self) -> Result<u64, Error> {
        self.inner.last_seq()
    }
    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, Error> {
        self.inner.load(doc)
    }
    fn commit(&self, doc: &DocId, seq: u64, chunk: &[u8], heads: &[[u8; 32]]) -> Result<(), Error> {
        self.check()?;
        let delay = self.commit_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        self.inner.commit(doc, seq, chunk, heads)
    }
    fn compact(&self, doc: &DocId, snapshot: &[u8], covers: u64) -> Result<(), Error> {
        self.check()?;
        self.inner.compact(doc, snapshot, covers)
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    fn append(
        &self,
        doc: &DocId,
        expected: u64,
        chunk: &[u8],
        heads: &[[u8; 32]],
    ) -> Result<u64, Error> {
        self.check()?;
        self.inner.append(doc, expected, chunk, heads)
    }
    fn feed_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.feed_signal()
    }
    fn committed_feed(&self, after: u64) -> Result<(u64, Vec<(u64, DocId)>), Error> {
        self.inner.committed_feed(after)
    }
    fn committed_feed_chunks(
        &self,
        after: u64,
        most: u64,
    ) -> Result<redline_server::storage::FeedRead, Error> {
        self.inner.committed_feed_chunks(after, most)
    }
    fn append_lost(&self, doc: &DocId, seq: u64) -> bool {
        self.inner.append_lost(doc, seq)
    }
    fn chunks_after(
        &self,
        doc: &DocId,
        after: u64,
    ) -> Result<Option<Vec<redline_server::storage::SeqChunk>>, Error> {
        self.check()?;
        self.inner.chunks_after(doc, after)
    }
    fn flush(&self) -> Result<(), Error> {
        self.check()?;
        if self.lying_flush.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.flush()
    }
    fn feed(&self, after: u64, upto: u64) -> Result<Vec<(u64, DocId)>, Error> {
        self.inner.feed(after, upto)
    }
    fn heads_at(&self, doc: &DocId, seq: u64) -> Result<Option<Vec<[u8; 32]>>, Error> {
        self.inner.heads_at(doc, seq)
    }
    fn list(&self) -> Result<Vec<DocId>, Error> {
        self.inner.list()
    }
    fn exists(&self, doc: &DocId) -> Result<bool, Error> {
        self.inner.exists(doc)
    }
}

impl<S: RelayStorage> Uploads for FaultyStorage<S> {
    fn upload_len(&self, key: &[u8]) -> Result<u64, Error> {
        self.inner.upload_len(key)
    }
    fn put_piece(&self, key: &[u8], offset: u64, data: &[u8]) -> Result<(), Error> {
        self.check()?;
        self.inner.put_piece(key, offset, data)
    }
    fn upload_bytes(&self, key: &[u8]) -> Result<Vec<u8>, Error> {
        self.inner.upload_bytes(key)
    }
    fn drop_upload(&self, key: &[u8]) -> Result<(), Error> {
        self.inner.drop_upload(key)
    }
    fn touch_upload(&self, key: &[u8], now: u64) -> Result<(), Error> {
        self.check()?;
        self.inner.touch_upload(key, now)
    }
    fn staged_bytes(&self, prefix: &[u8]) -> Result<u64, Error> {
        self.inner.staged_bytes(prefix)
    }
    fn expire_uploads(&self, cutoff: u64) -> Result<usize, Error> {
        self.inner.expire_uploads(cutoff)
    }
}

impl<S: RelayStorage> ActorBindings for FaultyStorage<S> {
    fn bind_actor(&self, actor: &[u8], device: &DeviceId) -> Result<DeviceId, Error> {
        self.inner.bind_actor(actor, device)
    }
    fn actor_owner(&self, actor: &[u8]) -> Result<Option<DeviceId>, Error> {
        self.inner.actor_owner(actor)
    }
    fn actors_of(&self, device: &DeviceId) -> Result<usize, Error> {
        self.inner.actors_of(device)
    }
}

impl<S: RelayStorage> DeviceRecords for FaultyStorage<S> {
    fn save_device(&self, device: &DeviceId, record: &[u8]) -> Result<(), Error> {
        self.inner.save_device(device, record)
    }
    fn devices(&self) -> Result<Vec<Vec<u8>>, Error> {
        self.inner.devices()
    }
}

impl<S: RelayStorage> QuarantineStore for FaultyStorage<S> {
    fn put_quarantine(&self, key: &[u8], item: &[u8]) -> Result<(), Error> {
        self.check()?;
        self.inner.put_quarantine(key, item)
    }
    fn visit_quarantined(&self, visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), Error> {
        self.inner.visit_quarantined(visit)
    }
    fn quarantined_with(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, Error> {
        self.inner.quarantined_with(prefix)
    }
    fn held_bytes(&self, prefix: &[u8]) -> Result<u64, Error> {
        self.inner.held_bytes(prefix)
    }
    fn drop_quarantine(&self, key: &[u8]) -> Result<(), Error> {
        self.inner.drop_quarantine(key)
    }
}

/// The `redline-server` binary of the same build: next to this executable (binaries) or
/// one level up (test executables live in `deps/`).
pub fn server_exe() -> PathBuf {
    let here = std::env::current_exe()
        .expect("own path")
        .parent()
        .expect("a directory")
        .to_path_buf();
    let beside = here.join("redline-server");
    let exe = if beside.exists() {
        beside
    } else {
        here.parent().expect("target dir").join("redline-server")
    };
    assert!(
        exe.exists(),
        "{} is missing: run the workspace tests (cargo test --workspace builds it)",
        exe.display()
    );
    exe
}

/// Where a relay child's logs go: appended to the file `REDLINE_RELAY_LOG` names (with
/// `RUST_LOG` passed through), else nowhere.
fn relay_log() -> std::io::Result<Stdio> {
    match std::env::var_os("REDLINE_RELAY_LOG") {
        Some(path) => Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .into()),
        None => Ok(Stdio::null()),
    }
}

/// The relay as a child process.
pub struct RelayProcess {
    child: Child,
    dir: PathBuf,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its certificate fingerprint.
    pub fingerprint: String,
    /// Its `/metrics` and `/health` endpoint, when started with one.
    pub http: Option<SocketAddr>,
    /// Further arguments of `serve` (kept for a restart).
    extra: Vec<String>,
}

impl RelayProcess {
    /// Starts `redline-server serve` on `dir`, at `listen` (port 0: any), without the
    /// metrics endpoint.
    pub fn start(dir: &Path, listen: SocketAddr) -> anyhow::Result<Self> {
        Self::spawn(dir, listen, false, &[])
    }

    /// Like [`start`](Self::start), with `/metrics` and `/health` on a loopback port.
    pub fn start_with_http(dir: &Path) -> anyhow::Result<Self> {
        Self::spawn(dir, SocketAddr::from(([127, 0, 0, 1], 0)), true, &[])
    }

    /// A relay storing in the PostgreSQL database at `url` (its data dir `dir` keeps
    /// certificate and token key), at `listen`, with `/metrics` and `/health`.
    pub fn start_on_postgres(dir: &Path, listen: SocketAddr, url: &str) -> anyhow::Result<Self> {
        Self::spawn(dir, listen, true, &["--postgres-url", url])
    }

    fn spawn(dir: &Path, listen: SocketAddr, http: bool, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(server_exe())
            .args([
                "serve",
                "--http-listen",
                if http { "127.0.0.1:0" } else { "off" },
                "--listen",
                &listen.to_string(),
            ])
            .args(extra)
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(relay_log()?)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let (mut addr, mut pin, mut metrics) = (None, None, None);
        while addr.is_none() || pin.is_none() || (http && metrics.is_none()) {
            let Some(line) = lines.next() else {
                anyhow::bail!("the relay exited before it was ready");
            };
            let line = line?;
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first() {
                Some(&"listening") => addr = Some(words[2].parse()?),
                Some(&"fingerprint") => pin = Some(words[1].to_string()),
                Some(&"metrics") if http => {
                    let url = words.get(1).copied().unwrap_or_default();
                    let host = url
                        .trim_start_matches("http://")
                        .trim_end_matches("/metrics");
                    metrics = Some(host.parse()?);
                }
                _ => {}
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Self {
            child,
            dir: dir.to_path_buf(),
            addr: addr.expect("set"),
            fingerprint: pin.expect("set"),
            http: metrics,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// The body of an HTTP GET of `path` on the metrics endpoint (headers included).
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let http = self
            .http
            .ok_or_else(|| anyhow::anyhow!("started without the metrics endpoint"))?;
        let mut s = std::net::TcpStream::connect(http)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    /// The value of metric `name` (its first sample).
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        self.get("/metrics")?
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no metric {name}"))
    }

    /// `kill -9`, then wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same data dir and address.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        // The port is free once the process is gone; retry briefly in case the OS lags.
        let mut last = None;
        for _ in 0..20 {
            let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
            match Self::spawn(&self.dir, self.addr, self.http.is_some(), &extra) {
                Ok(again) => {
                    // The old child is already dead; dropping it is harmless.
                    drop(std::mem::replace(self, again));
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.expect("tried"))
    }

    /// Sends SIGTERM and waits up to `within` for the exit status.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the relay did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/proc/<pid>/status` of the relay process.
    pub fn status_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/status", self.child.id()))
    }

    /// Peak resident memory (VmHWM) and current (VmRSS) in KiB, from /proc.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        Some((field("VmHWM:")?, field("VmRSS:")?))
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redline_server::storage::conformance::{self, Harness};

    /// The fault-injecting wrapper, not failing: it must keep the storage contract too,
    /// or the reliability suite would test a store the relay never has.
    struct Faulty {
        dirs: Vec<tempfile::TempDir>,
    }

    impl Harness for Faulty {
        type Store = FaultyStorage;
        fn fresh(&mut self) -> FaultyStorage {
            let dir = tempfile::tempdir().unwrap();
            let inner = SledStorage::open(dir.path()).unwrap();
            self.dirs.push(dir);
            FaultyStorage::new(inner, Default::default(), Default::default())
        }
        fn restart(&mut self, store: FaultyStorage) -> FaultyStorage {
            let path = store.inner.path();
            drop(store);
            let opened = conformance::reopen(|| SledStorage::open(&path));
            FaultyStorage::new(opened, Default::default(), Default::default())
        }
    }

    #[test]
    fn the_faulty_wrapper_keeps_the_storage_contract_while_healthy() {
        conformance::run(&mut Faulty { dirs: Vec::new() });
    }
}
