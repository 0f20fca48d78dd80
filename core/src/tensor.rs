//! Tensors on the host: their storage format, shape and bytes (memory-mapped or owned), and the
//! mapping from GGML type ids.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub use tandem_shaders::WeightFormat;

use crate::error::{Error, Result};

/// Where tensor bytes live: a memory-mapped file or an owned buffer (synthetic weights, tests).
pub enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    /// All bytes of the backing.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

impl fmt::Debug for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::Mapped(m) => write!(f, "Mapped({} bytes)", m.len()),
            Backing::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
        }
    }
}

/// Memory-maps a file read-only.
#[allow(unsafe_code)]
pub(crate) fn map_file(file: &std::fs::File, path: &Path) -> Result<memmap2::Mmap> {
    // SAFETY: the map is read-only; a model file modified by another process while it is served is
    // outside tandem's contract (as it is for llama.cpp and safetensors users).
    unsafe { memmap2::Mmap::map(file) }.map_err(|e| Error::io(path, e))
}

/// A byte range of a backing.
#[derive(Clone, Debug)]
pub struct TensorBytes {
    backing: Arc<Backing>,
    start: usize,
    len: usize,
}

impl TensorBytes {
    /// `len` bytes from `start`; the caller has checked the range.
    pub fn new(backing: Arc<Backing>, start: usize, len: usize) -> Self {
        debug_assert!(start + len <= backing.bytes().len());
        TensorBytes { backing, start, len }
    }

    /// Owned bytes.
    pub fn owned(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        TensorBytes { backing: Arc::new(Backing::Owned(bytes)), start: 0, len }
    }

    /// Where the bytes start in their backing (in a mapped file, the file offset).
    pub fn offset(&self) -> usize {
        self.start
    }

    /// Every byte of the backing (of a mapped file, the whole file).
    pub fn backing(&self) -> &[u8] {
        self.backing.bytes()
    }

    /// Whether the backing is a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(*self.backing, Backing::Mapped(_))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.backing.bytes()[self.start..self.start + self.len]
    }
}

/// A tensor as stored in a model file. `shape[0]` is the innermost (contiguous) dimension, as
/// in GGUF: a weight matrix with `rows` outputs and `cols` inputs has shape `[cols, rows]`.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub name: String,
    pub format: WeightFormat,
    pub shape: Vec<usize>,
    pub bytes: TensorBytes,
}

impl HostTensor {
    /// Elements per row (the innermost dimension).
    pub fn cols(&self) -> usize {
        self.shape[0]
    }

    /// Number of rows (product of the outer dimensions).
    pub fn rows(&self) -> usize {
        self.shape[1..].iter().product()
    }

    /// The stored bytes of rows `[start, end)`.
    pub fn row_bytes(&self, start: usize, end: usize) -> &[u8] {
        let rb = self.format.row_bytes(self.cols()).unwrap_or(0);
        &self.bytes.as_slice()[start * rb..end * rb]
    }
}

/// The format of a GGML type id, if tandem supports it.
pub fn ggml_type_format(ty: u32) -> Option<WeightFormat> {
    Some(match ty {
        0 => WeightFormat::F32,
        1 => WeightFormat::F16,
        2 => WeightFormat::Q4_0,
        3 => WeightFormat::Q4_1,
        6 => WeightFormat::Q5_0,
        7 => WeightFormat::Q5_1,
        8 => WeightFormat::Q8_0,
        10 => WeightFormat::Q2K,
        11 => WeightFormat::Q3K,
        12 => WeightFormat::Q4K,
        13 => WeightFormat::Q5K,
        14 => WeightFormat::Q6K,
        30 => WeightFormat::Bf16,
        _ => return None,
    })
}

/// The GGML type id of a format.
pub fn ggml_type_id(format: WeightFormat) -> u32 {
    match format {
        WeightFormat::F32 => 0,
        WeightFormat::F16 => 1,
        WeightFormat::Q4_0 => 2,
        WeightFormat::Q4_1 => 3,
        WeightFormat::Q5_0 => 6,
        WeightFormat::Q5_1 => 7,
        WeightFormat::Q8_0 => 8,
        WeightFormat::Q2K => 10,
        WeightFormat::Q3K => 11,
        WeightFormat::Q4K => 12,
        WeightFormat::Q5K => 13,
        WeightFormat::Q6K => 14,
        WeightFormat::Bf16 => 30,
    }
}

/// A GGML type id's name, for error messages about types tandem does not support.
pub fn ggml_type_name(ty: u32) -> String {
    let name = match ty {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        _ => return format!("unknown type {ty}"),
    };
    name.to_string()
}
