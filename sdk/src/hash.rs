//! FNV-1a, the 64-bit hash behind the model, plan and dropout-mask fingerprints: small,
//! stable across platforms and versions, and no dependency.

/// FNV-1a's 64-bit offset basis: the starting value of [`fnv1a`].
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Feeds `bytes` into a 64-bit FNV-1a hash.
pub(crate) fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash = (*hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
}
