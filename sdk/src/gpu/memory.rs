//! How much memory the GPU has. wgpu has no API for it, so it is read from the backend under
//! wgpu:
//! - Vulkan: the largest device-local memory heap and, where the driver has
//!   `VK_EXT_memory_budget`, how much of that heap this process may still allocate.
//! - Metal: the device's recommended working set (`recommendedMaxWorkingSetSize`), less what the
//!   device has allocated.
//! - DX12: the adapter's dedicated video memory, and the local segment's budget less its usage
//!   (`IDXGIAdapter3::QueryVideoMemoryInfo`).
//!
//! Other backends report nothing ([`AdapterReport::memory`](super::AdapterReport::memory) is
//! `None`), and callers must treat that as "unknown", never as "zero" or "unlimited".
//!
//! On integrated GPUs and CPU implementations such as lavapipe the device-local heap is system
//! memory, shared with everything else the machine runs; the budget, where there is one, already
//! accounts for that.

/// The GPU's memory, as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GpuMemory {
    /// Bytes in the largest device-local heap (the card's VRAM on a discrete GPU).
    pub total_bytes: u64,
    /// Bytes this process may still allocate in that heap, when the adapter was opened: the
    /// driver's budget less what the process already used. `None` where the driver gives no
    /// budget.
    pub available_bytes: Option<u64>,
}

impl GpuMemory {
    /// Whether `more` bytes can still be allocated: measured against the budget where the
    /// driver gives one, else against the whole heap less `held` (what this process already
    /// holds there, such as the model's weights). The error says what was needed and what there is.
    pub fn check_fits(&self, more: u64, held: u64) -> Result<(), String> {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        match self.available_bytes {
            Some(free) if more > free => Err(format!(
                "needs {:.2} GiB more GPU memory, but only {:.2} GiB of {:.2} GiB is free",
                gib(more),
                gib(free),
                gib(self.total_bytes)
            )),
            None if more.saturating_add(held) > self.total_bytes => Err(format!(
                "needs {:.2} GiB of GPU memory in all, but the GPU has {:.2} GiB",
                gib(more.saturating_add(held)),
                gib(self.total_bytes)
            )),
            _ => Ok(()),
        }
    }
}

/// Reads the adapter's memory from the backend under wgpu, where it can.
pub(crate) fn query(adapter: &wgpu::Adapter) -> Option<GpuMemory> {
    match adapter.get_info().backend {
        #[cfg(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd"))]
        wgpu::Backend::Vulkan => vulkan(adapter),
        #[cfg(target_vendor = "apple")]
        wgpu::Backend::Metal => metal(adapter),
        #[cfg(windows)]
        wgpu::Backend::Dx12 => dx12(adapter),
        _ => None,
    }
}

#[cfg(target_vendor = "apple")]
fn metal(adapter: &wgpu::Adapter) -> Option<GpuMemory> {
    use objc2_metal::MTLDevice;
    // SAFETY: the hal adapter is only read, while `adapter` keeps it alive.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Metal>() }?;
    let device = hal.raw_device();
    // The adapter's MTLDevice is the one wgpu's device allocates from, so its allocated size
    // counts this process's buffers.
    let total_bytes = device.recommendedMaxWorkingSetSize();
    let used = device.currentAllocatedSize() as u64;
    (total_bytes > 0).then(|| GpuMemory { total_bytes, available_bytes: Some(total_bytes.saturating_sub(used)) })
}

#[cfg(windows)]
fn dx12(adapter: &wgpu::Adapter) -> Option<GpuMemory> {
    use windows::Win32::Graphics::Dxgi::DXGI_MEMORY_SEGMENT_GROUP_LOCAL;
    // SAFETY: the hal adapter is only read, while `adapter` keeps it alive.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Dx12>() }?;
    let raw = hal.raw_adapter();
    // SAFETY: a plain query on a live adapter.
    let dedicated = unsafe { raw.GetDesc1() }.ok().map_or(0, |d| d.DedicatedVideoMemory as u64);
    let local = raw.query_video_memory_info(DXGI_MEMORY_SEGMENT_GROUP_LOCAL).ok();
    // An integrated GPU has little or no dedicated memory: its local segment's budget is the
    // shared memory it may use.
    let total_bytes = dedicated.max(local.map_or(0, |i| i.Budget));
    let available_bytes = local.map(|i| i.Budget.saturating_sub(i.CurrentUsage));
    (total_bytes > 0).then_some(GpuMemory { total_bytes, available_bytes })
}

#[cfg(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn vulkan(adapter: &wgpu::Adapter) -> Option<GpuMemory> {
    use ash::vk;
    // SAFETY: the hal adapter is only read, while `adapter` keeps it alive; no handle obtained
    // from it outlives this function.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let instance = hal.shared_instance();
    let raw = instance.raw_instance();
    let device = hal.raw_physical_device();
    let caps = hal.physical_device_capabilities();
    // The budget needs vkGetPhysicalDeviceMemoryProperties2 (Vulkan 1.1) and the extension.
    let budget_supported = instance.instance_api_version() >= vk::API_VERSION_1_1
        && caps.properties().api_version >= vk::API_VERSION_1_1
        && caps.supports_extension(ash::ext::memory_budget::NAME);
    let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
    let props = if budget_supported {
        let mut props2 = vk::PhysicalDeviceMemoryProperties2::default().push_next(&mut budget);
        // SAFETY: `device` belongs to `raw`, which is Vulkan 1.1 or later (checked above), and
        // the chained struct is one the call may extend.
        unsafe { raw.get_physical_device_memory_properties2(device, &mut props2) };
        props2.memory_properties
    } else {
        // SAFETY: `device` belongs to `raw`.
        unsafe { raw.get_physical_device_memory_properties(device) }
    };
    let heaps = &props.memory_heaps[..(props.memory_heap_count as usize).min(vk::MAX_MEMORY_HEAPS)];
    let (index, heap) = heaps
        .iter()
        .enumerate()
        .filter(|(_, h)| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
        .max_by_key(|(_, h)| h.size)?;
    // A driver without a budget leaves both arrays zero; a zero budget means "not reported".
    let available_bytes = (budget_supported && budget.heap_budget[index] > 0)
        .then(|| budget.heap_budget[index].saturating_sub(budget.heap_usage[index]));
    Some(GpuMemory { total_bytes: heap.size, available_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_budget_is_what_counts_where_there_is_one() {
        let m = GpuMemory { total_bytes: 8 * GIB, available_bytes: Some(2 * GIB) };
        assert!(m.check_fits(2 * GIB, 5 * GIB).is_ok());
        let e = m.check_fits(3 * GIB, 0).expect_err("3 GiB more than the 2 GiB free");
        assert!(e.contains("3.00 GiB more") && e.contains("2.00 GiB of 8.00 GiB is free"), "{e}");
    }

    #[test]
    fn without_a_budget_the_whole_heap_less_what_is_held_counts() {
        let m = GpuMemory { total_bytes: 8 * GIB, available_bytes: None };
        assert!(m.check_fits(6 * GIB, 2 * GIB).is_ok());
        let e = m.check_fits(6 * GIB, 2 * GIB + 1).expect_err("one byte over");
        assert!(e.contains("the GPU has 8.00 GiB"), "{e}");
        assert!(m.check_fits(u64::MAX, u64::MAX).is_err(), "no overflow");
    }
}
