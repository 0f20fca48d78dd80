//! Roles, and how `auto` nodes choose theirs: the most compute-rich nodes (by measured GFLOP/s per
//! GB/s) prefill, the bandwidth-rich decode, with pinned nodes counted toward the balance; and
//! when load stays skewed one node flips (TetriInfer's instance flip), with hysteresis so a burst
//! does not make roles flap.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::messages::Speed;

/// What a node does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Prefill,
    Decode,
    /// Prefill and decode on one node: the default for a node alone.
    #[default]
    Both,
    /// Routes requests and watches; runs no model.
    Observer,
    /// Chosen from the node's measured speed relative to the rest of the mesh.
    Auto,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            "both" => Ok(Role::Both),
            "observer" => Ok(Role::Observer),
            "auto" => Ok(Role::Auto),
            _ => Err(format!("unknown role `{s}` (prefill, decode, both, observer or auto)")),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "both",
            Role::Observer => "observer",
            Role::Auto => "auto",
        })
    }
}

impl Role {
    /// Whether the node runs requests at all.
    pub fn serves(self) -> bool {
        !matches!(self, Role::Observer)
    }
}

/// Whether a node's role is pinned or chosen automatically.
pub type RoleSetting = Role;

/// One node as the role choice sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct RoleInput {
    pub peer_id: String,
    /// `Auto` for nodes that choose; otherwise the pinned role.
    pub setting: RoleSetting,
    /// The role it has now.
    pub current: Role,
    pub speed: Speed,
    pub queued_prefill_tokens: u64,
    pub running: u64,
    pub waiting: u64,
    pub kv_blocks_free: u64,
    pub kv_blocks_total: u64,
    /// Expected prefill speed for its model.
    pub prefill_tokens_per_s: f64,
}

fn intensity(s: Speed) -> f64 {
    s.gflops / s.gbps.max(1e-9)
}

/// The role `me` should have: auto nodes ranked by compute intensity, the top `k` prefill and the
/// rest decode, where `k` balances the pinned roles and `shift` (from [`RoleBalancer`]) moves one
/// node toward the side under pressure. A lone serving node does both.
pub fn auto_role(me: &str, nodes: &[RoleInput], shift: i32) -> Role {
    let serving: Vec<&RoleInput> = nodes.iter().filter(|n| n.setting.serves()).collect();
    let mut autos: Vec<&RoleInput> = serving.iter().copied().filter(|n| n.setting == Role::Auto).collect();
    if !autos.iter().any(|n| n.peer_id == me) {
        return Role::Both;
    }
    let pinned = |r: Role| serving.iter().filter(|n| n.setting == r).count() as i64;
    let (p, d, b) = (pinned(Role::Prefill), pinned(Role::Decode), pinned(Role::Both));
    let n = autos.len() as i64;
    let lo = if p + b == 0 { 1 } else { 0 };
    let hi = if d + b == 0 { n - 1 } else { n };
    if lo > hi {
        // One auto node and nobody covers either side: it has to do both.
        return Role::Both;
    }
    let balanced = ((n + d - p) as f64 / 2.0).round() as i64;
    let k = (balanced + i64::from(shift)).clamp(lo, hi);
    autos.sort_by(|a, b| intensity(b.speed).total_cmp(&intensity(a.speed)).then_with(|| a.peer_id.cmp(&b.peer_id)));
    let rank = autos.iter().position(|n| n.peer_id == me).unwrap_or(0) as i64;
    if rank < k { Role::Prefill } else { Role::Decode }
}

/// Queued prefill work above this many seconds, with decode nodes half empty, is prefill pressure.
const PREFILL_BACKLOG_S: f64 = 2.0;
/// KV use above this share (or anyone waiting) on decode nodes, with prefill idle, is decode
/// pressure.
const DECODE_FULL: f64 = 0.85;

/// +1 for prefill pressure, -1 for decode pressure, 0 when neither is clear.
fn pressure(nodes: &[RoleInput]) -> i32 {
    let of = |r: Role| nodes.iter().filter(move |n| n.current == r);
    let (queued, speed) = of(Role::Prefill).fold((0.0, 0.0), |(q, s), n| (q + n.queued_prefill_tokens as f64, s + n.prefill_tokens_per_s));
    let backlog_s = if speed > 0.0 { queued / speed } else { 0.0 };
    let (free, total, waiting) =
        of(Role::Decode).fold((0, 0, 0), |(f, t, w), n| (f + n.kv_blocks_free, t + n.kv_blocks_total, w + n.waiting));
    let used = if total == 0 { 0.0 } else { 1.0 - free as f64 / total as f64 };
    let decodes = of(Role::Decode).count();
    let prefills = of(Role::Prefill).count();
    if backlog_s > PREFILL_BACKLOG_S && used < 0.5 && waiting == 0 && decodes > 1 {
        1
    } else if (used > DECODE_FULL || waiting > 0) && backlog_s < PREFILL_BACKLOG_S / 8.0 && prefills > 1 {
        -1
    } else {
        0
    }
}

/// Decides, once a tick, whether this auto node should flip: the wanted role must stay the same
/// for `hold` ticks in a row, and flips are at least `dwell` apart. A load skew moves the balance
/// by one node and keeps it there until the opposite skew shows (so the flip does not undo itself
/// when it has worked).
#[derive(Debug)]
pub struct RoleBalancer {
    hold: u32,
    dwell: Duration,
    shift: i32,
    wanted: Option<(Role, u32)>,
    last_flip: Option<Instant>,
}

