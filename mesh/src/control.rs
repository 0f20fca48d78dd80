//! `/tandem/control/1`: an operator's command to one node (pin its role, drain or undrain it),
//! sent by the console. A command is signed with a key derived from the mesh secret (HMAC-SHA256
//! over the target, the command, the time and a nonce), so only holders of the secret can send
//! one, a command for one node cannot be replayed on another, and a recorded one cannot be
//! replayed later. A node without a mesh secret refuses every command: on an open mesh anyone
//! could send them.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use hmac::{Hmac, Mac};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::frames::Limits;
use crate::roles::Role;
use crate::secret::MeshSecret;

/// The protocol name of control streams.
pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/tandem/control/1");

/// Bounds of a control stream: one small message each way.
pub const CONTROL_LIMITS: Limits =
    Limits { max_frame: 4 << 10, read_timeout: Duration::from_secs(30), write_timeout: Duration::from_secs(10) };

/// How far a command's time may be from the receiver's clock.
pub const CONTROL_MAX_SKEW_MS: u64 = 60_000;

/// Nonces remembered against replay (commands older than the skew are refused anyway).
const NONCES: usize = 4096;

/// What an operator asks a node to do.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ControlCommand {
    /// Pin the role (or hand it back to `auto`); a flip drains in-flight work first.
    SetRole { role: Role },
    /// Stop taking requests and move the running ones to other decode nodes; or take them again.
    Drain { drain: bool },
}

impl std::fmt::Display for ControlCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlCommand::SetRole { role } => write!(f, "set role {role}"),
            ControlCommand::Drain { drain: true } => write!(f, "drain"),
            ControlCommand::Drain { drain: false } => write!(f, "undrain"),
        }
    }
}

/// A signed command.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ControlRequest {
    pub v: u16,
    /// The peer id of the node it is for.
    pub target: String,
    #[serde(flatten)]
    pub command: ControlCommand,
    /// Unix time in milliseconds when it was signed.
    pub issued_ms: u64,
    pub nonce: u64,
    /// HMAC-SHA256 of the fields above, hex.
    pub mac: String,
}

/// The node's answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ControlReply {
    /// Done; the node's role and whether it drains now.
    Done {
        role: Role,
        draining: bool,
    },
    Refused {
        message: String,
    },
}

/// Why a command was refused.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum ControlError {
    #[error("this node has no mesh secret, so it takes no control messages (anyone could send them)")]
    NoSecret,
    #[error("protocol version {0}, this node speaks {PROTOCOL}", PROTOCOL = crate::PROTOCOL_VERSION)]
    Version(u16),
    #[error("the command is for {0}, not this node")]
    WrongTarget(String),
    #[error("the signature does not match: the sender lacks this mesh's secret, or the command was altered")]
    BadSignature,
    #[error("the command was signed {0} ms away from this node's clock (at most {CONTROL_MAX_SKEW_MS})")]
    Stale(u64),
    #[error("the command was already received (a replay)")]
    Replayed,
}

type HmacSha256 = Hmac<Sha256>;
use sha2::Sha256;

fn signature(key: &[u8; 32], target: &str, command: &ControlCommand, issued_ms: u64, nonce: u64) -> HmacSha256 {
    // Keys of any length are accepted by HMAC, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    let command = serde_json::to_vec(command).unwrap_or_default();
    for part in [target.as_bytes(), &command, &issued_ms.to_le_bytes(), &nonce.to_le_bytes()] {
        mac.update(&(part.len() as u64).to_le_bytes());
        mac.update(part);
    }
    mac
}

impl ControlRequest {
    /// Signs `command` for `target` with the mesh secret.
    pub fn sign(secret: &MeshSecret, target: &str, command: ControlCommand, issued_ms: u64) -> Self {
        let nonce = rand::random();
        let mac = hex::encode(signature(&secret.control_key(), target, &command, issued_ms, nonce).finalize().into_bytes());
        ControlRequest { v: crate::PROTOCOL_VERSION, target: target.into(), command, issued_ms, nonce, mac }
    }
}

/// A node's check of incoming commands: its secret, its peer id, and the nonces it has seen.
#[derive(Debug)]
pub struct ControlGate {
    key: Option<[u8; 32]>,
    me: String,
    seen: HashSet<u64>,
    order: VecDeque<u64>,
}

