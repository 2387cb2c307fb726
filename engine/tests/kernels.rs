//! Every kernel path available on this CPU against the scalar reference, bit for bit.

use half::{bf16, f16};
use moeshard_engine::Mat;
use moeshard_engine::kernels::{self, Path, scalar};
use proptest::prelude::*;

/// xorshift32: deterministic test data without extra dependencies.
struct Rng(u32);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng((seed as u32 ^ (seed >> 32) as u32).wrapping_mul(2_654_435_761) | 1)
    }
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

/// The same weights in the three stored dtypes.
struct Weights {
    f32: Vec<f32>,
    f16: Vec<f16>,
    bf16: Vec<bf16>,
}

impl Weights {
    fn new(v: Vec<f32>) -> Self {
        Weights {
            f16: v.iter().map(|&x| f16::from_f32(x)).collect(),
            bf16: v.iter().map(|&x| bf16::from_f32(x)).collect(),
            f32: v,
        }
    }
    fn mats(&self) -> [Mat<'_>; 3] {
        [
            Mat::F32(&self.f32),
            Mat::F16(&self.f16),
            Mat::BF16(&self.bf16),
        ]
    }
}

fn dtype(m: &Mat<'_>) -> &'static str {
    match m {
        Mat::F32(_) => "f32",
        Mat::F16(_) => "f16",
        Mat::BF16(_) => "bf16",
        Mat::Quant(..) => "quant",
    }
}

fn all_paths() -> Vec<Path> {
    kernels::available_paths()
}

fn reference(w: Mat<'_>, rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    scalar::matmul(w, rows, cols, x, n, &mut out);
    out
}

fn run(path: Path, w: Mat<'_>, rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows * n];
    kernels::matmul_with(path, w, rows, cols, x, n, &mut out);
    out
}

#[track_caller]
fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: element {i}: got {g:e} ({:#010x}), want {w:e} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

#[test]
fn this_machine_has_all_paths() {
    let paths = all_paths();
    assert_eq!(paths[0], Path::Scalar);
    assert!(paths.contains(&kernels::best_path()));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert!(paths.contains(&Path::Avx2) && paths.contains(&Path::Avx512));
    }
    eprintln!("kernel paths: {paths:?}, best {:?}", kernels::best_path());
}

#[test]
fn matmul_matches_reference_on_every_path() {
    let mut rng = Rng::new(1);
    let mut col_choices: Vec<usize> = (1..=40).collect();
    col_choices.extend([47, 48, 63, 64, 65, 100, 127, 128, 129, 255, 256, 257, 1000]);
    for case in 0..120 {
        let rows = 1 + rng.below(23);
        let cols = col_choices[rng.below(col_choices.len())];
        let n_tokens = 1 + case % 9;
        let w = Weights::new(rng.vec(rows * cols));
        let x = rng.vec(n_tokens * cols);
        for mat in w.mats() {
            let want = reference(mat, rows, cols, &x, n_tokens);
            for &path in &all_paths() {
                let got = run(path, mat, rows, cols, &x, n_tokens);
                let what = format!(
                    "{path:?} {} rows={rows} cols={cols} n={n_tokens}",
                    dtype(&mat)
                );
                assert_bits(&got, &want, &what);
            }
        }
    }
}

#[test]
fn batch_rows_equal_single_rows() {
    let mut rng = Rng::new(2);
    for &(rows, cols) in &[(7, 33), (16, 64), (9, 100), (37, 250)] {
        let w = Weights::new(rng.vec(rows * cols));
        for n_tokens in 1..=9 {
            let x = rng.vec(n_tokens * cols);
            for mat in w.mats() {
                for &path in &all_paths() {
                    let batch = run(path, mat, rows, cols, &x, n_tokens);
                    for t in 0..n_tokens {
                        let single = run(path, mat, rows, cols, &x[t * cols..(t + 1) * cols], 1);
                        let what =
                            format!("{path:?} {} {rows}x{cols} n={n_tokens} t={t}", dtype(&mat));
                        assert_bits(&batch[t * rows..(t + 1) * rows], &single, &what);
                    }
                }
            }
        }
    }
}

/// Long rows and more tokens than one tile: the kernels block along k and spill lane sums.
#[test]
fn k_blocked_matmul_matches_reference() {
    let mut rng = Rng::new(9);
    for &(rows, cols, n_tokens) in &[(5, 1040, 7), (9, 1100, 13), (3, 2049, 8), (6, 3000, 4)] {
        let w = Weights::new(rng.vec(rows * cols));
        let x = rng.vec(n_tokens * cols);
        for mat in w.mats() {
            let want = reference(mat, rows, cols, &x, n_tokens);
            for &path in &all_paths() {
                let got = run(path, mat, rows, cols, &x, n_tokens);
                let what = format!("{path:?} {} {rows}x{cols} n={n_tokens}", dtype(&mat));
                assert_bits(&got, &want, &what);
                let single = run(path, mat, rows, cols, &x[cols..2 * cols], 1);
                assert_bits(&got[rows..2 * rows], &single, &format!("{what} single"));
            }
        }
    }
}

/// Large enough to run in parallel; the result must not depend on the thread count.
#[test]
fn parallel_split_does_not_change_bits() {
    let mut rng = Rng::new(3);
    let (rows, cols) = (301, 517);
    let w = Weights::new(rng.vec(rows * cols));
    for n_tokens in [1, 5, 13] {
        let x = rng.vec(n_tokens * cols);
        for mat in w.mats() {
            let want = reference(mat, rows, cols, &x, n_tokens);
            for &path in &all_paths() {
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .expect("thread pool");
                    let got = pool.install(|| run(path, mat, rows, cols, &x, n_tokens));
                    let what = format!("{path:?} {} n={n_tokens} threads={threads}", dtype(&mat));
                    assert_bits(&got, &want, &what);
                }
            }
        }
    }
}

#[test]
fn default_entry_points_match_reference() {
    let mut rng = Rng::new(4);
    let (rows, cols, n) = (67, 301, 4);
    let w = Weights::new(rng.vec(rows * cols));
    let x = rng.vec(n * cols);
    for mat in w.mats() {
        let mut got = vec![0f32; rows * n];
        kernels::matmul(mat, rows, cols, &x, n, &mut got);
        assert_bits(&got, &reference(mat, rows, cols, &x, n), "matmul");
    }
    let a = rng.vec(cols);
    assert_eq!(
        kernels::dot(&a, &x[..cols]).to_bits(),
        scalar::dot_f32(&a, &x[..cols]).to_bits()
    );
}

#[test]
fn empty_shapes() {
    for &path in &all_paths() {
        let mut out = vec![7f32; 3];
        kernels::matmul_with(path, Mat::F32(&[]), 3, 0, &[], 1, &mut out);
        assert_eq!(out, [0.0; 3]);
        let mut none: [f32; 0] = [];
        kernels::matmul_with(path, Mat::F32(&[]), 0, 5, &[0.0; 10], 2, &mut none);
        kernels::matmul_with(path, Mat::F32(&[1.0; 10]), 2, 5, &[], 0, &mut none);
        assert_eq!(kernels::dot_with(path, &[], &[]).to_bits(), 0);
    }
}

/// Zeros of both signs, subnormals, huge values (overflow to infinity) and infinities.
#[test]
fn special_values_match_reference() {
    let mut rng = Rng::new(5);
    let specials = [
        0.0,
        -0.0,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        1e-30,
        -1e-30,
        3e38,
        -3e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0,
        -1.0,
    ];
    for case in 0..200 {
        let rows = 1 + rng.below(9);
        let cols = 1 + rng.below(70);
        let n = 1 + rng.below(5);
        let pick = |rng: &mut Rng| {
            if case % 3 == 0 || rng.below(4) == 0 {
                specials[rng.below(specials.len())]
            } else {
                rng.unit() * 1e-20
            }
        };
        let w = Weights::new((0..rows * cols).map(|_| pick(&mut rng)).collect());
        let x: Vec<f32> = (0..n * cols).map(|_| pick(&mut rng)).collect();
        for mat in w.mats() {
            let want = reference(mat, rows, cols, &x, n);
            for &path in &all_paths() {
                let got = run(path, mat, rows, cols, &x, n);
                assert_bits(
                    &got,
                    &want,
                    &format!("{path:?} {} case {case}", dtype(&mat)),
                );
            }
        }
    }
}

/// Products that round to -0 leave their lanes at -0; lanes without columns stay +0, so the result
/// is -0 exactly when all 16 lanes saw a column. Every path must get the sign right.
#[test]
fn negative_zero_survives() {
    for cols in [1, 15, 16, 17, 40] {
        let w = vec![-1e-30f32; cols];
        let x = vec![1e-30f32; cols];
        let want = if cols >= 16 { -0f32 } else { 0f32 };
        assert_eq!(scalar::dot_f32(&w, &x).to_bits(), want.to_bits());
        for &path in &all_paths() {
            let mut out = [1f32];
            kernels::matmul_with(path, Mat::F32(&w), 1, cols, &x, 1, &mut out);
            assert_eq!(out[0].to_bits(), want.to_bits(), "{path:?} cols={cols}");
            assert_eq!(kernels::dot_with(path, &w, &x).to_bits(), want.to_bits());
        }
    }
}

#[test]
fn dot_matches_reference() {
    let mut rng = Rng::new(6);
    for n in (0..300).chain([1000, 4096, 4097]) {
        let a = rng.vec(n);
        let b = rng.vec(n);
        let want = scalar::dot_f32(&a, &b);
        for &path in &all_paths() {
            assert_eq!(
                kernels::dot_with(path, &a, &b).to_bits(),
                want.to_bits(),
                "{path:?} n={n}"
            );
        }
    }
}

#[test]
fn axpy_matches_reference() {
    let mut rng = Rng::new(7);
    for n in (0..70).chain([1000, 1001]) {
        let x = rng.vec(n);
        let y0 = rng.vec(n);
        let a = rng.unit() * 3.0;
        let mut want = y0.clone();
        for (y, x) in want.iter_mut().zip(&x) {
            *y = a.mul_add(*x, *y);
        }
        for &path in &all_paths() {
            let mut y = y0.clone();
            kernels::axpy_with(path, a, &x, &mut y);
            assert_bits(&y, &want, &format!("{path:?} n={n}"));
        }
        let mut y = y0.clone();
        kernels::axpy(a, &x, &mut y);
        assert_bits(&y, &want, "axpy");
    }
}

#[test]
fn silu_mul_is_the_same_everywhere() {
    let mut rng = Rng::new(8);
    for n in (0..70).chain([513, 4096]) {
        let gate: Vec<f32> = (0..n).map(|_| rng.unit() * 30.0).collect();
        let up = rng.vec(n);
        let want: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| kernels::silu(*g) * u)
            .collect();
        for &path in &all_paths() {
            let mut g = gate.clone();
            kernels::silu_mul_with(path, &mut g, &up);
            assert_bits(&g, &want, &format!("{path:?} n={n}"));
        }
        let mut g = gate.clone();
        kernels::silu_mul(&mut g, &up);
        assert_bits(&g, &want, "silu_mul");
    }
    // Extremes, including overflow of exp(-x).
    let gate = vec![
        -200.0, -88.0, -20.0, -1e-30, 0.0, -0.0, 1e-30, 20.0, 88.0, 200.0, 1e30,
    ];
    let up = vec![1.0; gate.len()];
    let mut want = gate.clone();
    scalar::silu_mul(&mut want, &up);
    for &path in &all_paths() {
        let mut g = gate.clone();
        kernels::silu_mul_with(path, &mut g, &up);
        assert_bits(&g, &want, &format!("{path:?} extremes"));
    }
    assert!(want.iter().all(|v| v.is_finite()));
}

