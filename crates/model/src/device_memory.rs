//! How much GPU memory is in use, for benchmarks and progress reports.
//!
//! candle has no allocator statistics, so this asks the CUDA driver for the
//! device's free and total memory and reports `total − free`. That number
//! includes everything resident on the device: our tensors, cudarc's memory
//! pool, cuBLAS workspaces, the CUDA context itself and any other process
//! using the same GPU. It is therefore an upper bound on what this process
//! needs, comparable to `nvidia-smi`'s "memory used" rather than to
//! PyTorch's `max_memory_allocated`.

use candle_core::Device;

/// Bytes in use on `device`'s GPU (`total − free` as the driver reports it).
///
/// `None` on CPU and Metal, when the crate is built without the `cuda`
/// feature, or when the driver query fails (a failure here must never stop a
/// training run or a benchmark, so it is not an error).
pub fn used_bytes(device: &Device) -> Option<u64> {
    imp::used_bytes(device)
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::Device;

    pub(super) fn used_bytes(device: &Device) -> Option<u64> {
        let Device::Cuda(cuda) = device else {
            return None;
        };
        // `mem_get_info` binds the device's context to this thread first, so
        // the numbers are for this device even with several GPUs.
        let stream = cuda.cuda_stream();
        let (free, total) = stream.context().mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Device;

    pub(super) fn used_bytes(_device: &Device) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_has_no_device_memory() {
        assert_eq!(used_bytes(&Device::Cpu), None);
    }
}