impl ControlGate {
    pub fn new(secret: Option<&MeshSecret>, me: &str) -> Self {
        ControlGate { key: secret.map(MeshSecret::control_key), me: me.into(), seen: HashSet::new(), order: VecDeque::new() }
    }

    /// Accepts a command signed with this mesh's secret, for this node, recent and not seen
    /// before; `now_ms` is this node's Unix time.
    pub fn check(&mut self, req: &ControlRequest, now_ms: u64) -> Result<ControlCommand, ControlError> {
        let key = self.key.as_ref().ok_or(ControlError::NoSecret)?;
        if req.v != crate::PROTOCOL_VERSION {
            return Err(ControlError::Version(req.v));
        }
        if req.target != self.me {
            return Err(ControlError::WrongTarget(req.target.clone()));
        }
        let mac = hex::decode(&req.mac).map_err(|_| ControlError::BadSignature)?;
        signature(key, &req.target, &req.command, req.issued_ms, req.nonce).verify_slice(&mac).map_err(|_| ControlError::BadSignature)?;
        let skew = now_ms.abs_diff(req.issued_ms);
        if skew > CONTROL_MAX_SKEW_MS {
            return Err(ControlError::Stale(skew));
        }
        if !self.seen.insert(req.nonce) {
            return Err(ControlError::Replayed);
        }
        self.order.push_back(req.nonce);
        if self.order.len() > NONCES
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        Ok(req.command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: &str) -> MeshSecret {
        MeshSecret::parse(&byte.repeat(32), "test").expect("secret")
    }

    #[test]
    fn only_fresh_commands_signed_with_the_secret_for_this_node_pass() {
        let (s, now) = (secret("ab"), 1_700_000_000_000);
        let mut gate = ControlGate::new(Some(&s), "me");
        let cmd = ControlCommand::SetRole { role: Role::Prefill };
        let good = ControlRequest::sign(&s, "me", cmd, now);
        assert_eq!(gate.check(&good, now + 5), Ok(cmd));
        assert_eq!(gate.check(&good, now + 5), Err(ControlError::Replayed));

        let other_secret = ControlRequest::sign(&secret("cd"), "me", cmd, now);
        assert_eq!(gate.check(&other_secret, now), Err(ControlError::BadSignature));
        let mut altered = ControlRequest::sign(&s, "me", ControlCommand::Drain { drain: false }, now);
        altered.command = ControlCommand::Drain { drain: true };
        assert_eq!(gate.check(&altered, now), Err(ControlError::BadSignature));
        let mut garbled = ControlRequest::sign(&s, "me", cmd, now);
        garbled.mac = "zz".repeat(32);
        assert_eq!(gate.check(&garbled, now), Err(ControlError::BadSignature));
        garbled.mac.pop();
        assert_eq!(gate.check(&garbled, now), Err(ControlError::BadSignature));
        let mut retargeted = ControlRequest::sign(&s, "other", cmd, now);
        assert_eq!(gate.check(&retargeted, now), Err(ControlError::WrongTarget("other".into())));
        retargeted.target = "me".into();
        assert_eq!(gate.check(&retargeted, now), Err(ControlError::BadSignature), "a command for another node is not replayable here");
        let old = ControlRequest::sign(&s, "me", cmd, now - 2 * CONTROL_MAX_SKEW_MS);
        assert_eq!(gate.check(&old, now), Err(ControlError::Stale(2 * CONTROL_MAX_SKEW_MS)));
        let mut future = ControlRequest::sign(&s, "me", cmd, now);
        future.v = 9;
        assert_eq!(gate.check(&future, now), Err(ControlError::Version(9)));

        let mut open_mesh = ControlGate::new(None, "me");
        assert_eq!(open_mesh.check(&ControlRequest::sign(&s, "me", cmd, now), now), Err(ControlError::NoSecret));
    }

    #[test]
    fn requests_and_replies_have_a_stable_wire_form() {
        let req = ControlRequest::sign(&secret("ab"), "me", ControlCommand::Drain { drain: true }, 5);
        let json = serde_json::to_value(&req).expect("json");
        assert_eq!(json["command"], "drain");
        assert_eq!(json["drain"], true);
        assert_eq!(serde_json::from_value::<ControlRequest>(json).expect("back"), req);
        let reply = ControlReply::Done { role: Role::Decode, draining: false };
        assert_eq!(serde_json::from_slice::<ControlReply>(&serde_json::to_vec(&reply).expect("json")).expect("back"), reply);
    }
}