impl RoleBalancer {
    pub fn new(hold: u32, dwell: Duration) -> Self {
        RoleBalancer { hold, dwell, shift: 0, wanted: None, last_flip: None }
    }

    /// The role to flip to now, if any.
    pub fn tick(&mut self, me: &str, nodes: &[RoleInput], current: Role, now: Instant) -> Option<Role> {
        match pressure(nodes) {
            0 => {}
            p => self.shift = p,
        }
        let target = auto_role(me, nodes, self.shift);
        if target == current {
            self.wanted = None;
            return None;
        }
        let count = match self.wanted {
            Some((r, c)) if r == target => c + 1,
            _ => 1,
        };
        self.wanted = Some((target, count));
        let rested = self.last_flip.is_none_or(|t| now.duration_since(t) >= self.dwell);
        if count >= self.hold && rested {
            self.wanted = None;
            self.last_flip = Some(now);
            return Some(target);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, setting: Role, current: Role, gflops: f64, gbps: f64) -> RoleInput {
        RoleInput {
            peer_id: id.into(),
            setting,
            current,
            speed: Speed { gflops, gbps },
            queued_prefill_tokens: 0,
            running: 0,
            waiting: 0,
            kv_blocks_free: 100,
            kv_blocks_total: 100,
            prefill_tokens_per_s: 1000.0,
        }
    }

    #[test]
    fn compute_rich_nodes_prefill_and_bandwidth_rich_nodes_decode() {
        let a = Role::Auto;
        // An H100-like node (high GFLOP/s per GB/s) and a laptop-like one.
        let nodes = [node("h100", a, Role::Both, 400_000.0, 2_000.0), node("laptop", a, Role::Both, 5_000.0, 100.0)];
        assert_eq!(auto_role("h100", &nodes, 0), Role::Prefill);
        assert_eq!(auto_role("laptop", &nodes, 0), Role::Decode);
        // Alone, or beside an observer, a node does both.
        assert_eq!(auto_role("h100", &nodes[..1], 0), Role::Both);
        let with_observer = [nodes[0].clone(), node("console", Role::Observer, Role::Observer, 0.0, 0.0)];
        assert_eq!(auto_role("h100", &with_observer, 0), Role::Both);
        // A pinned prefill node makes the lone auto node decode, even the compute-rich one.
        let pinned = [nodes[0].clone(), node("p", Role::Prefill, Role::Prefill, 1.0, 1.0)];
        assert_eq!(auto_role("h100", &pinned, 0), Role::Decode);
        // Four autos split two and two; a shift moves one more to prefill, never all of them.
        let four: Vec<_> = (0..4).map(|i| node(&format!("n{i}"), a, Role::Both, 100.0 * (i + 1) as f64, 10.0)).collect();
        let roles = |shift| four.iter().map(|n| auto_role(&n.peer_id, &four, shift)).collect::<Vec<_>>();
        assert_eq!(roles(0), [Role::Decode, Role::Decode, Role::Prefill, Role::Prefill]);
        assert_eq!(roles(1), [Role::Decode, Role::Prefill, Role::Prefill, Role::Prefill]);
        assert_eq!(roles(5), [Role::Decode, Role::Prefill, Role::Prefill, Role::Prefill]);
        assert_eq!(roles(-5), [Role::Decode, Role::Decode, Role::Decode, Role::Prefill]);
        // Pinned nodes are never told to change.
        assert_eq!(auto_role("p", &pinned, 0), Role::Both);
    }

    #[test]
    fn skewed_load_flips_one_node_after_the_hold_and_not_again_before_the_dwell() {
        let a = Role::Auto;
        let mut nodes: Vec<_> = (0..4)
            .map(|i| node(&format!("n{i}"), a, if i < 2 { Role::Decode } else { Role::Prefill }, 100.0 * (i + 1) as f64, 10.0))
            .collect();
        let t0 = Instant::now();
        let mut b = RoleBalancer::new(3, Duration::from_secs(60));
        // Balanced: nobody moves.
        for i in 0..5 {
            assert_eq!(b.tick("n1", &nodes, Role::Decode, t0 + Duration::from_secs(i)), None);
        }
        // Prompts pile up on the prefill nodes while the decode nodes idle.
        nodes[2].queued_prefill_tokens = 5_000;
        nodes[3].queued_prefill_tokens = 5_000;
        let flips: Vec<_> = (5..10).map(|i| b.tick("n1", &nodes, Role::Decode, t0 + Duration::from_secs(i))).collect();
        assert_eq!(flips, [None, None, Some(Role::Prefill), None, None], "n1, the most compute-rich decode node, flips after 3 ticks");
        // n0 ranks lower and stays a decode node under the same view.
        let mut other = RoleBalancer::new(3, Duration::from_secs(60));
        assert!((5..10).all(|i| other.tick("n0", &nodes, Role::Decode, t0 + Duration::from_secs(i)).is_none()));
        // The skew is gone: the shift sticks, so n1 does not flip back.
        nodes[1].current = Role::Prefill;
        nodes[2].queued_prefill_tokens = 0;
        nodes[3].queued_prefill_tokens = 0;
        assert!((10..20).all(|i| b.tick("n1", &nodes, Role::Prefill, t0 + Duration::from_secs(i)).is_none()));
        // Now decode is full: n1 wants to go back, but only after the dwell since its last flip.
        nodes[0].kv_blocks_free = 0;
        let back: Vec<_> =
            (20..80).filter_map(|i| b.tick("n1", &nodes, Role::Prefill, t0 + Duration::from_secs(i)).map(|r| (i, r))).collect();
        assert_eq!(back, [(67, Role::Decode)]);
    }
}
