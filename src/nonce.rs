//! The per-boot nonce: 64 random bits drawn from the OS once per process, which tell this run
//! of a node from every earlier one. ReadIndex contexts carry it (an answer meant for a
//! previous boot must not resolve a read of this one) and request ids start from it.
//!
//! Random rather than derived from the clock, which can step back and repeat an earlier boot's
//! value, and rather than a counter persisted in the data dir, which would cost a durable write
//! before every start and could itself be lost to a power cut before its fsync. Two boots share
//! a nonce with probability 2^-64.

use std::io::Read;

/// 8 bytes from `/dev/urandom` (the kernel's CSPRNG; it never blocks once seeded at boot).
pub fn boot_nonce() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn nonces_differ() {
        let a = super::boot_nonce().unwrap();
        let b = super::boot_nonce().unwrap();
        assert_ne!(a, b);
    }
}
