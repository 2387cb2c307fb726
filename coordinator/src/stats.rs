//! Round-trip latency of expert dispatch: one sample per MoE layer step that went to workers,
//! from the moment its requests were started until the last worker's reply arrived.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Samples kept; older ones are dropped first.
pub const MAX_SAMPLES: usize = 1 << 16;

/// A bounded record of dispatch round trips, shared by the backend and whoever reads it.
#[derive(Debug, Default)]
pub struct DispatchStats {
    samples: Mutex<VecDeque<Duration>>,
}

impl DispatchStats {
    /// Adds one sample, dropping the oldest beyond [`MAX_SAMPLES`].
    pub fn record(&self, d: Duration) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() == MAX_SAMPLES {
            s.pop_front();
        }
        s.push_back(d);
    }

    /// The samples held, oldest first.
    pub fn latencies(&self) -> Vec<Duration> {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.iter().copied().collect()
    }

    /// Forgets every sample.
    pub fn reset(&self) {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no sample is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `q`-quantile (0..=1, nearest rank) of `samples`, or `None` when there are none.
pub fn percentile(samples: &[Duration], q: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.saturating_sub(1).min(v.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_resettable() {
        let s = DispatchStats::default();
        for i in 0..MAX_SAMPLES + 10 {
            s.record(Duration::from_micros(i as u64));
        }
        let l = s.latencies();
        assert_eq!(l.len(), MAX_SAMPLES);
        assert_eq!(l[0], Duration::from_micros(10));
        s.reset();
        assert!(s.is_empty());
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 0.5), Some(Duration::from_micros(50)));
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_micros(99)));
        assert_eq!(percentile(&v, 1.0), Some(Duration::from_micros(100)));
        assert_eq!(percentile(&v, 0.0), Some(Duration::from_micros(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
