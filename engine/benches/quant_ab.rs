//! Same-process A/B of the quantized kernels on one core, timed in thread CPU time (so other
//! processes on a shared machine do not count): each kernel path against the others on
//! expert-sized products, alternating paths round by round and keeping each one's best round.
//!
//! `cargo bench -p moeshard-engine --bench quant_ab` (Unix: thread CPU clock).
//! Optional filter argument: a type name (`q8_0`, `q4_k`, ...).

use std::hint::black_box;

use moeshard_engine::Mat;
use moeshard_engine::kernels::{self, Path};
use moeshard_engine::quant::{self, QType};

/// Nanoseconds this thread has run on a CPU (`CLOCK_THREAD_CPUTIME_ID`: exact, unlike
/// /proc/thread-self/schedstat, which advances in scheduler ticks on some kernels).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let paths: Vec<Path> = kernels::available_paths()
        .into_iter()
        .filter(|p| *p != Path::Scalar)
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    println!("one core, thread CPU time, best of 7 alternating rounds; GB/s of weights");
    for q in [
        QType::Q8_0,
        QType::Q4_0,
        QType::Q4_K,
        QType::Q5_K,
        QType::Q6_K,
    ] {
        if filter.as_deref().is_some_and(|f| f != q.name()) {
            continue;
        }
        // (rows, cols, tokens, matrices cycled through: many = from DRAM, like decode).
        for (rows, cols, n, copies) in [
            (512, 1024, 1, 1),
            (512, 1024, 1, 1000),
            (1024, 512, 1, 1),
            (512, 1024, 64, 1),
            (1024, 512, 64, 1),
            // Narrow experts of a wide model in prefill (~32 tokens each).
            (256, 2048, 32, 1),
            (2048, 256, 32, 1),
            // Their token tiles: 16, 8, 4 and the tails.
            (256, 2048, 16, 1),
            (256, 2048, 13, 1),
            (256, 2048, 8, 1),
            (256, 2048, 4, 1),
            (256, 2048, 3, 1),
            (256, 2048, 1, 1),
        ] {
            let mut one = Vec::new();
            quant::quantize(q, &values(rows * cols, 7), &mut one);
            let set: Vec<Vec<u8>> = (0..copies).map(|_| one.clone()).collect();
            let w = &set[0];
            let x = values(n * cols, 3);
            let mut out = vec![0f32; rows * n];
            let iters = (2_000_000 / (rows * cols * n / 1024)).clamp(3, 2000);
            let mut best = vec![u64::MAX; paths.len()];
            pool.install(|| {
                for _round in 0..7 {
                    for (i, &p) in paths.iter().enumerate() {
                        let t = thread_cpu_ns();
                        for k in 0..iters {
                            let w = Mat::Quant(q, &set[(k + 7 * i) % copies]);
                            kernels::matmul_with(p, w, rows, cols, &x, n, &mut out);
                            black_box(&out);
                        }
                        best[i] = best[i].min((thread_cpu_ns() - t) / iters as u64);
                    }
                }
            });
            let line: Vec<String> = paths
                .iter()
                .zip(&best)
                .map(|(p, &ns)| {
                    format!(
                        "{p:?} {:.1} us {:.1} GB/s",
                        ns as f64 / 1e3,
                        w.len() as f64 / ns as f64
                    )
                })
                .collect();
            let ratio = best[0] as f64 / *best.last().unwrap_or(&1) as f64;
            println!(
                "{} {rows}x{cols} n={n}{}: {} | first/last {ratio:.2}x",
                q.name(),
                if copies > 1 { " (DRAM)" } else { "" },
                line.join(" | ")
            );
        }
    }
}
