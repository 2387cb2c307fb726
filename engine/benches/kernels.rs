//! Kernel benchmarks: matvec weight streaming (GB/s, compare with the machine's memory bandwidth),
//! small-batch matmul (GFLOP/s, reported by criterion as "Gelem/s" with one element = one flop),
//! expert-sized matvecs and attention-sized dot products.
//!
//! `cargo bench -p moeshard-engine --bench kernels` (a few minutes). Filter with e.g.
//! `-- matvec/bf16`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use moeshard_engine::Mat;
use moeshard_engine::kernels::{self, Path};

const ROWS: usize = 4096;
const COLS: usize = 4096;
/// Total weight bytes the matvec benchmarks cycle through: far beyond any cache of this machine
/// (its L3 is reported as 260 MiB), so every matvec streams its weights from DRAM.
const FOOTPRINT: usize = 768 << 20;

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

/// Several distinct weight matrices of one dtype, used round-robin.
enum Set {
    F32(Vec<Vec<f32>>),
    F16(Vec<Vec<f16>>),
    BF16(Vec<Vec<bf16>>),
}

impl Set {
    fn new(dtype: &str, rows: usize, cols: usize, footprint: usize) -> Self {
        let esize = if dtype == "f32" { 4 } else { 2 };
        let count = footprint.div_ceil(rows * cols * esize).max(1);
        let base = values(rows * cols, 7);
        // Distinct contents per matrix are not needed for timing: copies with a shifted start.
        let rot = |i: usize| {
            let mut v = base.clone();
            v.rotate_left(i * 4099 % (rows * cols));
            v
        };
        match dtype {
            "f32" => Set::F32((0..count).map(rot).collect()),
            "f16" => Set::F16(
                (0..count)
                    .map(|i| rot(i).into_iter().map(f16::from_f32).collect())
                    .collect(),
            ),
            _ => Set::BF16(
                (0..count)
                    .map(|i| rot(i).into_iter().map(bf16::from_f32).collect())
                    .collect(),
            ),
        }
    }

    fn len(&self) -> usize {
        match self {
            Set::F32(v) => v.len(),
            Set::F16(v) => v.len(),
            Set::BF16(v) => v.len(),
        }
    }

    fn mat(&self, i: usize) -> Mat<'_> {
        match self {
            Set::F32(v) => Mat::F32(&v[i % v.len()]),
            Set::F16(v) => Mat::F16(&v[i % v.len()]),
            Set::BF16(v) => Mat::BF16(&v[i % v.len()]),
        }
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon pool")
}

fn simd_paths() -> Vec<Path> {
    kernels::available_paths()
        .into_iter()
        .filter(|p| *p != Path::Scalar)
        .collect()
}

fn matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for dtype in ["f32", "bf16", "f16"] {
        let set = Set::new(dtype, ROWS, COLS, FOOTPRINT);
        let esize = if dtype == "f32" { 4 } else { 2 };
        g.throughput(Throughput::BytesDecimal((ROWS * COLS * esize) as u64));
        let x = values(COLS, 3);
        let mut out = vec![0f32; ROWS];
        for path in simd_paths() {
            for threads in [1, 2] {
                let id = BenchmarkId::new(
                    format!("{dtype}/{path:?}"),
                    format!("{ROWS}x{COLS}/t{threads}"),
                );
                let p = pool(threads);
                let mut i = 0;
                g.bench_function(id, |b| {
                    p.install(|| {
                        b.iter(|| {
                            i += 1;
                            kernels::matmul_with(path, set.mat(i), ROWS, COLS, &x, 1, &mut out);
                            black_box(&out);
                        })
                    })
                });
            }
        }
        drop(set);
    }
    g.finish();
}

