//! A dataset folder holding every kind of broken input, built by the test:
//! each problem is reported once, with a message that says what to do, and
//! every good file is used.

mod common;
use common::*;
use sd_lora_data::{
    CaptionSource, Dataset, DatasetConfig, Layout, Severity, SubsetConfig, SubsetKind,
};
use std::fs;
use std::path::Path;

fn config(paths: &[(&Path, SubsetKind)]) -> DatasetConfig {
    DatasetConfig {
        subsets: paths
            .iter()
            .map(|(p, k)| SubsetConfig::new(*p, *k))
            .collect(),
        resolution: 64,
        min_bucket_side: Some(64),
        max_bucket_side: Some(128),
        min_image_side: 32,
        ..Default::default()
    }
}

fn problem<'a>(ds: &'a Dataset, file: &str) -> Vec<&'a sd_lora_data::Problem> {
    ds.problems
        .iter()
        .filter(|p| p.path.file_name().is_some_and(|n| n == file))
        .collect()
}

fn one(ds: &Dataset, file: &str, severity: Severity, needle: &str) {
    let ps = problem(ds, file);
    assert_eq!(ps.len(), 1, "{file}: expected one problem, got {ps:#?}");
    assert_eq!(ps[0].severity, severity, "{file}: {}", ps[0].message);
    assert!(
        ps[0].message.contains(needle),
        "{file}: message {:?} lacks {needle:?}",
        ps[0].message
    );
}

