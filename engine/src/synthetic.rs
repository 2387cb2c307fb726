//! Synthetic checkpoints: deterministic random weights of the exact shapes a config describes,
//! generated on first use and never written to disk, so a planning run exercises real compute and
//! real network traffic at full layer widths without downloading anything.
//!
//! Every tensor is a pure function of (its name, the seed): the coordinator and each worker make
//! the same weights independently.

use std::collections::BTreeMap;

use half::bf16;
use rayon::prelude::*;

use crate::config::{MlpKind, ModelConfig};
use crate::safetensors::TensorInfo;
use crate::sampling::Rng;
use crate::tensor::{DType, Tensor};

/// The names and shapes of every tensor of `cfg`, as a Hugging Face checkpoint would hold them.
/// (f16 is generated as bf16: both are two bytes, which is what a planning run measures.)
pub fn tensor_index(cfg: &ModelConfig, dtype: DType) -> BTreeMap<String, TensorInfo> {
    let dtype = if dtype == DType::F16 {
        DType::BF16
    } else {
        dtype
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let mut t: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        t.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = cfg.layer_prefix(l);
        let a = format!("{p}.self_attn");
        t.push((format!("{p}.input_layernorm.weight"), vec![h]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        if let Some(m) = cfg.mla {
            let qk = nh * m.qk_head_dim();
            match m.q_lora_rank {
                Some(r) => {
                    t.push((format!("{a}.q_a_proj.weight"), vec![r, h]));
                    t.push((format!("{a}.q_a_layernorm.weight"), vec![r]));
                    t.push((format!("{a}.q_b_proj.weight"), vec![qk, r]));
                }
                None => t.push((format!("{a}.q_proj.weight"), vec![qk, h])),
            }
            let (r, rd) = (m.kv_lora_rank, m.qk_rope_head_dim);
            t.push((format!("{a}.kv_a_proj_with_mqa.weight"), vec![r + rd, h]));
            t.push((format!("{a}.kv_a_layernorm.weight"), vec![r]));
            let kvb = nh * (m.qk_nope_head_dim + m.v_head_dim);
            t.push((format!("{a}.kv_b_proj.weight"), vec![kvb, r]));
            t.push((format!("{a}.o_proj.weight"), vec![h, nh * m.v_head_dim]));
        } else if let Some(d) = cfg
            .linear_attn
            .as_ref()
            .filter(|(_, linear)| linear[l])
            .map(|(d, _)| *d)
        {
            let la = format!("{p}.linear_attn");
            let (nv, vw) = (d.num_value_heads, d.num_value_heads * d.value_head_dim);
            t.push((format!("{la}.in_proj_qkv.weight"), vec![d.conv_dim(), h]));
            t.push((format!("{la}.in_proj_z.weight"), vec![vw, h]));
            t.push((format!("{la}.in_proj_b.weight"), vec![nv, h]));
            t.push((format!("{la}.in_proj_a.weight"), vec![nv, h]));
            t.push((
                format!("{la}.conv1d.weight"),
                vec![d.conv_dim(), 1, d.conv_kernel],
            ));
            t.push((format!("{la}.A_log"), vec![nv]));
            t.push((format!("{la}.dt_bias"), vec![nv]));
            t.push((format!("{la}.norm.weight"), vec![d.value_head_dim]));
            t.push((format!("{la}.out_proj.weight"), vec![h, vw]));
        } else {
            let q_rows = if cfg.attn_output_gate {
                2 * nh * hd
            } else {
                nh * hd
            };
            for (n, rows) in [("q", q_rows), ("k", nkv * hd), ("v", nkv * hd)] {
                t.push((format!("{a}.{n}_proj.weight"), vec![rows, h]));
                if cfg.qkv_bias {
                    t.push((format!("{a}.{n}_proj.bias"), vec![rows]));
                }
            }
            t.push((format!("{a}.o_proj.weight"), vec![h, nh * hd]));
            if cfg.o_bias {
                t.push((format!("{a}.o_proj.bias"), vec![h]));
            }
            if cfg.qk_norm {
                t.push((format!("{a}.q_norm.weight"), vec![hd]));
                t.push((format!("{a}.k_norm.weight"), vec![hd]));
            }
            if cfg.attention_sinks {
                t.push((format!("{a}.sinks"), vec![nh]));
            }
        }
        match cfg.layer_kinds[l] {
            MlpKind::Dense => {
                let i = cfg.intermediate_size;
                for (n, s) in [("gate", [i, h]), ("up", [i, h]), ("down", [h, i])] {
                    t.push((format!("{p}.mlp.{n}_proj.weight"), s.to_vec()));
                }
            }
            MlpKind::Moe => {
                let m = cfg.moe_prefix(l);
                let i = cfg.moe_intermediate_size;
                t.push((
                    format!("{m}.{}.weight", cfg.router_name),
                    vec![cfg.num_experts, h],
                ));
                if cfg.router_bias {
                    t.push((
                        format!("{m}.{}.bias", cfg.router_name),
                        vec![cfg.num_experts],
                    ));
                }
                if matches!(cfg.router, crate::config::RouterKind::SigmoidGrouped { .. }) {
                    t.push((
                        format!("{m}.gate.e_score_correction_bias"),
                        vec![cfg.num_experts],
                    ));
                }
                for e in 0..cfg.num_experts {
                    let n = cfg.expert_tensor_names(l, e);
                    t.push((n.gate_proj, vec![i, h]));
                    t.push((n.up_proj, vec![i, h]));
                    t.push((n.down_proj, vec![h, i]));
                }
                if let Some(si) = cfg.shared_expert_intermediate_size {
                    let se = cfg.shared_expert_name;
                    for (n, s) in [("gate", [si, h]), ("up", [si, h]), ("down", [h, si])] {
                        t.push((format!("{m}.{se}.{n}_proj.weight"), s.to_vec()));
                    }
                    if cfg.shared_expert_gated {
                        t.push((format!("{m}.shared_expert_gate.weight"), vec![1, h]));
                    }
                }
            }
        }
    }
    let mut offset = 0;
    t.into_iter()
        .map(|(name, shape)| {
            let len = dtype
                .bytes_for(&shape)
                .expect("synthetic shapes fit their dtype");
            let info = TensorInfo {
                dtype,
                shape,
                start: offset,
                len,
            };
            offset += len;
            (name, info)
        })
        .collect()
}

fn name_seed(name: &str, seed: u64) -> u64 {
    // FNV-1a over the name, mixed with the seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Generates the tensor `name` of shape `info.shape`: norms are 1, routers and weights uniform
/// with a scale that keeps activations of unit size, biases small.
pub fn generate(name: &str, info: &TensorInfo, seed: u64) -> Tensor {
    let numel: usize = info.shape.iter().product();
    let fan_in = *info.shape.last().unwrap_or(&1) as f32;
    let scale = if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
        0.0
    } else if name.ends_with(".bias") {
        0.02
    } else if name.contains("embed_tokens") {
        1.0
    } else {
        // Uniform in [-a, a] has standard deviation a / sqrt(3); aim at 1 / sqrt(fan_in).
        (3.0 / fan_in).sqrt()
    };
    let base = name_seed(name, seed);
    const CHUNK: usize = 1 << 16;
    let value = |rng: &mut Rng| {
        if scale == 0.0 {
            1.0
        } else {
            ((rng.next_f64() * 2.0 - 1.0) as f32) * scale
        }
    };
    match info.dtype {
        DType::F32 => {
            let mut data = vec![0f32; numel];
            data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                let mut rng = Rng::new(base ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for o in out {
                    *o = value(&mut rng);
                }
            });
            Tensor::from_f32(name, info.shape.clone(), &data)
        }
        // tensor_index never asks for the load-time-decoded F8E4M3/U8; generated as BF16 anyway
        DType::F16 | DType::BF16 | DType::F8E4M3 | DType::U8 => {
            let mut data = vec![bf16::ZERO; numel];
            data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                let mut rng = Rng::new(base ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for o in out {
                    *o = bf16::from_f32(value(&mut rng));
                }
            });
            Tensor::from_bf16(name, info.shape.clone(), &data)
        }
        q => {
            let q = q.quant().expect("block type");
            let cols = info.shape.last().copied().unwrap_or(1);
            let mut data = vec![0f32; numel];
            data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                let mut rng = Rng::new(base ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for o in out {
                    *o = value(&mut rng);
                }
            });
            let rows: Vec<Vec<u8>> = data
                .par_chunks(cols.max(1))
                .map(|row| {
                    let mut b = Vec::new();
                    crate::quant::quantize(q, row, &mut b);
                    b
                })
                .collect();
            Tensor::from_raw(name, info.dtype, info.shape.clone(), &rows.concat())
                .expect("synthetic tensor sizes are consistent")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use std::path::Path;

    const CFG: &str = r#"{"model_type":"qwen2_moe","hidden_size":32,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":48,
        "moe_intermediate_size":16,"num_experts":5,"num_experts_per_tok":2,
        "shared_expert_intermediate_size":24,"mlp_only_layers":[0],"vocab_size":64}"#;

    #[test]
    fn index_covers_what_the_model_loads_and_values_are_reproducible() {
        let cfg = ModelConfig::from_json_str(CFG, Path::new("config.json")).unwrap();
        let idx = tensor_index(&cfg, DType::BF16);
        assert!(idx.contains_key("model.layers.1.mlp.experts.4.down_proj.weight"));
        assert!(idx.contains_key("model.layers.1.mlp.shared_expert_gate.weight"));
        assert!(idx.contains_key("model.layers.0.mlp.up_proj.weight"));
        assert!(idx.contains_key("model.layers.0.self_attn.q_proj.bias"));
        let info = &idx["model.layers.1.mlp.experts.2.gate_proj.weight"];
        assert_eq!(info.shape, vec![16, 32]);
        let a = generate("model.layers.1.mlp.experts.2.gate_proj.weight", info, 7);
        let b = generate("model.layers.1.mlp.experts.2.gate_proj.weight", info, 7);
        let c = generate("model.layers.1.mlp.experts.3.gate_proj.weight", info, 7);
        assert_eq!(a.raw(), b.raw());
        assert_ne!(a.raw(), c.raw());
        assert_eq!(a.dtype(), DType::BF16);
        let n = generate("model.norm.weight", &idx["model.norm.weight"], 7);
        assert!(n.to_f32_vec().iter().all(|&x| x == 1.0));
    }
}
