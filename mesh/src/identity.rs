//! The node's persistent ed25519 identity: its peer id is stable across restarts, so allow-lists
//! and bootstrap addresses keep working.

use std::path::Path;

use libp2p::identity::Keypair;

use crate::error::{Error, Result};

/// Reads the key at `path`, or creates one there (mode 0600) on first start.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair> {
    let err = |message: String| Error::Identity { path: path.to_path_buf(), message };
    match std::fs::read(path) {
        Ok(bytes) => {
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(format!("not a libp2p key ({e}); delete it to make a new one")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create its folder: {e}")))?;
            }
            match write_private(path, &bytes) {
                Ok(()) => {}
                // Another process on this machine created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    return load_or_create_identity(path);
                }
                Err(e) => return Err(err(format!("cannot write it: {e}"))),
            }
            tracing::info!(path = %path.display(), peer_id = %key.public().to_peer_id(), "created a new node identity");
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// A node's hold on its identity, released when dropped (or when the process ends, however it
/// ends: the operating system drops the lock with the file).
#[derive(Debug)]
pub struct IdentityLock {
    _file: std::fs::File,
}

/// Locks the identity at `path` for this process, then reads or creates its key as
/// [`load_or_create_identity`] does, so that no other process on this machine runs a node with
/// the same peer id (two such nodes fail later, and confusingly, when they dial each other).
/// The lock is a sibling file (`identity.key.lock`): locking the key itself would keep `tandem
/// mesh id` from reading it where locks are mandatory (Windows), and taking the lock first makes
/// creating the key race-free.
pub fn claim_identity(path: &Path) -> Result<(Keypair, IdentityLock)> {
    let err = |message: String| Error::Identity { path: path.to_path_buf(), message };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create its folder: {e}")))?;
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| err(format!("cannot open its lock file: {e}")))?;
    match file.try_lock() {
        Ok(()) => Ok((load_or_create_identity(path)?, IdentityLock { _file: file })),
        Err(std::fs::TryLockError::WouldBlock) => {
            let peer_id = load_or_create_identity(path).map_or_else(|_| "unknown".to_string(), |k| k.public().to_peer_id().to_string());
            Err(Error::IdentityInUse { path: path.to_path_buf(), peer_id })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(err(format!("cannot lock it: {e}"))),
    }
}

#[cfg(unix)]
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_survives_a_restart_and_garbage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/identity.key");
        let a = load_or_create_identity(&path).expect("created");
        let b = load_or_create_identity(&path).expect("read back");
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(&path, b"not a key").expect("write");
        let e = load_or_create_identity(&path).expect_err("garbage");
        assert!(e.to_string().contains("identity.key"), "{e}");
    }

    #[test]
    fn a_claimed_identity_cannot_be_claimed_again_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        let (key, lock) = claim_identity(&path).expect("claimed");
        let e = claim_identity(&path).expect_err("in use");
        let text = e.to_string();
        assert!(text.contains("identity.key") && text.contains("--identity"), "{text}");
        assert!(text.contains(&key.public().to_peer_id().to_string()), "{text}");
        drop(lock);
        let (again, _lock) = claim_identity(&path).expect("released");
        assert_eq!(again.public().to_peer_id(), key.public().to_peer_id());
    }
}
