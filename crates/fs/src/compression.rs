//! Decompression of compressed file extents, as the kernel does it on the read path
//! (fs/btrfs/compression.c, zlib.c, lzo.c, zstd.c).
//!
//! # Definitions
//! - A *regular* compressed extent is `disk_num_bytes` bytes on disk (sector aligned, the tail
//!   after the compressed stream zeroed) that decompress to `ram_bytes` bytes. The kernel reads
//!   it with `btrfs_decompress_bio()`; here that is [`btrfs_decompress`].
//! - An *inline* compressed extent is the data of an EXTENT_DATA item; the kernel reads it with
//!   `uncompress_inline()` -> `btrfs_decompress()` into one page; here that is
//!   [`btrfs_decompress_inline`].
//!
//! # What the kernel does, and therefore what we do
//! - Output is produced until the destination is full; whatever the stream would yield beyond
//!   that is never looked at (`btrfs_decompress_buf2page()` returns 0 once the bio is full and
//!   the decompressor stops). A regular extent whose stream ends early is **not** an error: the
//!   rest is zero-filled (`zero_fill_bio()`). An inline extent that comes out short **is** an
//!   error (-EIO) in all three decompressors, with the tail zeroed.
//! - zlib: the stream carries the 2-byte zlib header; the kernel validates it (method 8, no
//!   preset dictionary, FCHECK), then inflates *raw* deflate, so the adler32 trailer is never
//!   verified and anything after the end of the deflate stream is ignored.
//! - zstd: one frame, window at most 2^17 bytes (`ZSTD_BTRFS_MAX_WINDOWLOG`). Decoding stops at
//!   the end of the first frame (a concatenated second frame is ignored) and also when the input
//!   runs out, which the kernel treats as success (zero-fill), not as a truncated frame.
//! - lzo: btrfs's segmented format (see [`lzo_decompress_bio`]); each segment is an LZO1X stream.
//!
//! # Invariants
//! - Every length read from disk is untrusted: offsets are computed with checked arithmetic and
//!   slices are taken with `get`, so no input can make this module panic (a proptest checks it).
//! - Memory is bounded by the caller's `ram_bytes`, which is itself bounded by
//!   [`BTRFS_MAX_UNCOMPRESSED`] (the kernel never writes a larger compressed extent).
//! - Every loop consumes input or produces output on each iteration, or stops.
//!
//! # Known differences from the kernel (only on crafted input)
//! - zlib: the kernel inflates with the window the header declares (2^(CINFO+8)); miniz always
//!   allows 32 KiB, so a stream with a small declared window that refers further back is accepted
//!   here and rejected by the kernel.
//! - lzo: the kernel's `lzo1x_decompress_safe()` treats a first byte of 17 in a stream of at least
//!   5 bytes as an LZO-RLE version marker; lzokay decodes plain LZO1X. btrfs never writes that.
//! - zstd: the kernel decodes into a page-sized buffer and stops when the input is used up, which
//!   could drop output still buffered inside the decoder; we decode into the whole destination.
//! - The kernel decompresses only up to the end of the range being read; we decompress the whole
//!   extent (up to `ram_bytes`), so a stream that breaks after the part a read needs fails here and
//!   not in the kernel.

use std::fmt;

/// The kernel's BTRFS_MAX_COMPRESSED: the largest on-disk size of a compressed extent.
pub const BTRFS_MAX_COMPRESSED: usize = 128 * 1024;
/// The kernel's BTRFS_MAX_UNCOMPRESSED: the largest `ram_bytes` of a compressed extent.
pub const BTRFS_MAX_UNCOMPRESSED: usize = 128 * 1024;
/// The kernel's BTRFS_MAX_EXTENT_SIZE: the largest extent of any kind.
pub const BTRFS_MAX_EXTENT_SIZE: usize = 128 * 1024 * 1024;
/// Page size of the kernels whose behaviour we reproduce (x86-64).
const PAGE_SIZE: usize = 4096;
/// Size of the lzo total-length header and of each segment header.
const LZO_LEN: usize = 4;
/// The kernel's ZSTD_BTRFS_MAX_WINDOWLOG.
const ZSTD_BTRFS_MAX_WINDOWLOG: u32 = 17;

/// Compression type of a file extent item (`btrfs_file_extent_item::compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CompressionType {
    None = 0,
    Zlib = 1,
    Lzo = 2,
    Zstd = 3,
}

impl CompressionType {
    /// The on-disk value as a compression type; `None` for values the kernel's tree-checker
    /// rejects (>= BTRFS_NR_COMPRESS_TYPES).
    pub fn from_disk(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Zlib),
            2 => Some(Self::Lzo),
            3 => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The kernel's name for the type (as in the `compress=` mount option).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Zlib => "zlib",
            Self::Lzo => "lzo",
            Self::Zstd => "zstd",
        }
    }
}

