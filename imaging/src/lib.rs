//! Image decoding shared by kiln serve and kiln-train, so that a photo is read the same
//! way when a model is trained and when it is served.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits, RgbImage};

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
    let image = reader.decode().map_err(|e| ImageError::Decode(e.to_string()))?;
    Ok(image.into_rgb8())
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
}
