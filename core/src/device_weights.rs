//! Weight tensors on the GPU, in their stored format. Quantized blocks are split at upload into an
//! array of quant words and an array of scales so every kernel load is an aligned u32; the bytes
//! are the file's, nothing is expanded. A tensor larger than one storage binding is split into
//! row ranges ("parts"), each its own buffer.

use tandem_shaders::{MatmulParams, WeightFormat};

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::tensor::HostTensor;

/// One row range of a matrix on the GPU.
#[derive(Debug)]
pub struct MatrixPart {
    pub row_start: usize,
    pub rows: usize,
    pub quants: wgpu::Buffer,
    pub scales: wgpu::Buffer,
}

/// A weight matrix (rows x cols) on the GPU.
#[derive(Debug)]
pub struct DeviceMatrix {
    pub name: String,
    /// The device layout (`WeightFormat::device_format` of the file's format).
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<MatrixPart>,
}

/// Bytes per row on the GPU in `format`'s device layout: (quant words, scale bytes).
fn gpu_row_bytes(format: WeightFormat, cols: usize) -> (usize, usize) {
    let blocks = cols / 32;
    match format.device_format() {
        WeightFormat::F32 => (cols * 4, 0),
        WeightFormat::Q8_0 => (blocks * 32, blocks * 2),
        WeightFormat::Q4_0 => (blocks * 16, blocks * 2),
        WeightFormat::Q4_1 => (blocks * 16, blocks * 4),
        // Q4_K and Q5_K: 5 scale words a super-block of 8 blocks (block_dm_k.wgsl).
        WeightFormat::Q4K => (blocks * 16, blocks / 8 * 20),
        // The five-bit formats: 5 quant words a block (q5_values.wgsl), and Q5_0's f16 scale,
        // Q5_1's f16 pair, Q5_K's super-block scales.
        WeightFormat::Q5_0 => (blocks * 20, blocks * 2),
        WeightFormat::Q5_1 => (blocks * 20, blocks * 4),
        WeightFormat::Q5K => (blocks * 20, blocks / 8 * 20),
        // Q6_K and Q3_K: six bits a value, their super-blocks' scales as the file's
        // (block_d_q6_k.wgsl).
        WeightFormat::Q6K => (blocks * 24, blocks / 8 * 20),
        // Q2_K: two bits a value, its super-blocks' scales as the file's (block_dm_q2_k.wgsl).
        WeightFormat::Q2K => (blocks * 8, blocks / 8 * 20),
        // F16 and BF16.
        _ => (cols * 2, 0),
    }
}

/// The device layout a stack of matrices in `formats` takes: their own where they share one,
/// else Q8_0 where each is Q8_0 or Q5_0 (whose values are Q8_0 bytes under the same scale:
/// Gemma 3's Q5_0 Q and K beside its Q8_0 V become one matmul, a dispatch fewer a layer).
pub fn stack_layout(formats: impl IntoIterator<Item = WeightFormat>) -> Option<WeightFormat> {
    let mut layouts = formats.into_iter().map(WeightFormat::device_format);
    let first = layouts.next()?;
    layouts.try_fold(first, |a, b| match (a, b) {
        _ if a == b => Some(a),
        (WeightFormat::Q8_0 | WeightFormat::Q5_0, WeightFormat::Q8_0 | WeightFormat::Q5_0) => Some(WeightFormat::Q8_0),
        _ => None,
    })
}

/// Splits file-layout blocks into (quant bytes, scale bytes) of the device layout `layout` (the
/// format's own, `WeightFormat::device_format`, or a stack's, `stack_layout`), transcoding where
/// the two differ.
fn repack(format: WeightFormat, layout: WeightFormat, bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if (format, layout) == (WeightFormat::Q5_0, WeightFormat::Q8_0) {
        let (mut quants, mut scales) = (Vec::new(), Vec::new());
        for b in bytes.chunks_exact(format.block_bytes()) {
            // q - 16 under the file's own f16 scale.
            scales.extend_from_slice(&b[..2]);
            quants.extend(crate::quant::decode_block(format, b).unwrap_or_default().iter().flat_map(|sub| sub.q.map(|q| q as u8)));
        }
        return (quants, scales);
    }
    let (block, scale) = match format {
        WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16 => return (bytes.to_vec(), Vec::new()),
        WeightFormat::Q8_0 => (34, 2),
        WeightFormat::Q4_0 => (18, 2),
        WeightFormat::Q4_1 => (20, 4),
        _ => return transcode(format, bytes),
    };
    let n = bytes.len() / block;
    let mut quants = Vec::with_capacity(n * (block - scale));
    let mut scales = Vec::with_capacity(n * scale);
    for b in bytes.chunks_exact(block) {
        scales.extend_from_slice(&b[..scale]);
        quants.extend_from_slice(&b[scale..]);
    }
    (quants, scales)
}

