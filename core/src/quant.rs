//! The 5-bit formats and the K-quants (ggml's Q5_0, Q5_1, Q2_K … Q6_K) on the CPU: decoding a
//! file block into 32-element sub-blocks of small integers under f32 scales (shared by the CPU
//! dequantizer and the upload, which transcodes them into the GPU layouts of
//! `WeightFormat::device_format`), and quantizing f32 values into file blocks for tests and
//! synthetic weights. The arithmetic follows ggml's `dequantize_row_*` step for step (the scale
//! products are formed in f32 in the same order), so the values are exactly the file's.

use half::f16;

use crate::tensor::WeightFormat;

/// 32 values `d[h] * q[i] + m[h]`, where `h = i / 16` (the halves differ only in Q2_K, Q3_K and
/// Q6_K, whose scales cover 16 values).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SubBlock {
    pub q: [i8; 32],
    pub d: [f32; 2],
    pub m: [f32; 2],
}

impl SubBlock {
    fn new() -> Self {
        SubBlock { q: [0; 32], d: [0.0; 2], m: [0.0; 2] }
    }

    /// The 32 values.
    pub fn values(&self) -> impl Iterator<Item = f32> + '_ {
        self.q.iter().enumerate().map(|(i, &q)| self.d[i / 16] * f32::from(q) + self.m[i / 16])
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q4_K's and Q5_K's 6-bit scale and minimum of sub-block `j` (ggml's `get_scale_min_k4`).
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 { (q[j] & 63, q[j + 4] & 63) } else { ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)) }
}