/// Block-quantized matvecs (decode) and small batches (prefill), in weight bytes per second.
fn quantized(c: &mut Criterion) {
    use moeshard_engine::quant::{self, QType};
    let mut g = c.benchmark_group("quant");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for q in [QType::Q8_0, QType::Q4_0, QType::Q4_K, QType::Q6_K] {
        let bytes = q.row_bytes(COLS).expect("whole blocks") * ROWS;
        let count = FOOTPRINT.div_ceil(bytes).max(1);
        let base = values(ROWS * COLS, 7);
        let mut one = Vec::new();
        quant::quantize(q, &base, &mut one);
        let set: Vec<Vec<u8>> = (0..count)
            .map(|i| {
                let mut v = one.clone();
                v.rotate_left(i * 7 * q.block_bytes() % one.len());
                v
            })
            .collect();
        for n in [1usize, 32] {
            g.throughput(Throughput::BytesDecimal(bytes as u64));
            let x = values(COLS * n, 3);
            let mut out = vec![0f32; ROWS * n];
            for path in simd_paths() {
                for threads in [1, 2] {
                    let id = BenchmarkId::new(
                        format!("{}/{path:?}", q.name()),
                        format!("{ROWS}x{COLS}/n{n}/t{threads}"),
                    );
                    let p = pool(threads);
                    let mut i = 0;
                    g.bench_function(id, |b| {
                        p.install(|| {
                            b.iter(|| {
                                i += 1;
                                let w = Mat::Quant(q, &set[i % set.len()]);
                                kernels::matmul_with(path, w, ROWS, COLS, &x, n, &mut out);
                                black_box(&out);
                            })
                        })
                    });
                }
            }
        }
    }
    g.finish();
}

fn batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let path = kernels::best_path();
    // 4096 x 4096, and 3072 x 1024 (the fused QKV projection of a hidden-1024 model).
    for (rows, cols) in [(ROWS, COLS), (3072, 1024)] {
        for dtype in ["f32", "bf16"] {
            // Out of cache like the matvecs, so small batches show the weight-streaming cost too.
            let set = Set::new(dtype, rows, cols, FOOTPRINT / 2);
            for n in [4, 16, 64] {
                let x = values(n * cols, 5);
                let mut out = vec![0f32; n * rows];
                g.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
                for threads in [1, 2] {
                    let id = BenchmarkId::new(
                        format!("{dtype}/{path:?}/n{n}"),
                        format!("{rows}x{cols}/t{threads}"),
                    );
                    let p = pool(threads);
                    let mut i = 0;
                    g.bench_function(id, |b| {
                        p.install(|| {
                            b.iter(|| {
                                i += 1;
                                kernels::matmul_with(path, set.mat(i), rows, cols, &x, n, &mut out);
                                black_box(&out);
                            })
                        })
                    });
                }
            }
        }
    }
    g.finish();
}

/// MoE expert shapes (hidden 1024, expert width 512), bf16, one token: cache-resident, so this
/// mostly measures per-call and threading overhead.
fn expert(c: &mut Criterion) {
    let mut g = c.benchmark_group("expert");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let path = kernels::best_path();
    for (rows, cols) in [(512, 1024), (1024, 512)] {
        let set = Set::new("bf16", rows, cols, 16 << 20);
        let x = values(cols, 9);
        let mut out = vec![0f32; rows];
        g.throughput(Throughput::BytesDecimal((rows * cols * 2) as u64));
        for threads in [1, 2] {
            let p = pool(threads);
            let mut i = 0;
            let id = BenchmarkId::new(
                format!("bf16/{path:?}"),
                format!("{rows}x{cols}/t{threads}"),
            );
            g.bench_function(id, |b| {
                p.install(|| {
                    b.iter(|| {
                        i += 1;
                        kernels::matmul_with(path, set.mat(i), rows, cols, &x, 1, &mut out);
                        black_box(&out);
                    })
                })
            });
        }
        assert!(set.len() > 1);
    }
    g.finish();
}

fn dot(c: &mut Criterion) {
    let mut g = c.benchmark_group("dot");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));
    let a = values(128, 1);
    let b = values(128, 2);
    for path in kernels::available_paths() {
        g.bench_function(BenchmarkId::new("128", format!("{path:?}")), |bench| {
            bench.iter(|| kernels::dot_with(path, black_box(&a), black_box(&b)))
        });
    }
    g.finish();
}

criterion_group!(benches, matvec, quantized, batch, expert, dot);
criterion_main!(benches);
