//! Who gets a connection: counts per source address (from the first packet, handshakes
//! included), per token (after the hello), and of connections not yet greeted (in their
//! handshake or without a hello). A [`Seat`] holds one place and gives it back when
//! dropped, however the connection ends.
//!
//! The relay's overall cap ([`RelayConfig::max_connections`]) would otherwise be one
//! pool that a single token holder can fill: with these counts one token or one address
//! takes at most its share, and under handshake load new connections must prove their
//! address (QUIC Retry) before the relay spends a TLS handshake on them.
//!
//! [`RelayConfig::max_connections`]: crate::RelayConfig::max_connections

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use redline_proto::token::TokenId;

use crate::config::Quotas;

/// Connection counts of a running relay.
#[derive(Debug)]
pub struct Door {
    quotas: Quotas,
    addresses: Counts<IpAddr>,
    tokens: Counts<TokenId>,
    pending: Counts<()>,
}

#[derive(Debug)]
struct Counts<K>(Mutex<HashMap<K, usize>>);

impl<K: Hash + Eq + Clone> Counts<K> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn take(&self, key: &K, limit: usize) -> bool {
        let mut m = self.0.lock().expect("door lock");
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    fn give_back(&self, key: &K) {
        let mut m = self.0.lock().expect("door lock");
        if let Some(n) = m.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(key);
            }
        }
    }

    fn count(&self, key: &K) -> usize {
        self.0
            .lock()
            .expect("door lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

/// One place taken at the door; given back when dropped.
#[derive(Debug)]
pub struct Seat {
    door: Arc<Door>,
    kind: SeatKind,
}

#[derive(Debug)]
enum SeatKind {
    Address(IpAddr),
    Token(TokenId),
    Pending,
}

impl Drop for Seat {
    fn drop(&mut self) {
        match &self.kind {
            SeatKind::Address(a) => self.door.addresses.give_back(a),
            SeatKind::Token(t) => self.door.tokens.give_back(t),
            SeatKind::Pending => self.door.pending.give_back(&()),
        }
    }
}

impl Door {
    /// Counts under `quotas`.
    pub fn new(quotas: Quotas) -> Arc<Self> {
        Arc::new(Self {
            quotas,
            addresses: Counts::new(),
            tokens: Counts::new(),
            pending: Counts::new(),
        })
    }

    /// A place for a connection from `ip`, if its address has one left.
    pub fn address(self: &Arc<Self>, ip: IpAddr) -> Option<Seat> {
        self.addresses
            .take(&ip, self.quotas.connections_per_address)
            .then(|| Seat {
                door: self.clone(),
                kind: SeatKind::Address(ip),
            })
    }

    /// A place for a connection with token `id`, if the token has one left.
    pub fn token(self: &Arc<Self>, id: TokenId) -> Option<Seat> {
        self.tokens
            .take(&id, self.quotas.connections_per_token)
            .then(|| Seat {
                door: self.clone(),
                kind: SeatKind::Token(id),
            })
    }

    /// Counts a connection as not yet greeted until the seat is dropped.
    pub fn pending(self: &Arc<Self>) -> Seat {
        self.pending.take(&(), usize::MAX);
        Seat {
            door: self.clone(),
            kind: SeatKind::Pending,
        }
    }

    /// Whether new connections should prove their address first (QUIC Retry): more
    /// than the quota are in their handshake or without a hello.
    pub fn under_handshake_load(&self) -> bool {
        self.pending.count(&()) >= self.quotas.retry_above_pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seats_are_counted_and_given_back() {
        let quotas = Quotas {
            connections_per_address: 2,
            connections_per_token: 1,
            retry_above_pending: 2,
            ..Quotas::default()
        };
        let door = Door::new(quotas);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let a = door.address(ip).unwrap();
        let _b = door.address(ip).unwrap();
        assert!(door.address(ip).is_none(), "a third from one address");
        assert!(door.address("127.0.0.1".parse().unwrap()).is_some());
        drop(a);
        assert!(door.address(ip).is_some(), "a seat is given back");
        let t = TokenId::random();
        let seat = door.token(t).unwrap();
        assert!(door.token(t).is_none());
        drop(seat);
        assert!(door.token(t).is_some());
        let p1 = door.pending();
        assert!(!door.under_handshake_load());
        let _p2 = door.pending();
        assert!(door.under_handshake_load());
        drop(p1);
        assert!(!door.under_handshake_load());
    }
}
