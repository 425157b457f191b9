//! Compiles every CUDA kernel of the crate with NVRTC (no GPU needed, only libnvrtc).
//!
//! libnvrtc is found through `SWITCHYARD_NVRTC_LIB=/path/to/libnvrtc.so.13` or the system loader
//! (`LD_LIBRARY_PATH`); `.ci/run` installs the `nvidia-cuda-nvrtc` wheel and sets both. Without it
//! the test prints `skipped: libnvrtc not found (...)` and passes, unless
//! `SWITCHYARD_REQUIRE_NVRTC=1`, which makes a missing NVRTC a failure.
#![cfg(feature = "cuda")]

use switchyard_kernels::cuda::nvrtc::{DEFAULT_ARCH, SOURCES, compile_all, compile_source, kernel_count, nvrtc_info};

fn required() -> bool {
    std::env::var("SWITCHYARD_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

#[test]
fn every_kernel_compiles_without_warnings() {
    let info = match nvrtc_info() {
        Ok(info) => info,
        Err(reason) => {
            assert!(!required(), "SWITCHYARD_REQUIRE_NVRTC=1 but libnvrtc was not found: {reason}");
            println!("skipped: libnvrtc not found ({reason})");
            return;
        }
    };
    println!("NVRTC {}.{} from {} (targets {:?})", info.version.0, info.version.1, info.source, info.supported_archs);
    // The default target, and the H100/H200 one when this NVRTC has it.
    let mut archs = vec![DEFAULT_ARCH.to_string()];
    if info.supported_archs.contains(&90) {
        archs.push("compute_90".into());
    }
    for arch in &archs {
        let compiled = compile_all(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(compiled.len(), SOURCES.len());
        let mut kernels = 0;
        for c in compiled.iter() {
            assert!(c.log.is_empty(), "{} ({arch}) compiled with messages:\n{}", c.source.file, c.log);
            assert!(
                c.ptx.contains(&format!(".target sm_{}", &arch["compute_".len()..])),
                "{}: PTX target",
                c.source.file
            );
            for k in c.source.kernels {
                assert!(c.defines(k), "{}: no .entry {k} in the PTX", c.source.file);
                kernels += 1;
            }
        }
        assert_eq!(kernels, kernel_count());
        // The cache hands back the same compilation.
        assert!(std::sync::Arc::ptr_eq(&compiled, &compile_all(arch).unwrap()));
        println!("compiled {kernels} kernels from {} sources for {arch}", compiled.len());
    }
}

#[test]
fn a_compile_error_is_reported_with_the_log() {
    if nvrtc_info().is_err() {
        println!("skipped: libnvrtc not found");
        return;
    }
    let mut bad = SOURCES[3];
    bad.source = "extern \"C\" __global__ void adamw_step(float* p) { p[0] = undefined_name; }";
    let err = compile_source(&bad, DEFAULT_ARCH).unwrap_err().to_string();
    assert!(err.contains("undefined_name") && err.contains("adam.cu"), "{err}");
}
