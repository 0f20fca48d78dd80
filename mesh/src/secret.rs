//! The mesh secret: a libp2p pnet pre-shared key. Nodes without it cannot complete a connection
//! (the handshake is encrypted with it before anything else), so outsiders never join.

use std::path::Path;
use std::str::FromStr;

use libp2p::pnet::PreSharedKey;

use crate::error::{Error, Result};

/// A 256-bit pre-shared key.
#[derive(Clone, Copy)]
pub struct MeshSecret {
    pub(crate) psk: PreSharedKey,
    /// The key itself: pnet does not hand it back, and control messages are signed with a key
    /// derived from it.
    key: [u8; 32],
}

impl std::fmt::Debug for MeshSecret {
    // Never print the key itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshSecret(fingerprint {})", self.fingerprint())
    }
}

const SWARM_KEY_HEADER: &str = "/key/swarm/psk/1.0.0/\n/base16/\n";

impl MeshSecret {
    /// Parses 64 hex characters, or IPFS's swarm.key format.
    pub fn parse(text: &str, source_name: &str) -> Result<Self> {
        let text = text.trim();
        let err = |message: &str| Error::Secret { source_name: source_name.into(), message: message.into() };
        let hex = if text.starts_with("/key/") {
            let normalized = text.lines().map(str::trim).collect::<Vec<_>>().join("\n");
            PreSharedKey::from_str(&normalized).map_err(|e| err(&format!("not a valid swarm.key: {e}")))?;
            normalized.rsplit('\n').next().unwrap_or_default().to_string()
        } else {
            text.to_string()
        };
        let mut key = [0u8; 32];
        hex::decode_to_slice(&hex, &mut key)
            .map_err(|_| err("expected 64 hex characters (or a swarm.key file); `tandem mesh keygen` writes one"))?;
        Ok(MeshSecret { psk: PreSharedKey::new(key), key })
    }

    /// The secret an operator gave: the file, or else the `TANDEM_MESH_SECRET` variable (never a
    /// flag: command lines are visible to every user); None for an open mesh.
    pub fn from_file_or_env(path: Option<&Path>) -> Result<Option<Self>> {
        match (path, std::env::var("TANDEM_MESH_SECRET")) {
            (Some(p), _) => Self::from_file(p).map(Some),
            (None, Ok(text)) if !text.is_empty() => Self::parse(&text, "TANDEM_MESH_SECRET").map(Some),
            _ => Ok(None),
        }
    }

    /// The key control messages are signed with: derived from the mesh secret, so that holding
    /// the secret is what lets an operator command nodes, and distinct from the pnet key.
    pub fn control_key(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"tandem control key v1");
        h.update(self.key);
        h.finalize().into()
    }

    /// Reads the key from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Secret { source_name: name.clone(), message: e.to_string() })?;
        Self::parse(&text, &name)
    }

    /// A short, non-secret name for the key, safe to log: nodes whose fingerprints differ cannot
    /// connect.
    pub fn fingerprint(&self) -> String {
        self.psk.fingerprint().to_string()
    }
}

/// Writes a new random key in swarm.key format (mode 0600); refuses to overwrite.
pub fn generate_secret(path: &Path) -> Result<MeshSecret> {
    let key: [u8; 32] = rand::random();
    let text = format!("{SWARM_KEY_HEADER}{}\n", hex::encode(key));
    crate::identity::write_private(path, text.as_bytes())
        .map_err(|e| Error::Secret { source_name: path.display().to_string(), message: format!("cannot write: {e}") })?;
    Ok(MeshSecret { psk: PreSharedKey::new(key), key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_parse_to_the_same_key_and_junk_is_refused() {
        let hex = "ab".repeat(32);
        let a = MeshSecret::parse(&hex, "test").expect("hex");
        let b = MeshSecret::parse(&format!("/key/swarm/psk/1.0.0/\r\n/base16/\r\n{hex}\r\n"), "test").expect("swarm.key");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.control_key(), b.control_key());
        assert_ne!(a.control_key(), MeshSecret::parse(&"cd".repeat(32), "test").expect("hex").control_key());
        assert!(!format!("{a:?}").contains(&hex), "the key is never printed");
        for bad in ["", "abc", &"zz".repeat(32), &"ab".repeat(33), "/key/swarm/psk/1.0.0/\n/base64/\nAAAA"] {
            assert!(MeshSecret::parse(bad, "test").is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("swarm.key");
        let made = generate_secret(&path).expect("keygen");
        assert_eq!(MeshSecret::from_file(&path).expect("read").fingerprint(), made.fingerprint());
        assert!(generate_secret(&path).is_err(), "never overwrites a key");
    }
}
