//! Routers: from a token's router logits to its chosen experts and their weights.
//!
//! Plain data in, plain data out, so every rule can be checked with tables.

use crate::layers::{sigmoid, softmax_inplace};

/// How a layer turns router logits into expert weights.
#[derive(Clone, Copy, Debug, PartialEq)]
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
    /// GPT-OSS: the top k logits, softmax over those k.
    TopKSoftmax {
        /// Experts per token.
        k: usize,
    },
    /// DeepSeek-V3: `s = sigmoid(logits)`; experts are chosen on `s + bias` (the layer's
    /// `e_score_correction_bias`) within the `topk_group` groups whose two best biased scores sum
    /// highest; weights are the unbiased `s` of the chosen, divided by their sum when
    /// `renormalize`, times `scaling`.
    SigmoidGroupedTopK {
        /// Experts per token.
        k: usize,
        /// Equal groups the experts are split into.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Divide the chosen scores by their sum (`norm_topk_prob`).
        renormalize: bool,
        /// `routed_scaling_factor`.
        scaling: f32,
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
    /// Chosen `(expert, weight)` pairs of one token, sorted by expert index. `bias` is the
    /// selection bias of [`RoutingRule::SigmoidGroupedTopK`] (ignored by the other rules).
    pub fn route(&self, logits: &[f32], bias: Option<&[f32]>) -> Vec<(usize, f32)> {
        match *self {
            RoutingRule::TopKSoftmax { k } => {
                let chosen = top_k(logits, k);
                let mut w: Vec<f32> = chosen.iter().map(|&e| logits[e]).collect();
                softmax_inplace(&mut w);
                let mut out: Vec<(usize, f32)> = chosen.into_iter().zip(w).collect();
                out.sort_by_key(|&(e, _)| e);
                out
            }
            RoutingRule::SigmoidGroupedTopK {
                k,
                n_group,
                topk_group,
                renormalize,
                scaling,
            } => {
                let scores: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
                let choice: Vec<f32> = match bias {
                    Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                    None => scores.clone(),
                };
                let per = choice.len() / n_group.max(1);
                let group_scores: Vec<f32> = choice
                    .chunks(per.max(1))
                    .map(|g| top_k(g, 2).iter().map(|&i| g[i]).sum())
                    .collect();
                let kept = top_k(&group_scores, topk_group);
                let masked: Vec<f32> = choice
                    .iter()
                    .enumerate()
                    .map(|(e, &v)| {
                        if kept.contains(&(e / per.max(1))) {
                            v
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let chosen = top_k(&masked, k);
                let sum: f32 = chosen.iter().map(|&e| scores[e]).sum::<f32>() + 1e-20;
                let mut out: Vec<(usize, f32)> = chosen
                    .into_iter()
                    .map(|e| {
                        let w = if renormalize {
                            scores[e] / sum
                        } else {
                            scores[e]
                        };
                        (e, w * scaling)
                    })
                    .collect();
                out.sort_by_key(|&(e, _)| e);
                out
            }
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
            .route(logits, None);
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
        .route(&logits, None);
        let mut chosen = [logits[2], logits[4]];
        softmax_inplace(&mut chosen);
        assert!((r[0].1 - chosen[0]).abs() < 1e-6 && (r[1].1 - chosen[1]).abs() < 1e-6);
    }

    #[test]
    fn top_k_softmax_is_a_softmax_over_the_chosen_logits() {
        let logits = [0.3f32, -1.2, 2.2, 0.9, 1.7];
        let r = RoutingRule::TopKSoftmax { k: 3 }.route(&logits, None);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 3, 4]);
        let mut chosen = [logits[2], logits[3], logits[4]];
        softmax_inplace(&mut chosen);
        for (got, want) in r.iter().zip(chosen) {
            assert!((got.1 - want).abs() < 1e-6, "{r:?}");
        }
    }

    #[test]
    fn sigmoid_grouped_table() {
        let rule = |k, n_group, topk_group, renormalize, scaling| RoutingRule::SigmoidGroupedTopK {
            k,
            n_group,
            topk_group,
            renormalize,
            scaling,
        };
        // Eight experts in four groups of two. Without bias, groups {0,1} and {6,7} score highest.
        let logits = [2.0f32, 1.5, 3.0, -4.0, -1.0, -1.0, 1.0, 1.2];
        let experts = |r: &[(usize, f32)]| r.iter().map(|x| x.0).collect::<Vec<_>>();
        // (rule, bias, expected experts)
        let bias_to_group_2 = [0.0f32, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0];
        // (rule, selection bias, expected experts)
        type Case<'a> = (RoutingRule, Option<&'a [f32]>, Vec<usize>);
        let cases: Vec<Case<'_>> = vec![
            // expert 2 is the single best but its group {2,3} sums low: not kept
            (rule(2, 4, 2, true, 1.0), None, vec![0, 1]),
            (rule(3, 4, 2, true, 1.0), None, vec![0, 1, 7]),
            // one group only: plain top-k on the biased scores
            (rule(2, 1, 1, true, 1.0), None, vec![0, 2]),
            // the bias moves the choice to group {4,5}, not the weights
            (
                rule(2, 4, 1, false, 1.0),
                Some(&bias_to_group_2),
                vec![4, 5],
            ),
        ];
        for (r, bias, want) in cases {
            let out = r.route(&logits, bias);
            assert_eq!(experts(&out), want, "{r:?}");
        }
        // weights: unbiased sigmoid scores, renormalised, scaled
        let out = rule(2, 4, 1, true, 2.5).route(&logits, Some(&bias_to_group_2));
        let s = sigmoid(-1.0);
        assert!(
            (out[0].1 - 2.5 * s / (2.0 * s + 1e-20)).abs() < 1e-6,
            "{out:?}"
        );
        let out = rule(2, 4, 1, false, 2.5).route(&logits, Some(&bias_to_group_2));
        assert!((out[1].1 - 2.5 * s).abs() < 1e-6, "{out:?}");
    }
}
