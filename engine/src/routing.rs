//! Routers: from a token's router logits to its chosen experts and their weights.
//!
//! Plain data in, plain data out, so every rule can be checked with tables.

use crate::layers::softmax_inplace;

/// How a layer turns router logits into expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingRule {
    /// Softmax over all experts, keep the top k; renormalise them to sum to one when `renormalize`
    /// (Qwen3-MoE and Qwen2-MoE with `norm_topk_prob`; Mixtral always, which equals a softmax over
    /// the chosen logits).
    SoftmaxTopK {
        /// Experts per token.
        k: usize,
        /// Divide the chosen probabilities by their sum.
        renormalize: bool,
    },
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

impl RoutingRule {
    /// Chosen `(expert, weight)` pairs of one token, sorted by expert index.
    pub fn route(&self, logits: &[f32]) -> Vec<(usize, f32)> {
        match *self {
            RoutingRule::SoftmaxTopK { k, renormalize } => {
                let mut p = logits.to_vec();
                softmax_inplace(&mut p);
                let chosen = top_k(&p, k);
                let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
                let mut out: Vec<(usize, f32)> = chosen
                    .into_iter()
                    .map(|e| (e, if renormalize { p[e] / sum } else { p[e] }))
                    .collect();
                out.sort_by_key(|&(e, _)| e);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_low() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 2), vec![1, 2]);
        assert_eq!(top_k(&[3.0, 1.0, 2.0], 1), vec![0]);
        assert_eq!(top_k(&[1.0, 2.0, 3.0], 3), vec![2, 1, 0]);
    }

    #[test]
    fn softmax_top_k_table() {
        // (logits, k, renormalize, expected experts)
        let cases: &[(&[f32], usize, bool, &[usize])] = &[
            (&[0.0, 2.0, 1.0], 1, false, &[1]),
            (&[0.0, 2.0, 1.0], 2, true, &[1, 2]),
            (&[5.0, -1.0, 4.0, 4.5, 0.0], 3, false, &[0, 2, 3]),
        ];
        for &(logits, k, renorm, want) in cases {
            let r = RoutingRule::SoftmaxTopK {
                k,
                renormalize: renorm,
            }
            .route(logits);
            let experts: Vec<usize> = r.iter().map(|x| x.0).collect();
            assert_eq!(experts, want, "logits {logits:?}");
            let sum: f32 = r.iter().map(|x| x.1).sum();
            if renorm {
                assert!((sum - 1.0).abs() < 1e-6);
            } else {
                assert!(sum < 1.0);
            }
        }
    }

    #[test]
    fn renormalized_equals_softmax_over_chosen_logits() {
        let logits = [0.3f32, -1.2, 2.2, 0.9, 1.7];
        let r = RoutingRule::SoftmaxTopK {
            k: 2,
            renormalize: true,
        }
        .route(&logits);
        let mut chosen = [logits[2], logits[4]];
        softmax_inplace(&mut chosen);
        assert!((r[0].1 - chosen[0]).abs() < 1e-6 && (r[1].1 - chosen[1]).abs() < 1e-6);
    }
}