/// The 5-bit and K-quant blocks in their device layouts (see the `dequant_q*_k.wgsl` files):
/// every value is the file's exactly, the scales being formed in f32 as ggml forms them.
fn transcode(format: WeightFormat, bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let device = format.device_format();
    let (mut quants, mut scales) = (Vec::new(), Vec::new());
    for b in bytes.chunks_exact(format.block_bytes()) {
        if device == WeightFormat::Q2K {
            // The super-block's f16 d and dmin, then its 16 bytes of 4-bit scales and minimums.
            scales.extend_from_slice(&b[80..84]);
            scales.extend_from_slice(&b[..16]);
        }
        if device == WeightFormat::Q6K {
            // The super-block's f16 d (and two bytes of padding), then its 16 signed scales
            // (block_d_q6_k.wgsl).
            let (d, sc) = crate::quant::k6_scales(format, b);
            scales.extend_from_slice(&[d[0], d[1], 0, 0]);
            scales.extend(sc.iter().map(|&s| s as u8));
        }
        if matches!(device, WeightFormat::Q4K | WeightFormat::Q5K) {
            // The super-block's f16 d and dmin as the file holds them, then each block's 6-bit
            // scale and minimum as a byte pair (block_dm_k.wgsl).
            scales.extend_from_slice(&b[..4]);
            for j in 0..8 {
                let (sc, m) = crate::quant::scale_min_k4(j, &b[4..16]);
                scales.extend_from_slice(&[sc, m]);
            }
        }
        for sub in crate::quant::decode_block(format, b).unwrap_or_default() {
            match device {
                // The five-bit formats: v (Q5_0's q + 16) as low nibbles (word j: elements
                // 8j..8j+3 low, 8j+4..8j+7 high), then the top bits, element i at bit i; Q5_0's
                // and Q5_1's scales as the file holds them.
                WeightFormat::Q5_0 | WeightFormat::Q5_1 | WeightFormat::Q5K => {
                    let bias = if format == WeightFormat::Q5_0 { 16 } else { 0 };
                    let v: Vec<u32> = sub.q.iter().map(|&q| (i32::from(q) + bias) as u32 & 31).collect();
                    push_nibble_words(&mut quants, &v);
                    let top = (0..32).fold(0u32, |w, i| w | ((v[i] >> 4) << i));
                    quants.extend_from_slice(&top.to_le_bytes());
                    match format {
                        WeightFormat::Q5_0 => scales.extend_from_slice(&b[..2]),
                        WeightFormat::Q5_1 => scales.extend_from_slice(&b[..4]),
                        _ => {}
                    }
                }
                WeightFormat::Q4K => quants.extend((0..16).map(|j| (sub.q[j] as u8) | ((sub.q[j + 16] as u8) << 4))),
                // Q6_K and Q3_K: v = q + 32 as low nibbles (word j: elements 8j..8j+3 low,
                // 8j+4..8j+7 high), then the top two bits, 16 a word in order.
                WeightFormat::Q6K => {
                    let v: Vec<u32> = sub.q.iter().map(|&q| (i32::from(q) + 32) as u32 & 63).collect();
                    push_nibble_words(&mut quants, &v);
                    for h in 0..2 {
                        let word = (0..16).fold(0u32, |w, i| w | ((v[16 * h + i] >> 4) << (2 * i)));
                        quants.extend_from_slice(&word.to_le_bytes());
                    }
                }
                // Q2_K: 16 values a word, element i at bits 2i.
                WeightFormat::Q2K => {
                    for half in sub.q.chunks(16) {
                        let word = half.iter().enumerate().fold(0u32, |w, (i, &q)| w | (u32::from(q as u8 & 3) << (2 * i)));
                        quants.extend_from_slice(&word.to_le_bytes());
                    }
                }
                _ => {}
            }
        }
    }
    (quants, scales)
}

/// The low nibbles of a block's 32 values `v` as 4 words: word j holds elements 8j..8j+3 in the
/// low nibbles of its bytes and 8j+4..8j+7 in the high ones, so a mask and a shift give four
/// values in order, one a byte (q5_values.wgsl, block_d_q6_k.wgsl).
fn push_nibble_words(quants: &mut Vec<u8>, v: &[u32]) {
    for j in 0..4 {
        let word = (0..4).fold(0u32, |w, b| w | ((v[8 * j + b] & 0xf) | ((v[8 * j + 4 + b] & 0xf) << 4)) << (8 * b));
        quants.extend_from_slice(&word.to_le_bytes());
    }
}

