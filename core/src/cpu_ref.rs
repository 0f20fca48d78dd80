//! Plain CPU implementations of every kernel, written for clarity, used as the reference the GPU
//! kernels are tested against (and by `export-hf` to dequantize).

use half::{bf16, f16};

use crate::tensor::WeightFormat;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes one row of `cols` elements stored in `format` (the file's byte layout).
pub fn dequantize_row(format: WeightFormat, bytes: &[u8], cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(cols);
    match format {
        WeightFormat::F32 => out.extend(bytes.chunks_exact(4).take(cols).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        WeightFormat::F16 => out.extend(bytes.chunks_exact(2).take(cols).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
        WeightFormat::Bf16 => out.extend(bytes.chunks_exact(2).take(cols).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        WeightFormat::Q8_0 => {
            for blk in bytes.chunks_exact(34).take(cols / 32) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..34].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        WeightFormat::Q4_0 => {
            for blk in bytes.chunks_exact(18).take(cols / 32) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..18];
                out.extend(qs.iter().map(|&q| d * (f32::from(q & 0xf) - 8.0)));
                out.extend(qs.iter().map(|&q| d * (f32::from(q >> 4) - 8.0)));
            }
        }
        WeightFormat::Q4_1 => {
            for blk in bytes.chunks_exact(20).take(cols / 32) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                let qs = &blk[4..20];
                out.extend(qs.iter().map(|&q| d * f32::from(q & 0xf) + m));
                out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
        }
        _ => {
            for blk in bytes.chunks_exact(format.block_bytes()).take(cols / format.block_elems()) {
                for sub in crate::quant::decode_block(format, blk).unwrap_or_default() {
                    out.extend(sub.values());
                }
            }
        }
    }
    out
}

/// Quantizes one row of f32 values into `format`'s file layout (round to nearest), the inverse
/// of [`dequantize_row`] up to the format's precision. Used to build test and synthetic weights.
pub fn quantize_row(format: WeightFormat, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match format {
        WeightFormat::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        WeightFormat::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        WeightFormat::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        WeightFormat::Q8_0 => {
            for blk in values.chunks(32) {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
            }
        }
        WeightFormat::Q4_0 => {
            for blk in values.chunks(32) {
                let max = blk.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
            }
        }
        WeightFormat::Q4_1 => {
            for blk in values.chunks(32) {
                let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
                let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
            }
        }
        _ => out = crate::quant::quantize(format, values),
    }
    out
}

/// Dequantizes a whole matrix (rows x cols), row-major.
pub fn dequantize(format: WeightFormat, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let rb = format.row_bytes(cols).expect("cols fit the block size");
    (0..rows).flat_map(|r| dequantize_row(format, &bytes[r * rb..(r + 1) * rb], cols)).collect()
}

/// y[t, n] = sum_k x[t, k] * w[n, k].
pub fn matmul(x: &[f32], w: &[f32], tokens: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; tokens * n];
    for t in 0..tokens {
        for r in 0..n {
            y[t * n + r] = (0..k).map(|i| f64::from(x[t * k + i]) * f64::from(w[r * k + i])).sum::<f64>() as f32;
        }
    }
    y
}

/// One block of 32 activations as 8-bit values the way the GPU's producers write them for the
/// decode matvec (`q8_lanes` in q8_lanes.wgsl, llama.cpp's q8_1): the quants, d = max|v| / 127, and
/// s = d * sum of the quants.
pub fn quantize_q8_block(v: &[f32]) -> ([i8; 32], f32, f32) {
    let amax = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let inv = if amax > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; 32];
    for (q, x) in q.iter_mut().zip(v) {
        *q = (x * inv).round_ties_even() as i8;
    }
    let sum: i32 = q.iter().map(|&q| i32::from(q)).sum();
    (q, d, d * sum as f32)
}

/// `x` after a round trip through 8-bit activations: what the decode matvec multiplies.
pub fn q8_round_trip(x: &[f32]) -> Vec<f32> {
    x.chunks(32)
        .flat_map(|block| {
            let (q, d, _) = quantize_q8_block(block);
            q.into_iter().map(move |q| f32::from(q) * d)
        })
        .collect()
}

/// RMSNorm of each row of `dim` values.
pub fn rmsnorm(x: &[f32], g: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|row| {
            let ms = row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + f64::from(eps)).sqrt();
            row.iter().zip(g).map(move |(v, g)| (f64::from(*v) * inv * f64::from(*g)) as f32)
        })
        .collect()
}

/// silu(gate) * up.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect()
}

/// cos/sin of every (position, pair): angle = pos * theta^(-2i/head_dim) / factor_i.
pub fn rope_table(positions: usize, head_dim: usize, theta: f64, freq_factors: Option<&[f32]>) -> Vec<[f32; 2]> {
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for i in 0..half {
            let mut freq = theta.powf(-2.0 * i as f64 / head_dim as f64);
            if let Some(f) = freq_factors {
                freq /= f64::from(f[i]);
            }
            let a = p as f64 * freq;
            out.push([a.cos() as f32, a.sin() as f32]);
        }
    }
    out
}

/// Rotates one head vector in place at position `pos`. `neox`: pairs (i, i + d/2), else (2i, 2i+1).
pub fn rope(head: &mut [f32], pos: usize, table: &[[f32; 2]], neox: bool) {
    let half = head.len() / 2;
    for i in 0..half {
        let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
        let [c, s] = table[pos * half + i];
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
}

/// Causal attention for one sequence: q [T, n_heads*hd] at positions `start..start+T`, keys and
/// values [start+T, n_kv*hd] for every position so far.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], start: usize, n_heads: usize, n_kv: usize, hd: usize) -> Vec<f32> {
    attention_windowed(q, k, v, start, n_heads, n_kv, hd, 0)
}

/// `attention` where the query at position p sees only positions p - window + 1..=p (0: all).
#[allow(clippy::too_many_arguments)]
pub fn attention_windowed(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    window: usize,
) -> Vec<f32> {
    let tokens = q.len() / (n_heads * hd);
    let kv_dim = n_kv * hd;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; q.len()];
    for t in 0..tokens {
        let n = start + t + 1;
        let lo = if window > 0 { n.saturating_sub(window) } else { 0 };
        for h in 0..n_heads {
            let kvh = h / (n_heads / n_kv);
            let qv = &q[(t * n_heads + h) * hd..][..hd];
            let scores: Vec<f64> =
                (lo..n).map(|j| (0..hd).map(|d| f64::from(qv[d]) * f64::from(k[j * kv_dim + kvh * hd + d])).sum::<f64>() * scale).collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let o: f64 = (lo..n).map(|j| e[j - lo] * f64::from(v[j * kv_dim + kvh * hd + d])).sum();
                out[(t * n_heads + h) * hd + d] = (o / z) as f32;
            }
        }
    }
    out
}

/// The id of the largest value, ties to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
