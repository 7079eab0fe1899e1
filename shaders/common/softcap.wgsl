// Gemma 2's attention logit soft-capping, for the attention kernels (their `p` is
// AttentionParams): a scaled score s becomes cap · tanh(s / cap) before the softmax, with cap =
// p.softcap; 0 leaves scores as they are. tanh's argument is clamped to ±15, where tanh is 1 in
// f32 already, so no backend's tanh meets an overflow.
fn softcap(s: f32) -> f32 {
    if (p.softcap > 0.0) { return p.softcap * tanh(clamp(s / p.softcap, -15.0, 15.0)); }
    return s;
}

// The derivative of softcap at s: 1 - tanh(s / cap)^2 (1 without a cap).
fn softcap_grad(s: f32) -> f32 {
    if (p.softcap > 0.0) {
        let t = tanh(clamp(s / p.softcap, -15.0, 15.0));
        return 1.0 - t * t;
    }
    return 1.0;
}
