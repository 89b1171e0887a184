//! Caption files and caption operations.
//!
//! Reading: UTF-8 (a BOM is stripped; UTF-16 with a BOM, as Windows Notepad
//! writes it, is decoded too), whitespace trimmed, the first non-empty line is
//! the caption. Operations (applied each time a sample is drawn, seeded):
//! caption dropout, tag shuffling that keeps the first `keep_tokens` tags,
//! and tag dropout — in kohya's order, so captions behave as users expect.

use crate::rng::Rng;
use std::path::Path;

/// The outcome of reading one caption file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionFile {
    /// A caption; `extra_lines` counts further non-empty lines that were ignored.
    Text { caption: String, extra_lines: usize },
    /// The file holds no text (or only whitespace).
    Empty,
    /// The bytes are not valid UTF-8; `offset` is the first bad byte.
    NotUtf8 { offset: usize },
    /// The file could not be read.
    Unreadable(String),
}

/// Reads a caption file by the rules above.
pub fn read_caption_file(path: &Path) -> CaptionFile {
    match std::fs::read(path) {
        Ok(bytes) => parse_caption_bytes(&bytes),
        Err(e) => CaptionFile::Unreadable(e.to_string()),
    }
}

/// The rules of [`read_caption_file`] applied to bytes.
pub fn parse_caption_bytes(bytes: &[u8]) -> CaptionFile {
    let text = if let Some(rest) = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
        match std::str::from_utf8(rest) {
            Ok(s) => s.to_string(),
            Err(e) => {
                return CaptionFile::NotUtf8 {
                    offset: e.valid_up_to() + 3,
                };
            }
        }
    } else if let Some(s) = decode_utf16_with_bom(bytes) {
        s
    } else {
        match std::str::from_utf8(bytes) {
            Ok(s) => s.to_string(),
            Err(e) => {
                return CaptionFile::NotUtf8 {
                    offset: e.valid_up_to(),
                };
            }
        }
    };
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    match lines.next() {
        None => CaptionFile::Empty,
        Some(first) => CaptionFile::Text {
            caption: first.to_string(),
            extra_lines: lines.count(),
        },
    }
}

fn decode_utf16_with_bom(bytes: &[u8]) -> Option<String> {
    let (le, rest) = match bytes {
        [0xFF, 0xFE, rest @ ..] => (true, rest),
        [0xFE, 0xFF, rest @ ..] => (false, rest),
        _ => return None,
    };
    if rest.len() % 2 != 0 {
        return None;
    }
    let units = rest.chunks_exact(2).map(|c| {
        if le {
            u16::from_le_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], c[1]])
        }
    });
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .ok()
}

/// Per-subset caption operations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptionOps {
    /// Shuffle comma-separated tags after the first `keep_tokens`.
    pub shuffle: bool,
    /// Leading tags never shuffled or dropped.
    pub keep_tokens: usize,
    /// Probability of replacing the whole caption by "".
    pub caption_dropout_rate: f64,
    /// Probability of dropping each tag after the first `keep_tokens`.
    pub tag_dropout_rate: f64,
}

impl CaptionOps {
    /// Whether applying these ops can change a caption.
    pub fn is_identity(&self) -> bool {
        !self.shuffle && self.caption_dropout_rate <= 0.0 && self.tag_dropout_rate <= 0.0
    }

    /// Applies the operations with `rng`: caption dropout first, then tag
    /// shuffling, then tag dropout, joining the tags with ", ".
    pub fn apply(&self, caption: &str, rng: &mut Rng) -> String {
        if self.is_identity() {
            return caption.to_string();
        }
        if rng.chance(self.caption_dropout_rate) {
            return String::new();
        }
        if !self.shuffle && self.tag_dropout_rate <= 0.0 {
            return caption.to_string();
        }
        let tags: Vec<&str> = caption
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        let keep = self.keep_tokens.min(tags.len());
        let (fixed, flexible) = tags.split_at(keep);
        let mut flexible = flexible.to_vec();
        if self.shuffle {
            rng.shuffle(&mut flexible);
        }
        if self.tag_dropout_rate > 0.0 {
            flexible.retain(|_| !rng.chance(self.tag_dropout_rate));
        }
        fixed
            .iter()
            .chain(flexible.iter())
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_file_rules() {
        let t = |s: &str, e: usize| CaptionFile::Text {
            caption: s.into(),
            extra_lines: e,
        };
        assert_eq!(parse_caption_bytes(b"  a dog \n"), t("a dog", 0));
        assert_eq!(parse_caption_bytes(b"\xEF\xBB\xBFa dog"), t("a dog", 0));
        assert_eq!(
            parse_caption_bytes(b"\n\n  \r\nfirst\r\nsecond\n\nthird"),
            t("first", 2)
        );
        assert_eq!(parse_caption_bytes(b""), CaptionFile::Empty);
        assert_eq!(parse_caption_bytes(b" \n\t\n"), CaptionFile::Empty);
        assert_eq!(parse_caption_bytes(b"\xEF\xBB\xBF"), CaptionFile::Empty);
        assert_eq!(
            parse_caption_bytes(b"caf\xE9 au lait"),
            CaptionFile::NotUtf8 { offset: 3 }
        );
        assert_eq!(
            parse_caption_bytes("一只狗, 猫".as_bytes()),
            t("一只狗, 猫", 0)
        );
        // UTF-16 LE with BOM, as Windows Notepad's "Unicode".
        let mut u16le = vec![0xFF, 0xFE];
        for u in "a cat\r\n".encode_utf16() {
            u16le.extend(u.to_le_bytes());
        }
        assert_eq!(parse_caption_bytes(&u16le), t("a cat", 0));
    }

    #[test]
    fn shuffle_keeps_leading_tokens_and_is_seeded() {
        let ops = CaptionOps {
            shuffle: true,
            keep_tokens: 2,
            ..Default::default()
        };
        let cap = "ohwx, dog, grass, sky, ball, tree, sun, red collar";
        let a = ops.apply(cap, &mut Rng::new(1));
        let b = ops.apply(cap, &mut Rng::new(1));
        assert_eq!(a, b);
        assert!(a.starts_with("ohwx, dog, "), "{a}");
        let outs: std::collections::HashSet<String> =
            (0..20).map(|s| ops.apply(cap, &mut Rng::new(s))).collect();
        assert!(outs.len() > 5, "shuffling should vary with the seed");
        for o in &outs {
            let mut got: Vec<&str> = o.split(", ").collect();
            let mut want: Vec<&str> = cap.split(", ").collect();
            got.sort();
            want.sort();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn dropouts() {
        let drop_all = CaptionOps {
            caption_dropout_rate: 1.0,
            ..Default::default()
        };
        assert_eq!(drop_all.apply("a, b", &mut Rng::new(0)), "");
        let tag_drop = CaptionOps {
            keep_tokens: 1,
            tag_dropout_rate: 1.0,
            ..Default::default()
        };
        assert_eq!(tag_drop.apply("ohwx, b, c", &mut Rng::new(0)), "ohwx");
        let half = CaptionOps {
            caption_dropout_rate: 0.5,
            ..Default::default()
        };
        let mut rng = Rng::new(9);
        let dropped = (0..2000)
            .filter(|_| half.apply("x", &mut rng).is_empty())
            .count();
        assert!((900..1100).contains(&dropped), "{dropped}");
        // No ops: untouched, commas and all.
        assert_eq!(
            CaptionOps::default().apply(" a,b ", &mut Rng::new(0)),
            " a,b "
        );
    }
}
