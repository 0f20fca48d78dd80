use std::path::PathBuf;

/// What can go wrong in the mesh.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("identity key file {path}: {message}")]
    Identity { path: PathBuf, message: String },
    #[error(
        "identity key file {path} (peer id {peer_id}) is in use by another tandem process on this machine; \
         two nodes cannot share one identity: give this one its own with --identity PATH (or TANDEM_IDENTITY)"
    )]
    IdentityInUse { path: PathBuf, peer_id: String },
    #[error("mesh secret {source_name}: {message}")]
    Secret { source_name: String, message: String },
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("bad multiaddr `{addr}`: {message}")]
    Address { addr: String, message: String },
    #[error("mesh transport: {0}")]
    Transport(String),
    #[error("the mesh has stopped")]
    Stopped,
    #[error("cannot open a stream to {peer}: {message}")]
    OpenStream { peer: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
