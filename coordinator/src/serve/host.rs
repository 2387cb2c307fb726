//! This host's memory as the cluster page (and `moeshard doctor`) show it, read from Linux's
//! `/proc`; `None` where that is not available.

use serde::Serialize;

/// Memory of this host and of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostMemory {
    /// Physical memory of the host.
    pub total_bytes: u64,
    /// Memory available to new allocations without swapping (`MemAvailable`).
    pub available_bytes: u64,
    /// Resident memory of this process (`VmRSS`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_rss_bytes: Option<u64>,
}

/// The value in kB of `key` in a `/proc` "Key:   123 kB" file, in bytes.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        kb.checked_mul(1024)
    })
}

/// Parses `/proc/meminfo` and `/proc/self/status` texts.
pub fn parse_memory(meminfo: &str, status: Option<&str>) -> Option<HostMemory> {
    let total_bytes = kb_field(meminfo, "MemTotal")?;
    let available_bytes = kb_field(meminfo, "MemAvailable")
        .or_else(|| kb_field(meminfo, "MemFree"))
        .unwrap_or(0);
    Some(HostMemory {
        total_bytes,
        available_bytes,
        process_rss_bytes: status.and_then(|s| kb_field(s, "VmRSS")),
    })
}

/// This host's memory now (`None` off Linux or when `/proc` cannot be read).
pub fn memory() -> Option<HostMemory> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok();
    parse_memory(&meminfo, status.as_deref())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let meminfo = "MemTotal:       16303504 kB\nMemFree:  100 kB\nMemAvailable:   8151752 kB\n";
        let status = "Name:\tx\nVmRSS:\t   2048 kB\n";
        let m = parse_memory(meminfo, Some(status)).unwrap();
        assert_eq!(m.total_bytes, 16303504 * 1024);
        assert_eq!(m.available_bytes, 8151752 * 1024);
        assert_eq!(m.process_rss_bytes, Some(2048 * 1024));
        assert_eq!(parse_memory("garbage", None), None);
        assert_eq!(
            parse_memory("MemTotal: 4 kB\nMemFree: 2 kB\n", None).map(|m| m.available_bytes),
            Some(2048)
        );
    }
}
