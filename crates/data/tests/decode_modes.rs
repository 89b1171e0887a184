//! Every colour mode, container and orientation users have decodes to
//! upright 8-bit RGB.

mod common;
use common::*;
use image::{Rgba, RgbaImage};
use sd_lora_data::decode::{DecodeError, decode_bytes};

const WHITE: [u8; 3] = [255, 255, 255];

fn px(bytes: &[u8], bg: [u8; 3]) -> ([u32; 2], [u8; 3]) {
    let d = decode_bytes(bytes, bg).unwrap();
    let p = d.rgb.get_pixel(0, 0).0;
    ([d.rgb.width(), d.rgb.height()], p)
}

#[test]
fn grey_and_grey_alpha() {
    let g = png_with(
        4,
        2,
        png::ColorType::Grayscale,
        png::BitDepth::Eight,
        None,
        &[100; 8],
    );
    assert_eq!(px(&g, WHITE), ([4, 2], [100, 100, 100]));
    // grey 0 at alpha 0 on white → white; grey 0 at full alpha → black
    let ga = png_with(
        2,
        1,
        png::ColorType::GrayscaleAlpha,
        png::BitDepth::Eight,
        None,
        &[0, 0, 0, 255],
    );
    let d = decode_bytes(&ga, WHITE).unwrap();
    assert!(d.had_alpha);
    assert_eq!(d.rgb.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(d.rgb.get_pixel(1, 0).0, [0, 0, 0]);
}

#[test]
fn rgba_composited_on_configured_background() {
    let mut img = RgbaImage::from_pixel(2, 1, Rgba([255, 0, 0, 0]));
    img.put_pixel(1, 0, Rgba([255, 0, 0, 128]));
    let bytes = png_bytes_rgba(&img);
    let d = decode_bytes(&bytes, [0, 0, 255]).unwrap();
    assert_eq!(
        d.rgb.get_pixel(0, 0).0,
        [0, 0, 255],
        "fully transparent → background"
    );
    assert_eq!(
        d.rgb.get_pixel(1, 0).0,
        [128, 0, 127],
        "half transparent → mix"
    );
    let d = decode_bytes(&bytes, WHITE).unwrap();
    assert_eq!(d.rgb.get_pixel(0, 0).0, [255, 255, 255]);
}

#[test]
fn palette_one_bit_and_sixteen_bit() {
    let pal = png_with(
        2,
        1,
        png::ColorType::Indexed,
        png::BitDepth::Eight,
        Some(vec![10, 20, 30, 200, 100, 50]),
        &[1, 0],
    );
    let d = decode_bytes(&pal, WHITE).unwrap();
    assert_eq!(d.rgb.get_pixel(0, 0).0, [200, 100, 50]);
    assert_eq!(d.rgb.get_pixel(1, 0).0, [10, 20, 30]);

    // 1-bit: 8 pixels 10110000 → white, black, white, white, black...
    let bw = png_with(
        8,
        1,
        png::ColorType::Grayscale,
        png::BitDepth::One,
        None,
        &[0b1011_0000],
    );
    let d = decode_bytes(&bw, WHITE).unwrap();
    assert_eq!(d.rgb.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(d.rgb.get_pixel(1, 0).0, [0, 0, 0]);

    // 16-bit RGB: 0xFFFF → 255, 0x8080 → 128, 0 → 0 (big-endian samples).
    let data = [0xFF, 0xFF, 0x80, 0x80, 0x00, 0x00];
    let p16 = png_with(
        1,
        1,
        png::ColorType::Rgb,
        png::BitDepth::Sixteen,
        None,
        &data,
    );
    assert_eq!(px(&p16, WHITE), ([1, 1], [255, 128, 0]));
}

#[test]
fn cmyk_jpeg_becomes_rgb() {
    // No ink → white; full black ink → black.
    let (size, white) = px(&cmyk_jpeg(16, 16, [0, 0, 0, 0]), WHITE);
    assert_eq!(size, [16, 16]);
    assert!(white.iter().all(|&v| v > 240), "{white:?}");
    let (_, black) = px(&cmyk_jpeg(16, 16, [0, 0, 0, 255]), WHITE);
    assert!(black.iter().all(|&v| v < 15), "{black:?}");
    // Cyan ink → little red, much green and blue.
    let (_, cyan) = px(&cmyk_jpeg(16, 16, [255, 0, 0, 0]), WHITE);
    assert!(cyan[0] < 40 && cyan[1] > 200 && cyan[2] > 200, "{cyan:?}");
}

#[test]
fn animated_gif_uses_first_frame() {
    let gif = animated_gif(8, 8, &[[255, 0, 0], [0, 0, 255]]);
    let (size, p) = px(&gif, WHITE);
    assert_eq!(size, [8, 8]);
    assert!(p[0] > 200 && p[2] < 50, "{p:?}");
}

#[test]
fn exif_orientation_is_applied() {
    // 6 = rotate 90° clockwise: a 64×32 landscape becomes 32×64 portrait.
    let img = gradient(64, 32);
    let d = decode_bytes(&jpeg_with_orientation(&img, 6), WHITE).unwrap();
    assert_eq!(d.rgb.dimensions(), (32, 64));
    // After a clockwise turn, the original top-left (dark red, dark green)
    // is at the top-right.
    let tr = d.rgb.get_pixel(31, 0).0;
    assert!(tr[0] < 30 && tr[1] < 30, "{tr:?}");
    // 1 = upright: unchanged.
    let d = decode_bytes(&jpeg_with_orientation(&img, 1), WHITE).unwrap();
    assert_eq!(d.rgb.dimensions(), (64, 32));
}

#[test]
fn webp_and_bmp() {
    let img = gradient(12, 10);
    let d = decode_bytes(&webp_bytes(&img), WHITE).unwrap();
    assert_eq!(d.rgb, img);
    let d = decode_bytes(&bmp_bytes(&img), WHITE).unwrap();
    assert_eq!(d.rgb, img);
}

#[test]
fn broken_files_fail_with_advice_and_never_panic() {
    let png = {
        let mut v = Vec::new();
        let img = gradient(64, 64);
        image::codecs::png::PngEncoder::new(&mut v)
            .write_image(img.as_raw(), 64, 64, image::ExtendedColorType::Rgb8)
            .unwrap();
        v
    };
    use image::ImageEncoder;
    let jpg = jpeg_bytes(&gradient(64, 64));
    assert_eq!(decode_bytes(&[], WHITE).unwrap_err(), DecodeError::Empty);
    for cut in [8, 33, png.len() / 2, png.len() - 13] {
        let e = decode_bytes(&png[..cut], WHITE).unwrap_err();
        assert!(matches!(e, DecodeError::Corrupt(_)), "cut {cut}: {e:?}");
    }
    for cut in [jpg.len() / 2, jpg.len() - 2] {
        let e = decode_bytes(&jpg[..cut], WHITE).unwrap_err();
        assert!(e.to_string().contains("cut off"), "cut {cut}: {e}");
    }
    // Every prefix and a few corruptions of a valid file: errors, no panics.
    for cut in (0..png.len()).step_by(7) {
        let _ = decode_bytes(&png[..cut], WHITE);
    }
    for cut in (0..jpg.len()).step_by(11) {
        let _ = decode_bytes(&jpg[..cut], WHITE);
    }
    for i in (20..png.len()).step_by(13) {
        let mut b = png.clone();
        b[i] ^= 0x5A;
        let _ = decode_bytes(&b, WHITE);
    }
}