/// The sub-blocks of one file block of `format` (`format.block_bytes()` bytes), in order; None
/// for the formats these are not for.
pub fn decode_block(format: WeightFormat, b: &[u8]) -> Option<Vec<SubBlock>> {
    let mut out = Vec::with_capacity(8);
    match format {
        WeightFormat::Q5_0 | WeightFormat::Q5_1 => {
            let mut s = SubBlock::new();
            let (d, m, rest) = if format == WeightFormat::Q5_0 { (f16_at(b, 0), 0.0, 2) } else { (f16_at(b, 0), f16_at(b, 2), 4) };
            let qh = u32::from_le_bytes([b[rest], b[rest + 1], b[rest + 2], b[rest + 3]]);
            let qs = &b[rest + 4..rest + 20];
            let bias = if format == WeightFormat::Q5_0 { 16 } else { 0 };
            for (j, &q) in qs.iter().enumerate() {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                s.q[j] = (((q & 0xf) | h0) as i16 - bias) as i8;
                s.q[j + 16] = (((q >> 4) | h1) as i16 - bias) as i8;
            }
            s.d = [d; 2];
            s.m = [m; 2];
            out.push(s);
        }
        WeightFormat::Q4K | WeightFormat::Q5K => {
            let (d, min) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, ql) = if format == WeightFormat::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let mut s = SubBlock::new();
                let bytes = &ql[(j / 2) * 32..(j / 2) * 32 + 32];
                for l in 0..32 {
                    let low = if j % 2 == 0 { bytes[l] & 0xf } else { bytes[l] >> 4 };
                    let high = qh.map_or(0, |h| if h[l] & (1 << j) != 0 { 16 } else { 0 });
                    s.q[l] = (low + high) as i8;
                }
                s.d = [d * f32::from(sc); 2];
                s.m = [-(min * f32::from(m)); 2];
                out.push(s);
            }
        }
        WeightFormat::Q6K => {
            let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16_at(b, 208));
            let mut vals = [0i8; 256];
            for n in 0..2 {
                let (ql, qh) = (&ql[n * 64..], &qh[n * 32..]);
                for l in 0..32 {
                    let y = &mut vals[n * 128..];
                    y[l] = (((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i8) - 32;
                    y[l + 32] = (((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i8) - 32;
                    y[l + 64] = (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8) - 32;
                    y[l + 96] = (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8) - 32;
                }
            }
            for j in 0..8 {
                let mut s = SubBlock::new();
                s.q.copy_from_slice(&vals[j * 32..j * 32 + 32]);
                s.d = [d * f32::from(sc[2 * j] as i8), d * f32::from(sc[2 * j + 1] as i8)];
                out.push(s);
            }
        }
        WeightFormat::Q3K => {
            let (hm, qs, raw, d) = (&b[0..32], &b[32..96], &b[96..108], f16_at(b, 108));
            let scales = q3k_scales(raw);
            let mut vals = [0i8; 256];
            let mut dl = [0f32; 16];
            let (mut is, mut m, mut y) = (0, 1u8, 0);
            for n in 0..2 {
                let q = &qs[n * 32..];
                for shift in [0, 2, 4, 6] {
                    for half in 0..2 {
                        dl[is] = d * f32::from(scales[is] as i8 - 32);
                        is += 1;
                        for l in 0..16 {
                            let i = l + 16 * half;
                            vals[y] = ((q[i] >> shift) & 3) as i8 - if hm[i] & m != 0 { 0 } else { 4 };
                            y += 1;
                        }
                    }
                    m <<= 1;
                }
            }
            for j in 0..8 {
                let mut s = SubBlock::new();
                s.q.copy_from_slice(&vals[j * 32..j * 32 + 32]);
                s.d = [dl[2 * j], dl[2 * j + 1]];
                out.push(s);
            }
        }
        WeightFormat::Q2K => {
            let (sc, qs, d, min) = (&b[0..16], &b[16..80], f16_at(b, 80), f16_at(b, 82));
            let mut vals = [0i8; 256];
            let (mut dl, mut ml) = ([0f32; 16], [0f32; 16]);
            let (mut is, mut y) = (0, 0);
            for n in 0..2 {
                let q = &qs[n * 32..];
                for shift in [0, 2, 4, 6] {
                    for half in 0..2 {
                        dl[is] = d * f32::from(sc[is] & 0xf);
                        ml[is] = -(min * f32::from(sc[is] >> 4));
                        is += 1;
                        for l in 0..16 {
                            vals[y] = ((q[l + 16 * half] >> shift) & 3) as i8;
                            y += 1;
                        }
                    }
                }
            }
            for j in 0..8 {
                let mut s = SubBlock::new();
                s.q.copy_from_slice(&vals[j * 32..j * 32 + 32]);
                s.d = [dl[2 * j], dl[2 * j + 1]];
                s.m = [ml[2 * j], ml[2 * j + 1]];
                out.push(s);
            }
        }
        _ => return None,
    }
    Some(out)
}

/// Q6_K's and Q3_K's super-block scale d (its f16 bytes) and its 16 signed scales, one per 16
/// values in order (Q3_K's 6-bit ones less 32), as ggml reads them; the other formats have none.
pub(crate) fn k6_scales(format: WeightFormat, b: &[u8]) -> ([u8; 2], [i8; 16]) {
    match format {
        WeightFormat::Q6K => ([b[208], b[209]], std::array::from_fn(|i| b[192 + i] as i8)),
        WeightFormat::Q3K => ([b[108], b[109]], q3k_scales(&b[96..108]).map(|s| s as i8 - 32)),
        _ => ([0; 2], [0; 16]),
    }
}

/// Q3_K's sixteen 6-bit scales (stored + 32) from its 12 packed bytes (ggml's aux shuffle).
fn q3k_scales(raw: &[u8]) -> [u8; 16] {
    let mut s = [0u8; 16];
    for i in 0..16 {
        let (low, high) = match i {
            0..4 => (raw[i] & 0xf, raw[8 + i] & 3),
            4..8 => (raw[i] & 0xf, (raw[8 + i - 4] >> 2) & 3),
            8..12 => (raw[i - 8] >> 4, (raw[8 + i - 8] >> 4) & 3),
            _ => (raw[i - 8] >> 4, (raw[8 + i - 12] >> 6) & 3),
        };
        s[i] = low | (high << 4);
    }
    s
}

/// The inverse of [`q3k_scales`].
fn pack_q3k_scales(s: &[u8; 16]) -> [u8; 12] {
    let mut raw = [0u8; 12];
    for (i, &v) in s.iter().enumerate() {
        let (low, high) = (v & 0xf, v >> 4);
        match i {
            0..4 => {
                raw[i] |= low;
                raw[8 + i] |= high;
            }
            4..8 => {
                raw[i] |= low;
                raw[8 + i - 4] |= high << 2;
            }
            8..12 => {
                raw[i - 8] |= low << 4;
                raw[8 + i - 8] |= high << 4;
            }
            _ => {
                raw[i - 8] |= low << 4;
                raw[8 + i - 12] |= high << 6;
            }
        }
    }
    raw
}

/// The inverse of [`scale_min_k4`] over all eight sub-blocks.
fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0xf) | ((m[j + 4] & 0xf) << 4);
    }
    q
}

fn round_clamp(v: f32, lo: i32, hi: i32) -> i32 {
    (v.round() as i32).clamp(lo, hi)
}

