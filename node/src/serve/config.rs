//! `tandem serve` settings: defaults, overridden by a TOML file, overridden by environment
//! variables, overridden by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tandem_core::KvDtype;
use tandem_core::scheduler::Policy;
use tandem_mesh::{MeshSecret, Multiaddr, PeerId, PlacementMode, Role};

/// Flags of `tandem serve`. Every one can also be set in the config file (same name, with `_`
/// for `-`) or in the environment variable shown.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with any of the settings below; flags and environment variables win over it.
    #[arg(long, env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// The model: `smollm2-135m` (fetched if missing), a .gguf file, a Hugging Face directory,
    /// or `synthetic:NAME[:FORMAT]` (seeded random weights of a real shape, for benchmarks).
    /// Its API id is the short name or the file stem.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,
    /// Address of the OpenAI-compatible HTTP API (port 0 picks a free port).
    #[arg(long, env = "TANDEM_HTTP")]
    pub http: Option<SocketAddr>,
    /// GPU adapter: index or part of its name (see `tandem adapters`).
    #[arg(long, env = "TANDEM_ADAPTER")]
    pub adapter: Option<String>,
    /// Memory for the KV cache, e.g. `512MiB` or `4GiB`. Default: 1 GiB on CPU adapters, 4 GiB on
    /// GPUs (wgpu does not report an adapter's memory size), capped by the adapter's binding limit.
    #[arg(long, env = "TANDEM_KV_MEMORY")]
    pub kv_memory: Option<String>,
    /// Which of the model's layers this node holds: `all` (the default), a span such as `0-9`
    /// (layers 0 through 9; the node then serves as one stage of a chain of nodes that together
    /// hold the model), or `auto` (the span the mesh lacks most, as many layers as fit in
    /// `--gpu-memory`).
    #[arg(long, env = "TANDEM_LAYERS")]
    pub layers: Option<String>,
    /// The adapter's memory for weights and K/V, e.g. `8GiB`: wgpu does not report it. Used by
    /// `--layers auto` and shown to the mesh.
    #[arg(long, env = "TANDEM_GPU_MEMORY")]
    pub gpu_memory: Option<String>,
    /// Most bytes per second this node sends of its model's weights to peers that fetch them,
    /// e.g. `100MiB` (the default); a quarter of it while it serves requests.
    #[arg(long, env = "TANDEM_WEIGHTS_RATE")]
    pub weights_rate: Option<String>,
    /// Most tokens in one engine step: decode tokens of every running request plus prefill chunks.
    #[arg(long, env = "TANDEM_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Positions per request (prompt plus output). Default: the model's context, at most 8192.
    #[arg(long, env = "TANDEM_CONTEXT")]
    pub context: Option<usize>,
    /// Batch-invariant kernels only: a request's tokens at temperature 0 do not depend on what
    /// shares its steps, chunking, cache hits or which node computed its K/V. Slower.
    #[arg(long, env = "TANDEM_DETERMINISTIC", num_args = 0..=1, default_missing_value = "true")]
    pub deterministic: Option<bool>,
    /// How the K/V cache stores values: f16 (half the memory; the default) or f32.
    #[arg(long, env = "TANDEM_KV_DTYPE")]
    pub kv_dtype: Option<KvDtype>,
    /// Requests that may wait for a slot; beyond it new requests get 429.
    #[arg(long, env = "TANDEM_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// Scheduling policy: fcfs, decode-first or shortest-prompt-first.
    #[arg(long, env = "TANDEM_POLICY")]
    pub policy: Option<Policy>,
    /// Fuse prompt chunks with decode tokens (true) or run prefills alone and whole (false).
    #[arg(long, env = "TANDEM_CHUNKED_PREFILL")]
    pub chunked_prefill: Option<bool>,
    /// How requests entering here are placed: auto (split across a prefill and a decode node
    /// when that is expected to be faster), colocated (one node does both) or split (always,
    /// where a pair exists). The last two are for measurements.
    #[arg(long, env = "TANDEM_PLACEMENT")]
    pub placement: Option<PlacementMode>,
    /// Largest accepted request body, e.g. `1MiB`.
    #[arg(long, env = "TANDEM_MAX_BODY")]
    pub max_body: Option<String>,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM; then the node exits
    /// whatever is left.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<u64>,
    /// Seconds a client may take to send a whole request, headers and body, from its first byte.
    #[arg(long, env = "TANDEM_HTTP_READ_TIMEOUT")]
    pub http_read_timeout: Option<u64>,
    /// Seconds an HTTP connection may stay open with no request in flight.
    #[arg(long, env = "TANDEM_HTTP_IDLE_TIMEOUT")]
    pub http_idle_timeout: Option<u64>,
    /// Most open HTTP connections; beyond it a new one closes the longest idle one, or is turned
    /// away when every one has a request in flight.
    #[arg(long, env = "TANDEM_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// Logs as JSON lines instead of text.
    #[arg(long, env = "TANDEM_LOG_JSON")]
    pub log_json: Option<bool>,
    /// Mesh listen address (repeatable), e.g. `/ip4/0.0.0.0/tcp/4001` or `/ip4/0.0.0.0/udp/4001/quic-v1`.
    /// Default: every interface, a free TCP port (and QUIC outside private meshes).
    #[arg(long = "listen", env = "TANDEM_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// A peer to join through (repeatable), e.g. `/ip4/10.0.0.2/tcp/4001/p2p/12D3Koo...`; the
    /// `/p2p/` part may be left out.
    #[arg(long = "peer", env = "TANDEM_PEERS", value_delimiter = ',')]
    pub peer: Vec<String>,
    /// prefill, decode, both (default), observer (no model: routes and watches) or auto (chosen
    /// from measured speed relative to the mesh, re-balanced under skewed load).
    #[arg(long, env = "TANDEM_ROLE")]
    pub role: Option<Role>,
    /// File holding the mesh secret (64 hex characters or a swarm.key); the secret itself can
    /// come from the TANDEM_MESH_SECRET variable, never from a flag. A private mesh is TCP only.
    #[arg(long, env = "TANDEM_MESH_SECRET_FILE")]
    pub mesh_secret_file: Option<PathBuf>,
    /// Only these peers may connect (repeatable); default: anyone with the mesh secret.
    #[arg(long = "allow-peer", env = "TANDEM_ALLOW_PEERS", value_delimiter = ',')]
    pub allow_peer: Vec<String>,
    /// Turn off mDNS discovery on the local network.
    #[arg(long, env = "TANDEM_NO_MDNS")]
    pub no_mdns: bool,
    /// The node's identity key file (created on first start).
    #[arg(long, env = "TANDEM_IDENTITY")]
    pub identity: Option<PathBuf>,
}

