//! Refused incoming connections, counted per source address and reported in aggregate. Anyone
//! who can reach the mesh port can make connections fail by the hundred thousand: each one logged
//! or turned into an event would flood the log and push every other event out of the view. So the
//! first refusal from a source is reported at once (the operator learns why), and the rest of that
//! source's refusals in the window become one line and one event with a count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::Multiaddr;

use crate::handshakes::ip_of;

/// How often a source that keeps failing is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Sources tracked one by one; beyond it they share one entry.
const MAX_SOURCES: usize = 1024;

/// Where a refused connection came from: its IP address, or IPv6 /64 (the port changes with every
/// attempt).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Ip(IpAddr),
    /// Sources beyond [`MAX_SOURCES`], or addresses without an IP.
    Others,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Ip(ip) => write!(f, "{ip}"),
            Source::Others => f.write_str("other addresses"),
        }
    }
}

/// What to report about a source now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub source: Source,
    /// Refusals since the last report (1 for the first).
    pub count: u64,
    /// Why the latest one was refused.
    pub detail: String,
}

struct Entry {
    /// When this source was last reported.
    reported: Instant,
    /// Refusals since then.
    count: u64,
    detail: String,
}

/// The refusals seen, by source.
#[derive(Default)]
pub struct Refusals {
    sources: HashMap<Source, Entry>,
}

/// The source of `addr`: its IPv4 address, or its IPv6 /64 (one host may hold a whole /64 and
/// pick a new address for every connection).
fn source_of(addr: &Multiaddr) -> Option<IpAddr> {
    ip_of(addr).map(|ip| match ip {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        v4 => v4,
    })
}

impl Refusals {
    /// Counts a refusal from `addr`; returns a report if this source has not been reported in
    /// the last [`REPORT_EVERY`].
    pub fn refused(&mut self, addr: &Multiaddr, detail: String, now: Instant) -> Option<Report> {
        let mut source = source_of(addr).map_or(Source::Others, Source::Ip);
        if !self.sources.contains_key(&source) && self.sources.len() >= MAX_SOURCES {
            source = Source::Others;
        }
        match self.sources.get_mut(&source) {
            Some(e) => {
                e.count += 1;
                e.detail = detail;
                None
            }
            None => {
                self.sources.insert(source, Entry { reported: now, count: 0, detail: detail.clone() });
                Some(Report { source, count: 1, detail })
            }
        }
    }

    /// Reports for the sources whose window has passed with refusals in it; forgets sources
    /// quiet for a whole window.
    pub fn due(&mut self, now: Instant) -> Vec<Report> {
        let mut out = Vec::new();
        self.sources.retain(|source, e| {
            if now.duration_since(e.reported) < REPORT_EVERY {
                return true;
            }
            if e.count == 0 {
                return false;
            }
            out.push(Report { source: *source, count: e.count, detail: e.detail.clone() });
            e.reported = now;
            e.count = 0;
            true
        });
        out.sort_by_key(|r| std::cmp::Reverse(r.count));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str, port: u16) -> Multiaddr {
        format!("/ip4/{ip}/tcp/{port}").parse().expect("multiaddr")
    }

    #[test]
    fn a_source_is_reported_once_then_once_a_window_with_a_count() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let first = r.refused(&addr("10.0.0.9", 1000), "bad handshake".into(), t0).expect("first is reported");
        assert_eq!((first.count, first.source.to_string()), (1, "10.0.0.9".to_string()));
        for port in 1001..2000 {
            assert!(r.refused(&addr("10.0.0.9", port), "bad handshake".into(), t0).is_none(), "counted, not reported");
        }
        assert!(r.due(t0 + Duration::from_secs(59)).is_empty(), "not before the window ends");
        let due = r.due(t0 + REPORT_EVERY);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 999);
        assert!(r.due(t0 + 2 * REPORT_EVERY).is_empty(), "a quiet window reports nothing");
        assert!(r.sources.is_empty(), "and forgets the source");
        assert!(r.refused(&addr("10.0.0.9", 1), "again".into(), t0 + 2 * REPORT_EVERY).is_some(), "reported afresh");
    }

    #[test]
    fn an_ipv6_host_rotating_addresses_within_its_64_is_one_source() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let v6 = |last: u16| -> Multiaddr { format!("/ip6/2001:db8:1:2:{last:x}::1/tcp/9").parse().expect("multiaddr") };
        let reports = (0..500).filter(|i| r.refused(&v6(*i), "x".into(), t0).is_some()).count();
        assert_eq!(reports, 1);
        assert_eq!(r.due(t0 + REPORT_EVERY)[0].source.to_string(), "2001:db8:1:2::");
    }

    #[test]
    fn sources_beyond_the_bound_share_one_entry() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let mut reports = 0;
        for i in 0..(MAX_SOURCES as u32 + 500) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            reports += usize::from(r.refused(&addr(&ip.to_string(), 1), "x".into(), t0).is_some());
        }
        assert_eq!(r.sources.len(), MAX_SOURCES + 1);
        assert_eq!(reports, MAX_SOURCES + 1, "each tracked source once, and the shared entry once");
    }
}