/// Finite f32 values of any magnitude, with a bias towards awkward ones.
fn any_finite() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -1.0f32..1.0,
        1 => any::<f32>().prop_filter("finite", |v| v.is_finite()),
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => -1e-38f32..1e-38,
    ]
}

fn matrix_case() -> impl Strategy<Value = (usize, usize, usize, Vec<f32>, Vec<f32>)> {
    (1usize..8, 1usize..80, 1usize..6).prop_flat_map(|(rows, cols, n)| {
        (
            Just(rows),
            Just(cols),
            Just(n),
            prop::collection::vec(any_finite(), rows * cols),
            prop::collection::vec(any_finite(), n * cols),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every path, every dtype, arbitrary finite data: the reference bits.
    #[test]
    fn prop_paths_agree((rows, cols, n, w, x) in matrix_case()) {
        let w = Weights::new(w);
        for mat in w.mats() {
            let want = reference(mat, rows, cols, &x, n);
            for &path in &all_paths() {
                let got = run(path, mat, rows, cols, &x, n);
                for (g, r) in got.iter().zip(&want) {
                    prop_assert!(g.to_bits() == r.to_bits() || (g.is_nan() && r.is_nan()),
                        "{path:?} {}: {g:e} vs {r:e}", dtype(&mat));
                }
            }
        }
    }

    /// A matmul row is exactly the dot product of its weight row and token.
    #[test]
    fn prop_matmul_is_rowwise_dot((rows, cols, n, w, x) in matrix_case()) {
        let got = run(kernels::best_path(), Mat::F32(&w), rows, cols, &x, n);
        for t in 0..n {
            for r in 0..rows {
                let d = kernels::dot(&w[r * cols..(r + 1) * cols], &x[t * cols..(t + 1) * cols]);
                let g = got[t * rows + r];
                prop_assert!(g.to_bits() == d.to_bits() || (g.is_nan() && d.is_nan()));
            }
        }
    }

    /// The canonical dot product is exactly symmetric (a fused multiply-add commutes in its
    /// product), and scaling by a power of two scales it exactly (barring overflow and underflow).
    #[test]
    fn prop_dot_symmetric_and_scales(v in prop::collection::vec((-1.0f32..1.0, -1.0f32..1.0), 0..200)) {
        let (a, b): (Vec<f32>, Vec<f32>) = v.into_iter().unzip();
        let d = kernels::dot(&a, &b);
        prop_assert_eq!(d.to_bits(), kernels::dot(&b, &a).to_bits());
        let a4: Vec<f32> = a.iter().map(|v| v * 4.0).collect();
        prop_assert_eq!((d * 4.0).to_bits(), kernels::dot(&a4, &b).to_bits());
    }
}

mod quantized {
    use moeshard_engine::kernels::{self, Path};
    use moeshard_engine::quant::{self, ALL, QActs, QType};
    use moeshard_engine::tensor::Mat;
    use proptest::prelude::*;

    /// Random blocks of `q`: random quant bytes, with scales replaced by finite f16 values of
    /// moderate size (random bytes would make NaNs and infinities).
    fn random_blocks(q: QType, n_blocks: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut out: Vec<u8> = (0..n_blocks * q.block_bytes())
            .map(|_| next() as u8)
            .collect();
        let scale = |v: u64| half::f16::from_f32(((v % 1000) as f32 - 500.0) / 50_000.0).to_bits();
        for blk in out.chunks_exact_mut(q.block_bytes()) {
            let offsets: &[usize] = match q {
                QType::Q8_0 | QType::Q4_0 => &[0],
                QType::Q4_K | QType::Q5_K => &[0, 2],
                QType::Q6_K => &[208],
            };
            for &o in offsets {
                blk[o..o + 2].copy_from_slice(&scale(next()).to_le_bytes());
            }
        }
        out
    }

    fn acts(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.61 + seed as f32 * 1.3).sin() * 3.0)
            .collect()
    }

    /// Largest quant values (every bit set) against activations at the ends of the 8-bit range:
    /// the SIMD paths' 16-bit intermediate sums must neither overflow nor saturate.
    #[test]
    fn extreme_blocks_and_activations_match_the_reference() {
        for q in ALL {
            let (rows, cols, n) = (5, 512, 9);
            let mut w = vec![0xFFu8; rows * cols / q.block_elems() * q.block_bytes()];
            let one = half::f16::from_f32(0.5).to_bits().to_le_bytes();
            for blk in w.chunks_exact_mut(q.block_bytes()) {
                let offsets: &[usize] = match q {
                    QType::Q8_0 | QType::Q4_0 => &[0],
                    QType::Q4_K | QType::Q5_K => &[0, 2],
                    QType::Q6_K => &[208],
                };
                for &o in offsets {
                    blk[o..o + 2].copy_from_slice(&one);
                }
            }
            // Alternating signs per token, every value at the block maximum.
            let x: Vec<f32> = (0..n * cols)
                .map(|i| if (i / cols) % 2 == 0 { 3.0 } else { -3.0 })
                .collect();
            let mut want = vec![0f32; rows * n];
            kernels::matmul_with(
                Path::Scalar,
                Mat::Quant(q, &w),
                rows,
                cols,
                &x,
                n,
                &mut want,
            );
            assert!(
                want.iter().all(|v| v.is_finite() && *v != 0.0),
                "{q:?}: {want:?}"
            );
            for path in kernels::available_paths() {
                let mut got = vec![0f32; rows * n];
                kernels::matmul_with(path, Mat::Quant(q, &w), rows, cols, &x, n, &mut got);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{q:?} on {path:?}");
            }
        }
    }

    #[test]
    fn every_path_matches_the_reference_bit_for_bit() {
        for q in ALL {
            for &(rows, cols, n) in &[
                (1, 256, 1),
                (7, 512, 1),
                (33, 1024, 3),
                (130, 768, 7),
                (5, 256, 20),
                (9, 512, 13),
            ] {
                let w = random_blocks(q, rows * cols / q.block_elems(), (rows * cols + n) as u64);
                let x = acts(n * cols, rows as u64);
                let a = QActs::new(q, &x, cols);
                let rb = q.row_bytes(cols).unwrap();
                let mut want = vec![0f32; rows * n];
                for t in 0..n {
                    let (xq, xd, s16) = a.token(t);
                    for r in 0..rows {
                        want[t * rows + r] =
                            quant::dot_row_ref(q, &w[r * rb..(r + 1) * rb], xq, xd, s16);
                    }
                }
                for path in kernels::available_paths() {
                    for threads in [1, 2, 3] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        let mut got = vec![0f32; rows * n];
                        pool.install(|| {
                            kernels::matmul_with(
                                path,
                                Mat::Quant(q, &w),
                                rows,
                                cols,
                                &x,
                                n,
                                &mut got,
                            )
                        });
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                e.to_bits(),
                                "{q:?} {path:?} {rows}x{cols} n={n} threads={threads} at {i}: {g} vs {e}"
                            );
                        }
                    }
                }
                // A token alone gives the same bits as inside the batch.
                if n > 1 {
                    let mut alone = vec![0f32; rows];
                    kernels::matmul(
                        Mat::Quant(q, &w),
                        rows,
                        cols,
                        &x[cols..2 * cols],
                        1,
                        &mut alone,
                    );
                    assert_eq!(alone, want[rows..2 * rows]);
                }
            }
        }
    }

    #[test]
    fn quantized_product_is_close_to_the_dequantized_product() {
        let (rows, cols) = (16, 1024);
        for q in ALL {
            let w = random_blocks(q, rows * cols / q.block_elems(), 77);
            let mut wd = vec![0f32; rows * cols];
            quant::dequantize(q, &w, &mut wd);
            let x = acts(cols, 5);
            let mut got = vec![0f32; rows];
            kernels::matmul(Mat::Quant(q, &w), rows, cols, &x, 1, &mut got);
            let mut want = vec![0f32; rows];
            kernels::matmul(Mat::F32(&wd), rows, cols, &x, 1, &mut want);
            for r in 0..rows {
                let mag: f32 = (0..cols).map(|k| (wd[r * cols + k] * x[k]).abs()).sum();
                // 8-bit activations: each product is off by at most half a step of its block.
                assert!(
                    (got[r] - want[r]).abs() <= 0.01 * mag + 1e-6,
                    "{q:?} row {r}: {} vs {}",
                    got[r],
                    want[r]
                );
            }
        }
    }

    #[test]
    fn serial_products_equal_split_products() {
        let (rows, cols) = (512, 1024);
        for q in ALL {
            let w = random_blocks(q, rows * cols / q.block_elems(), 9);
            let x = acts(cols * 3, 4);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            let (mut split, mut whole) = (vec![0f32; rows * 3], vec![0f32; rows * 3]);
            pool.install(|| {
                kernels::matmul(Mat::Quant(q, &w), rows, cols, &x, 3, &mut split);
                kernels::serial(|| {
                    kernels::matmul(Mat::Quant(q, &w), rows, cols, &x, 3, &mut whole)
                });
            });
            assert_eq!(split, whole, "{q:?}");
        }
    }

    /// Query, key and value projections of mixed formats (two of one quantized type, one of
    /// another, one float) in one call: the same bits as one product each, on any thread count.
    #[test]
    fn many_products_equal_one_each() {
        let cols = 512;
        for &n in &[1usize, 3, 9] {
            let x = acts(n * cols, 21);
            let (wq, wk) = (
                random_blocks(QType::Q4_K, 64 * cols / 256, 5),
                random_blocks(QType::Q4_K, 16 * cols / 256, 6),
            );
            let wv = random_blocks(QType::Q6_K, 16 * cols / 256, 7);
            let wf = acts(8 * cols, 8);
            let mats = [
                (Mat::Quant(QType::Q4_K, &wq), 64),
                (Mat::Quant(QType::Q6_K, &wv), 16),
                (Mat::F32(&wf), 8),
                (Mat::Quant(QType::Q4_K, &wk), 16),
            ];
            let want: Vec<Vec<f32>> = mats
                .iter()
                .map(|&(w, rows)| {
                    let mut y = vec![0f32; rows * n];
                    kernels::matmul(w, rows, cols, &x, n, &mut y);
                    y
                })
                .collect();
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got: Vec<Vec<f32>> = mats.iter().map(|&(_, r)| vec![0f32; r * n]).collect();
                pool.install(|| {
                    let mut jobs: Vec<(Mat<'_>, usize, &mut [f32])> = mats
                        .iter()
                        .zip(got.iter_mut())
                        .map(|(&(w, rows), y)| (w, rows, y.as_mut_slice()))
                        .collect();
                    kernels::matmul_many(&mut jobs, cols, &x, n);
                });
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        bits(g),
                        bits(w),
                        "matrix {k}, {n} tokens, {threads} threads"
                    );
                }
            }
        }
    }

    /// Activations quantized once for a batch and gathered by token are the bytes of quantizing
    /// the gathered rows alone, whether the batch was quantized on one thread or split over
    /// several; products on them are the bits of the products on the rows.
    #[test]
    fn quantized_once_and_gathered_equals_quantized_per_product() {
        for q in ALL {
            // 2048 columns x 40 tokens is past the size quantized in parallel.
            for &(rows, cols, n) in &[(16, 256, 3), (24, 2048, 40)] {
                let x = acts(n * cols, 21);
                let serial = kernels::serial(|| QActs::new(q, &x, cols));
                for threads in [2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let par = pool.install(|| QActs::new(q, &x, cols));
                    assert_eq!(par.q, serial.q, "{q:?} n={n} t={threads}");
                    assert_eq!(par.d, serial.d, "{q:?} n={n} t={threads}");
                    assert_eq!(par.sums16, serial.sums16, "{q:?} n={n} t={threads}");
                }
                assert_eq!(serial.n_tokens(), n);
                assert!(serial.fits(q));
                let tokens: Vec<usize> = vec![n - 1, 0, n - 1, 1, n / 2];
                let picked: Vec<f32> = tokens
                    .iter()
                    .flat_map(|&t| x[t * cols..(t + 1) * cols].iter().copied())
                    .collect();
                let gathered = serial.gather(&tokens);
                let own = QActs::new(q, &picked, cols);
                assert_eq!(gathered.q, own.q, "{q:?}");
                assert_eq!(gathered.d, own.d, "{q:?}");
                assert_eq!(gathered.sums16, own.sums16, "{q:?}");
                assert_eq!(gathered.n_tokens(), tokens.len());
                let nb = rows * cols / q.block_elems();
                let (w1, w2) = (random_blocks(q, nb, 3), random_blocks(q, nb, 4));
                let m = tokens.len();
                let (mut want1, mut want2) = (vec![0f32; rows * m], vec![0f32; rows * m]);
                kernels::matmul(Mat::Quant(q, &w1), rows, cols, &picked, m, &mut want1);
                kernels::matmul(Mat::Quant(q, &w2), rows, cols, &picked, m, &mut want2);
                let (mut got1, mut got2) = (vec![0f32; rows * m], vec![0f32; rows * m]);
                kernels::matmul_many_acts(
                    &mut [
                        (Mat::Quant(q, &w1), rows, &mut got1),
                        (Mat::Quant(q, &w2), rows, &mut got2),
                    ],
                    &gathered,
                );
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got1), bits(&want1), "{q:?} {rows}x{cols}");
                assert_eq!(bits(&got2), bits(&want2), "{q:?} {rows}x{cols}");
            }
        }
        // Activations of the 32-blocks do not fit the K types and the other way round.
        let x = acts(256, 1);
        assert!(!QActs::new(QType::Q8_0, &x, 256).fits(QType::Q4_K));
        assert!(!QActs::new(QType::Q6_K, &x, 256).fits(QType::Q4_0));
        assert!(QActs::new(QType::Q4_K, &x, 256).fits(QType::Q6_K));
    }

    #[test]
    fn gate_up_pair_equals_two_products() {
        for q in ALL {
            for &(rows, cols, n) in &[(64, 512, 1), (130, 256, 5), (8, 1024, 64)] {
                let nb = rows * cols / q.block_elems();
                let (w1, w2) = (random_blocks(q, nb, 3), random_blocks(q, nb, 4));
                let x = acts(n * cols, 11);
                let mut want1 = vec![0f32; rows * n];
                let mut want2 = vec![0f32; rows * n];
                kernels::matmul(Mat::Quant(q, &w1), rows, cols, &x, n, &mut want1);
                kernels::matmul(Mat::Quant(q, &w2), rows, cols, &x, n, &mut want2);
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut got1 = vec![0f32; rows * n];
                    let mut got2 = vec![0f32; rows * n];
                    pool.install(|| {
                        kernels::matmul_pair(
                            Mat::Quant(q, &w1),
                            Mat::Quant(q, &w2),
                            rows,
                            cols,
                            &x,
                            n,
                            &mut got1,
                            &mut got2,
                        )
                    });
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got1),
                        bits(&want1),
                        "{q:?} {rows}x{cols} n={n} t={threads}"
                    );
                    assert_eq!(
                        bits(&got2),
                        bits(&want2),
                        "{q:?} {rows}x{cols} n={n} t={threads}"
                    );
                }
            }
        }
        // Different types fall back to two products.
        let (rows, cols) = (16, 256);
        let w1 = random_blocks(QType::Q8_0, rows * cols / 32, 5);
        let w2 = random_blocks(QType::Q4_K, rows * cols / 256, 6);
        let x = acts(cols, 2);
        let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
        kernels::matmul_pair(
            Mat::Quant(QType::Q8_0, &w1),
            Mat::Quant(QType::Q4_K, &w2),
            rows,
            cols,
            &x,
            1,
            &mut a,
            &mut b,
        );
        let mut want = vec![0f32; rows];
        kernels::matmul(Mat::Quant(QType::Q4_K, &w2), rows, cols, &x, 1, &mut want);
        assert_eq!(b, want);
        kernels::matmul(Mat::Quant(QType::Q8_0, &w1), rows, cols, &x, 1, &mut want);
        assert_eq!(a, want);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn proptest_paths_agree(qi in 0usize..5, rows in 1usize..9, nb in 1usize..5, n in 1usize..12, seed in any::<u64>()) {
            let q = ALL[qi];
            let cols = nb * q.block_elems();
            let w = random_blocks(q, rows * nb, seed);
            let x = acts(n * cols, seed % 1000);
            let mut want = vec![0f32; rows * n];
            kernels::matmul_with(Path::Scalar, Mat::Quant(q, &w), rows, cols, &x, n, &mut want);
            for path in kernels::available_paths() {
                let mut got = vec![0f32; rows * n];
                kernels::matmul_with(path, Mat::Quant(q, &w), rows, cols, &x, n, &mut got);
                prop_assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
        }
    }
}
