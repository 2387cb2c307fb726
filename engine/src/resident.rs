//! Anonymous memory for the weights a process computes with.
//!
//! Reading weights through the file mapping costs decode speed: on the benchmark model a decode
//! step streamed ~20% more slowly from page-cache pages than from the same bytes copied into
//! anonymous memory, and more again without 2 MiB pages (one TLB entry and one hardware-prefetch
//! stream restart per 4 KiB page otherwise). So by default a checkpoint copies each weight matrix
//! it hands to a layer into a [`ResidentArena`]: large anonymous mappings, aligned to 2 MiB and
//! advised as huge pages, filled by bump allocation. The file's own pages are then released from
//! the process (they stay in the page cache as clean, reclaimable pages).
//!
//! The arena has a budget (what the system reports as available when it is made, less a
//! reserve); a tensor that would go beyond it stays in the file mapping, with one warning, so a
//! model larger than memory still loads as before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::{MmapMut, MmapOptions, MmapRaw};

/// Bytes kept free for everything else when the budget is derived from the system's memory.
const RESERVE: u64 = 1 << 30;
/// Size of one mapping (larger for a tensor that needs more).
const CHUNK: usize = 256 << 20;
/// Huge page size the mappings are aligned to.
const HUGE: usize = 2 << 20;
/// Alignment of every tensor in the arena (a cache line; more than any dtype needs).
const ALIGN: usize = 64;

/// Where the process's weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoadMode {
    /// Copy into anonymous (huge-page) memory while the system has room; the file mapping after.
    #[default]
    Memory,
    /// Read every weight through the file mapping (pages shared with the page cache).
    Mmap,
}

/// One mapping of the arena.
pub(crate) struct Chunk {
    map: MmapRaw,
    /// Offset of the first 2 MiB boundary in `map`.
    base: usize,
    /// Usable bytes from `base` (whole huge pages).
    len: usize,
    /// Bytes handed out of this chunk, given back to `live` when the chunk goes (its last
    /// tensor dropped: a worker's old assignment, say).
    given: AtomicU64,
    live: Arc<AtomicU64>,
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.live
            .fetch_sub(self.given.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl Chunk {
    /// The `len` bytes at `start` (relative to the aligned base).
    pub(crate) fn slice(&self, start: usize, len: usize) -> &[u8] {
        assert!(start + len <= self.len, "range in chunk");
        // SAFETY: in bounds (checked); a range is written once, by `ResidentArena::copy`,
        // before the tensor that reads it exists, and never again.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.base + start), len) }
    }
}

struct State {
    chunk: Option<Arc<Chunk>>,
    /// Bytes handed out of `chunk`.
    used: usize,
}

/// Bump-allocated anonymous memory holding copies of weights; see the module docs.
pub struct ResidentArena {
    budget: u64,
    /// Bytes handed out of the chunks that are still alive.
    live: Arc<AtomicU64>,
    state: Mutex<State>,
    warned: AtomicBool,
}

impl std::fmt::Debug for ResidentArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ResidentArena(budget {}, used {})",
            self.budget,
            self.used()
        )
    }
}

impl ResidentArena {
    /// An arena that may hold up to `budget` bytes.
    pub fn with_budget(budget: u64) -> Self {
        ResidentArena {
            budget,
            live: Arc::new(AtomicU64::new(0)),
            state: Mutex::new(State {
                chunk: None,
                used: 0,
            }),
            warned: AtomicBool::new(false),
        }
    }

    /// An arena whose budget is the memory the system has available now, less a reserve.
    pub fn from_system() -> Self {
        Self::with_budget(available_memory().saturating_sub(RESERVE))
    }

    /// Bytes of the copies held (those in chunks some tensor still uses).
    pub fn used(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// A copy of `bytes` in the arena as (chunk, offset), or `None` when it would go beyond the
    /// budget or the system refuses the mapping (the caller keeps the original).
    pub(crate) fn copy(&self, name: &str, bytes: &[u8]) -> Option<(Arc<Chunk>, usize)> {
        let len = bytes.len();
        let (chunk, start) = {
            let mut s = self.state.lock().ok()?;
            if self.used().saturating_add(len as u64) > self.budget {
                drop(s);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        tensor = name,
                        budget_bytes = self.budget,
                        "weights beyond the memory budget stay in the file mapping (slower)"
                    );
                }
                return None;
            }
            let fits = s.chunk.as_ref().is_some_and(|c| s.used + len <= c.len);
            if !fits {
                match new_chunk(len, &self.live) {
                    Ok(c) => {
                        s.chunk = Some(Arc::new(c));
                        s.used = 0;
                    }
                    Err(e) => {
                        drop(s);
                        if !self.warned.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                tensor = name,
                                error = %e,
                                "no anonymous memory for weights: they stay in the file mapping"
                            );
                        }
                        return None;
                    }
                }
            }
            let start = s.used;
            s.used = (start + len).next_multiple_of(ALIGN);
            let c = s.chunk.clone().expect("chunk set above");
            c.given.fetch_add(len as u64, Ordering::Relaxed);
            self.live.fetch_add(len as u64, Ordering::Relaxed);
            (c, start)
        };
        // SAFETY: `start..start + len` lies in the chunk (checked by `fits` or a fresh chunk of
        // at least `len`) and was handed out only here, under the lock, so no one else writes or
        // reads it until this copy is done.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                chunk.map.as_mut_ptr().add(chunk.base + start),
                len,
            );
        }
        Some((chunk, start))
    }
}

