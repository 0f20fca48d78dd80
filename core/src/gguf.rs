//! GGUF (v2/v3) reader: header, metadata, tensor table and data, memory-mapped.
//!
//! Every length and offset read from the file is checked against the file's size before use, so
//! a truncated or corrupt file gives an error naming the file and, where it applies, the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::tensor::{Backing, HostTensor, TensorBytes, ggml_type_format, ggml_type_name};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Far above any real model; stops a corrupt count from allocating the machine away.
const MAX_ITEMS: u64 = 1 << 24;
/// Tensors and metadata keys: real models have a few thousand at most, and each costs several
/// times its bytes in the file once parsed.
const MAX_ENTRIES: usize = 1 << 16;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(MetaArray),
}

/// A metadata array, kept in its element type: a large array costs about what the file does
/// (one enum per element would cost 32 bytes for each byte of a `u8` array).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    Array(Vec<MetaArray>),
}

impl MetaArray {
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::F64(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::Str(v) => v.len(),
            MetaArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, if this is an array of strings.
    pub fn strings(&self) -> Option<&[String]> {
        match self {
            MetaArray::Str(v) => Some(v),
            _ => None,
        }
    }

    /// The elements as signed integers, if this is an array of integers that all fit.
    pub fn integers(&self) -> Option<Vec<i64>> {
        fn all<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            MetaArray::U8(v) => all(v, |x| Some(x.into())),
            MetaArray::I8(v) => all(v, |x| Some(x.into())),
            MetaArray::U16(v) => all(v, |x| Some(x.into())),
            MetaArray::I16(v) => all(v, |x| Some(x.into())),
            MetaArray::U32(v) => all(v, |x| Some(x.into())),
            MetaArray::I32(v) => all(v, |x| Some(x.into())),
            MetaArray::U64(v) => all(v, |x| i64::try_from(x).ok()),
            MetaArray::I64(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// GGUF's type id of the elements.
    fn element_type(&self) -> u32 {
        match self {
            MetaArray::U8(_) => 0,
            MetaArray::I8(_) => 1,
            MetaArray::U16(_) => 2,
            MetaArray::I16(_) => 3,
            MetaArray::U32(_) => 4,
            MetaArray::I32(_) => 5,
            MetaArray::F32(_) => 6,
            MetaArray::Bool(_) => 7,
            MetaArray::Str(_) => 8,
            MetaArray::Array(_) => 9,
            MetaArray::U64(_) => 10,
            MetaArray::I64(_) => 11,
            MetaArray::F64(_) => 12,
        }
    }
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A parsed GGUF file: metadata and tensors backed by the memory map.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<HostTensor>,
}

struct Reader<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Gguf { path: self.path.to_path_buf(), reason: reason.into() }
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
                self.err(format!("truncated while reading {what} at byte {} (file has {} bytes)", self.pos, self.data.len()))
            })?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// A count read from the file, checked before anything is allocated for it: each item takes
    /// at least `min_bytes` of what is left of the file.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = self.remaining();
        usize::try_from(n)
            .ok()
            .filter(|&c| c as u64 <= MAX_ITEMS && c.checked_mul(min_bytes).is_some_and(|b| b <= left))
            .ok_or_else(|| self.err(format!("{what} {n} is implausible: the {left} bytes left in the file cannot hold that many")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| self.err(format!("{what} length {len} too large")))?;
        let b = self.bytes(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => MetaValue::Bool(self.array::<1>(key)?[0] != 0),
            8 => MetaValue::Str(self.string(key)?),
            9 => MetaValue::Array(self.meta_array(key, 0)?),
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.err(format!("metadata `{key}` has unknown value type {other}"))),
        })
    }

    fn meta_array(&mut self, key: &str, depth: u32) -> Result<MetaArray> {
        if depth > 2 {
            return Err(self.err(format!("metadata `{key}`: arrays nested too deep")));
        }
        let elem_ty = self.u32(key)?;
        // The least each element takes in the file: strings their length, arrays their header.
        let size = match elem_ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            other => return Err(self.err(format!("metadata `{key}` is an array of unknown type {other}"))),
        };
        let n = self.count(&format!("metadata `{key}` array length"), size)?;
        if elem_ty == 8 {
            return (0..n).map(|_| self.string(key)).collect::<Result<_>>().map(MetaArray::Str);
        }
        if elem_ty == 9 {
            return (0..n).map(|_| self.meta_array(key, depth + 1)).collect::<Result<_>>().map(MetaArray::Array);
        }
        let b = self.bytes(n * size, key)?;
        // Each element of a fixed-size type, from its little-endian bytes.
        macro_rules! each {
            ($t:ty) => {
                b.chunks_exact(std::mem::size_of::<$t>()).map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default())).collect()
            };
        }
        Ok(match elem_ty {
            0 => MetaArray::U8(b.to_vec()),
            1 => MetaArray::I8(each!(i8)),
            2 => MetaArray::U16(each!(u16)),
            3 => MetaArray::I16(each!(i16)),
            4 => MetaArray::U32(each!(u32)),
            5 => MetaArray::I32(each!(i32)),
            6 => MetaArray::F32(each!(f32)),
            7 => MetaArray::Bool(b.iter().map(|&x| x != 0).collect()),
            10 => MetaArray::U64(each!(u64)),
            11 => MetaArray::I64(each!(i64)),
            _ => MetaArray::F64(each!(f64)),
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path)?;
        // SAFETY-free: memmap2's map is `unsafe` because another process may change the file; we
        // only read, and a model file changing under a running server is outside our contract.
        let map = crate::tensor::map_file(&file, path)?;
        Self::parse(path, Arc::new(Backing::Mapped(map)))
    }

    /// Parses a GGUF image held in memory (used by tests and synthetic models).
    pub fn parse(path: &Path, backing: Arc<Backing>) -> Result<Self> {
        let data = backing.bytes();
        let mut r = Reader { path, data, pos: 0 };
        if r.bytes(4, "magic")? != MAGIC {
            return Err(r.err("bad magic (expected `GGUF`)"));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(r.err(format!("unsupported GGUF version {version} (tandem reads 2 and 3)")));
        }
        // A tensor entry takes at least 32 bytes (name length, one dimension, type, offset), a
        // metadata entry 13 (key length, type, one byte of value).
        let n_tensors = r.count("tensor count", 32)?;
        let n_kv = r.count("metadata count", 13)?;
        if n_tensors > MAX_ENTRIES || n_kv > MAX_ENTRIES {
            return Err(r.err(format!("{n_tensors} tensors and {n_kv} metadata keys: more than {MAX_ENTRIES} is implausible")));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| r.err("general.alignment is not a power of two"))?,
            None => DEFAULT_ALIGNMENT,
        };
        struct Info {
            name: String,
            dims: Vec<usize>,
            ty: u32,
            offset: u64,
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::Tensor { path: path.into(), tensor: name, reason: format!("{n_dims} dimensions") });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.u64(&name)?;
                dims.push(usize::try_from(d).map_err(|_| r.err(format!("tensor `{name}`: dimension {d} too large")))?);
            }
            let ty = r.u32(&name)?;
            let offset = r.u64(&name)?;
            infos.push(Info { name, dims, ty, offset });
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for info in infos {
            let tensor_err = |reason: String| Error::Tensor { path: path.into(), tensor: info.name.clone(), reason };
            let Some(format) = ggml_type_format(info.ty) else {
                return Err(Error::UnsupportedTensorType { path: path.into(), tensor: info.name, type_name: ggml_type_name(info.ty) });
            };
            let cols = info.dims[0];
            let rows: usize =
                info.dims[1..].iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| tensor_err("shape overflows".into()))?;
            let row_bytes =
                format.row_bytes(cols).ok_or_else(|| tensor_err(format!("{cols} columns is not a multiple of the {format} block size")))?;
            let len = row_bytes.checked_mul(rows).ok_or_else(|| tensor_err("size overflows".into()))?;
            if info.offset % alignment != 0 {
                return Err(tensor_err(format!("data offset {} is not aligned to {alignment}", info.offset)));
            }
            let start = data_start.checked_add(info.offset).ok_or_else(|| tensor_err("offset overflows".into()))?;
            let end = start.checked_add(len as u64).ok_or_else(|| tensor_err("offset overflows".into()))?;
            if end > data.len() as u64 {
                return Err(tensor_err(format!(
                    "data [{start}, {end}) lies beyond the end of the file ({} bytes): the file is truncated",
                    data.len()
                )));
            }
            tensors.push(HostTensor {
                name: info.name,
                format,
                shape: info.dims,
                bytes: TensorBytes::new(backing.clone(), start as usize, len),
            });
        }
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::Str(s) => write_str(out, s),
        MetaValue::Array(items) => write_array(out, items),
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_array(out: &mut Vec<u8>, items: &MetaArray) {
    out.extend_from_slice(&items.element_type().to_le_bytes());
    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            $v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()))
        };
    }
    match items {
        MetaArray::U8(v) => out.extend_from_slice(v),
        MetaArray::I8(v) => each!(v),
        MetaArray::U16(v) => each!(v),
        MetaArray::I16(v) => each!(v),
        MetaArray::U32(v) => each!(v),
        MetaArray::I32(v) => each!(v),
        MetaArray::U64(v) => each!(v),
        MetaArray::I64(v) => each!(v),
        MetaArray::F32(v) => each!(v),
        MetaArray::F64(v) => each!(v),
        MetaArray::Bool(v) => out.extend(v.iter().map(|&x| u8::from(x))),
        MetaArray::Str(v) => v.iter().for_each(|s| write_str(out, s)),
        MetaArray::Array(v) => v.iter().for_each(|a| write_array(out, a)),
    }
}

