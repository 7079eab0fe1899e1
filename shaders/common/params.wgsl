// The params structs shared by a kernel and its backward (and by the elementwise kernels).
// Each has a #[repr(C)] twin of the same name in shaders/src/lib.rs with a size check.

struct RmsNormParams {
    n_rows: u32,
    dim: u32,
    eps: f32,
    n_rows2: u32,     // rows of the pair variant's second tensor (rms_norm.pair)
}

struct RopeParams {
    n_tokens: u32,
    n_heads: u32,
    head_dim: u32,
    pos_offset: u32,
    rot_dim: u32,     // the first rot_dim values of each head rotate (partial RoPE); the rest pass
    n_kv_heads: u32,  // key heads, rotated in the same dispatch after the n_heads query heads
    _pad1: u32,
    _pad2: u32,
}

struct SoftcapParams {
    n: u32,
    cap: f32,
    _pad0: u32,
    _pad1: u32,
}

struct DropoutParams {
    n: u32,
    seed: u32,
    threshold: u32,   // keep when hash >= threshold = p * 2^32
    scale: f32,       // 1 / (1 - p)
}

struct ElementwiseParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct CrossEntropyParams {
    n_rows: u32,
    vocab: u32,
    grad_scale: f32,   // used by cross_entropy_backward.wgsl only
    row_offset: u32,   // its `.weighted` variant's first row in `weights`
    softcap: f32,      // the logits' soft cap (logit_softcap.wgsl), 0 for none: backward only
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct AttentionParams {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos_offset: u32,
    kv_stride: u32,   // floats per key position: n_kv_heads * head_dim
    scale: f32,
    softcap: f32,     // Gemma 2's attention logit cap (common/softcap.wgsl); 0: none
    split_keys: u32,  // attention.wgsl: keys per workgroup along z (split-key decoding); 0: all
    n_splits: u32,    // workgroups along z that split the keys (attention_combine.wgsl reads them)
    head_split: u32,  // attention_backward_kv_t128.wgsl: 1 = a workgroup per query head, into partials
    key_ends: u32,    // attention.wgsl, attention_combine.wgsl: 1 = key_start holds each query's (first, end)
}

struct KvWriteParams {
    n_rows: u32,
    width: u32,       // floats of a position: n_kv_heads * head_dim
    first: u32,       // the first row's position (without ranges)
    ranges: u32,      // 1: each row's position is the end of its key range less one
}

// Every matmul and matvec kernel (forward, dX and dW).
// MatmulParams.x_op: what a product fuses into reading its input x (with `aux`): a one-row
// product any of the first four, a weight gradient's x the gated activations or X_RMS_KEPT.
const X_AS_IS: u32 = 0u;
const X_RMS_NORM: u32 = 1u;     // x RMS-normed, aux the norm's weight
const X_SILU_MUL: u32 = 2u;     // silu(x) * aux: x the gate, aux the up projection
const X_GELU_MUL: u32 = 3u;     // gelu_tanh(x) * aux
const X_RMS_KEPT: u32 = 4u;     // x[m, k] * aux[k] * row_scale[m]: RMS-normed with each row's kept 1/rms

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    y_stride: u32,
    y_col_offset: u32,
    y_seg_rows: u32,    // output rows in blocks of this many, scattered (common/matmul_store.wgsl; 0: none)
    accumulate: u32,
    alpha: f32,
    w_offset: u32,      // first element of w (LoRA matrices live in one flat buffer)
    dy_stride: u32,     // dX kernels: row stride of dy
    dy_col_offset: u32, // dX kernels: first column of dy
    split_k: u32,       // tiled kernels: reduction length per workgroup z, or 0 for all of it
    x_op: u32,          // what the kernel fuses into reading x (X_AS_IS, X_RMS_NORM, ...)
    norm_eps: f32,      // X_RMS_NORM's epsilon
    lora_rank: u32,     // one-row kernels: a LoRA B product added in the epilogue, its rank (0: none)
    lora_b: u32,        // B's first element in lora_b
    lora_scale: f32,    // its factor: y += lora_scale * lora_h[lora_h..] . B[col, :]
    seg_rows: u32,      // dense one-row kernels: rows a block of w, gathered (common/dense_rows.wgsl)
    w_offset1: u32,     // the second block's first element
    w_offset2: u32,     // the third's
    lora_h: u32,        // h's first element in lora_h (many rows: row m's is m * lora_h_stride + lora_h)
    x_stride: u32,      // many-row forward kernels: row stride of x (K when x is contiguous)
    x_col_offset: u32,  // and its first column read
    lora_h_stride: u32, // many-row forward and dX kernels: the row stride of h (dX: of dh)
    lora_seg_rows: u32, // dX kernels: rows a block of the gathered A read from lora_b (0: none fused)
    lora_w1: u32,       // its second block's first element
    lora_w2: u32,       // its third's
    y_offset1: u32,     // y_seg_rows: the second block's first element (the first's is y_col_offset)
    y_offset2: u32,     // and the third's
    _pad0: u32,
    _pad1: u32,
}

// dpo.wgsl and dpo_logps.wgsl: the pairs of a packed batch.
struct DpoParams {
    n_pairs: u32,
    length_normalized: u32, // 1: the log-ratios are divided by the completion's scored tokens (IPO)
    ipo: u32,               // 1: (h - 1 / (2 beta))^2; 0: a * -log sigmoid(z) + b * -log sigmoid(-z)
    _pad: u32,
    beta: f32,
    a: f32,
    b: f32,
    grad_scale: f32,        // 1 / the pairs of the optimizer step
}