/// A fresh mapping of at least `len` usable bytes from a 2 MiB boundary, advised as huge pages.
fn new_chunk(len: usize, live: &Arc<AtomicU64>) -> std::io::Result<Chunk> {
    let size = len.max(CHUNK).next_multiple_of(HUGE);
    let map: MmapMut = MmapOptions::new().len(size + HUGE).map_anon()?;
    let base = (map.as_ptr() as usize).next_multiple_of(HUGE) - map.as_ptr() as usize;
    #[cfg(target_os = "linux")]
    {
        // Best effort: without it the copies still work, on 4 KiB pages.
        let _ = map.advise_range(memmap2::Advice::HugePage, base, size);
    }
    Ok(Chunk {
        map: MmapRaw::from(map),
        base,
        len: size,
        given: AtomicU64::new(0),
        live: live.clone(),
    })
}

/// Memory the system can give this process now, in bytes (Linux: `MemAvailable`; elsewhere the
/// physical memory).
pub fn available_memory() -> u64 {
    #[cfg(target_os = "linux")]
    if let Ok(s) = std::fs::read_to_string("/proc/meminfo")
        && let Some(kb) = s
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        return kb * 1024;
    }
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        pages as u64 * size as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_exact_aligned_and_disjoint() {
        let a = ResidentArena::with_budget(1 << 30);
        let x: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let y: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 253) as u8).collect();
        let (cx, sx) = a.copy("x", &x).unwrap();
        let (cy, sy) = a.copy("y", &y).unwrap();
        assert_eq!(cx.slice(sx, x.len()), &x[..]);
        assert_eq!(cy.slice(sy, y.len()), &y[..]);
        assert_eq!(sx % ALIGN, 0);
        assert_eq!(sy % ALIGN, 0);
        assert_eq!(
            cx.slice(0, 1).as_ptr() as usize % HUGE,
            0,
            "chunk base on 2 MiB"
        );
        assert!(Arc::ptr_eq(&cx, &cy) && sy >= sx + x.len());
        assert_eq!(a.used(), (x.len() + y.len()) as u64);
    }

    #[test]
    fn a_tensor_larger_than_a_chunk_gets_its_own() {
        let a = ResidentArena::with_budget(u64::MAX);
        let small = vec![1u8; 10];
        let big = vec![2u8; CHUNK + 5];
        let (c1, _) = a.copy("small", &small).unwrap();
        let (c2, s2) = a.copy("big", &big).unwrap();
        assert!(!Arc::ptr_eq(&c1, &c2));
        assert_eq!(s2, 0);
        assert!(c2.slice(s2, big.len()).iter().all(|&b| b == 2));
    }

    #[test]
    fn chunks_no_longer_used_give_their_bytes_back() {
        let a = ResidentArena::with_budget(u64::MAX);
        let (c1, _) = a.copy("first", &vec![1u8; CHUNK - 100]).unwrap();
        // Does not fit what is left of the first chunk: a second one becomes current.
        let (c2, _) = a.copy("second", &[2u8; 1000]).unwrap();
        assert!(!Arc::ptr_eq(&c1, &c2));
        assert_eq!(a.used(), (CHUNK - 100 + 1000) as u64);
        drop(c1);
        assert_eq!(a.used(), 1000, "the first chunk's bytes are back");
        drop(c2);
        assert_eq!(a.used(), 1000, "the current chunk stays with the arena");
    }

    #[test]
    fn beyond_the_budget_nothing_is_copied() {
        let a = ResidentArena::with_budget(100);
        assert!(a.copy("a", &[0u8; 60]).is_some());
        assert!(a.copy("b", &[0u8; 60]).is_none());
        assert!(a.copy("c", &[0u8; 40]).is_some());
        assert_eq!(a.used(), 100);
    }

    /// The same model loaded with the weights in resident memory, in the file mapping, and with
    /// a budget that holds only some of them: the same logits, bit for bit, and the weights
    /// where each mode says.
    #[test]
    fn load_modes_give_the_same_logits() {
        use crate::experts::LocalExperts;
        use crate::model::Model;
        use crate::safetensors::Checkpoint;
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for model in ["qwen3_moe_tiny", "gguf/qwen2_moe_gguf-q8_0.gguf"] {
            let path = fixtures.join(model);
            let run = |mode: Option<LoadMode>, budget: Option<u64>| {
                let (cfg, mut ckpt) = Checkpoint::open_with_config(&path).unwrap();
                if let Some(m) = mode {
                    ckpt.set_load_mode(m);
                }
                if let Some(b) = budget {
                    ckpt.set_resident_budget(b);
                }
                let m = Model::from_checkpoint(cfg.clone(), &ckpt).unwrap();
                let e = LocalExperts::load_all(&cfg, &ckpt).unwrap();
                let logits = crate::generate::all_logits(&m, &e, &[1, 5, 9, 3, 7]).unwrap();
                (
                    logits,
                    m.lm_head.weight.is_resident(),
                    ckpt.resident_bytes(),
                )
            };
            let (mem, mem_head, mem_bytes) = run(None, None);
            let (map, map_head, map_bytes) = run(Some(LoadMode::Mmap), None);
            assert!(mem_head && mem_bytes > 0, "{model}: default copies weights");
            assert!(!map_head && map_bytes == 0, "{model}: mmap copies nothing");
            assert_eq!(bits(&mem), bits(&map), "{model}: memory vs mmap");
            // Half of what the full load copied: some weights in memory, the rest mapped.
            let (part, _, part_bytes) = run(None, Some(mem_bytes / 2));
            assert!(
                part_bytes > 0 && part_bytes <= mem_bytes / 2,
                "{model}: budget kept"
            );
            assert_eq!(bits(&part), bits(&map), "{model}: partly resident vs mmap");
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn the_system_reports_some_memory() {
        assert!(available_memory() > 0);
    }
}