impl fmt::Display for CompressionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a compressed extent could not be decompressed. Offsets are byte offsets inside the
/// compressed data. [`DecompressError::kernel_returns_euclean`] tells which ones the kernel
/// reports as -EUCLEAN rather than -EIO.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecompressError {
    #[error("invalid sector size {0} (must be a power of two from 4096 to 65536)")]
    InvalidSectorSize(u32),
    #[error("{kind}: ram_bytes {ram_bytes} exceeds the maximum of {max} for this extent kind")]
    RamBytesTooLarge {
        kind: CompressionType,
        ram_bytes: usize,
        max: usize,
    },
    #[error("zlib: invalid stream header ({detail})")]
    ZlibBadHeader { detail: String },
    #[error(
        "zlib: corrupt deflate stream ({msg}) at input offset {offset} of {len}, \
         after {produced} bytes of output"
    )]
    ZlibData {
        msg: String,
        offset: usize,
        len: usize,
        produced: usize,
    },
    #[error(
        "zlib: stream truncated: {len} bytes of input ended without end of stream after \
         {produced} of {expected} bytes of output"
    )]
    ZlibTruncated {
        len: usize,
        produced: usize,
        expected: usize,
    },
    #[error("zlib: inline stream does not end within {limit} bytes of output")]
    ZlibInlineTooLong { limit: usize },
    #[error("zstd: {msg} at input offset {offset} of {len}, after {produced} bytes of output")]
    Zstd {
        msg: String,
        offset: usize,
        len: usize,
        produced: usize,
    },
    #[error("zstd: decoder made no progress at input offset {offset} of {len}")]
    ZstdNoProgress { offset: usize, len: usize },
    #[error("lzo: compressed data of {len} bytes is too short for the {LZO_LEN}-byte header")]
    LzoTooShort { len: usize },
    #[error("lzo: header invalid, lzo len {len_in} compressed len {compressed_len}")]
    LzoHeaderInvalid { len_in: u32, compressed_len: usize },
    #[error(
        "lzo: segment header at offset {offset} extends beyond the compressed data \
         ({compressed_len} bytes)"
    )]
    LzoSegmentHeaderTruncated {
        offset: usize,
        compressed_len: usize,
    },
    #[error("lzo: segment too big at offset {offset}: len {seg_len}, max {max}")]
    LzoSegmentTooBig {
        offset: usize,
        seg_len: u32,
        max: usize,
    },
    #[error(
        "lzo: segment overflows compressed input at offset {offset}: len {seg_len}, \
         compressed len {compressed_len}"
    )]
    LzoSegmentOverflow {
        offset: usize,
        seg_len: u32,
        compressed_len: usize,
    },
    #[error("lzo: decompression failed ({error}) in the segment at offset {offset}")]
    LzoDecompress { offset: usize, error: LzoError },
    #[error(
        "lzo: inline extent length {srclen} out of range (must be more than {min} and at most \
         {max})"
    )]
    LzoInlineBadLength {
        srclen: usize,
        min: usize,
        max: usize,
    },
    #[error("lzo: inline extent {field} is {found}, expected {expected}")]
    LzoInlineLengthMismatch {
        field: &'static str,
        found: u32,
        expected: usize,
    },
    #[error("{kind}: inline extent decompressed to {produced} bytes, expected {expected}")]
    InlineShort {
        kind: CompressionType,
        produced: usize,
        expected: usize,
    },
}

/// An LZO1X decoding failure (a copy of lzokay's error so that ours stays `Eq` and stable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LzoError {
    LookbehindOverrun,
    OutputOverrun,
    InputOverrun,
    InputNotConsumed,
    Other,
}

impl From<lzokay::Error> for LzoError {
    fn from(e: lzokay::Error) -> Self {
        match e {
            lzokay::Error::LookbehindOverrun => Self::LookbehindOverrun,
            lzokay::Error::OutputOverrun => Self::OutputOverrun,
            lzokay::Error::InputOverrun => Self::InputOverrun,
            lzokay::Error::InputNotConsumed => Self::InputNotConsumed,
            lzokay::Error::Error => Self::Other,
        }
    }
}

impl fmt::Display for LzoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LookbehindOverrun => "lookbehind overrun",
            Self::OutputOverrun => "output overrun",
            Self::InputOverrun => "input overrun",
            Self::InputNotConsumed => "input not consumed",
            Self::Other => "invalid stream",
        })
    }
}

impl DecompressError {
    /// True where the kernel returns -EUCLEAN (structure of the compressed data is invalid);
    /// false where it returns -EIO (the decompressor failed) or where the caller passed a bad
    /// argument ([`DecompressError::InvalidSectorSize`]).
    pub fn kernel_returns_euclean(&self) -> bool {
        matches!(
            self,
            Self::RamBytesTooLarge { .. }
                | Self::LzoTooShort { .. }
                | Self::LzoHeaderInvalid { .. }
                | Self::LzoSegmentHeaderTruncated { .. }
                | Self::LzoSegmentOverflow { .. }
                | Self::LzoInlineBadLength { .. }
                | Self::LzoInlineLengthMismatch { .. }
        )
    }
}

/// lzo1x_worst_compress(): the largest LZO1X output for `x` input bytes.
const fn lzo1x_worst_compress(x: usize) -> usize {
    x + x / 16 + 64 + 3
}

fn check_sectorsize(sectorsize: u32) -> Result<usize, DecompressError> {
    if sectorsize.is_power_of_two() && (4096..=65536).contains(&sectorsize) {
        usize::try_from(sectorsize).map_err(|_| DecompressError::InvalidSectorSize(sectorsize))
    } else {
        Err(DecompressError::InvalidSectorSize(sectorsize))
    }
}

fn check_ram_bytes(kind: CompressionType, ram_bytes: usize) -> Result<(), DecompressError> {
    let max = match kind {
        CompressionType::None => BTRFS_MAX_EXTENT_SIZE,
        _ => BTRFS_MAX_UNCOMPRESSED,
    };
    if ram_bytes > max {
        return Err(DecompressError::RamBytesTooLarge {
            kind,
            ram_bytes,
            max,
        });
    }
    Ok(())
}