/// The same settings as read from the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    model: Option<String>,
    http: Option<SocketAddr>,
    adapter: Option<String>,
    kv_memory: Option<String>,
    layers: Option<String>,
    gpu_memory: Option<String>,
    weights_rate: Option<String>,
    max_batch_tokens: Option<usize>,
    context: Option<usize>,
    deterministic: Option<bool>,
    kv_dtype: Option<KvDtype>,
    max_waiting: Option<usize>,
    policy: Option<Policy>,
    chunked_prefill: Option<bool>,
    placement: Option<PlacementMode>,
    max_body: Option<String>,
    shutdown_grace: Option<u64>,
    http_read_timeout: Option<u64>,
    http_idle_timeout: Option<u64>,
    http_max_connections: Option<usize>,
    log_json: Option<bool>,
    listen: Option<Vec<String>>,
    peer: Option<Vec<String>>,
    role: Option<Role>,
    mesh_secret_file: Option<PathBuf>,
    allow_peer: Option<Vec<String>>,
    mdns: Option<bool>,
    identity: Option<PathBuf>,
}

/// Resolved settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeConfig {
    pub model: String,
    pub http: SocketAddr,
    pub adapter: Option<String>,
    /// Bytes; None for the adapter-dependent default.
    pub kv_memory: Option<u64>,
    pub layers: Layers,
    /// Bytes, when told.
    pub gpu_memory: Option<u64>,
    /// Bytes per second of weights sent to peers.
    pub weights_rate: u64,
    pub max_batch_tokens: usize,
    pub context: Option<usize>,
    pub deterministic: bool,
    pub kv_dtype: KvDtype,
    pub max_waiting: usize,
    pub policy: Policy,
    pub chunked_prefill: bool,
    pub placement: PlacementMode,
    pub max_body: usize,
    pub shutdown_grace: u64,
    pub http_read_timeout: u64,
    pub http_idle_timeout: u64,
    pub http_max_connections: usize,
    pub log_json: bool,
    pub mesh: MeshSettings,
}

/// Which layers of the model a node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layers {
    #[default]
    All,
    /// Layers `start..end` (the flag names the last one, inclusive).
    Span { start: usize, end: usize },
    /// Chosen at load from what the mesh lacks and what fits.
    Auto,
}

impl std::str::FromStr for Layers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "all" => Ok(Layers::All),
            "auto" => Ok(Layers::Auto),
            span => {
                let (a, b) = span.split_once('-').ok_or("expected `all`, `auto` or a span like `0-9`")?;
                let (start, last): (usize, usize) = match (a.trim().parse(), b.trim().parse()) {
                    (Ok(a), Ok(b)) => (a, b),
                    _ => return Err("a span is two layer numbers, like `0-9`".into()),
                };
                if last < start {
                    return Err(format!("the span ends (layer {last}) before it starts (layer {start})"));
                }
                Ok(Layers::Span { start, end: last + 1 })
            }
        }
    }
}

