//! The relay's UDP socket: kernel buffers sized for many phones at once, and the
//! kernel's count of datagrams it dropped because the relay did not read them in time
//! (`/proc/self/net/udp`, Linux; exported as `redline_udp_receive_drops_total`).

use std::net::SocketAddr;

use tracing::debug;

/// The UDP buffers the relay asked the kernel for, and what it got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpBuffers {
    /// Bytes asked for, each way.
    pub wanted: usize,
    /// Receive buffer granted.
    pub receive: usize,
    /// Send buffer granted.
    pub send: usize,
}

impl UdpBuffers {
    /// Whether the kernel granted less than asked (its `rmem_max`/`wmem_max` cap).
    pub fn capped(&self) -> bool {
        self.receive < self.wanted || self.send < self.wanted
    }

    /// One calm line for operators: what the relay got and, if capped, what to do.
    pub fn describe(&self) -> String {
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        if self.capped() {
            format!(
                "{:.1} MiB receive, {:.1} MiB send (asked {:.0} MiB: the kernel caps them; for hundreds of phones at once raise net.core.rmem_max and wmem_max, docs/DEPLOYMENT.md)",
                mib(self.receive),
                mib(self.send),
                mib(self.wanted)
            )
        } else {
            format!("{:.0} MiB each way", mib(self.receive))
        }
    }
}

/// The relay's UDP socket, with kernel buffers as large as `buffer` (or as the kernel
/// allows: it caps them at `net.core.rmem_max`/`wmem_max`; the relay reports what it
/// got in its start-up line and `/health`).
pub(crate) fn socket(
    listen: SocketAddr,
    buffer: usize,
) -> std::io::Result<(std::net::UdpSocket, UdpBuffers)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if listen.is_ipv6() {
        // Dual-stack where the OS allows it, as quinn's own binding does.
        let _ = socket.set_only_v6(false);
    }
    let mut granted = UdpBuffers {
        wanted: buffer,
        ..UdpBuffers::default()
    };
    for (what, set, get) in [
        (
            "receive",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
            Socket::recv_buffer_size as fn(&Socket) -> std::io::Result<usize>,
        ),
        (
            "send",
            Socket::set_send_buffer_size,
            Socket::send_buffer_size,
        ),
    ] {
        if let Err(e) = set(&socket, buffer) {
            debug!("cannot set the UDP {what} buffer to {buffer} bytes: {e}");
        }
        // Linux grants up to the sysctl cap and reports double what it granted (its
        // bookkeeping counts against the same budget).
        let reported = get(&socket).unwrap_or(0);
        let got = if cfg!(target_os = "linux") {
            reported / 2
        } else {
            reported
        };
        debug!(bytes = got, wanted = buffer, "UDP {what} buffer");
        if what == "receive" {
            granted.receive = got;
        } else {
            granted.send = got;
        }
    }
    socket.bind(&listen.into())?;
    Ok((socket.into(), granted))
}

/// The socket's inode, which names it in `/proc/self/net/udp` (Linux only).
pub(crate) fn inode(socket: &std::net::UdpSocket) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
        link.to_str()?
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        None
    }
}

/// Datagrams the kernel dropped for the socket `inode` so far (Linux only).
pub fn drops(inode: u64) -> Option<u64> {
    ["/proc/self/net/udp", "/proc/self/net/udp6"]
        .iter()
        .find_map(|table| drops_in(&std::fs::read_to_string(table).ok()?, inode))
}

/// The `drops` column of `inode`'s line in a `/proc/net/udp` table.
fn drops_in(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(9)?.parse::<u64>().ok()? != inode {
            return None;
        }
        fields.get(12)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1021: 0100007F:1D17 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 51234 2 0000000000000000 0
 1022: 0100007F:AC3B 00000000:0000 07 00000000:00034000 00:00000000 00000000     0        0 51299 2 0000000000000000 3354
";

    #[test]
    fn the_drops_column_of_the_socket_is_read() {
        assert_eq!(drops_in(TABLE, 51299), Some(3354));
        assert_eq!(drops_in(TABLE, 51234), Some(0));
        assert_eq!(drops_in(TABLE, 7), None);
    }

    #[test]
    fn a_live_socket_is_found_with_no_drops() {
        let (socket, buffers) = socket(SocketAddr::from(([127, 0, 0, 1], 0)), 1 << 20).unwrap();
        assert_eq!(buffers.wanted, 1 << 20);
        assert!(buffers.receive > 0 && buffers.send > 0);
        assert!(buffers.describe().contains("MiB"));
        if cfg!(target_os = "linux") {
            let inode = inode(&socket).expect("a socket inode");
            assert_eq!(drops(inode), Some(0));
        }
    }
}
