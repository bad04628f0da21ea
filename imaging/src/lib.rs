//! Image decoding shared by kiln serve and kiln-train, so that a photo is read the same
//! way when a model is trained and when it is served.

use std::io::Cursor;

pub use image::RgbImage;
use image::{ImageDecoder, ImageFormat, ImageReader, Limits};

/// Refuse decompression bombs: anything larger is not a photo a classifier wants.
const MAX_IMAGE_SIDE: u32 = 16_384;
const MAX_DECODE_BYTES: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the file is empty")]
    Empty,
    #[error("the file is not a supported image (JPEG or PNG): {0}")]
    Decode(String),
}

/// Decodes a JPEG or PNG into RGB, refusing oversized and truncated files.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let image = reader(bytes)?.decode().map_err(|e| ImageError::Decode(e.to_string()))?;
    Ok(image.into_rgb8())
}

/// Width and height from the header, with the same checks as [`decode`].
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    let (w, h) = reader(bytes)?.into_dimensions().map_err(|e| ImageError::Decode(e.to_string()))?;
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(ImageError::Decode(format!("{w}×{h} is larger than {MAX_IMAGE_SIDE} pixels a side")));
    }
    Ok((w, h))
}

/// Decodes into `out` as packed RGB (`width·height·3` bytes, e.g. a slice of a pinned
/// staging buffer). An RGB8 source (most JPEGs) is decoded straight into `out`; other
/// colour types are converted, with one copy.
pub fn decode_rgb_into(bytes: &[u8], out: &mut [u8]) -> Result<(u32, u32), ImageError> {
    let decoder = reader(bytes)?.into_decoder().map_err(|e| ImageError::Decode(e.to_string()))?;
    let (w, h) = decoder.dimensions();
    let need = (w as usize) * (h as usize) * 3;
    if out.len() != need {
        return Err(ImageError::Decode(format!("{w}×{h} RGB needs {need} bytes, the buffer has {}", out.len())));
    }
    if decoder.color_type() == image::ColorType::Rgb8 {
        decoder.read_image(out).map_err(|e| ImageError::Decode(e.to_string()))?;
    } else {
        let image = image::DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Decode(e.to_string()))?;
        out.copy_from_slice(image.into_rgb8().as_raw());
    }
    Ok((w, h))
}

/// A reader with kiln's limits, refusing empty and truncated files up front.
fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let mut reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Decode(e.to_string()))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    if reader.format() == Some(ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err(ImageError::Decode("truncated JPEG (no end-of-image marker)".into()));
    }
    Ok(reader)
}

/// JPEG decoders fill a cut-off scan with grey and report success; a truncated upload
/// must be an error instead. Walks the marker segments (skipping each scan's
/// entropy-coded data, where FF is always stuffed or a restart marker) and reports
/// whether the end-of-image marker is reached before the data runs out.
fn jpeg_is_complete(b: &[u8]) -> bool {
    let mut i = 2; // past SOI
    loop {
        while b.get(i) == Some(&0xFF) {
            i += 1; // fill bytes before a marker
        }
        let Some(&marker) = b.get(i) else { return false };
        i += 1;
        match marker {
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => continue, // standalone markers carry no length
            _ => {}
        }
        let Some(len) = b.get(i..i + 2).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]]))) else { return false };
        i += len;
        if marker == 0xDA {
            loop {
                match (b.get(i), b.get(i + 1)) {
                    (Some(0xFF), Some(0x00 | 0xD0..=0xD7)) => i += 2,
                    (Some(0xFF), Some(_)) => break,
                    (Some(_), _) => i += 1,
                    (None, _) => return false,
                }
            }
        } else if b.get(i).is_none_or(|&x| x != 0xFF) {
            return false; // a segment must be followed by the next marker
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 3) as u8, 7]))
    }

    #[test]
    fn decode_rejects_truncated_jpeg() -> Result<(), Box<dyn std::error::Error>> {
        let mut jpeg = Vec::new();
        let img = gradient(64, 64);
        image::DynamicImage::ImageRgb8(img).write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)?;
        assert!(decode(&jpeg).is_ok());
        assert!(matches!(decode(&jpeg[..jpeg.len() / 2]), Err(ImageError::Decode(_))));
        Ok(())
    }

    #[test]
    fn decode_rejects_empty_and_garbage() {
        assert!(matches!(decode(b""), Err(ImageError::Empty)));
        assert!(matches!(decode(b"definitely not an image"), Err(ImageError::Decode(_))));
    }

    #[test]
    fn decode_into_matches_decode_for_jpeg_and_png() -> Result<(), Box<dyn std::error::Error>> {
        let img = gradient(37, 23);
        for format in [ImageFormat::Png, ImageFormat::Jpeg] {
            let mut bytes = Vec::new();
            img.write_to(&mut Cursor::new(&mut bytes), format)?;
            assert_eq!(dimensions(&bytes)?, (37, 23));
            let mut out = vec![0u8; 37 * 23 * 3];
            assert_eq!(decode_rgb_into(&bytes, &mut out)?, (37, 23));
            assert_eq!(out, decode(&bytes)?.into_raw());
            let mut short = vec![0u8; 10];
            assert!(decode_rgb_into(&bytes, &mut short).is_err());
        }
        // A grey PNG takes the converting path.
        let grey = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y) as u8]));
        let mut bytes = Vec::new();
        grey.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)?;
        let mut out = vec![0u8; 5 * 4 * 3];
        decode_rgb_into(&bytes, &mut out)?;
        assert_eq!(&out[..6], &[0, 0, 0, 40, 40, 40]);
        assert!(dimensions(&[]).is_err());
        Ok(())
    }
}