/// Decompress a whole regular compressed extent, as the kernel's `btrfs_decompress_bio()`
/// followed by `zero_fill_bio()`.
///
/// `src` is the `disk_num_bytes` bytes read from disk (an inline item's data also works, but
/// [`btrfs_decompress_inline`] reproduces the kernel's stricter inline rules). The result has
/// exactly `ram_bytes` bytes: a stream that yields fewer is zero-filled, as the kernel does; output
/// beyond `ram_bytes` is not produced (the kernel stops once the bio is full, so it never looks at
/// it either). `CompressionType::None` copies `src` (zero-filled to `ram_bytes`).
pub fn btrfs_decompress(
    kind: CompressionType,
    src: &[u8],
    ram_bytes: usize,
    sectorsize: u32,
) -> Result<Vec<u8>, DecompressError> {
    let sectorsize = check_sectorsize(sectorsize)?;
    check_ram_bytes(kind, ram_bytes)?;
    let mut out = vec![0u8; ram_bytes];
    let produced = match kind {
        CompressionType::None => {
            let n = src.len().min(ram_bytes);
            out[..n].copy_from_slice(&src[..n]);
            n
        }
        CompressionType::Zlib => zlib_decompress_bio(src, &mut out)?,
        CompressionType::Lzo => lzo_decompress_bio(src, &mut out, sectorsize)?,
        CompressionType::Zstd => zstd_decompress_bio(src, &mut out)?,
    };
    debug_assert!(produced <= ram_bytes);
    // zero_fill_bio(). Not redundant with the zeroed allocation: zstd may use the unused end of
    // its output buffer as scratch space for literals.
    if let Some(tail) = out.get_mut(produced..) {
        tail.fill(0);
    }
    Ok(out)
}

