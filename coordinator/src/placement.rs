//! Which host holds which routed expert: a pure function of the hosts' capacities.
//!
//! Every MoE layer's experts are spread over the hosts in proportion to their capacities (largest
//! remainder), so every layer's round trip fans out to all hosts. Across layers the remainder
//! seats go to the hosts furthest behind their proportional total, so a host's total never drifts
//! more than one expert from its share. Each host with capacity gets at least one expert of every
//! layer when the layer has enough experts. Blocks are contiguous in host order. Deterministic:
//! the same inputs give the same placement on every coordinator.

use std::collections::BTreeMap;

use crate::CoordinatorError;

/// One host that can hold experts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCapacity {
    /// Name for messages (a worker's address, or "coordinator").
    pub name: String,
    /// Bytes of expert weights it offers.
    pub capacity: u64,
}

/// The owner of every routed expert of every MoE layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    hosts: usize,
    owners: BTreeMap<usize, Vec<usize>>,
}

impl Placement {
    /// Number of hosts placed over (including those that got nothing).
    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// Owner (host index) of each expert of `layer`, or `None` when the layer is not a MoE layer.
    pub fn layer(&self, layer: usize) -> Option<&[usize]> {
        self.owners.get(&layer).map(Vec::as_slice)
    }

    /// The host of one expert.
    pub fn owner(&self, layer: usize, expert: usize) -> Option<usize> {
        self.layer(layer)?.get(expert).copied()
    }

    /// The `(layer, expert)` pairs of `host`, in order.
    pub fn experts_of(&self, host: usize) -> Vec<(usize, usize)> {
        self.owners
            .iter()
            .flat_map(|(&l, owners)| {
                owners
                    .iter()
                    .enumerate()
                    .filter(move |&(_, &h)| h == host)
                    .map(move |(e, _)| (l, e))
            })
            .collect()
    }

    /// Experts per host over all layers.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.hosts];
        for owners in self.owners.values() {
            for &h in owners {
                c[h] += 1;
            }
        }
        c
    }
}

/// Places `num_experts` experts of each of `moe_layers` (each `expert_bytes` big) on `hosts`.
pub fn place(
    hosts: &[HostCapacity],
    moe_layers: &[usize],
    num_experts: usize,
    expert_bytes: u64,
) -> Result<Placement, CoordinatorError> {
    let offered: u128 = hosts.iter().map(|h| u128::from(h.capacity)).sum();
    let need = moe_layers.len() as u128 * num_experts as u128 * u128::from(expert_bytes);
    if need > 0 && offered == 0 {
        return Err(CoordinatorError::NoCapacity { hosts: hosts.len() });
    }
    if need > offered {
        return Err(CoordinatorError::InsufficientCapacity {
            need: need.min(u128::from(u64::MAX)) as u64,
            offered: offered.min(u128::from(u64::MAX)) as u64,
        });
    }
    let n = hosts.len();
    if n == 0 && !moe_layers.is_empty() && num_experts > 0 {
        return Err(CoordinatorError::NoCapacity { hosts: 0 });
    }
    let e = num_experts as u128;
    // Weightless experts (need == 0) still need owners: spread them evenly then.
    let (caps, offered): (Vec<u128>, u128) = if offered == 0 {
        (vec![1; n], n as u128)
    } else {
        (
            hosts.iter().map(|h| u128::from(h.capacity)).collect(),
            offered,
        )
    };
    let eligible = caps.iter().filter(|&&c| c > 0).count();
    let mut totals = vec![0u128; n];
    let mut owners = BTreeMap::new();
    for (k, &layer) in moe_layers.iter().enumerate() {
        // Seats of this layer, in units of 1/offered to stay exact.
        let mut seats: Vec<u128> = caps.iter().map(|&c| e * c / offered).collect();
        // Each fractional part is below one, so fewer seats are left than hosts with capacity.
        let left = num_experts - seats.iter().sum::<u128>() as usize;
        // Remainder seats: to whoever is furthest behind its ideal running total.
        let ideal = |i: usize| (k as u128 + 1) * e * caps[i];
        let mut order: Vec<usize> = (0..n).filter(|&i| caps[i] > 0).collect();
        order.sort_by(|&a, &b| {
            let behind = |i: usize| ideal(i) as i128 - ((totals[i] + seats[i]) * offered) as i128;
            behind(b).cmp(&behind(a)).then(a.cmp(&b))
        });
        for &i in order.iter().take(left) {
            seats[i] += 1;
        }
        // Every host with capacity gets one expert of the layer, taken from the largest share.
        if num_experts >= eligible {
            for i in 0..n {
                if caps[i] > 0 && seats[i] == 0 {
                    let donor = (0..n)
                        .max_by(|&a, &b| seats[a].cmp(&seats[b]).then(b.cmp(&a)))
                        .unwrap_or(i);
                    if seats[donor] > 1 {
                        seats[donor] -= 1;
                        seats[i] += 1;
                    }
                }
            }
        }
        let mut layer_owners = Vec::with_capacity(num_experts);
        for (i, &s) in seats.iter().enumerate() {
            layer_owners.extend(std::iter::repeat_n(i, s as usize));
            totals[i] += s;
        }
        owners.insert(layer, layer_owners);
    }
    for (i, h) in hosts.iter().enumerate() {
        let bytes = totals[i] * u128::from(expert_bytes);
        if bytes > u128::from(h.capacity) {
            return Err(CoordinatorError::HostOverCapacity {
                host: h.name.clone(),
                experts: totals[i] as usize,
                need: bytes.min(u128::from(u64::MAX)) as u64,
                capacity: h.capacity,
            });
        }
    }
    Ok(Placement { hosts: n, owners })
}

