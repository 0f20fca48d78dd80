// RMSNorm of every query and key head on its own (Gemma 3's and Qwen3's q/k norms), in place in
// the fused QKV rows before RoPE: head h < N_HEADS of token t is scaled by `gq`, the key heads
// after it by `gk`. One workgroup per (head, token); the sum of squares goes by a fixed tree, so a
// head's result depends only on its values.

override N_HEADS: u32;
override N_KV_HEADS: u32;
override HEAD_DIM: u32;
override EPS: f32;

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> gq: array<f32>;
@group(0) @binding(3) var<storage, read> gk: array<f32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let h = wg.x;
    let t = wg.y;
    if (t >= step.n_tokens) {
        return;
    }
    let row = t * (N_HEADS + 2u * N_KV_HEADS) * HEAD_DIM;
    let base = row + h * HEAD_DIM;
    var sum = 0.0;
    for (var i = lane; i < HEAD_DIM; i += WG) {
        let v = qkv[base + i];
        sum += v * v;
    }
    red[lane] = sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            red[lane] += red[lane + stride];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(workgroupUniformLoad(&red[0]) / f32(HEAD_DIM) + EPS);
    for (var i = lane; i < HEAD_DIM; i += WG) {
        var g = gk[i];
        if (h < N_HEADS) {
            g = gq[i];
        }
        qkv[base + i] = qkv[base + i] * inv * g;
    }
}
