//! Bounds-checked little-endian access to byte slices.

use crate::error::{CorruptKind, Result};

/// Borrow `len` bytes at `off`, or a corruption error naming `what`.
pub fn slice<'a>(buf: &'a [u8], off: usize, len: usize, what: &'static str) -> Result<&'a [u8]> {
    off.checked_add(len)
        .and_then(|end| buf.get(off..end))
        .ok_or_else(|| {
            CorruptKind::OutOfBounds {
                what,
                offset: off,
                len,
                available: buf.len(),
            }
            .into()
        })
}

pub fn u8_at(buf: &[u8], off: usize, what: &'static str) -> Result<u8> {
    Ok(slice(buf, off, 1, what)?[0])
}

pub fn u16_at(buf: &[u8], off: usize, what: &'static str) -> Result<u16> {
    let s = slice(buf, off, 2, what)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

pub fn u32_at(buf: &[u8], off: usize, what: &'static str) -> Result<u32> {
    let s = slice(buf, off, 4, what)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

pub fn u64_at(buf: &[u8], off: usize, what: &'static str) -> Result<u64> {
    let s = slice(buf, off, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

pub fn array_at<const N: usize>(buf: &[u8], off: usize, what: &'static str) -> Result<[u8; N]> {
    let s = slice(buf, off, N, what)?;
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    Ok(a)
}

/// Little-endian writers for encoders. The caller guarantees the buffer is large enough
/// (encoders size their buffers from the same constants); out of range is a programmer error.
pub fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test scenario: reads past the end or with overflowing offsets are errors, not panics.
    #[test]
    fn out_of_bounds_is_error() {
        let b = [1u8, 2, 3];
        assert!(u32_at(&b, 0, "x").is_err());
        assert!(slice(&b, usize::MAX, 2, "x").is_err());
        assert_eq!(u16_at(&b, 1, "x").unwrap(), 0x0302);
    }
}
