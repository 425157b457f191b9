//! Self-test of the MPI communicator: every collective on every rank, then prints `rank R: ok`
//! (exits non-zero with the error otherwise).
//!
//! ```text
//! cargo build -p switchyard-runtime --features mpi --example mpi_selftest
//! mpirun -np 4 target/debug/examples/mpi_selftest                  # the collectives
//! mpirun -np 4 target/debug/examples/mpi_selftest --timeout-check  # the last rank arrives late
//! mpirun -np 4 target/debug/examples/mpi_selftest --abort-check    # the last rank aborts
//! ```
//!
//! `--timeout-check`: the last rank sleeps past the (1 s) timeout of a sub-communicator; every other
//! rank must get `CommError::Timeout` naming it within the timeout plus 2 s, then all meet again on
//! the world communicator and exit cleanly. `--abort-check`: the last rank calls `abort`; every other
//! rank, waiting in a barrier with a 30 s timeout, must get `CommError::PeerFailed` within 5 s.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use switchyard_runtime::comm::hierarchical::Hierarchical;
use switchyard_runtime::comm::mpi::{self, MpiComm};
use switchyard_runtime::comm::{CommError, CommExt, Communicator};

type Res = Result<(), Box<dyn Error>>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

/// Deterministic pseudo-random numbers (splitmix64), the same on every rank.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The bytes rank `src` sends to `dst` in test `seed`.
fn bytes(seed: u64, src: usize, dst: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| mix(seed ^ ((src as u64) << 40) ^ ((dst as u64) << 20) ^ i as u64) as u8).collect()
}

/// An uneven length up to `max`; one in four is zero.
fn len_of(seed: u64, src: usize, dst: usize, max: usize) -> usize {
    let x = mix(seed.wrapping_mul(31) ^ ((src as u64) << 32) ^ dst as u64);
    if x.is_multiple_of(4) { 0 } else { (x >> 8) as usize % (max + 1) }
}