impl DeviceMatrix {
    /// Uploads a 2-D tensor, split into parts that fit the adapter's binding limit.
    pub fn upload(ctx: &GpuContext, t: &HostTensor) -> Result<Self> {
        Self::upload_stacked(ctx, &[t])
    }

    /// Uploads 2-D tensors of one width and one device layout stacked by rows into one matrix,
    /// each transcoded from its own file format, split into parts that fit the adapter's binding
    /// limit.
    pub fn upload_stacked(ctx: &GpuContext, ts: &[&HostTensor]) -> Result<Self> {
        let first = ts.first().ok_or(Error::EmptyStack)?;
        let cols = first.cols();
        let format = stack_layout(ts.iter().map(|t| t.format)).filter(|_| ts.iter().all(|t| t.cols() == cols));
        let Some(format) = format else {
            let names = ts.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
            return Err(Error::StackMismatch { names });
        };
        let name = ts.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join("+");
        let rows: usize = ts.iter().map(|t| t.rows()).sum();
        let (qb, sb) = gpu_row_bytes(format, cols);
        let per_row = qb.max(sb).max(1) as u64;
        // Rows per part: what fits one binding and one dispatch of a workgroup a row (the most
        // workgroups a dimension takes, 65,535 on every adapter: Gemma's 262,144-token head is
        // five parts), kept even so packed f16 scales never straddle parts.
        let max_rows = (((ctx.max_binding() / per_row) as usize).min(ctx.limits.max_compute_workgroups_per_dimension as usize) & !1).max(2);
        if per_row > ctx.max_binding() {
            return Err(Error::AdapterLimit { what: "bytes in one weight row", needed: per_row, limit: ctx.max_binding() });
        }
        let mut parts = Vec::new();
        let mut start = 0;
        while start < rows {
            let end = (start + max_rows).min(rows);
            let (mut quants, mut scales) = (Vec::new(), Vec::new());
            let mut first_row = 0;
            for t in ts {
                let (a, b) = (start.max(first_row), end.min(first_row + t.rows()));
                if a < b {
                    let (q, s) = repack(t.format, format, t.row_bytes(a - first_row, b - first_row));
                    quants.extend_from_slice(&q);
                    scales.extend_from_slice(&s);
                }
                first_row += t.rows();
            }
            let label = format!("{name}[{start}..{end}]");
            parts.push(MatrixPart {
                row_start: start,
                rows: end - start,
                quants: ctx.storage_init(&label, &quants),
                scales: ctx.storage_init(&format!("{label}.scales"), &scales),
            });
            start = end;
        }
        Ok(DeviceMatrix { name, format, rows, cols, parts })
    }

    /// Uniform parameters for each part when it writes columns `y_offset..` of rows `y_stride` wide.
    pub fn part_params(&self, ctx: &GpuContext, x_stride: usize, y_stride: usize, y_offset: usize) -> Vec<wgpu::Buffer> {
        self.parts
            .iter()
            .map(|p| {
                let params = MatmulParams {
                    n: p.rows as u32,
                    k: self.cols as u32,
                    y_stride: y_stride as u32,
                    x_stride: x_stride as u32,
                    y_offset: (y_offset + p.row_start) as u32,
                    ..Default::default()
                };
                ctx.uniform_init(&format!("{}.params", self.name), bytemuck::bytes_of(&params))
            })
            .collect()
    }
}

/// A vector (norm weights) uploaded as f32.
pub fn upload_vector(ctx: &GpuContext, t: &HostTensor) -> wgpu::Buffer {
    let values = crate::cpu_ref::dequantize_row(t.format, t.bytes.as_slice(), t.cols());
    ctx.storage_init(&t.name, bytemuck::cast_slice(&values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_share_a_layout_or_take_q8_0_for_q5_0() {
        use WeightFormat::*;
        assert_eq!(stack_layout([Q4K, Q4K]), Some(Q4K));
        assert_eq!(stack_layout([Q5_0, Q5_0]), Some(Q5_0));
        assert_eq!(stack_layout([Q5_0, Q5_0, Q8_0]), Some(Q8_0));
        assert_eq!(stack_layout([Q3K, Q6K]), Some(Q6K), "Q3_K rides Q6_K's layout");
        assert_eq!(stack_layout([Q4K, Q6K]), None);
        assert_eq!(stack_layout([Q5_0, Q5_1]), None);
        assert_eq!(stack_layout([]), None);
    }
}
