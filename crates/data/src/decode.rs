//! Turning an image file, whatever it holds, into 8-bit RGB.
//!
//! Users' folders hold phone photos with EXIF rotation, PNGs with alpha,
//! palettes and 16-bit channels, CMYK JPEGs from print workflows, animated
//! GIFs, and files that are not images at all. Every one either decodes to an
//! upright 8-bit RGB image (alpha composited on a background colour, the first
//! frame of an animation) or fails with a [`DecodeError`] that says what the
//! file is and what to do.

use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};
use std::io::Cursor;
use std::path::Path;

/// Why a file could not be used as an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Reading the file failed.
    #[error("cannot read the file ({0}); check that it exists and is readable")]
    Io(String),
    /// Zero bytes.
    #[error("the file is empty (0 bytes); re-export or re-download it, or remove it")]
    Empty,
    /// The content is not an image format we know.
    #[error("{0}")]
    NotAnImage(String),
    /// An image format this build cannot decode.
    #[error("{0}")]
    Unsupported(String),
    /// The data is damaged or cut off.
    #[error(
        "the image data is damaged or incomplete ({0}); re-export or re-download it, or remove it"
    )]
    Corrupt(String),
    /// Too large to decode within the memory limit.
    #[error(
        "the image is too large to decode ({0}); downscale it (training never needs more than a few megapixels)"
    )]
    TooLarge(String),
}

/// An upright, 8-bit RGB image and what it took to get there.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The pixels.
    pub rgb: RgbImage,
    /// The file had an alpha channel that was composited onto the background.
    pub had_alpha: bool,
}

/// Decodes `path` into upright 8-bit RGB; see the module docs.
pub fn decode_image(path: &Path, background: [u8; 3]) -> Result<Decoded, DecodeError> {
    let bytes = std::fs::read(path).map_err(|e| DecodeError::Io(e.to_string()))?;
    decode_bytes(&bytes, background)
}

/// [`decode_image`] on bytes already read.
pub fn decode_bytes(bytes: &[u8], background: [u8; 3]) -> Result<Decoded, DecodeError> {
    let img = decode_upright(bytes)?;
    let had_alpha = img.color().has_alpha();
    let rgb = if had_alpha {
        composite(&img, background)
    } else {
        // Handles grey, 16-bit and float images, scaling to 8 bits.
        img.to_rgb8()
    };
    Ok(Decoded { rgb, had_alpha })
}

/// A loss mask, upright, 8-bit: the alpha channel of the image at `path`
/// when `alpha` (fully opaque for an image without one), else its
/// brightness (a grayscale mask file; white = trained).
pub fn decode_mask(path: &Path, alpha: bool) -> Result<GrayImage, DecodeError> {
    let bytes = std::fs::read(path).map_err(|e| DecodeError::Io(e.to_string()))?;
    let img = decode_upright(&bytes)?;
    Ok(if alpha {
        let rgba = img.to_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([rgba.get_pixel(x, y)[3]])
        })
    } else {
        img.to_luma8()
    })
}

/// Decodes any supported image and applies its EXIF orientation.
fn decode_upright(bytes: &[u8]) -> Result<DynamicImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Io(e.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(unknown_content(bytes));
    };
    if format == image::ImageFormat::Jpeg && jpeg_is_truncated(bytes) {
        return Err(DecodeError::Corrupt(
            "JPEG has no end-of-image marker: the file was cut off".into(),
        ));
    }
    let mut decoder = reader.into_decoder().map_err(classify)?;
    // A missing or malformed EXIF block is not worth rejecting an image for.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(classify)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Straight-alpha "over" onto an opaque background colour.
fn composite(img: &DynamicImage, bg: [u8; 3]) -> RgbImage {
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(p[3]);
        for c in 0..3 {
            let v = u32::from(p[c]) * a + u32::from(bg[c]) * (255 - a);
            o[c] = ((v + 127) / 255) as u8;
        }
    }
    out
}

/// A JPEG's entropy-coded data ends with an EOI marker (FF D9); decoders fill
/// a cut-off file with grey instead of failing, so look for it after the last
/// start-of-scan marker (an embedded EXIF thumbnail has its own EOI earlier).
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let last = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi < sos,
        (Some(_), None) => true,
        // No scan at all: let the decoder produce its own error.
        (None, _) => false,
    }
}

/// Says what a file with an image extension but no image signature holds.
fn unknown_content(bytes: &[u8]) -> DecodeError {
    let head = &bytes[..bytes.len().min(512)];
    if head.len() >= 12 && &head[4..8] == b"ftyp" {
        let brand = String::from_utf8_lossy(&head[8..12]).to_string();
        let what = match brand.as_str() {
            "avif" | "avis" => "an AVIF image",
            b if b.starts_with("hei") || b.starts_with("mif") || b == "msf1" => {
                "a HEIC/HEIF image (the iPhone photo format)"
            }
            _ => "a video or ISO media file",
        };
        return DecodeError::Unsupported(format!(
            "the file is {what} with an image extension; convert it to PNG or JPEG"
        ));
    }
    let lower = String::from_utf8_lossy(head).to_ascii_lowercase();
    if lower.contains("<html") || lower.contains("<!doctype") {
        return DecodeError::NotAnImage(
            "the file is a web page, not an image (a failed download?); download the image again"
                .into(),
        );
    }
    let printable = head
        .iter()
        .filter(|&&b| {
            b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7F).contains(&b) || b >= 0x80
        })
        .count();
    if std::str::from_utf8(head).is_ok() || printable * 10 >= head.len() * 9 {
        return DecodeError::NotAnImage(
            "the file contains text, not an image; rename it (a caption belongs in a .txt file) or remove it"
                .into(),
        );
    }
    DecodeError::NotAnImage(
        "the content is not a supported image format (PNG, JPEG, WebP, BMP, GIF, TIFF); convert or remove it"
            .into(),
    )
}

fn classify(e: image::ImageError) -> DecodeError {
    use image::ImageError as E;
    match e {
        E::Limits(l) => DecodeError::TooLarge(l.to_string()),
        E::Unsupported(u) => DecodeError::Unsupported(format!(
            "this image variant is not supported ({u}); re-save it as an ordinary PNG or JPEG"
        )),
        E::IoError(io) => DecodeError::Corrupt(io.to_string()),
        other => DecodeError::Corrupt(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_detection() {
        assert!(!jpeg_is_truncated(&[
            0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0xD9
        ]));
        assert!(jpeg_is_truncated(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3]));
        // Thumbnail EOI before the main scan does not count.
        assert!(jpeg_is_truncated(&[0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xDA, 1]));
    }

    #[test]
    fn content_sniffing_messages() {
        let msg = |b: &[u8]| decode_bytes(b, [255; 3]).unwrap_err().to_string();
        assert_eq!(msg(b""), DecodeError::Empty.to_string());
        assert!(msg(b"a photo of a dog\n").contains("contains text"));
        assert!(msg(b"<!DOCTYPE html><html>").contains("web page"));
        assert!(msg(b"\0\0\0\x18ftypheic\0\0\0\0").contains("HEIC"));
        assert!(msg(&[0u8, 1, 2, 3, 250, 251, 0, 0, 9]).contains("not a supported image format"));
    }
}