fn inv(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Quantizes values (a multiple of the format's block) into file blocks of `format`, round to
/// nearest under simple scales: for test and synthetic weights, not for producing model files.
pub fn quantize(format: WeightFormat, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in values.chunks(format.block_elems()) {
        match format {
            WeightFormat::Q5_0 | WeightFormat::Q5_1 => {
                let (min, max) = min_max(blk);
                let (d, m, bias) = if format == WeightFormat::Q5_0 {
                    let amax = if max.abs() > min.abs() { max } else { min };
                    (amax / -16.0, 0.0, 16)
                } else {
                    ((max - min) / 31.0, min, 0)
                };
                let d16 = f16::from_f32(d);
                let m16 = f16::from_f32(m);
                out.extend_from_slice(&d16.to_le_bytes());
                if format == WeightFormat::Q5_1 {
                    out.extend_from_slice(&m16.to_le_bytes());
                }
                let q: Vec<u8> =
                    blk.iter().map(|&v| round_clamp((v - m16.to_f32()) * inv(d16.to_f32()) + bias as f32, 0, 31) as u8).collect();
                let mut qh = 0u32;
                for (j, &q) in q.iter().enumerate() {
                    qh |= u32::from(q >> 4) << j;
                }
                out.extend_from_slice(&qh.to_le_bytes());
                out.extend((0..16).map(|j| (q[j] & 0xf) | ((q[j + 16] & 0xf) << 4)));
            }
            WeightFormat::Q4K | WeightFormat::Q5K => {
                let levels = if format == WeightFormat::Q4K { 15.0 } else { 31.0 };
                let subs: Vec<(f32, f32)> = blk
                    .chunks(32)
                    .map(|s| {
                        let (min, max) = min_max(s);
                        let min = min.min(0.0);
                        ((max - min) / levels, -min)
                    })
                    .collect();
                let d = f16::from_f32(subs.iter().map(|s| s.0).fold(0.0, f32::max) / 63.0);
                let dmin = f16::from_f32(subs.iter().map(|s| s.1).fold(0.0, f32::max) / 63.0);
                let mut sc = [0u8; 8];
                let mut mn = [0u8; 8];
                for (j, &(s, m)) in subs.iter().enumerate() {
                    sc[j] = round_clamp(s * inv(d.to_f32()), 0, 63) as u8;
                    mn[j] = round_clamp(m * inv(dmin.to_f32()), 0, 63) as u8;
                }
                out.extend_from_slice(&d.to_le_bytes());
                out.extend_from_slice(&dmin.to_le_bytes());
                out.extend_from_slice(&pack_scale_min_k4(&sc, &mn));
                let q: Vec<u8> = blk
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let j = i / 32;
                        let (d1, m1) = (d.to_f32() * f32::from(sc[j]), dmin.to_f32() * f32::from(mn[j]));
                        round_clamp((v + m1) * inv(d1), 0, levels as i32) as u8
                    })
                    .collect();
                if format == WeightFormat::Q5K {
                    let mut qh = [0u8; 32];
                    for (i, &q) in q.iter().enumerate() {
                        qh[i % 32] |= (q >> 4) << (i / 32);
                    }
                    out.extend_from_slice(&qh);
                }
                for pair in 0..4 {
                    out.extend((0..32).map(|l| (q[pair * 64 + l] & 0xf) | ((q[pair * 64 + 32 + l] & 0xf) << 4)));
                }
            }
            WeightFormat::Q6K => {
                let scales: Vec<f32> = blk.chunks(16).map(|s| max_abs(s) / 31.0).collect();
                let d = f16::from_f32(scales.iter().copied().fold(0.0, f32::max) / 127.0);
                let sc: Vec<i8> = scales.iter().map(|&s| round_clamp(s * inv(d.to_f32()), -128, 127) as i8).collect();
                let q: Vec<u8> = blk
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (round_clamp(v * inv(d.to_f32() * f32::from(sc[i / 16])), -32, 31) + 32) as u8)
                    .collect();
                let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
                for n in 0..2 {
                    let y = &q[n * 128..];
                    for l in 0..32 {
                        ql[n * 64 + l] = (y[l] & 0xf) | ((y[l + 64] & 0xf) << 4);
                        ql[n * 64 + l + 32] = (y[l + 32] & 0xf) | ((y[l + 96] & 0xf) << 4);
                        qh[n * 32 + l] = (y[l] >> 4) | ((y[l + 32] >> 4) << 2) | ((y[l + 64] >> 4) << 4) | ((y[l + 96] >> 4) << 6);
                    }
                }
                out.extend_from_slice(&ql);
                out.extend_from_slice(&qh);
                out.extend(sc.iter().map(|&s| s as u8));
                out.extend_from_slice(&d.to_le_bytes());
            }
            WeightFormat::Q3K => {
                let scales: Vec<f32> = blk.chunks(16).map(|s| max_abs(s) / 3.0).collect();
                let d = f16::from_f32(scales.iter().copied().fold(0.0, f32::max) / 31.0);
                let mut s6 = [0u8; 16];
                for (i, &s) in scales.iter().enumerate() {
                    s6[i] = (round_clamp(s * inv(d.to_f32()), -32, 31) + 32) as u8;
                }
                // Value y (0..256) in order: group n of 128, shift pair g, half h, lane l.
                let (mut hm, mut qs) = ([0u8; 32], [0u8; 64]);
                for (y, &v) in blk.iter().enumerate() {
                    let dl = d.to_f32() * f32::from(s6[y / 16] as i8 - 32);
                    let q = (round_clamp(v * inv(dl), -4, 3) + 4) as u8;
                    let (n, g, i) = (y / 128, (y % 128) / 32, y % 32);
                    qs[n * 32 + i] |= (q & 3) << (2 * g);
                    if q >= 4 {
                        hm[i] |= 1 << (n * 4 + g);
                    }
                }
                out.extend_from_slice(&hm);
                out.extend_from_slice(&qs);
                out.extend_from_slice(&pack_q3k_scales(&s6));
                out.extend_from_slice(&d.to_le_bytes());
            }
            WeightFormat::Q2K => {
                let subs: Vec<(f32, f32)> = blk
                    .chunks(16)
                    .map(|s| {
                        let (min, max) = min_max(s);
                        let min = min.min(0.0);
                        ((max - min) / 3.0, -min)
                    })
                    .collect();
                let d = f16::from_f32(subs.iter().map(|s| s.0).fold(0.0, f32::max) / 15.0);
                let dmin = f16::from_f32(subs.iter().map(|s| s.1).fold(0.0, f32::max) / 15.0);
                let sc: Vec<u8> = subs
                    .iter()
                    .map(|&(s, m)| {
                        round_clamp(s * inv(d.to_f32()), 0, 15) as u8 | ((round_clamp(m * inv(dmin.to_f32()), 0, 15) as u8) << 4)
                    })
                    .collect();
                let mut qs = [0u8; 64];
                for (y, &v) in blk.iter().enumerate() {
                    let s = sc[y / 16];
                    let (dl, ml) = (d.to_f32() * f32::from(s & 0xf), dmin.to_f32() * f32::from(s >> 4));
                    let q = round_clamp((v + ml) * inv(dl), 0, 3) as u8;
                    let (n, g, i) = (y / 128, (y % 128) / 32, y % 32);
                    qs[n * 32 + i] |= q << (2 * g);
                }
                out.extend_from_slice(&sc);
                out.extend_from_slice(&qs);
                out.extend_from_slice(&d.to_le_bytes());
                out.extend_from_slice(&dmin.to_le_bytes());
            }
            _ => unreachable!("quant::quantize is called for the 5-bit formats and K-quants only"),
        }
    }
    out
}

