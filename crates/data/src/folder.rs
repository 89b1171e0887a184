//! Folder conventions: kohya `N_caption` names, which files are images, and
//! which are caption files.

use std::path::Path;

/// The parts of a kohya sub-folder name such as `10_ohwx dog`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KohyaFolderName {
    /// Times each image is repeated per epoch (the `10`).
    pub repeats: u32,
    /// Caption for images without a caption file (the `ohwx dog`); may be empty.
    pub caption: String,
}

/// Parses a kohya sub-folder name `N_caption`.
///
/// `N` must be a positive integer followed by an underscore; the rest is the
/// caption, with further underscores kept (`5_blue_hair` → "blue_hair"), as
/// kohya does. Returns `None` for names that do not follow the pattern.
pub fn parse_kohya_folder_name(name: &str) -> Option<KohyaFolderName> {
    let (n, caption) = name.split_once('_')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let repeats: u32 = n.parse().ok()?;
    if repeats == 0 {
        return None;
    }
    Some(KohyaFolderName {
        repeats,
        caption: caption.trim().to_string(),
    })
}

/// Extensions decoded as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"];

/// Image formats people have that we cannot decode, with advice.
const UNSUPPORTED_IMAGE_EXTENSIONS: &[(&str, &str)] = &[
    ("heic", "HEIC (iPhone photo)"),
    ("heif", "HEIF"),
    ("avif", "AVIF"),
    ("jxl", "JPEG XL"),
    ("psd", "Photoshop"),
    ("svg", "SVG (vector)"),
    ("ico", "icon"),
    ("tga", "TGA"),
    ("exr", "OpenEXR"),
    ("cr2", "camera raw"),
    ("cr3", "camera raw"),
    ("nef", "camera raw"),
    ("arw", "camera raw"),
    ("dng", "camera raw"),
    ("raf", "camera raw"),
];

/// What a file in a dataset folder is, judged by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRole {
    /// An image we decode.
    Image,
    /// A loss mask for the image named by the stem without [`MASK_SUFFIX`]
    /// (OneTrainer's `NAME-masklabel.png`), not a training image.
    Mask(String),
    /// A caption candidate (its extension, with the dot, lower-case).
    Caption(String),
    /// An image format we cannot decode (a description of it).
    UnsupportedImage(&'static str),
    /// Anything else (kohya latent caches, metadata, system files): ignored.
    Other,
}

/// The stem suffix of a mask file: `photo-masklabel.png` masks `photo.*`.
pub const MASK_SUFFIX: &str = "-masklabel";

/// Classifies a file name. `caption_extension` is the configured one (with
/// its dot); `.txt` and `.caption` are always caption candidates.
pub fn file_role(path: &Path, caption_extension: &str) -> FileRole {
    // Lossy: a file name that is not valid UTF-8 is still a file to read.
    let Some(name) = path.file_name().map(|n| n.to_string_lossy()) else {
        return FileRole::Other;
    };
    // Dotfiles are system metadata (macOS `._photo.jpg`, `.DS_Store`), never
    // images, even when they carry an image extension.
    if name.starts_with('.') {
        return FileRole::Other;
    }
    let Some(ext) = path.extension() else {
        return FileRole::Other;
    };
    let ext = ext.to_string_lossy().to_ascii_lowercase();
    if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(image) = stem.strip_suffix(MASK_SUFFIX) {
            return FileRole::Mask(image.to_string());
        }
        return FileRole::Image;
    }
    let dotted = format!(".{ext}");
    if dotted == caption_extension.to_ascii_lowercase() || dotted == ".txt" || dotted == ".caption"
    {
        return FileRole::Caption(dotted);
    }
    if let Some((_, what)) = UNSUPPORTED_IMAGE_EXTENSIONS.iter().find(|(e, _)| *e == ext) {
        return FileRole::UnsupportedImage(what);
    }
    FileRole::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_names() {
        let p = parse_kohya_folder_name("10_ohwx dog").unwrap();
        assert_eq!((p.repeats, p.caption.as_str()), (10, "ohwx dog"));
        let p = parse_kohya_folder_name("5_blue_hair").unwrap();
        assert_eq!((p.repeats, p.caption.as_str()), (5, "blue_hair"));
        let p = parse_kohya_folder_name("007_ ").unwrap();
        assert_eq!((p.repeats, p.caption.as_str()), (7, ""));
        for bad in [
            "dog",
            "10",
            "_dog",
            "0_dog",
            "x10_dog",
            "-1_dog",
            "1.5_dog",
            "99999999999_dog",
        ] {
            assert_eq!(parse_kohya_folder_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn roles() {
        let r = |n: &str| file_role(Path::new(n), ".txt");
        assert_eq!(r("a.PNG"), FileRole::Image);
        assert_eq!(r("a.JpEg"), FileRole::Image);
        assert_eq!(r("a.webp"), FileRole::Image);
        assert_eq!(r("a.txt"), FileRole::Caption(".txt".into()));
        assert_eq!(r("a.Caption"), FileRole::Caption(".caption".into()));
        assert_eq!(r("._a.jpg"), FileRole::Other);
        assert_eq!(r("a.npz"), FileRole::Other);
        assert_eq!(r("noext"), FileRole::Other);
        assert!(matches!(r("a.HEIC"), FileRole::UnsupportedImage(_)));
        assert_eq!(
            file_role(Path::new("a.tags"), ".tags"),
            FileRole::Caption(".tags".into())
        );
    }
}
