//! Random identifiers: tokens, object UIDs and generateName suffixes.

fn fill(b: &mut [u8]) {
    // SystemRandom reads the kernel's getrandom; it does not fail on Linux once booted.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), b).is_err() {
        panic!("the system random number generator failed");
    }
}

/// 48 hex digits.
pub fn token() -> String {
    let mut b = [0u8; 24];
    fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A random (version 4) UUID, as the API server gives every object.
pub fn uid() -> String {
    let mut b = [0u8; 16];
    fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Five characters of the API server's generateName alphabet (no vowels, nothing confusable).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut b = [0u8; 5];
    fill(&mut b);
    b.iter().map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char).collect()
}

/// A number in `0..n` (n > 0).
pub fn below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    fill(&mut b);
    u64::from_le_bytes(b) % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let u = uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, uid());
        assert_eq!(token().len(), 48);
        assert_eq!(name_suffix().len(), 5);
        assert!(below(3) < 3);
    }
}
