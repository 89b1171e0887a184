//! What the end-to-end training tests share: the example dataset and the
//! settings of a tiny run on it.

use std::path::{Path, PathBuf};

/// `assets/example_dataset`.
pub fn example_dataset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/example_dataset")
}

/// `--set`s of a run of the built-in tiny model on the example dataset at
/// 64 px (buckets to match), without periodic checkpoints, writing to `out`.
pub fn tiny_run_sets(out: &Path) -> Vec<String> {
    vec![
        "model.path=\"builtin:tiny\"".into(),
        format!(
            "dataset.subsets[0].path={:?}",
            example_dataset().to_string_lossy()
        ),
        "dataset.resolution=64".into(),
        "dataset.bucket_step=32".into(),
        "dataset.min_bucket_side=32".into(),
        "dataset.max_bucket_side=128".into(),
        "dataset.min_image_side=32".into(),
        "output.save_every=0".into(),
        format!("output.dir={:?}", out.to_string_lossy()),
    ]
}