/// Every expert's hosts in order of preference, per MoE layer: the owner in the placement first,
/// then its replicas.
pub type Holders = BTreeMap<usize, Vec<Vec<usize>>>;

/// The capacities to place by when some hosts page their experts from disk (`budgets[i]`: the
/// bytes host `i` keeps resident, `None` when everything it hosts stays in memory), so that
/// the expected disk reads balance, not only the bytes.
///
/// With routing spread over a host's experts, a host holding `n` bytes within a budget `B` reads
/// about `max(0, n - B)` worth per unit of traffic. Hosts without a budget are filled first (up
/// to their capacity: they never read), then every paged host up to its budget (free), and
/// whatever is left is spread so that each paged host holds `B + t`, the same `t` for all (its
/// capacity allowing): equal expected reads. The result feeds [`place`], which spreads experts
/// in proportion to it. Without budgets it returns `hosts` unchanged.
pub fn paged_capacities(
    hosts: &[HostCapacity],
    budgets: &[Option<u64>],
    need: u64,
) -> Vec<HostCapacity> {
    if budgets.iter().all(Option::is_none) {
        return hosts.to_vec();
    }
    let held = |t: u64| -> Vec<u64> {
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| match budgets.get(i).copied().flatten() {
                Some(b) => h.capacity.min(b.saturating_add(t)),
                None => h.capacity,
            })
            .collect()
    };
    let total = |t: u64| held(t).iter().map(|&c| u128::from(c)).sum::<u128>();
    // The smallest t whose sum covers `need` (the largest capacity is always enough if any is).
    let (mut lo, mut hi) = (0u64, hosts.iter().map(|h| h.capacity).max().unwrap_or(0));
    if total(0) >= u128::from(need) {
        hi = 0;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if total(mid) >= u128::from(need) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    hosts
        .iter()
        .zip(held(hi))
        .map(|(h, c)| HostCapacity {
            name: h.name.clone(),
            capacity: c,
        })
        .collect()
}

