//! A bound on the incoming connections one source address may hold mid-handshake. The swarm
//! admits 64 such connections in all and gives each 10 s to finish: without a bound per source,
//! one stranger reopening 64 silent connections every 10 s would keep every real peer out.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Incoming connections one address may have mid-handshake at once.
pub const PER_SOURCE: usize = 16;

/// Why a connection was turned away.
#[derive(Debug, thiserror::Error)]
#[error("{source_ip} already has {PER_SOURCE} connections mid-handshake")]
pub struct TooManyHandshakes {
    pub source_ip: IpAddr,
}

/// The behaviour: counts pending incoming connections per source IP.
#[derive(Default)]
pub struct HandshakeLimit {
    by_source: HashMap<IpAddr, usize>,
    by_connection: HashMap<ConnectionId, IpAddr>,
}

/// The IP address in `addr`, if it has one.
pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl HandshakeLimit {
    /// The connection is no longer mid-handshake (established, failed or denied).
    fn done(&mut self, id: ConnectionId) {
        let Some(ip) = self.by_connection.remove(&id) else { return };
        if let Some(n) = self.by_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&ip);
            }
        }
    }

    fn pending(&self, ip: &IpAddr) -> usize {
        self.by_source.get(ip).copied().unwrap_or(0)
    }
}

impl NetworkBehaviour for HandshakeLimit {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote) else { return Ok(()) };
        if self.pending(&ip) >= PER_SOURCE {
            return Err(ConnectionDenied::new(TooManyHandshakes { source_ip: ip }));
        }
        *self.by_source.entry(ip).or_insert(0) += 1;
        self.by_connection.insert(connection_id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.done(connection_id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ListenFailure(f) => self.done(f.connection_id),
            FromSwarm::ConnectionEstablished(e) => self.done(e.connection_id),
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _peer: PeerId, _id: ConnectionId, event: THandlerOutEvent<Self>) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_gets_a_bounded_number_of_handshakes_and_gets_them_back() {
        let mut limit = HandshakeLimit::default();
        let local: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().expect("addr");
        let a: Multiaddr = "/ip4/10.0.0.1/tcp/5000".parse().expect("addr");
        let b: Multiaddr = "/ip4/10.0.0.2/tcp/5000".parse().expect("addr");
        let ids: Vec<ConnectionId> = (0..PER_SOURCE).map(|_| ConnectionId::new_unchecked(rand_id())).collect();
        for id in &ids {
            limit.handle_pending_inbound_connection(*id, &local, &a).expect("within the bound");
        }
        let denied = limit.handle_pending_inbound_connection(ConnectionId::new_unchecked(rand_id()), &local, &a).expect_err("over");
        let why = denied.downcast_ref::<TooManyHandshakes>().expect("our reason").to_string();
        assert!(why.contains("10.0.0.1"), "{why}");
        limit.handle_pending_inbound_connection(ConnectionId::new_unchecked(rand_id()), &local, &b).expect("another source");
        limit.handle_established_inbound_connection(ids[0], PeerId::random(), &local, &a).expect("established");
        limit.done(ids[0]);
        assert_eq!(limit.pending(&"10.0.0.1".parse().expect("ip")), PER_SOURCE - 1, "counted once");
        limit.handle_pending_inbound_connection(ConnectionId::new_unchecked(rand_id()), &local, &a).expect("a place came back");
        for id in &ids[1..] {
            limit.done(*id);
        }
        assert_eq!(limit.pending(&"10.0.0.1".parse().expect("ip")), 1);
    }

    fn rand_id() -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(1 << 40);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }
}
