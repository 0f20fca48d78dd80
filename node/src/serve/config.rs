//! `tandem serve` settings: defaults, overridden by a TOML file, overridden by environment
//! variables, overridden by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tandem_core::scheduler::Policy;

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
    /// Most tokens in one engine step: decode tokens of every running request plus prefill chunks.
    #[arg(long, env = "TANDEM_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Positions per request (prompt plus output). Default: the model's context, at most 8192.
    #[arg(long, env = "TANDEM_CONTEXT")]
    pub context: Option<usize>,
    /// Requests that may wait for a slot; beyond it new requests get 429.
    #[arg(long, env = "TANDEM_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// Scheduling policy: fcfs, decode-first or shortest-prompt-first.
    #[arg(long, env = "TANDEM_POLICY")]
    pub policy: Option<Policy>,
    /// Fuse prompt chunks with decode tokens (true) or run prefills alone and whole (false).
    #[arg(long, env = "TANDEM_CHUNKED_PREFILL")]
    pub chunked_prefill: Option<bool>,
    /// Largest accepted request body, e.g. `1MiB`.
    #[arg(long, env = "TANDEM_MAX_BODY")]
    pub max_body: Option<String>,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<u64>,
    /// Logs as JSON lines instead of text.
    #[arg(long, env = "TANDEM_LOG_JSON")]
    pub log_json: Option<bool>,
}

/// The same settings as read from the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    model: Option<String>,
    http: Option<SocketAddr>,
    adapter: Option<String>,
    kv_memory: Option<String>,
    max_batch_tokens: Option<usize>,
    context: Option<usize>,
    max_waiting: Option<usize>,
    policy: Option<Policy>,
    chunked_prefill: Option<bool>,
    max_body: Option<String>,
    shutdown_grace: Option<u64>,
    log_json: Option<bool>,
}

/// Resolved settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeConfig {
    pub model: String,
    pub http: SocketAddr,
    pub adapter: Option<String>,
    /// Bytes; None for the adapter-dependent default.
    pub kv_memory: Option<u64>,
    pub max_batch_tokens: usize,
    pub context: Option<usize>,
    pub max_waiting: usize,
    pub policy: Policy,
    pub chunked_prefill: bool,
    pub max_body: usize,
    pub shutdown_grace: u64,
    pub log_json: bool,
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
        let max_body = size("max-body", &self.max_body.or(file.max_body).unwrap_or_else(|| "1MiB".into()))?;
        let cfg = ServeConfig {
            model: self.model.or(file.model).unwrap_or_else(|| crate::models::DEFAULT_MODEL.id.to_string()),
            http: self.http.or(file.http).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            adapter: self.adapter.or(file.adapter),
            kv_memory,
            max_batch_tokens: self.max_batch_tokens.or(file.max_batch_tokens).unwrap_or(512),
            context: self.context.or(file.context),
            max_waiting: self.max_waiting.or(file.max_waiting).unwrap_or(256),
            policy: self.policy.or(file.policy).unwrap_or_default(),
            chunked_prefill: self.chunked_prefill.or(file.chunked_prefill).unwrap_or(true),
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
            shutdown_grace: self.shutdown_grace.or(file.shutdown_grace).unwrap_or(30),
            log_json: self.log_json.or(file.log_json).unwrap_or(false),
        };
        if cfg.max_batch_tokens < 16 {
            return Err(ConfigError::TooSmall { setting: "max-batch-tokens", min: 16 });
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
        std::fs::write(&path, "max_batch_size = 3\n").expect("write");
        let err = ServeArgs { config: Some(path), ..Default::default() }.resolve().expect_err("unknown key");
        assert!(err.to_string().contains("max_batch_size"), "{err}");
        let err = ServeArgs { kv_memory: Some("lots".into()), ..Default::default() }.resolve().expect_err("bad size");
        assert!(err.to_string().contains("kv-memory"), "{err}");
    }
}