/// How the node joins the mesh.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    pub listen: Vec<Multiaddr>,
    pub peers: Vec<Multiaddr>,
    pub role: Role,
    pub secret: Option<MeshSecret>,
    pub allow: Vec<PeerId>,
    pub mdns: bool,
    pub identity: PathBuf,
}

impl PartialEq for MeshSettings {
    fn eq(&self, o: &Self) -> bool {
        (&self.listen, &self.peers, self.role, &self.allow, self.mdns, &self.identity)
            == (&o.listen, &o.peers, o.role, &o.allow, o.mdns, &o.identity)
            && self.secret.map(|s| s.fingerprint()) == o.secret.map(|s| s.fingerprint())
    }
}

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{setting}: `{value}` is not a size (try 512MiB or 4GiB)")]
    Size { setting: &'static str, value: String },
    #[error("{setting} must be at least {min}")]
    TooSmall { setting: &'static str, min: usize },
    #[error("{setting} must be at most {max}")]
    TooLarge { setting: &'static str, max: u64 },
    #[error("{setting}: `{value}`: {message}")]
    Mesh { setting: &'static str, value: String, message: String },
    #[error(transparent)]
    Secret(#[from] tandem_mesh::Error),
}

fn multiaddrs(setting: &'static str, values: Vec<String>) -> Result<Vec<Multiaddr>, ConfigError> {
    values
        .into_iter()
        .map(|v| v.parse().map_err(|e: tandem_mesh::MultiaddrError| ConfigError::Mesh { setting, value: v, message: e.to_string() }))
        .collect()
}

/// Where the identity key lives unless told: `$XDG_CONFIG_HOME/tandem` or `~/.config/tandem`.
fn default_identity() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from).join(".config"));
    base.join("tandem").join("identity.key")
}

fn size(setting: &'static str, value: &str) -> Result<u64, ConfigError> {
    value.parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|_| ConfigError::Size { setting, value: value.into() })
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.message().to_string() })
}