/// The holders of `primary` with up to `copies - 1` replicas of each expert on other hosts.
///
/// Only hosts `0..capacities.len()` (the workers) take replicas, each within its capacity left
/// after its own share. Experts listed in `hot` get their replicas first (the rest follow in
/// layer and expert order), so when capacity runs short it is the cold experts that go without.
/// A host's replicas are spread over all the other hosts, so when it dies its load is shared by
/// all survivors rather than doubled on one. Pure and deterministic.
pub fn replicate(
    primary: &Placement,
    capacities: &[u64],
    expert_bytes: u64,
    copies: usize,
    hot: &[(usize, usize)],
) -> Holders {
    let mut holders: Holders = primary
        .owners
        .iter()
        .map(|(&l, owners)| (l, owners.iter().map(|&h| vec![h]).collect()))
        .collect();
    let n = capacities.len().min(primary.hosts);
    if copies <= 1 || n < 2 {
        return holders;
    }
    let counts = primary.counts();
    let mut spare: Vec<u64> = (0..n)
        .map(|i| capacities[i].saturating_sub((counts[i] as u64).saturating_mul(expert_bytes)))
        .collect();
    let exists = |&(l, e): &(usize, usize)| primary.owner(l, e).is_some();
    let mut order: Vec<(usize, usize)> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for &x in hot.iter().filter(|x| exists(x)) {
        if seen.insert(x) {
            order.push(x);
        }
    }
    for (&l, owners) in &primary.owners {
        for e in 0..owners.len() {
            if seen.insert((l, e)) {
                order.push((l, e));
            }
        }
    }
    for k in 1..copies {
        for &(l, e) in &order {
            let Some(hs) = holders.get_mut(&l).and_then(|v| v.get_mut(e)) else {
                continue;
            };
            let owner = hs[0];
            let start = if owner < n { owner } else { (l + e) % n };
            let skip = 1 + (l + e + k - 1) % (n - 1);
            for j in 0..n {
                let c = (start + skip + j) % n;
                if !hs.contains(&c) && spare[c] >= expert_bytes {
                    hs.push(c);
                    spare[c] -= expert_bytes;
                    break;
                }
            }
        }
    }
    holders
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paged hosts: the expected reads (held beyond the budget) come out equal.
    #[test]
    fn paged_capacities_balance_reads() {
        // Three hosts of 100 units of disk-backed capacity; budgets 10, 20 and 60; 120 to place.
        let h = hosts(&[100, 100, 100]);
        let got = paged_capacities(&h, &[Some(10), Some(20), Some(60)], 120);
        let caps: Vec<u64> = got.iter().map(|c| c.capacity).collect();
        // t = 10: 20 + 30 + 70 = 120; each reads 10.
        assert_eq!(caps, vec![20, 30, 70]);
        // Room within the budgets: nobody reads, placed by budget.
        let got = paged_capacities(&h, &[Some(10), Some(20), Some(60)], 50);
        assert_eq!(
            got.iter().map(|c| c.capacity).collect::<Vec<_>>(),
            vec![10, 20, 60]
        );
        // A host without a budget is filled first (it never reads); capacity caps a paged host.
        let h2 = hosts(&[40, 50, 300]);
        let got = paged_capacities(&h2, &[None, Some(10), Some(10)], 200);
        // 40 + min(50, 10 + t) + min(300, 10 + t) = 200 -> t = 100: 40 + 50 + 110.
        assert_eq!(
            got.iter().map(|c| c.capacity).collect::<Vec<_>>(),
            vec![40, 50, 110]
        );
        // No budgets: unchanged.
        assert_eq!(paged_capacities(&h, &[None, None, None], 120), h);
        // Placement by the paged capacities gives the budget-rich host more experts.
        let p = place(&got, &[0, 1], 20, 5).unwrap();
        assert_eq!(p.counts(), vec![8, 10, 22]);
    }

    fn hosts(caps: &[u64]) -> Vec<HostCapacity> {
        caps.iter()
            .enumerate()
            .map(|(i, &capacity)| HostCapacity {
                name: format!("h{i}"),
                capacity,
            })
            .collect()
    }

    /// Per-layer seat counts of each host.
    fn per_layer(p: &Placement, layers: &[usize]) -> Vec<Vec<usize>> {
        layers
            .iter()
            .map(|&l| {
                let mut c = vec![0; p.hosts()];
                for &h in p.layer(l).unwrap() {
                    c[h] += 1;
                }
                c
            })
            .collect()
    }

    #[test]
    fn table() {
        struct Case {
            caps: &'static [u64],
            layers: &'static [usize],
            experts: usize,
            want: &'static [&'static [usize]],
        }
        const BIG: u64 = 1 << 40;
        let cases = [
            // One host takes everything.
            Case {
                caps: &[BIG],
                layers: &[0, 1],
                experts: 5,
                want: &[&[5], &[5]],
            },
            // Equal capacities: as even as can be, remainders rotate between layers.
            Case {
                caps: &[BIG, BIG],
                layers: &[0, 2],
                experts: 5,
                want: &[&[3, 2], &[2, 3]],
            },
            Case {
                caps: &[BIG, BIG, BIG],
                layers: &[0, 1, 2],
                experts: 8,
                want: &[&[3, 3, 2], &[3, 2, 3], &[2, 3, 3]],
            },
            // 1:2:3 over 6 experts is exact.
            Case {
                caps: &[BIG, 2 * BIG, 3 * BIG],
                layers: &[1],
                experts: 6,
                want: &[&[1, 2, 3]],
            },
            // 1:2:3 over 5 experts: quotas .83 1.67 2.5; remainders to h0 and h1 first.
            Case {
                caps: &[BIG, 2 * BIG, 3 * BIG],
                layers: &[0, 1],
                experts: 5,
                want: &[&[1, 2, 2], &[1, 1, 3]],
            },
            // A tiny host still gets one expert of every layer when there are enough.
            Case {
                caps: &[1_000 * BIG, BIG],
                layers: &[0, 1],
                experts: 3,
                want: &[&[2, 1], &[2, 1]],
            },
            // A host with no capacity gets nothing.
            Case {
                caps: &[BIG, 0, BIG],
                layers: &[0],
                experts: 4,
                want: &[&[2, 0, 2]],
            },
            // More hosts than experts: not everyone can have one.
            Case {
                caps: &[BIG, BIG, BIG, BIG],
                layers: &[0],
                experts: 3,
                want: &[&[1, 1, 1, 0]],
            },
        ];
        for (ci, c) in cases.iter().enumerate() {
            let p = place(&hosts(c.caps), c.layers, c.experts, 1).unwrap();
            let got = per_layer(&p, c.layers);
            let want: Vec<Vec<usize>> = c.want.iter().map(|w| w.to_vec()).collect();
            assert_eq!(got, want, "case {ci}");
        }
    }

    #[test]
    fn totals_stay_within_one_expert_of_the_share() {
        let caps = [3u64, 5, 11, 1];
        let layers: Vec<usize> = (0..48).collect();
        let big: Vec<u64> = caps.iter().map(|c| c << 20).collect();
        let p = place(&hosts(&big), &layers, 60, 1).unwrap();
        let total: u64 = caps.iter().sum();
        for (i, &n) in p.counts().iter().enumerate() {
            let share = 48.0 * 60.0 * caps[i] as f64 / total as f64;
            assert!((n as f64 - share).abs() <= 1.0, "host {i}: {n} vs {share}");
        }
        // Each layer is contiguous blocks in host order.
        for l in &layers {
            let owners = p.layer(*l).unwrap();
            assert!(owners.windows(2).all(|w| w[0] <= w[1]));
        }
    }

    #[test]
    fn experts_of_lists_a_hosts_experts() {
        let p = place(&hosts(&[10, 10]), &[0, 3], 3, 1).unwrap();
        assert_eq!(p.experts_of(0), vec![(0, 0), (0, 1), (3, 0)]);
        assert_eq!(p.experts_of(1), vec![(0, 2), (3, 1), (3, 2)]);
        assert_eq!(p.owner(3, 2), Some(1));
        assert_eq!(p.owner(1, 0), None);
    }

    #[test]
    fn capacity_is_a_limit() {
        // 2 layers x 4 experts x 10 bytes = 80 bytes.
        let err = place(&hosts(&[30, 40]), &[0, 1], 4, 10).unwrap_err();
        assert!(
            matches!(
                err,
                CoordinatorError::InsufficientCapacity {
                    need: 80,
                    offered: 70
                }
            ),
            "{err}"
        );
        let err = place(&hosts(&[0, 0]), &[0], 4, 10).unwrap_err();
        assert!(
            matches!(err, CoordinatorError::NoCapacity { hosts: 2 }),
            "{err}"
        );
        // Exactly enough in total, but rounding puts 3 experts (30 bytes) on a host offering 25.
        let err = place(&hosts(&[25, 15]), &[0], 4, 10).unwrap_err();
        assert!(
            matches!(err, CoordinatorError::HostOverCapacity { ref host, .. } if host == "h0"),
            "{err}"
        );
        place(&hosts(&[40, 40]), &[0, 1], 4, 10).unwrap();
        // No MoE layers: nothing to place.
        let p = place(&hosts(&[0]), &[], 4, 10).unwrap();
        assert_eq!(p.counts(), vec![0]);
    }

    #[test]
    fn deterministic() {
        let h = hosts(&[700, 300, 900]);
        let layers: Vec<usize> = (0..10).collect();
        assert_eq!(
            place(&h, &layers, 16, 1).unwrap(),
            place(&h, &layers, 16, 1).unwrap()
        );
    }

    #[test]
    fn replicas_spread_over_the_others_within_capacity() {
        const BIG: u64 = 1 << 40;
        let layers = [0, 1];
        let p = place(&hosts(&[BIG, BIG, BIG]), &layers, 6, 1).unwrap();
        // One copy: the placement itself.
        let one = replicate(&p, &[BIG; 3], 1, 1, &[]);
        for &l in &layers {
            for (e, hs) in one[&l].iter().enumerate() {
                assert_eq!(hs, &vec![p.owner(l, e).unwrap()]);
            }
        }
        // Two copies: every expert on two distinct hosts, the owner first.
        let two = replicate(&p, &[BIG; 3], 1, 2, &[]);
        let mut took = [0usize; 3];
        for &l in &layers {
            for (e, hs) in two[&l].iter().enumerate() {
                assert_eq!(hs.len(), 2, "layer {l} expert {e}");
                assert_eq!(hs[0], p.owner(l, e).unwrap());
                assert_ne!(hs[0], hs[1]);
                if hs[0] == 0 {
                    took[hs[1]] += 1;
                }
            }
        }
        // Host 0's experts are replicated on both other hosts, not piled on one.
        assert!(took[1] > 0 && took[2] > 0, "{took:?}");
        // Three copies on three hosts: everything everywhere.
        let three = replicate(&p, &[BIG; 3], 1, 3, &[]);
        assert!(three.values().flatten().all(|hs| hs.len() == 3));
        assert_eq!(three, replicate(&p, &[BIG; 3], 1, 3, &[]), "deterministic");
    }

    #[test]
    fn hot_experts_get_the_scarce_replica_room_first() {
        // Two hosts, 4 experts of one layer, 2 each; each host has room for one more.
        let p = place(&hosts(&[3, 3]), &[0], 4, 1).unwrap();
        let hot = [(0, 3), (0, 0), (7, 1)]; // a layer that does not exist is ignored
        let h = replicate(&p, &[3, 3], 1, 2, &hot);
        let counts: Vec<usize> = h[&0].iter().map(Vec::len).collect();
        assert_eq!(counts, vec![2, 1, 1, 2], "{h:?}");
        // A coordinator share (host 2, beyond the capacities given) takes no replicas.
        let p = place(&hosts(&[10, 10, 10]), &[0], 3, 1).unwrap();
        let h = replicate(&p, &[10, 10], 1, 3, &[]);
        for hs in &h[&0] {
            assert!(hs[1..].iter().all(|&x| x < 2), "{hs:?}");
        }
    }
}
