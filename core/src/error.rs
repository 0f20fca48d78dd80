//! The one error type of tandem-core.

use std::path::PathBuf;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core, with the context needed to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {kind}: models are read from regular files only")]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error("{path} holds {size} bytes, more than the {max} such a file may hold")]
    FileTooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path}: not a valid GGUF file: {reason}")]
    Gguf { path: PathBuf, reason: String },
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor { path: PathBuf, tensor: String, reason: String },
    #[error(
        "{path}: tensor `{tensor}` has type {type_name}, which tandem does not support (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
    )]
    UnsupportedTensorType { path: PathBuf, tensor: String, type_name: String },
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, tensor: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: safetensors: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error(
        "no GPU adapter found{detail}. tandem needs a Vulkan, Metal or DX12 driver: install your GPU's driver, or on a headless Linux machine Mesa's CPU driver lavapipe (`apt-get install mesa-vulkan-drivers`)"
    )]
    NoAdapter { detail: String },
    #[error("no adapter matches `{wanted}`; available: {available}")]
    AdapterNotFound { wanted: String, available: String },
    #[error("cannot open the GPU device on {adapter}: {reason}")]
    Device { adapter: String, reason: String },
    #[error("GPU error in {op}: {reason}")]
    Gpu { op: String, reason: String },
    #[error("the model needs {needed} but the adapter allows {limit} ({what})")]
    AdapterLimit { what: &'static str, needed: u64, limit: u64 },
    #[error("prompt of {tokens} tokens plus {max_new} new tokens exceeds the context of {context} tokens")]
    ContextOverflow { tokens: usize, max_new: usize, context: usize },
    #[error("out of KV cache blocks: need {needed}, {free} free")]
    OutOfKvBlocks { needed: usize, free: usize },
    #[error("overloaded: {waiting} requests are already waiting")]
    Overloaded { waiting: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    #[error("KV import rejected: {0}")]
    KvImport(String),
    #[error("cannot stack {names}: the matrices differ in width or share no device layout")]
    StackMismatch { names: String },
    #[error("no matrices to stack")]
    EmptyStack,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