impl ServeArgs {
    /// Flags (clap has already preferred a flag over its environment variable) over the file
    /// over the defaults.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let kv_memory = self.kv_memory.or(file.kv_memory).map(|v| size("kv-memory", &v)).transpose()?;
        let layers = match self.layers.or(file.layers) {
            Some(v) => v.parse().map_err(|message| ConfigError::Mesh { setting: "layers", value: v, message })?,
            None => Layers::All,
        };
        let gpu_memory = self.gpu_memory.or(file.gpu_memory).map(|v| size("gpu-memory", &v)).transpose()?;
        let weights_rate = size("weights-rate", &self.weights_rate.or(file.weights_rate).unwrap_or_else(|| "100MiB".into()))?;
        let max_body = size("max-body", &self.max_body.or(file.max_body).unwrap_or_else(|| "1MiB".into()))?;
        let cfg = ServeConfig {
            model: self.model.or(file.model).unwrap_or_else(|| crate::models::DEFAULT_MODEL.id.to_string()),
            http: self.http.or(file.http).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            adapter: self.adapter.or(file.adapter),
            kv_memory,
            layers,
            gpu_memory,
            weights_rate,
            max_batch_tokens: self.max_batch_tokens.or(file.max_batch_tokens).unwrap_or(512),
            context: self.context.or(file.context),
            deterministic: self.deterministic.or(file.deterministic).unwrap_or(false),
            kv_dtype: self.kv_dtype.or(file.kv_dtype).unwrap_or_default(),
            max_waiting: self.max_waiting.or(file.max_waiting).unwrap_or(256),
            policy: self.policy.or(file.policy).unwrap_or_default(),
            placement: self.placement.or(file.placement).unwrap_or_default(),
            chunked_prefill: self.chunked_prefill.or(file.chunked_prefill).unwrap_or(true),
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
            shutdown_grace: self.shutdown_grace.or(file.shutdown_grace).unwrap_or(30),
            http_read_timeout: self.http_read_timeout.or(file.http_read_timeout).unwrap_or(10),
            http_idle_timeout: self.http_idle_timeout.or(file.http_idle_timeout).unwrap_or(60),
            http_max_connections: self.http_max_connections.or(file.http_max_connections).unwrap_or(1024),
            log_json: self.log_json.or(file.log_json).unwrap_or(false),
            mesh: MeshSettings {
                listen: multiaddrs("listen", if self.listen.is_empty() { file.listen.unwrap_or_default() } else { self.listen })?,
                peers: multiaddrs("peer", if self.peer.is_empty() { file.peer.unwrap_or_default() } else { self.peer })?,
                role: self.role.or(file.role).unwrap_or_default(),
                secret: MeshSecret::from_file_or_env(self.mesh_secret_file.or(file.mesh_secret_file).as_deref())?,
                allow: (if self.allow_peer.is_empty() { file.allow_peer.unwrap_or_default() } else { self.allow_peer })
                    .into_iter()
                    .map(|v| {
                        v.parse().map_err(|e: tandem_mesh::PeerIdError| ConfigError::Mesh {
                            setting: "allow-peer",
                            value: v,
                            message: e.to_string(),
                        })
                    })
                    .collect::<Result<_, _>>()?,
                mdns: !self.no_mdns && file.mdns.unwrap_or(true),
                identity: self.identity.or(file.identity).unwrap_or_else(default_identity),
            },
        };
        if cfg.max_batch_tokens < 16 {
            return Err(ConfigError::TooSmall { setting: "max-batch-tokens", min: 16 });
        }
        // Seconds are added to clocks: a day is more than any of them needs.
        const DAY: u64 = 86_400;
        for (setting, value, min) in [
            ("http-read-timeout", cfg.http_read_timeout, 1),
            ("http-idle-timeout", cfg.http_idle_timeout, 1),
            ("shutdown-grace", cfg.shutdown_grace, 0),
        ] {
            if value < min {
                return Err(ConfigError::TooSmall { setting, min: min as usize });
            }
            if value > DAY {
                return Err(ConfigError::TooLarge { setting, max: DAY });
            }
        }
        if cfg.http_max_connections < 1 {
            return Err(ConfigError::TooSmall { setting: "http-max-connections", min: 1 });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tandem.toml");
        std::fs::write(&path, "http = \"0.0.0.0:9000\"\nmax_batch_tokens = 128\npolicy = \"decode-first\"\nkv_memory = \"256MiB\"\n")
            .expect("write");
        let args = ServeArgs { config: Some(path.clone()), max_batch_tokens: Some(64), ..Default::default() };
        let cfg = args.resolve().expect("resolves");
        assert_eq!(cfg.http, "0.0.0.0:9000".parse().expect("addr"));
        assert_eq!(cfg.max_batch_tokens, 64, "the flag wins");
        assert_eq!(cfg.policy, Policy::DecodeFirst);
        assert_eq!(cfg.kv_memory, Some(256 << 20));
        assert_eq!(cfg.max_waiting, 256, "default");
        assert_eq!(cfg.mesh.role, Role::Both, "default");
        assert!(cfg.mesh.mdns && cfg.mesh.secret.is_none());
        std::fs::write(&path, "listen = [\"/ip4/127.0.0.1/tcp/4001\"]\nrole = \"decode\"\nmdns = false\n").expect("write");
        let cfg = ServeArgs { config: Some(path.clone()), ..Default::default() }.resolve().expect("resolves");
        assert_eq!((cfg.mesh.listen.len(), cfg.mesh.role, cfg.mesh.mdns), (1, Role::Decode, false));
        let err = ServeArgs { peer: vec!["/ip4/nonsense".into()], ..Default::default() }.resolve().expect_err("bad multiaddr");
        assert!(err.to_string().contains("peer"), "{err}");
        let err = ServeArgs { allow_peer: vec!["12D3".into()], ..Default::default() }.resolve().expect_err("bad peer id");
        assert!(err.to_string().contains("allow-peer"), "{err}");
        std::fs::write(&path, "max_batch_size = 3\n").expect("write");
        let err = ServeArgs { config: Some(path), ..Default::default() }.resolve().expect_err("unknown key");
        assert!(err.to_string().contains("max_batch_size"), "{err}");
        let err = ServeArgs { kv_memory: Some("lots".into()), ..Default::default() }.resolve().expect_err("bad size");
        assert!(err.to_string().contains("kv-memory"), "{err}");
        for (v, want) in [
            ("0-9", Layers::Span { start: 0, end: 10 }),
            ("auto", Layers::Auto),
            ("all", Layers::All),
            ("20-29", Layers::Span { start: 20, end: 30 }),
        ] {
            let cfg = ServeArgs { layers: Some(v.into()), ..Default::default() }.resolve().expect("layers");
            assert_eq!(cfg.layers, want, "{v}");
        }
        for bad in ["9-0", "x", "1-", "-3"] {
            let err = ServeArgs { layers: Some(bad.into()), ..Default::default() }.resolve().expect_err("bad span");
            assert!(err.to_string().contains("layers"), "{bad}: {err}");
        }
        assert!(err.to_string().contains("kv-memory"), "{err}");
    }
}