fn min_max(v: &[f32]) -> (f32, f32) {
    v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formats this module decodes: those `decode_block` takes.
    fn formats() -> impl Iterator<Item = WeightFormat> {
        WeightFormat::ALL.into_iter().filter(|f| decode_block(*f, &vec![0; f.block_bytes()]).is_some())
    }

    #[test]
    fn quantized_blocks_decode_close_to_their_values_and_have_the_files_size() {
        let values: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3).collect();
        assert_eq!(formats().count(), 7, "Q5_0, Q5_1 and the five K-quants");
        for format in formats() {
            let bytes = quantize(format, &values);
            assert_eq!(bytes.len(), format.row_bytes(values.len()).expect("whole blocks"), "{format}");
            let decoded: Vec<f32> = bytes
                .chunks_exact(format.block_bytes())
                .flat_map(|b| decode_block(format, b).expect("decodes"))
                .flat_map(|s| s.values().collect::<Vec<_>>())
                .collect();
            // Half a step of the coarsest format (2 bits over a 0.6 range, plus scale rounding).
            let tol = match format {
                WeightFormat::Q2K => 0.16,
                WeightFormat::Q3K => 0.06,
                _ => 0.03,
            };
            for (i, (got, want)) in decoded.iter().zip(&values).enumerate() {
                assert!((got - want).abs() <= tol, "{format}[{i}]: {got} vs {want}");
            }
        }
    }

    #[test]
    fn q3k_and_k4_scale_packing_round_trip() {
        let s: [u8; 16] = std::array::from_fn(|i| (i as u8 * 7 + 3) % 64);
        assert_eq!(q3k_scales(&pack_q3k_scales(&s)), s);
        let sc: [u8; 8] = std::array::from_fn(|i| (i as u8 * 11 + 5) % 64);
        let m: [u8; 8] = std::array::from_fn(|i| (i as u8 * 13 + 1) % 64);
        let packed = pack_scale_min_k4(&sc, &m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &packed), (sc[j], m[j]), "sub-block {j}");
        }
    }
}
