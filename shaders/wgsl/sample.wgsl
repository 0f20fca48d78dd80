// Token choice for each sampled row, on the GPU so only the token id travels back.
// temperature <= 0: argmax (ties to the lowest id). Otherwise softmax(logits / temperature)
// restricted to the top-k logits and then to the smallest top-p nucleus, sampled with a
// counter-based random number from (seed, counter): the choice never depends on the batch.
// Thresholds are found by bisection over the order-preserving integer keys of the logits, and
// every sum runs over fixed sets of ids (lane i takes i, i + WG, ...) in lane order, so results
// are reproducible.

struct SampleParams {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    seed: u32,
    counter: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override VOCAB: u32;

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<SampleParams>;
@group(0) @binding(3) var<storage, read_write> chosen: array<u32>;

var<workgroup> red_f: array<f32, WG>;
var<workgroup> red_u: array<u32, WG>;
var<workgroup> row_params: SampleParams;

fn key_of(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn sum_f(lane: u32, v: f32) -> f32 {
    red_f[lane] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            red_f[lane] += red_f[lane + stride];
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&red_f[0]);
    workgroupBarrier();
    return r;
}

fn sum_u(lane: u32, v: u32) -> u32 {
    red_u[lane] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            red_u[lane] += red_u[lane + stride];
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&red_u[0]);
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let r = wg.x;
    if (r >= step.n_sample) {
        return;
    }
    if (lane == 0u) {
        row_params = params[r];
    }
    // Loaded through the workgroup so the branches below are provably uniform.
    let sp = workgroupUniformLoad(&row_params);
    let base = r * VOCAB;
    // Lane i takes ids i, i + WG, ...: each pass over the logits is one coalesced sweep (a
    // contiguous chunk a lane made the 128k-token argmax take 225 µs on the H200).

    // Argmax by key, ties to the lowest id; also the maximum for the softmax.
    var best_key = 0u;
    var best_id = 0xffffffffu;
    for (var i = lane; i < VOCAB; i += WG) {
        let k = key_of(logits[base + i]);
        if (k > best_key || best_id == 0xffffffffu) {
            best_key = k;
            best_id = i;
        }
    }
    red_u[lane] = best_key;
    red_f[lane] = bitcast<f32>(best_id);
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            let ok = red_u[lane + stride];
            let oid = bitcast<u32>(red_f[lane + stride]);
            let mid = bitcast<u32>(red_f[lane]);
            if (oid != 0xffffffffu && (ok > red_u[lane] || (ok == red_u[lane] && oid < mid) || mid == 0xffffffffu)) {
                red_u[lane] = ok;
                red_f[lane] = bitcast<f32>(oid);
            }
        }
        workgroupBarrier();
    }
    let top_key = workgroupUniformLoad(&red_u[0]);
    let top_id = bitcast<u32>(workgroupUniformLoad(&red_f[0]));
    workgroupBarrier();
    if (sp.temperature <= 0.0) {
        if (lane == 0u) {
            chosen[r] = top_id;
        }
        return;
    }
    let top_logit = logits[base + top_id];
    let inv_t = 1.0 / sp.temperature;

    // Top-k: the largest key threshold that still keeps at least k tokens.
    var threshold = 0u;
    if (sp.top_k > 0u && sp.top_k < VOCAB) {
        var lo_k = 0u;
        var hi_k = top_key;
        // A binary search over 32-bit keys: at most 32 halvings.
        for (var it = 0u; it < 33u && lo_k < hi_k; it++) {
            let mid = lo_k + (hi_k - lo_k + 1u) / 2u;
            var cnt = 0u;
            for (var i = lane; i < VOCAB; i += WG) {
                cnt += select(0u, 1u, key_of(logits[base + i]) >= mid);
            }
            if (sum_u(lane, cnt) >= sp.top_k) {
                lo_k = mid;
            } else {
                hi_k = mid - 1u;
            }
        }
        threshold = lo_k;
    }

    // Top-p: the largest threshold whose kept mass reaches top_p of the top-k mass.
    if (sp.top_p > 0.0 && sp.top_p < 1.0) {
        var mass = 0.0;
        for (var i = lane; i < VOCAB; i += WG) {
            let v = logits[base + i];
            if (key_of(v) >= threshold) {
                mass += exp((v - top_logit) * inv_t);
            }
        }
        let need = sum_f(lane, mass) * sp.top_p;
        var lo_p = threshold;
        var hi_p = top_key;
        for (var it = 0u; it < 33u && lo_p < hi_p; it++) {
            let mid = lo_p + (hi_p - lo_p + 1u) / 2u;
            var part = 0.0;
            for (var i = lane; i < VOCAB; i += WG) {
                let v = logits[base + i];
                if (key_of(v) >= mid) {
                    part += exp((v - top_logit) * inv_t);
                }
            }
            if (sum_f(lane, part) >= need) {
                lo_p = mid;
            } else {
                hi_p = mid - 1u;
            }
        }
        threshold = lo_p;
    }

    // Draw: find the lane, then the token, where the running mass passes u * total, walking the
    // tokens lane by lane (any fixed order samples the same distribution).
    var mine = 0.0;
    for (var i = lane; i < VOCAB; i += WG) {
        let v = logits[base + i];
        if (key_of(v) >= threshold) {
            mine += exp((v - top_logit) * inv_t);
        }
    }
    red_f[lane] = mine;
    workgroupBarrier();
    if (lane == 0u) {
        var total = 0.0;
        for (var i = 0u; i < WG; i++) {
            total += red_f[i];
        }
        let u = f32(pcg(sp.seed ^ pcg(sp.counter)) >> 8u) / 16777216.0;
        let goal = u * total;
        var run = 0.0;
        var pick = top_id;
        var found = false;
        for (var c = 0u; c < WG && !found; c++) {
            if (run + red_f[c] > goal) {
                for (var i = c; i < VOCAB; i += WG) {
                    let v = logits[base + i];
                    if (key_of(v) >= threshold) {
                        run += exp((v - top_logit) * inv_t);
                        pick = i;
                        if (run > goal) {
                            found = true;
                            break;
                        }
                    }
                }
            } else {
                run += red_f[c];
            }
        }
        chosen[r] = pick;
    }
}