#[test]
fn kohya_root_with_every_broken_input() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train");
    let sub = root.join("10_ohwx dog");
    fs::create_dir_all(&sub).unwrap();
    // Good files.
    save_png(&sub.join("a_good.png"), &gradient(96, 64));
    fs::write(sub.join("a_good.txt"), "ohwx dog, grass\n").unwrap();
    save_png(&sub.join("b_folder_caption.PNG"), &gradient(64, 64));
    fs::write(sub.join("c_bom.jpg"), jpeg_bytes(&gradient(64, 80))).unwrap();
    fs::write(
        sub.join("c_bom.txt"),
        b"\xEF\xBB\xBF  ohwx dog on a sofa  \r\n",
    )
    .unwrap();
    fs::write(sub.join("d_multiline.webp"), webp_bytes(&gradient(64, 64))).unwrap();
    fs::write(sub.join("d_multiline.txt"), "first line\nsecond line\n").unwrap();
    fs::write(sub.join("e_latin1.bmp"), bmp_bytes(&gradient(64, 64))).unwrap();
    fs::write(sub.join("e_latin1.txt"), b"caf\xE9").unwrap();
    fs::write(
        sub.join("f_caption_ext.png"),
        png_bytes_rgba(&image::RgbaImage::new(64, 64)),
    )
    .unwrap();
    fs::write(sub.join("f_caption_ext.caption"), "from dot caption").unwrap();
    save_png(&sub.join("g_both.png"), &gradient(64, 64));
    fs::write(sub.join("g_both.txt"), "from txt").unwrap();
    fs::write(sub.join("g_both.caption"), "from caption").unwrap();
    fs::write(
        sub.join("h_rotated.jpg"),
        jpeg_with_orientation(&gradient(128, 64), 6),
    )
    .unwrap();
    fs::write(sub.join("i_empty_caption.png"), {
        let mut v = Vec::new();
        gradient(64, 64)
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    })
    .unwrap();
    fs::write(sub.join("i_empty_caption.txt"), "  \n").unwrap();
    // Broken files.
    fs::write(sub.join("x_empty.png"), b"").unwrap();
    let good_png = fs::read(sub.join("a_good.png")).unwrap();
    fs::write(sub.join("x_truncated.png"), &good_png[..good_png.len() / 2]).unwrap();
    let jpg = jpeg_bytes(&gradient(64, 64));
    fs::write(sub.join("x_truncated.jpg"), &jpg[..jpg.len() / 2]).unwrap();
    fs::write(sub.join("x_text.jpg"), "this is not an image\n").unwrap();
    save_png(&sub.join("x_tiny.png"), &gradient(20, 40));
    fs::write(sub.join("x_orphan.txt"), "caption without image").unwrap();
    fs::write(sub.join("x_phone.heic"), b"\0\0\0\x18ftypheic").unwrap();
    fs::write(sub.join("notes.json"), "{}").unwrap(); // ignored quietly
    std::os::unix::fs::symlink(tmp.path().join("gone.png"), sub.join("x_dangling.png")).unwrap();
    fs::write(sub.join("._a_good.png"), b"\0\x05\x16\x07").unwrap(); // macOS junk, ignored
    // A sub-folder that does not follow the naming pattern, and a stray root image.
    fs::create_dir_all(root.join("misc")).unwrap();
    save_png(&root.join("misc").join("m.png"), &gradient(64, 64));
    save_png(&root.join("stray.png"), &gradient(64, 64));

    let ds = Dataset::scan(&config(&[(&root, SubsetKind::Instance)])).unwrap();

    // One subset from the `10_ohwx dog` folder.
    assert_eq!(ds.subsets.len(), 1);
    let s = &ds.subsets[0];
    assert_eq!(
        (s.repeats, s.fallback_caption.as_deref()),
        (10, Some("ohwx dog"))
    );
    let used: Vec<String> = ds
        .images
        .iter()
        .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        used,
        [
            "a_good.png",
            "b_folder_caption.PNG",
            "c_bom.jpg",
            "d_multiline.webp",
            "e_latin1.bmp",
            "f_caption_ext.png",
            "g_both.png",
            "h_rotated.jpg",
            "i_empty_caption.png"
        ]
    );
    let cap = |i: usize| (ds.images[i].caption.as_str(), ds.images[i].caption_source);
    assert_eq!(cap(0), ("ohwx dog, grass", CaptionSource::File));
    assert_eq!(cap(1), ("ohwx dog", CaptionSource::Folder));
    assert_eq!(cap(2), ("ohwx dog on a sofa", CaptionSource::File));
    assert_eq!(cap(3), ("first line", CaptionSource::File));
    assert_eq!(cap(4), ("ohwx dog", CaptionSource::Folder));
    assert_eq!(cap(5), ("from dot caption", CaptionSource::File));
    assert_eq!(cap(6), ("from txt", CaptionSource::File));
    assert_eq!(cap(8), ("ohwx dog", CaptionSource::Folder));
    assert_eq!(
        (ds.images[7].width, ds.images[7].height),
        (64, 128),
        "EXIF rotation"
    );
    assert_eq!(s.captions_by_extension.get(".txt"), Some(&4));
    assert_eq!(s.captions_by_extension.get(".caption"), Some(&1));
    assert_eq!(s.fallback_captions, 4); // b, e (bad UTF-8), h (none), i (empty)

    one(
        &ds,
        "d_multiline.txt",
        Severity::Warning,
        "only the first is used",
    );
    one(&ds, "e_latin1.txt", Severity::Warning, "not valid UTF-8");
    assert!(
        problem(&ds, "e_latin1.txt")[0]
            .message
            .contains("\"ohwx dog\"")
    );
    one(
        &ds,
        "g_both.caption",
        Severity::Warning,
        "g_both.txt is used",
    );
    one(
        &ds,
        "i_empty_caption.txt",
        Severity::Warning,
        "caption file is empty",
    );
    one(&ds, "x_empty.png", Severity::Error, "empty");
    one(
        &ds,
        "x_truncated.png",
        Severity::Error,
        "damaged or incomplete",
    );
    one(&ds, "x_truncated.jpg", Severity::Error, "cut off");
    one(&ds, "x_text.jpg", Severity::Error, "contains text");
    one(
        &ds,
        "x_tiny.png",
        Severity::Error,
        "smaller than dataset.min_image_side",
    );
    one(&ds, "x_orphan.txt", Severity::Warning, "has no image");
    one(
        &ds,
        "x_phone.heic",
        Severity::Error,
        "convert it to PNG or JPEG",
    );
    one(&ds, "misc", Severity::Warning, "not `N_caption`");
    one(
        &ds,
        "stray.png",
        Severity::Warning,
        "kohya root is not used",
    );
    one(&ds, "x_dangling.png", Severity::Error, "broken link");
    assert!(problem(&ds, "notes.json").is_empty());
    assert!(problem(&ds, "._a_good.png").is_empty());
    assert_eq!(ds.problems.len(), 14, "{:#?}", ds.problems);

    // Deterministic: a second scan is identical, order included.
    let again = Dataset::scan(&ds.config).unwrap();
    assert_eq!(again.images, ds.images);
    assert_eq!(again.problems, ds.problems);
}

#[test]
fn non_utf8_file_names_are_reported_and_serialised() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    fs::create_dir_all(&dir).unwrap();
    let name = std::ffi::OsStr::from_bytes(b"caf\xE9.png");
    save_png(&dir.join(name), &gradient(64, 64));
    fs::write(dir.join(std::ffi::OsStr::from_bytes(b"bad\xFF.png")), b"").unwrap();
    let ds = Dataset::scan(&config(&[(&dir, SubsetKind::Instance)])).unwrap();
    assert_eq!(ds.images.len(), 1);
    assert_eq!(
        ds.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count(),
        1
    );
    let json = serde_json::to_string(&sd_lora_data::report::Report::new(&ds)).unwrap();
    assert!(json.contains("caf\u{FFFD}.png"), "{json}");
}

