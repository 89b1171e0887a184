//! The device the parity tests run on: `SD_LORA_TEST_DEVICE` = `cpu`
//! (default), `cuda` or `cuda:N` (needs a build with `--features cuda`).
//!
//! One `Device` per test binary: candle gives every `Device::new_cuda` call its
//! own context and stream and refuses to mix tensors from two of them, so the
//! device is created once and cloned.

use std::sync::OnceLock;

use candle_core::Device;

/// The device selected by `SD_LORA_TEST_DEVICE` (CPU when unset).
pub fn test_device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let name = std::env::var("SD_LORA_TEST_DEVICE").unwrap_or_default();
            match name.trim() {
                "" | "cpu" => Device::Cpu,
                "cuda" => Device::new_cuda(0).expect("SD_LORA_TEST_DEVICE=cuda"),
                other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                    Some(Ok(ordinal)) => {
                        Device::new_cuda(ordinal).expect("SD_LORA_TEST_DEVICE=cuda:N")
                    }
                    _ => panic!("SD_LORA_TEST_DEVICE={other:?}: use cpu, cuda or cuda:N"),
                },
            }
        })
        .clone()
}

/// Whether the tests run on a GPU (for GPU-only tolerances).
#[allow(dead_code)]
pub fn on_gpu() -> bool {
    !test_device().is_cpu()
}
