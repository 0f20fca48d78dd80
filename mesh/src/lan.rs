//! Peers found on the LAN by mDNS, kept until their records expire and redialled while
//! unconnected. mDNS reports a peer once, so one failed dial (a busy machine, a handshake cut
//! short) would otherwise lose it for the record's whole lifetime; the redials back off, since
//! mDNS is unauthenticated and a peer that never accepts (another mesh, a node off the
//! allow-list, a spoofed record) must not cost a dial and a log line every few seconds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

/// Peers kept at once; the one found longest ago makes room for a newcomer.
const MAX_PEERS: usize = 256;
/// Addresses kept per peer.
const MAX_ADDRS: usize = 8;
const FIRST_REDIAL: Duration = Duration::from_secs(3);
const MAX_REDIAL: Duration = Duration::from_secs(300);

struct LanPeer {
    addrs: Vec<Multiaddr>,
    found: Instant,
    next_dial: Instant,
    backoff: Duration,
}

/// The peers mDNS has found and not yet expired.
#[derive(Default)]
pub struct LanPeers {
    peers: HashMap<PeerId, LanPeer>,
}

impl LanPeers {
    /// mDNS found `peer` at `addrs` (it is dialled at once by the caller).
    pub fn found(&mut self, peer: PeerId, addrs: &[Multiaddr], now: Instant) {
        if !self.peers.contains_key(&peer)
            && self.peers.len() >= MAX_PEERS
            && let Some(oldest) = self.peers.iter().min_by_key(|(_, p)| p.found).map(|(id, _)| *id)
        {
            self.peers.remove(&oldest);
        }
        let p = self.peers.entry(peer).or_insert(LanPeer {
            addrs: Vec::new(),
            found: now,
            next_dial: now + FIRST_REDIAL,
            backoff: FIRST_REDIAL,
        });
        for a in addrs {
            if !p.addrs.contains(a) && p.addrs.len() < MAX_ADDRS {
                p.addrs.push(a.clone());
            }
        }
    }

    /// mDNS expired `peer`'s record at `addr`.
    pub fn expired(&mut self, peer: &PeerId, addr: &Multiaddr) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.addrs.retain(|a| a != addr);
            if p.addrs.is_empty() {
                self.peers.remove(peer);
            }
        }
    }

    /// A connection to `peer` is up: should it drop, the redials start over quickly.
    pub fn connected(&mut self, peer: &PeerId, now: Instant) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.backoff = FIRST_REDIAL;
            p.next_dial = now + FIRST_REDIAL;
        }
    }

    /// The peers to redial now (those not connected whose wait is over), each with its addresses;
    /// their next wait doubles, up to five minutes.
    pub fn due(&mut self, now: Instant, connected: impl Fn(&PeerId) -> bool) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut out = Vec::new();
        for (id, p) in &mut self.peers {
            if connected(id) || now < p.next_dial {
                continue;
            }
            p.backoff = (p.backoff * 2).min(MAX_REDIAL);
            p.next_dial = now + p.backoff;
            out.push((*id, p.addrs.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redials_back_off_until_connected_and_stop_when_the_record_expires() {
        let mut lan = LanPeers::default();
        let peer = PeerId::random();
        let addr: Multiaddr = "/ip4/10.0.0.2/tcp/4001".parse().expect("addr");
        let t0 = Instant::now();
        lan.found(peer, std::slice::from_ref(&addr), t0);
        assert!(lan.due(t0 + Duration::from_secs(1), |_| false).is_empty(), "dialled when found; the first redial waits");
        let at: Vec<u64> = (1..=600).filter(|s| !lan.due(t0 + Duration::from_secs(*s), |_| false).is_empty()).collect();
        assert_eq!(at, [3, 9, 21, 45, 93, 189, 381], "waits of 6, 12, 24, 48, 96, 192 s, then at most 300");
        lan.connected(&peer, t0 + Duration::from_secs(400));
        assert!(lan.due(t0 + Duration::from_secs(500), |_| true).is_empty(), "connected: nothing to do");
        assert_eq!(lan.due(t0 + Duration::from_secs(403), |_| false).len(), 1, "dropped: redialled 3 s after the last connection");
        lan.expired(&peer, &addr);
        assert!(lan.due(t0 + Duration::from_secs(10_000), |_| false).is_empty(), "expired: forgotten");
    }

    #[test]
    fn a_full_table_makes_room_by_forgetting_the_oldest() {
        let mut lan = LanPeers::default();
        let addr: Multiaddr = "/ip4/10.0.0.2/tcp/4001".parse().expect("addr");
        let t0 = Instant::now();
        let first = PeerId::random();
        lan.found(first, std::slice::from_ref(&addr), t0);
        for i in 1..=MAX_PEERS as u64 {
            lan.found(PeerId::random(), std::slice::from_ref(&addr), t0 + Duration::from_millis(i));
        }
        assert_eq!(lan.peers.len(), MAX_PEERS);
        assert!(!lan.peers.contains_key(&first), "the oldest made room");
    }
}
