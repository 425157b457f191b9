//! Stand-alone driver of [`switchyard_kernels::run_kernel_bench`] (the same library function as
//! `switchyard bench kernels`), printing the report as JSON.
//!
//! ```text
//! cargo run --release -p switchyard-kernels --example kernel_bench -- \
//!     --tokens 4096 --d-model 512 --d-ffn 2048 --experts 8 --top-k 2 --capacity-factor 1.25 \
//!     --threads 2 [--activation gelu|swiglu] [--backend pure-rust|blas] [--warmup 1] \
//!     [--iterations 5] [--seed 1] [--torch-python /tmp/torchvenv/bin/python]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use switchyard_kernels::{Activation, GemmBackend, KernelBenchConfig, run_kernel_bench};

fn parse() -> Result<KernelBenchConfig, String> {
    let mut cfg = KernelBenchConfig::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        let value = args.get(i + 1).ok_or_else(|| format!("{flag} needs a value"))?.as_str();
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag {
            "--tokens" => cfg.tokens = num(value)?,
            "--d-model" => cfg.d_model = num(value)?,
            "--d-ffn" => cfg.d_ffn = num(value)?,
            "--experts" => cfg.experts = num(value)?,
            "--top-k" => cfg.top_k = num(value)?,
            "--threads" => cfg.threads = num(value)?,
            "--warmup" => cfg.warmup = num(value)?,
            "--iterations" => cfg.iterations = num(value)?,
            "--seed" => cfg.seed = num(value)? as u64,
            "--capacity-factor" => cfg.capacity_factor = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?,
            "--activation" => {
                cfg.activation = match value {
                    "gelu" => Activation::Gelu,
                    "swiglu" => Activation::SwiGlu,
                    _ => return Err(format!("unknown activation {value}")),
                }
            }
            "--backend" => {
                cfg.backend = Some(match value {
                    "pure-rust" => GemmBackend::PureRust,
                    "blas" => GemmBackend::Blas,
                    _ => return Err(format!("unknown backend {value}")),
                })
            }
            "--torch-python" => cfg.torch_python = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown flag {flag}")),
        }
        i += 2;
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cfg = match parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run_kernel_bench(&cfg) {
        Ok(report) => match serde_json::to_string_pretty(&report) {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
