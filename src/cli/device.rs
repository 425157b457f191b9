//! `--device` of the commands that run the MoE compute (`train`, `bench kernels`): parsing the flag and choosing
//! the device through the kernels' probe (`profile` has its own: its choice depends on the GPU world).

use anyhow::{Result, anyhow};
use switchyard_kernels::cuda::{DeviceRequest, DeviceSelection, select};

/// Parses `--device` (`cpu`, `cuda`, `cuda:N`, `auto`).
pub(super) fn parse(flag: &str) -> Result<DeviceRequest> {
    flag.parse().map_err(|e: String| anyhow!("--device {flag}: {e}"))
}

/// The device for `request`: `cuda` without a usable GPU is an error naming what is missing and the fix;
/// `auto` without one selects the CPU.
pub(super) fn choose(flag: &str, request: DeviceRequest) -> Result<DeviceSelection> {
    select(request).map_err(|e| anyhow!("--device {flag}: {e}"))
}

/// Why `auto` stayed on the CPU: the selection's reason without its "running on the CPU: " lead.
pub(super) fn cpu_reason(choice: &DeviceSelection) -> &str {
    choice.reason.trim_start_matches("running on the CPU: ")
}