#[test]
fn dreambooth_instance_and_class_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let inst = tmp.path().join("dog");
    let class = tmp.path().join("class");
    fs::create_dir_all(&inst).unwrap();
    fs::create_dir_all(&class).unwrap();
    for i in 0..3 {
        save_png(&inst.join(format!("{i}.png")), &gradient(64, 64));
    }
    for i in 0..5 {
        save_png(&class.join(format!("{i}.png")), &gradient(64, 64));
    }
    let mut c = config(&[(&inst, SubsetKind::Instance), (&class, SubsetKind::Class)]);
    c.subsets[0].caption = Some("a photo of ohwx dog".into());
    c.subsets[1].caption = Some("a photo of a dog".into());
    c.prior_loss_weight = 0.5;
    let ds = Dataset::scan(&c).unwrap();
    assert!(ds.problems.is_empty(), "{:#?}", ds.problems);
    assert_eq!(ds.images.len(), 8);
    let kinds: Vec<_> = ds
        .images
        .iter()
        .map(|e| ds.subsets[e.subset].kind)
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == SubsetKind::Class).count(), 5);
    assert_eq!(ds.images[0].caption_source, CaptionSource::Prompt);
    assert_eq!(ds.images[0].caption, "a photo of ohwx dog");
    assert_eq!(ds.images[7].caption, "a photo of a dog");
    assert_eq!(ds.subsets[0].loss_weight, 1.0);
    assert_eq!(ds.subsets[1].loss_weight, 0.5);
}

#[test]
fn folder_named_like_a_kohya_subset_and_missing_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let sub = tmp.path().join("3_sks cat");
    fs::create_dir_all(sub.join("extra")).unwrap();
    save_png(&sub.join("a.png"), &gradient(64, 64));
    save_png(&sub.join("extra").join("b.png"), &gradient(64, 64));
    let missing = tmp.path().join("nope");
    let file = sub.join("a.png");
    let ds = Dataset::scan(&config(&[
        (&sub, SubsetKind::Instance),
        (&missing, SubsetKind::Instance),
        (&file, SubsetKind::Instance),
    ]))
    .unwrap();
    assert_eq!(ds.subsets.len(), 1);
    assert_eq!(ds.subsets[0].repeats, 3);
    assert_eq!(ds.images[0].caption, "sks cat");
    one(&ds, "extra", Severity::Warning, "sub-folder is not read");
    one(&ds, "nope", Severity::Error, "folder not found");
    one(&ds, "a.png", Severity::Error, "not a folder");

    // Forcing the kohya layout on a folder without N_caption children.
    let mut c = config(&[(tmp.path(), SubsetKind::Instance)]);
    c.subsets[0].layout = Layout::Images;
    let ds = Dataset::scan(&c).unwrap();
    assert!(!ds.has_images());
    let mut c = config(&[(&sub, SubsetKind::Instance)]);
    c.subsets[0].layout = Layout::Kohya;
    let ds = Dataset::scan(&c).unwrap();
    assert!(!ds.has_images());
    assert!(ds.problems[0].message.contains("no sub-folder is named"));
}

#[test]
fn uncaptioned_images_and_upscaling_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    fs::create_dir_all(&dir).unwrap();
    save_png(&dir.join("small.png"), &gradient(40, 40));
    let mut c = config(&[(&dir, SubsetKind::Instance)]);
    c.resolution = 128;
    let ds = Dataset::scan(&c).unwrap();
    assert_eq!(ds.images[0].caption_source, CaptionSource::None);
    let msgs: Vec<&str> = ds.problems.iter().map(|p| p.message.as_str()).collect();
    assert!(msgs.iter().any(|m| m.starts_with("no caption")), "{msgs:?}");
    assert!(msgs.iter().any(|m| m.contains("enlarged ×3.2")), "{msgs:?}");
}

#[test]
fn invalid_config_is_an_error_before_scanning() {
    let mut c = config(&[(Path::new("/nonexistent"), SubsetKind::Instance)]);
    c.subsets[0].keep_tokens = 1;
    c.subsets[0].caption_tag_dropout_rate = -0.1;
    let e = Dataset::scan(&c).unwrap_err();
    assert_eq!(e.key, "dataset.subsets[0].caption_tag_dropout_rate");
}

#[test]
fn toml_unknown_keys_are_rejected_with_the_key_name() {
    let e = toml::from_str::<DatasetConfig>("resolutoin = 512").unwrap_err();
    assert!(e.to_string().contains("resolutoin"), "{e}");
    let e = toml::from_str::<DatasetConfig>("[[subsets]]\npath = \"x\"\nrepeat = 3").unwrap_err();
    assert!(e.to_string().contains("repeat"), "{e}");
    let e = toml::from_str::<DatasetConfig>("crop = \"middle\"").unwrap_err();
    assert!(e.to_string().contains("center"), "{e}");
    let ok: DatasetConfig =
        toml::from_str("resolution = 768\n[[subsets]]\npath = \"x\"\nkind = \"class\"").unwrap();
    assert_eq!(ok.subsets[0].kind, SubsetKind::Class);
    assert_eq!(ok.subsets[0].caption_extension, ".txt");
}
