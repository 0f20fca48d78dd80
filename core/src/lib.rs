//! tandem-core: a Llama-family model on our own WGSL kernels through wgpu, with a paged KV cache
//! that can be exported and imported layer by layer.
//!
//! The path of a request: [`HostModel::load`] maps a GGUF file or Hugging Face directory,
//! [`Engine::new`] uploads it to a [`GpuContext`], and [`Engine::step`] runs batched steps
//! (prefill chunks and decode tokens together) that sample on the GPU.

pub mod arch;
pub mod config;
pub mod content;
pub mod cpu_ref;
pub mod device_weights;
pub mod engine;
pub mod error;
pub mod files;
pub mod generate;
pub mod gguf;
pub mod gpu;
pub mod hf_export;
pub mod kernels;
pub mod kv;
pub mod layer;
pub mod model;
pub mod probe;
pub mod quant;
pub mod recorder;
pub mod scheduler;
pub mod spm;
pub mod stage;
mod strftime;
pub mod synthetic;
pub mod tensor;
pub mod tokenizer;
pub mod worker;

pub use config::{ModelConfig, RopeLayout};
pub use engine::{Engine, EngineConfig, SamplingParams, StepInput, StepOutput, StepTiming};
pub use error::{Error, Result};
pub use generate::{GenerationStats, generate, prefill};
pub use gguf::{GgufFile, GgufTensorOut, MetaArray, MetaValue, write_gguf};
pub use gpu::{AdapterSummary, GpuContext, list_adapters};
pub use kv::{BLOCK_TOKENS, KvDtype, KvLayer, KvSink, SeqId};
pub use model::HostModel;
pub use probe::{DeviceSpeed, measure_speed};
pub use recorder::KernelTime;
pub use tensor::{HostTensor, WeightFormat};
pub use tokenizer::{ChatMessage, TextTokenizer};