fn value_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::Str(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

/// A tensor entry for [`write_gguf`]: name, GGML type id, GGUF-order shape, bytes.
#[derive(Debug, Clone)]
pub struct GgufTensorOut<'a> {
    pub name: &'a str,
    pub ggml_type: u32,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

/// Writes a GGUF v3 file (32-byte alignment).
pub fn write_gguf(path: &Path, metadata: &BTreeMap<String, MetaValue>, tensors: &[GgufTensorOut<'_>]) -> Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    let meta: Vec<_> = metadata.iter().filter(|(k, _)| k.as_str() != "general.alignment").collect();
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        write_value(&mut out, &MetaValue::Str(k.clone()));
        out.extend_from_slice(&value_type(v).to_le_bytes());
        write_value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        write_value(&mut out, &MetaValue::Str(t.name.to_string()));
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        t.shape.iter().for_each(|d| out.extend_from_slice(&(*d as u64).to_le_bytes()));
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += (t.bytes.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    out.resize(out.len().div_ceil(DEFAULT_ALIGNMENT as usize) * DEFAULT_ALIGNMENT as usize, 0);
    for t in tensors {
        out.extend_from_slice(t.bytes);
        out.resize(out.len().div_ceil(DEFAULT_ALIGNMENT as usize) * DEFAULT_ALIGNMENT as usize, 0);
    }
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}