/// Values whose sum depends on the order of addition.
fn contribution(seed: u64, rank: usize, len: usize) -> Vec<f64> {
    (0..len)
        .map(|i| {
            let x = mix(seed ^ ((rank as u64) << 32) ^ i as u64);
            let mag = [1e-3, 1.0, 1e8, 1e16][(x % 4) as usize];
            let sign = if (x >> 3).is_multiple_of(2) { 1.0 } else { -1.0 };
            sign * mag * (1.0 + (x >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}

/// Every collective on `c`; `seed` varies the data.
fn suite(c: &dyn Communicator, seed: u64) -> Res {
    let (me, n) = (c.rank(), c.size());

    // Point-to-point around a ring, two tags, order kept per (source, tag).
    let (right, left) = ((me + 1) % n, (me + n - 1) % n);
    for i in 0..6usize {
        c.send(right, 10 + (i % 2) as u32, &bytes(seed, me, i, len_of(seed, me, i, 5000)))?;
    }
    for (tag, order) in [(11u32, [1usize, 3, 5]), (10, [0, 2, 4])] {
        for i in order {
            let got = c.recv(left, tag)?;
            ensure!(
                got == bytes(seed, left, i, len_of(seed, left, i, 5000)),
                "recv: message {i} from {left} (tag {tag}) differs"
            );
        }
    }

    // all_to_all_v with uneven sizes (some zero).
    let send: Vec<Vec<u8>> = (0..n).map(|j| bytes(seed + 1, me, j, len_of(seed + 1, me, j, 4000))).collect();
    let refs: Vec<&[u8]> = send.iter().map(Vec::as_slice).collect();
    let got = c.all_to_all_v(&refs)?;
    ensure!(got.len() == n, "all_to_all_v returned {} buffers", got.len());
    for (j, g) in got.iter().enumerate() {
        ensure!(*g == bytes(seed + 1, j, me, len_of(seed + 1, j, me, 4000)), "all_to_all_v: bytes from {j} differ");
    }

    // all_gather.
    let all = c.all_gather(&bytes(seed + 2, me, 0, len_of(seed + 2, me, 0, 3000)))?;
    ensure!(all.len() == n, "all_gather returned {} buffers", all.len());
    for (j, g) in all.iter().enumerate() {
        ensure!(*g == bytes(seed + 2, j, 0, len_of(seed + 2, j, 0, 3000)), "all_gather: bytes of {j} differ");
    }

    // broadcast from every root.
    for root in 0..n {
        let want = bytes(seed + 3, root, 0, 100 + 37 * root);
        let mut data = if me == root { want.clone() } else { vec![1, 2, 3] };
        c.broadcast(root, &mut data)?;
        ensure!(data == want, "broadcast from {root} differs");
    }

    // all_reduce: the rank-order sum, bit for bit, on every rank.
    for len in [0usize, 1, 7, 1000] {
        let mut v64 = contribution(seed, me, len);
        c.all_reduce_sum_f64(&mut v64)?;
        let mut v32: Vec<f32> = contribution(seed, me, len).iter().map(|&x| x as f32).collect();
        c.all_reduce_sum_f32(&mut v32)?;
        let mut want64 = contribution(seed, 0, len);
        let mut want32: Vec<f32> = want64.iter().map(|&x| x as f32).collect();
        for r in 1..n {
            for ((w64, w32), x) in want64.iter_mut().zip(want32.iter_mut()).zip(contribution(seed, r, len)) {
                *w64 += x;
                *w32 += x as f32;
            }
        }
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        ensure!(bits(&v64) == bits(&want64), "all_reduce_sum_f64 (len {len}) is not the rank-order sum");
        let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        ensure!(bits32(&v32) == bits32(&want32), "all_reduce_sum_f32 (len {len}) is not the rank-order sum");
        let everyone = c.all_gather_u64(&bits(&v64))?;
        ensure!(everyone.iter().all(|b| *b == bits(&v64)), "all_reduce_sum_f64 bits differ between ranks");
    }
    let mut uneven = vec![1.0f32; 3 + usize::from(me == n - 1)];
    if n > 1 {
        let res = c.all_reduce_sum_f32(&mut uneven);
        ensure!(matches!(res, Err(CommError::Invalid { .. })), "all_reduce with unequal lengths gave {res:?}");
    }

    // barrier and a vote.
    c.barrier()?;
    ensure!(c.all_agree(true)?, "all_agree(true) was false");
    ensure!(n == 1 || !c.all_agree(me != 0)?, "all_agree with one dissent was true");

    // split into two groups (odd/even), ordered by descending rank.
    let sub = c.split(me % 2, n - me)?;
    let members: Vec<u64> = (0..n).rev().filter(|r| r % 2 == me % 2).map(|r| r as u64).collect();
    ensure!(sub.size() == members.len(), "split: group size {} != {}", sub.size(), members.len());
    let seen = sub.all_gather_u64(&[me as u64])?;
    ensure!(seen.iter().map(|v| v[0]).collect::<Vec<_>>() == members, "split: members {seen:?} != {members:?}");
    let mut one = [1.0f64];
    sub.all_reduce_sum_f64(&mut one)?;
    ensure!(one[0] == members.len() as f64, "split: all_reduce in the group gave {}", one[0]);
    // Same user tag on parent and child must not mix.
    sub.send((sub.rank() + 1) % sub.size(), 10, b"child")?;
    c.send(right, 10, b"parent")?;
    ensure!(c.recv(left, 10)? == b"parent", "parent message mixed up");
    ensure!(sub.recv((sub.rank() + sub.size() - 1) % sub.size(), 10)? == b"child", "child message mixed up");

    // Hierarchical all-to-all with 2 ranks per node equals the flat one.
    if n.is_multiple_of(2) {
        let h = Hierarchical::new(c, 2)?;
        for round in 0..3u64 {
            let s = seed + 10 + round;
            let send: Vec<Vec<u8>> = (0..n).map(|j| bytes(s, me, j, len_of(s, me, j, 3000))).collect();
            let refs: Vec<&[u8]> = send.iter().map(Vec::as_slice).collect();
            let flat = c.all_to_all_v(&refs)?;
            let two_d = h.all_to_all_v(c, &refs)?;
            ensure!(flat == two_d, "hierarchical all_to_all_v differs from the flat one (round {round})");
        }
    }
    c.barrier()?;
    Ok(())
}

/// The suite on the world, then on a sub-communicator that cuts messages into 700-byte pieces.
fn full(world: &MpiComm) -> Res {
    suite(world, 1)?;
    let mut small = world.split_mpi(0, world.rank())?;
    small.set_max_message_bytes(700)?;
    suite(&small, 100)?;
    Ok(())
}

/// The last rank arrives late at a sub-communicator with a 1 s timeout.
fn timeout_check(world: &MpiComm) -> Res {
    let (me, n) = (world.rank(), world.size());
    ensure!(n >= 2, "--timeout-check needs at least 2 ranks");
    let late = n - 1;
    let short = Duration::from_secs(1);
    let mut sub = world.split_mpi(0, me)?;
    sub.set_timeout(short);
    world.barrier()?;
    if me == late {
        std::thread::sleep(3 * short);
        // The others' messages are already here; whether this completes does not matter.
        let _ = sub.barrier();
    } else {
        for op in ["barrier", "all_reduce_sum_f64"] {
            let t0 = Instant::now();
            let res = if op == "barrier" { sub.barrier() } else { sub.all_reduce_sum_f64(&mut [1.0]) };
            let waited = t0.elapsed();
            ensure!(
                matches!(res, Err(CommError::Timeout { peer, .. }) if peer == late),
                "{op}: expected a timeout naming rank {late}, got {res:?}"
            );
            ensure!(
                waited >= short.mul_f64(0.9) && waited <= short + Duration::from_secs(2),
                "{op}: timed out after {waited:?}"
            );
        }
    }
    world.barrier()?;
    Ok(())
}

/// The last rank aborts; the others must see it within 5 s although their timeout is 30 s.
fn abort_check(world: &MpiComm) -> Res {
    let (me, n) = (world.rank(), world.size());
    ensure!(n >= 2, "--abort-check needs at least 2 ranks");
    world.barrier()?;
    if me == n - 1 {
        // Abort only once every other rank is past the first barrier (else that one fails too).
        for r in 0..n - 1 {
            world.recv(r, 1)?;
        }
        world.abort("abort check");
        return Ok(());
    }
    world.send(n - 1, 1, b"ready")?;
    let t0 = Instant::now();
    let res = world.barrier();
    let waited = t0.elapsed();
    match res {
        Err(CommError::PeerFailed { peer, reason, .. }) if peer == n - 1 && reason.contains("abort check") => {}
        other => return Err(format!("expected PeerFailed from rank {}, got {other:?}", n - 1).into()),
    }
    ensure!(waited < Duration::from_secs(5), "PeerFailed came after {waited:?}");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] => "",
        ["--timeout-check"] => "timeout check",
        ["--abort-check"] => "abort check",
        _ => {
            eprintln!("usage: mpi_selftest [--timeout-check | --abort-check]");
            return ExitCode::from(2);
        }
    };
    let world = match mpi::init(Duration::from_secs(30)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mpi_selftest: {e}");
            return ExitCode::FAILURE;
        }
    };
    let me = world.rank();
    let result = match mode {
        "timeout check" => timeout_check(&world),
        "abort check" => abort_check(&world),
        _ => full(&world),
    };
    match result {
        Ok(()) => {
            let suffix = if mode.is_empty() { String::new() } else { format!(" ({mode})") };
            println!("rank {me}: ok{suffix}");
            drop(world);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rank {me}: FAILED: {e}");
            world.abort(&e.to_string());
            // Without MPI_Finalize: mpirun sees the non-zero exit and ends the job.
            std::process::exit(1);
        }
    }
}