/// Decompress an inline compressed extent, as the kernel's `uncompress_inline()` ->
/// `btrfs_decompress()` (zlib_decompress / lzo_decompress / zstd_decompress).
///
/// `src` is the inline item's data. Returns exactly `min(ram_bytes, 4096)` bytes (the kernel
/// decompresses inline extents into one page). Output shorter than that is an error, as in the
/// kernel. `CompressionType::None` copies `src` (zero-filled), as `read_inline_extent()`.
pub fn btrfs_decompress_inline(
    kind: CompressionType,
    src: &[u8],
    ram_bytes: usize,
    sectorsize: u32,
) -> Result<Vec<u8>, DecompressError> {
    let sectorsize = check_sectorsize(sectorsize)?;
    let destlen = ram_bytes.min(PAGE_SIZE);
    let mut out = vec![0u8; destlen];
    let produced = match kind {
        CompressionType::None => {
            let n = src.len().min(destlen);
            out[..n].copy_from_slice(&src[..n]);
            return Ok(out);
        }
        CompressionType::Zlib => zlib_decompress_inline(src, &mut out)?,
        CompressionType::Lzo => lzo_decompress_inline(src, &mut out, sectorsize)?,
        CompressionType::Zstd => zstd_decompress_inline(src, &mut out, sectorsize)?,
    };
    if produced < destlen {
        return Err(DecompressError::InlineShort {
            kind,
            produced,
            expected: destlen,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// zlib

/// The kernel's header test in zlib_decompress_bio()/zlib_decompress(): a valid zlib header
/// without a preset dictionary lets it inflate raw deflate from byte 2 on, skipping the adler32
/// check. Anything else goes to a zlib-wrapped inflate, which rejects the same headers this
/// function rejects (bad method, bad FCHECK, preset dictionary, window too large, too short).
/// Returns the offset of the deflate data.
fn zlib_header(src: &[u8]) -> Result<usize, DecompressError> {
    const PRESET_DICT: u8 = 0x20;
    const Z_DEFLATED: u8 = 8;
    let (b0, b1) = match src {
        [b0, b1, _, ..] => (*b0, *b1),
        _ => {
            return Err(DecompressError::ZlibBadHeader {
                detail: format!("only {} bytes of input", src.len()),
            })
        }
    };
    let fcheck = (u16::from(b0) << 8 | u16::from(b1)) % 31;
    if b0 & 0x0f != Z_DEFLATED || fcheck != 0 {
        return Err(DecompressError::ZlibBadHeader {
            detail: format!("bytes {b0:#04x} {b1:#04x} are not a zlib deflate header"),
        });
    }
    if b1 & PRESET_DICT != 0 {
        return Err(DecompressError::ZlibBadHeader {
            detail: "preset dictionary requested".to_string(),
        });
    }
    // Window bits CINFO+8 must be 8..=15 (zlib_inflateInit2 refuses more).
    if b0 >> 4 > 7 {
        return Err(DecompressError::ZlibBadHeader {
            detail: format!("window size 2^{} too large", u32::from(b0 >> 4) + 8),
        });
    }
    Ok(2)
}

/// Number of bytes a flate2 counter says were processed, as a usize bounded by `limit`.
fn counter(v: u64, limit: usize) -> usize {
    usize::try_from(v).map_or(limit, |v| v.min(limit))
}

/// zlib_decompress_bio(): inflate until `out` is full (success), the deflate stream ends
/// (success, the caller zero-fills), or the input runs out without an end of stream (error).
fn zlib_decompress_bio(src: &[u8], out: &mut [u8]) -> Result<usize, DecompressError> {
    use flate2::{Decompress, FlushDecompress, Status};

    let start = zlib_header(src)?;
    let input = src.get(start..).unwrap_or(&[]);
    let mut strm = Decompress::new(false);
    loop {
        let in_pos = counter(strm.total_in(), input.len());
        let produced = counter(strm.total_out(), out.len());
        if produced == out.len() {
            // The bio is full: btrfs_decompress_buf2page() returned 0.
            return Ok(produced);
        }
        let rest_in = input.get(in_pos..).unwrap_or(&[]);
        let Some(rest_out) = out.get_mut(produced..) else {
            return Ok(produced);
        };
        let status = strm.decompress(rest_in, rest_out, FlushDecompress::None);
        let new_in = counter(strm.total_in(), input.len());
        let new_out = counter(strm.total_out(), out.len());
        match status {
            Err(e) => {
                return Err(DecompressError::ZlibData {
                    msg: e.to_string(),
                    offset: start.saturating_add(new_in),
                    len: src.len(),
                    produced: new_out,
                })
            }
            Ok(Status::StreamEnd) => return Ok(new_out),
            Ok(Status::Ok) | Ok(Status::BufError) => {
                if new_in == in_pos && new_out == produced && new_out < out.len() {
                    // No progress and not full: the input ended inside the stream.
                    return Err(DecompressError::ZlibTruncated {
                        len: src.len(),
                        produced: new_out,
                        expected: out.len(),
                    });
                }
            }
        }
    }
}

/// zlib_decompress(): one inflate call with Z_FINISH into a page-sized buffer; the stream must
/// end inside that page and yield at least `out.len()` bytes (checked by the caller).
fn zlib_decompress_inline(src: &[u8], out: &mut [u8]) -> Result<usize, DecompressError> {
    use flate2::{Decompress, FlushDecompress, Status};

    let start = zlib_header(src)?;
    let input = src.get(start..).unwrap_or(&[]);
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut strm = Decompress::new(false);
    let status = strm.decompress(input, &mut buf, FlushDecompress::Finish);
    let total_out = counter(strm.total_out(), buf.len());
    match status {
        Err(e) => Err(DecompressError::ZlibData {
            msg: e.to_string(),
            offset: start.saturating_add(counter(strm.total_in(), input.len())),
            len: src.len(),
            produced: total_out,
        }),
        Ok(Status::StreamEnd) => {
            let to_copy = total_out.min(out.len());
            out[..to_copy].copy_from_slice(&buf[..to_copy]);
            Ok(to_copy)
        }
        // The kernel returns 0 here without copying anything when the page filled up (leaving
        // the page's old contents); we refuse instead of returning undefined data.
        Ok(Status::Ok) | Ok(Status::BufError) if total_out == buf.len() => {
            Err(DecompressError::ZlibInlineTooLong { limit: PAGE_SIZE })
        }
        Ok(Status::Ok) | Ok(Status::BufError) => Err(DecompressError::ZlibTruncated {
            len: src.len(),
            produced: total_out,
            expected: out.len(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// zstd

fn zstd_decoder() -> Result<zstd::stream::raw::Decoder<'static>, DecompressError> {
    use zstd::stream::raw::{DParameter, Decoder};
    let zerr = |e: std::io::Error| DecompressError::Zstd {
        msg: format!("decoder init failed: {e}"),
        offset: 0,
        len: 0,
        produced: 0,
    };
    let mut dec = Decoder::new().map_err(zerr)?;
    dec.set_parameter(DParameter::WindowLogMax(ZSTD_BTRFS_MAX_WINDOWLOG))
        .map_err(zerr)?;
    Ok(dec)
}

/// zstd_decompress_bio(): stream-decode until `out` is full, the first frame ends, or the
/// input is used up (all three are success; the caller zero-fills). A decoder error is -EIO.
fn zstd_decompress_bio(src: &[u8], out: &mut [u8]) -> Result<usize, DecompressError> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

    let mut dec = zstd_decoder()?;
    let mut inb = InBuffer::around(src);
    let mut produced = 0usize;
    loop {
        let before_in = inb.pos();
        let Some(rest) = out.get_mut(produced..) else {
            return Ok(produced);
        };
        let mut outb = OutBuffer::around(rest);
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| DecompressError::Zstd {
                msg: e.to_string(),
                offset: inb.pos(),
                len: src.len(),
                produced,
            })?;
        let n = outb.pos();
        produced = produced.saturating_add(n).min(out.len());
        if produced == out.len() || inb.pos() >= src.len() || hint == 0 {
            return Ok(produced);
        }
        if n == 0 && inb.pos() == before_in {
            return Err(DecompressError::ZstdNoProgress {
                offset: inb.pos(),
                len: src.len(),
            });
        }
    }
}

/// zstd_decompress(): one decode call into a sector-sized buffer; the caller checks that at
/// least `out.len()` bytes came out.
fn zstd_decompress_inline(
    src: &[u8],
    out: &mut [u8],
    sectorsize: usize,
) -> Result<usize, DecompressError> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

    let mut dec = zstd_decoder()?;
    let mut buf = vec![0u8; sectorsize];
    let mut inb = InBuffer::around(src);
    let mut outb = OutBuffer::around(&mut buf[..]);
    dec.run(&mut inb, &mut outb)
        .map_err(|e| DecompressError::Zstd {
            msg: e.to_string(),
            offset: inb.pos(),
            len: src.len(),
            produced: 0,
        })?;
    let to_copy = outb.pos().min(out.len());
    out[..to_copy].copy_from_slice(&buf[..to_copy]);
    Ok(to_copy)
}

// ---------------------------------------------------------------------------------------------
// lzo

fn read_le32(src: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(LZO_LEN)?;
    let bytes: [u8; 4] = src.get(offset..end)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// lzo_decompress_bio(): btrfs's segmented LZO format.
///
/// Layout: a 4-byte LE total length (header included), then segments, each a 4-byte LE payload
/// length followed by an LZO1X stream of at most one sector of output. A segment header never
/// crosses a sector boundary: when fewer than 4 bytes remain in the sector after a payload, they
/// are zero padding. Decoding stops when the output is full or the total length is reached.
fn lzo_decompress_bio(
    src: &[u8],
    out: &mut [u8],
    sectorsize: usize,
) -> Result<usize, DecompressError> {
    let compressed_len = src.len();
    let len_in = read_le32(src, 0).ok_or(DecompressError::LzoTooShort {
        len: compressed_len,
    })?;
    let len_in_usize = usize::try_from(len_in).unwrap_or(usize::MAX);
    // The total must not exceed the extent, and the extent must not have unused sectors.
    let len_in_rounded = len_in_usize
        .checked_next_multiple_of(sectorsize)
        .unwrap_or(usize::MAX);
    if len_in_usize > BTRFS_MAX_COMPRESSED.min(compressed_len) || len_in_rounded < compressed_len {
        return Err(DecompressError::LzoHeaderInvalid {
            len_in,
            compressed_len,
        });
    }
    let max_seg_len = lzo1x_worst_compress(PAGE_SIZE.max(sectorsize));
    let mut buf = vec![0u8; lzo1x_worst_compress(sectorsize)];
    let mut cur_in = LZO_LEN;
    let mut cur_out = 0usize;
    if out.is_empty() {
        return Ok(0);
    }
    while cur_in < len_in_usize {
        // Padding below keeps every segment header inside one sector.
        debug_assert_eq!(cur_in / sectorsize, (cur_in + LZO_LEN - 1) / sectorsize);
        let seg_len = read_le32(src, cur_in).ok_or(DecompressError::LzoSegmentHeaderTruncated {
            offset: cur_in,
            compressed_len,
        })?;
        let seg_offset = cur_in;
        cur_in += LZO_LEN;
        let seg_len_usize = usize::try_from(seg_len).unwrap_or(usize::MAX);
        if seg_len_usize > max_seg_len {
            return Err(DecompressError::LzoSegmentTooBig {
                offset: seg_offset,
                seg_len,
                max: max_seg_len,
            });
        }
        let payload = cur_in
            .checked_add(seg_len_usize)
            .and_then(|end| src.get(cur_in..end))
            .ok_or(DecompressError::LzoSegmentOverflow {
                offset: seg_offset,
                seg_len,
                compressed_len,
            })?;
        let out_len = lzokay::decompress::decompress(payload, &mut buf).map_err(|e| {
            DecompressError::LzoDecompress {
                offset: seg_offset,
                error: e.into(),
            }
        })?;
        cur_in += seg_len_usize;

        // btrfs_decompress_buf2page(): copy what fits; a full destination ends the read.
        let room = out.len() - cur_out;
        let n = out_len.min(room);
        out[cur_out..cur_out + n].copy_from_slice(&buf[..n]);
        cur_out += n;
        if cur_out == out.len() {
            return Ok(cur_out);
        }

        let sector_bytes_left = sectorsize - cur_in % sectorsize;
        if sector_bytes_left < LZO_LEN {
            cur_in += sector_bytes_left;
        }
    }
    Ok(cur_out)
}

/// lzo_decompress(): an inline lzo extent is exactly one segment: the total length equals the
/// item size, the segment length equals the item size minus both headers, and the segment
/// decompresses to at most one sector.
fn lzo_decompress_inline(
    src: &[u8],
    out: &mut [u8],
    sectorsize: usize,
) -> Result<usize, DecompressError> {
    let srclen = src.len();
    let max = lzo1x_worst_compress(PAGE_SIZE) + 2 * LZO_LEN;
    if srclen <= 2 * LZO_LEN || srclen > max {
        return Err(DecompressError::LzoInlineBadLength {
            srclen,
            min: 2 * LZO_LEN,
            max,
        });
    }
    let bad_len = |field: &'static str, found: u32, expected: usize| {
        DecompressError::LzoInlineLengthMismatch {
            field,
            found,
            expected,
        }
    };
    let total = read_le32(src, 0).ok_or(bad_len("total length", 0, srclen))?;
    if usize::try_from(total).ok() != Some(srclen) {
        return Err(bad_len("total length", total, srclen));
    }
    let seg_expected = srclen - 2 * LZO_LEN;
    let seg_len = read_le32(src, LZO_LEN).ok_or(bad_len("segment length", 0, seg_expected))?;
    if usize::try_from(seg_len).ok() != Some(seg_expected) {
        return Err(bad_len("segment length", seg_len, seg_expected));
    }
    let payload = src.get(2 * LZO_LEN..).unwrap_or(&[]);
    let mut buf = vec![0u8; sectorsize];
    let out_len = lzokay::decompress::decompress(payload, &mut buf).map_err(|e| {
        DecompressError::LzoDecompress {
            offset: LZO_LEN,
            error: e.into(),
        }
    })?;
    let to_copy = out_len.min(out.len());
    out[..to_copy].copy_from_slice(&buf[..to_copy]);
    Ok(to_copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    const SS: u32 = 4096;

    /// Deterministic pseudo-random bytes (xorshift), so tests need no extra crates.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Half text-like, half random: compresses, but not to nothing.
    fn mixed(seed: u64, len: usize) -> Vec<u8> {
        let n = noise(seed, len);
        n.iter()
            .enumerate()
            .map(|(i, b)| {
                if (i / 64) % 2 == 0 {
                    b"btrfs "[i % 6]
                } else {
                    *b
                }
            })
            .collect()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(3));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zstd_frame(data: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(data, 3).unwrap()
    }

    /// Test-only btrfs lzo compressor, following the layout lzo_compress_folios() writes.
    /// Returns the stream and how many times sector padding was inserted.
    fn btrfs_lzo_compress(data: &[u8], sectorsize: usize) -> (Vec<u8>, usize) {
        let mut out = vec![0u8; LZO_LEN];
        let mut paddings = 0;
        for chunk in data.chunks(sectorsize) {
            let c = lzokay::compress::compress(chunk).unwrap();
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
            let left = out.len().next_multiple_of(sectorsize) - out.len();
            if left != 0 && left < LZO_LEN {
                out.resize(out.len() + left, 0);
                paddings += 1;
            }
        }
        let total = out.len() as u32;
        out[..LZO_LEN].copy_from_slice(&total.to_le_bytes());
        (out, paddings)
    }

    /// As the kernel stores a regular extent: padded with zeros to a sector multiple.
    fn sector_pad(mut v: Vec<u8>) -> Vec<u8> {
        v.resize(v.len().next_multiple_of(SS as usize), 0);
        v
    }

    fn inline_lzo(data: &[u8]) -> Vec<u8> {
        let c = lzokay::compress::compress(data).unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&((c.len() + 8) as u32).to_le_bytes());
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        out.extend_from_slice(&c);
        out
    }

    // Test scenario: every on-disk compression value maps to its type; unknown values are refused.
    #[test]
    fn from_disk_values() {
        assert_eq!(CompressionType::from_disk(0), Some(CompressionType::None));
        assert_eq!(CompressionType::from_disk(1), Some(CompressionType::Zlib));
        assert_eq!(CompressionType::from_disk(2), Some(CompressionType::Lzo));
        assert_eq!(CompressionType::from_disk(3), Some(CompressionType::Zstd));
        for v in 4..=255u8 {
            assert_eq!(CompressionType::from_disk(v), None);
        }
    }

    // Test scenario: a 128 KiB extent of mixed data round-trips through each decompressor, and
    // ends not on a sector boundary (ram_bytes is the unaligned length).
    #[test]
    fn round_trip_regular() {
        for len in [
            1usize,
            100,
            4095,
            4096,
            4097,
            65536 + 13,
            BTRFS_MAX_UNCOMPRESSED,
        ] {
            let data = mixed(len as u64, len);
            let z = sector_pad(zlib(&data));
            assert_eq!(
                btrfs_decompress(CompressionType::Zlib, &z, len, SS).unwrap(),
                data
            );
            let s = sector_pad(zstd_frame(&data));
            assert_eq!(
                btrfs_decompress(CompressionType::Zstd, &s, len, SS).unwrap(),
                data
            );
            let (l, _) = btrfs_lzo_compress(&data, SS as usize);
            let l = sector_pad(l);
            assert_eq!(
                btrfs_decompress(CompressionType::Lzo, &l, len, SS).unwrap(),
                data,
                "lzo len {len}"
            );
        }
    }

    // Test scenario: incompressible data makes lzo segments larger than a sector, so payloads
    // cross sector boundaries; a segment ending 1..=3 bytes before a sector boundary forces zero
    // padding, and the decoder must skip it.
    #[test]
    fn lzo_sector_padding() {
        let ss = SS as usize;
        // Search a deterministic family of inputs for each padding length 1, 2 and 3.
        let mut found = [false; LZO_LEN];
        for prefix in 0..ss {
            // First segment: random bytes (grows); second: `prefix` random bytes + zeros.
            let mut data = noise(7, ss);
            let mut second = noise(8, prefix);
            second.resize(ss, 0);
            data.extend_from_slice(&second);
            data.extend_from_slice(&mixed(9, ss + 100));
            let first = lzokay::compress::compress(&data[..ss]).unwrap();
            let sec = lzokay::compress::compress(&data[ss..2 * ss]).unwrap();
            let end = LZO_LEN + LZO_LEN + first.len() + LZO_LEN + sec.len();
            let left = end.next_multiple_of(ss) - end;
            if left == 0 || left >= LZO_LEN || found[left] {
                continue;
            }
            found[left] = true;
            let (stream, paddings) = btrfs_lzo_compress(&data, ss);
            assert!(paddings >= 1);
            let stream = sector_pad(stream);
            let got = btrfs_decompress(CompressionType::Lzo, &stream, data.len(), SS).unwrap();
            assert_eq!(got, data, "padding of {left} bytes");
            if found[1..].iter().all(|f| *f) {
                return;
            }
        }
        panic!("no input produced every padding length: {found:?}");
    }

    // Test scenario: a stream that yields fewer bytes than ram_bytes is zero-filled for regular
    // extents (zero_fill_bio), as the kernel does when the file extent's ram_bytes is larger.
    #[test]
    fn short_output_is_zero_filled() {
        let data = mixed(3, 5000);
        let ram = 12288;
        let mut want = data.clone();
        want.resize(ram, 0);
        let z = sector_pad(zlib(&data));
        assert_eq!(
            btrfs_decompress(CompressionType::Zlib, &z, ram, SS).unwrap(),
            want
        );
        let s = sector_pad(zstd_frame(&data));
        assert_eq!(
            btrfs_decompress(CompressionType::Zstd, &s, ram, SS).unwrap(),
            want
        );
        let l = sector_pad(btrfs_lzo_compress(&data, SS as usize).0);
        assert_eq!(
            btrfs_decompress(CompressionType::Lzo, &l, ram, SS).unwrap(),
            want
        );
    }

    // Test scenario: output beyond ram_bytes is never produced or looked at (the kernel stops once
    // the bio is full), so a longer stream is cut at ram_bytes.
    #[test]
    fn long_output_is_cut_at_ram_bytes() {
        let data = mixed(4, 9000);
        let ram = 5000;
        let z = sector_pad(zlib(&data));
        assert_eq!(
            btrfs_decompress(CompressionType::Zlib, &z, ram, SS).unwrap(),
            &data[..ram]
        );
        let s = sector_pad(zstd_frame(&data));
        assert_eq!(
            btrfs_decompress(CompressionType::Zstd, &s, ram, SS).unwrap(),
            &data[..ram]
        );
        let l = sector_pad(btrfs_lzo_compress(&data, SS as usize).0);
        assert_eq!(
            btrfs_decompress(CompressionType::Lzo, &l, ram, SS).unwrap(),
            &data[..ram]
        );
    }

    // Test scenario: zlib's adler32 trailer is not checked (the kernel inflates raw deflate) but
    // a broken header, a preset dictionary or a truncated deflate stream are errors.
    #[test]
    fn zlib_header_and_truncation() {
        let data = mixed(5, 6000);
        let mut z = zlib(&data);
        let n = z.len();
        z[n - 1] ^= 0xff; // adler32
        assert_eq!(
            btrfs_decompress(CompressionType::Zlib, &z, data.len(), SS).unwrap(),
            data
        );
        let mut bad = z.clone();
        bad[0] = 0x79;
        assert!(matches!(
            btrfs_decompress(CompressionType::Zlib, &bad, data.len(), SS),
            Err(DecompressError::ZlibBadHeader { .. })
        ));
        // 0x78 0xbb: FCHECK valid, FDICT set.
        let mut dict = z.clone();
        dict[1] = 0xbb;
        assert_eq!((0x78u16 << 8 | 0xbb) % 31, 0);
        assert!(matches!(
            btrfs_decompress(CompressionType::Zlib, &dict, data.len(), SS),
            Err(DecompressError::ZlibBadHeader { .. })
        ));
        let cut = &z[..z.len() / 2];
        assert!(matches!(
            btrfs_decompress(CompressionType::Zlib, cut, data.len(), SS),
            Err(DecompressError::ZlibTruncated { .. })
        ));
        assert!(btrfs_decompress(CompressionType::Zlib, &[], 10, SS).is_err());
    }

    // Test scenario: zstd stops at the end of the first frame (a concatenated second frame is
    // ignored, the tail zero-filled), and a frame cut short yields what was decoded, zero-filled:
    // the kernel's loop ends successfully when the input is used up.
    #[test]
    fn zstd_frames_and_truncation() {
        let a = mixed(6, 3000);
        let b = mixed(7, 3000);
        let mut two = zstd_frame(&a);
        two.extend_from_slice(&zstd_frame(&b));
        let got = btrfs_decompress(CompressionType::Zstd, &two, 6000, SS).unwrap();
        assert_eq!(&got[..3000], &a[..]);
        assert!(
            got[3000..].iter().all(|&x| x == 0),
            "{:?}",
            &got[2990..3010]
        );

        // A 1 KiB window makes blocks of at most 1 KiB, so half a frame holds whole blocks.
        let big = mixed(8, 100_000);
        let mut enc = zstd::bulk::Compressor::new(3).unwrap();
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(10))
            .unwrap();
        let f = enc.compress(&big).unwrap();
        let cut = &f[..f.len() / 2];
        let got = btrfs_decompress(CompressionType::Zstd, cut, big.len(), SS).unwrap();
        assert_eq!(got.len(), big.len());
        let good = got.iter().zip(&big).take_while(|(x, y)| x == y).count();
        assert!(
            good > 50_000 / 2 && good < big.len(),
            "{good} bytes decoded"
        );
        assert!(got[good..].iter().all(|&x| x == 0));

        let garbage = noise(9, 4096);
        assert!(matches!(
            btrfs_decompress(CompressionType::Zstd, &garbage, 4096, SS),
            Err(DecompressError::Zstd { .. })
        ));
    }

    // Test scenario: a zstd frame whose window exceeds 128 KiB is refused, as the kernel's
    // decoder workspace is sized for ZSTD_BTRFS_MAX_WINDOWLOG.
    #[test]
    fn zstd_window_limit() {
        use zstd::stream::raw::CParameter;
        let data = noise(10, 1 << 20);
        let mut enc = zstd::bulk::Compressor::new(3).unwrap();
        enc.set_parameter(CParameter::WindowLog(20)).unwrap();
        let f = enc.compress(&data).unwrap();
        assert!(matches!(
            btrfs_decompress(CompressionType::Zstd, &f, BTRFS_MAX_UNCOMPRESSED, SS),
            Err(DecompressError::Zstd { .. })
        ));
    }

    // Test scenario: each structural lzo error is reported by name with its offset, never a panic.
    #[test]
    fn lzo_structural_errors() {
        let data = mixed(11, 10000);
        let good = sector_pad(btrfs_lzo_compress(&data, SS as usize).0);
        let run = |s: &[u8]| btrfs_decompress(CompressionType::Lzo, s, data.len(), SS);
        assert_eq!(run(&good).unwrap(), data);

        assert!(matches!(
            run(&[1, 2]),
            Err(DecompressError::LzoTooShort { len: 2 })
        ));
        // Total length larger than the extent.
        let mut s = good.clone();
        s[..4].copy_from_slice(&(good.len() as u32 + 1).to_le_bytes());
        assert!(matches!(
            run(&s),
            Err(DecompressError::LzoHeaderInvalid { .. })
        ));
        // Total length leaving a whole unused sector.
        let mut s = good.clone();
        s.extend_from_slice(&[0; 4096]);
        assert!(matches!(
            run(&s),
            Err(DecompressError::LzoHeaderInvalid { .. })
        ));
        // First segment too big.
        let mut s = good.clone();
        s[4..8].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(
            run(&s),
            Err(DecompressError::LzoSegmentTooBig { offset: 4, .. })
        ));
        // Segment running past the end of the data.
        let (raw, _) = btrfs_lzo_compress(&data[..100], SS as usize);
        let mut s = raw.clone();
        s[4..8].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        assert!(matches!(
            btrfs_decompress(CompressionType::Lzo, &s, 100, SS),
            Err(DecompressError::LzoSegmentOverflow { offset: 4, .. })
        ));
        // Garbage payload.
        let mut s = good.clone();
        for b in &mut s[8..40] {
            *b = 0xff;
        }
        assert!(matches!(
            run(&s),
            Err(DecompressError::LzoDecompress { .. })
        ));
        // Unaligned data whose last segment header would cross the end.
        let (raw, _) = btrfs_lzo_compress(&data[..100], SS as usize);
        let mut s = raw.clone();
        let total = raw.len() as u32 + 2;
        s.extend_from_slice(&[0, 0]);
        s[..4].copy_from_slice(&total.to_le_bytes());
        assert!(matches!(
            btrfs_decompress(CompressionType::Lzo, &s, 200, SS),
            Err(DecompressError::LzoSegmentHeaderTruncated { .. })
        ));
        assert!(DecompressError::LzoHeaderInvalid {
            len_in: 0,
            compressed_len: 0
        }
        .kernel_returns_euclean());
    }

    // Test scenario: inline extents round-trip in all three formats and come back exactly
    // min(ram_bytes, 4096) long; the regular decoder accepts the same inline data.
    #[test]
    fn inline_round_trip() {
        for len in [1usize, 17, 2048, 3000] {
            let data = mixed(len as u64 + 100, len);
            for (kind, src) in [
                (CompressionType::Zlib, zlib(&data)),
                (CompressionType::Zstd, zstd_frame(&data)),
                (CompressionType::Lzo, inline_lzo(&data)),
            ] {
                assert_eq!(
                    btrfs_decompress_inline(kind, &src, len, SS).unwrap(),
                    data,
                    "{kind} {len}"
                );
                assert_eq!(btrfs_decompress(kind, &src, len, SS).unwrap(), data);
            }
        }
        assert_eq!(
            btrfs_decompress_inline(CompressionType::None, b"abc", 5, SS).unwrap(),
            b"abc\0\0"
        );
    }

    // Test scenario: an inline extent that decompresses short is an error (the kernel returns
    // -EIO and zeroes the tail), as are lzo inline items whose two length headers disagree with
    // the item size.
    #[test]
    fn inline_errors() {
        let data = mixed(12, 1000);
        for (kind, src) in [
            (CompressionType::Zlib, zlib(&data)),
            (CompressionType::Zstd, zstd_frame(&data)),
            (CompressionType::Lzo, inline_lzo(&data)),
        ] {
            assert_eq!(
                btrfs_decompress_inline(kind, &src, 1500, SS),
                Err(DecompressError::InlineShort {
                    kind,
                    produced: 1000,
                    expected: 1500
                })
            );
        }
        let mut s = inline_lzo(&data);
        s[0] ^= 1;
        assert!(matches!(
            btrfs_decompress_inline(CompressionType::Lzo, &s, 1000, SS),
            Err(DecompressError::LzoInlineLengthMismatch {
                field: "total length",
                ..
            })
        ));
        let mut s = inline_lzo(&data);
        s[4] ^= 1;
        assert!(matches!(
            btrfs_decompress_inline(CompressionType::Lzo, &s, 1000, SS),
            Err(DecompressError::LzoInlineLengthMismatch {
                field: "segment length",
                ..
            })
        ));
        assert!(matches!(
            btrfs_decompress_inline(CompressionType::Lzo, &[0; 8], 1000, SS),
            Err(DecompressError::LzoInlineBadLength { .. })
        ));
        // More than one sector of lzo output does not fit the kernel's buffer.
        let big = inline_lzo(&[0u8; 5000]);
        assert!(matches!(
            btrfs_decompress_inline(CompressionType::Lzo, &big, 4096, SS),
            Err(DecompressError::LzoDecompress {
                error: LzoError::OutputOverrun,
                ..
            })
        ));
    }

    // Test scenario: arguments outside what btrfs allows are refused before any allocation.
    #[test]
    fn argument_limits() {
        assert_eq!(
            btrfs_decompress(CompressionType::Zlib, &[], 10, 1000),
            Err(DecompressError::InvalidSectorSize(1000))
        );
        assert!(matches!(
            btrfs_decompress(CompressionType::Zstd, &[], usize::MAX, SS),
            Err(DecompressError::RamBytesTooLarge { .. })
        ));
        assert_eq!(
            btrfs_decompress(CompressionType::None, b"xy", 3, SS).unwrap(),
            b"xy\0"
        );
    }

    const KINDS: [CompressionType; 4] = [
        CompressionType::None,
        CompressionType::Zlib,
        CompressionType::Lzo,
        CompressionType::Zstd,
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        // Test scenario: random bytes never panic any decoder, regular or inline, and every
        // success has exactly the promised length.
        #[test]
        fn random_bytes_never_panic(
            src in proptest::collection::vec(any::<u8>(), 0..9000),
            ram in 0usize..=BTRFS_MAX_UNCOMPRESSED,
            ss_shift in 12u32..=16,
        ) {
            let ss = 1u32 << ss_shift;
            for kind in KINDS {
                if let Ok(v) = btrfs_decompress(kind, &src, ram, ss) {
                    prop_assert_eq!(v.len(), ram);
                }
                if let Ok(v) = btrfs_decompress_inline(kind, &src, ram, ss) {
                    prop_assert_eq!(v.len(), ram.min(PAGE_SIZE));
                }
            }
        }

        // Test scenario: valid streams with a few bytes overwritten (lengths included) never
        // panic, which reaches deeper into the decoders than random bytes do.
        #[test]
        fn mutated_streams_never_panic(
            seed in any::<u64>(),
            len in 1usize..20000,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let data = mixed(seed, len);
            let streams = [
                (CompressionType::Zlib, zlib(&data)),
                (CompressionType::Zstd, zstd_frame(&data)),
                (CompressionType::Lzo, sector_pad(btrfs_lzo_compress(&data, SS as usize).0)),
                (CompressionType::Lzo, inline_lzo(&data[..len.min(4096)])),
            ];
            for (kind, mut s) in streams {
                for (pos, val) in &edits {
                    let i = pos % s.len();
                    s[i] = *val;
                }
                if let Ok(v) = btrfs_decompress(kind, &s, len, SS) {
                    prop_assert_eq!(v.len(), len);
                }
                if let Ok(v) = btrfs_decompress_inline(kind, &s, len, SS) {
                    prop_assert_eq!(v.len(), len.min(PAGE_SIZE));
                }
            }
        }
    }
}
