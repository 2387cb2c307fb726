//! One sequence from prompt to finish: chunked prefill, then token-by-token decode.

use crate::error::{EngineError, Result};
use crate::experts::ExpertBackend;
use crate::model::{Model, SeqStep, WantLogits};
use crate::sampling::{Sampler, SamplingParams};

/// Largest number of prompt tokens run in one forward step (bounds activation memory).
pub const PREFILL_CHUNK: usize = 256;

/// Why a generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (or a stop condition) was produced.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Tokens that end the generation (not included in the output).
    pub stop_tokens: Vec<u32>,
    /// Context limit (prompt plus output); capped by the model's own.
    pub max_context: usize,
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// New tokens (without the stop token).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Runs `req`; `on_token` sees each new token as it is chosen and may return false to stop early.
pub fn generate(
    model: &Model,
    experts: &dyn ExpertBackend,
    req: &GenerateRequest,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    if req.prompt.is_empty() {
        return Err(EngineError::Input("the prompt has no tokens".into()));
    }
    let mut cache = model.new_cache(req.max_context);
    if req.prompt.len() >= cache.max_len() {
        return Err(EngineError::Input(format!(
            "the prompt has {} tokens; the context limit is {}",
            req.prompt.len(),
            cache.max_len()
        )));
    }
    let mut sampler = Sampler::new(req.sampling);
    let mut logits = prefill(model, experts, &req.prompt, &mut cache)?;
    let mut tokens = Vec::new();
    loop {
        if tokens.len() >= req.max_tokens {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Length,
            });
        }
        let next = sampler.sample(&logits);
        if req.stop_tokens.contains(&next) {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Stop,
            });
        }
        tokens.push(next);
        if !on_token(next)? {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Stop,
            });
        }
        if tokens.len() >= req.max_tokens || cache.len() + 1 > cache.max_len() {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Length,
            });
        }
        let step_tokens = [next];
        let mut steps = [SeqStep {
            tokens: &step_tokens,
            cache: &mut cache,
            want: WantLogits::Last,
        }];
        logits = model
            .forward(&mut steps, experts)?
            .pop()
            .unwrap_or_default();
    }
}

/// Logits at every position of `tokens` from one prefill (chunked), `[n, vocab]` row-major.
pub fn all_logits(model: &Model, experts: &dyn ExpertBackend, tokens: &[u32]) -> Result<Vec<f32>> {
    let mut cache = model.new_cache(tokens.len().max(1));
    let mut out = Vec::with_capacity(tokens.len() * model.cfg.vocab_size);
    for chunk in tokens.chunks(PREFILL_CHUNK) {
        let mut steps = [SeqStep {
            tokens: chunk,
            cache: &mut cache,
            want: WantLogits::All,
        }];
        out.extend(
            model
                .forward(&mut steps, experts)?
                .pop()
                .unwrap_or_default(),
        );
    }
    Ok(out)
}

/// Runs `tokens` through the model in chunks of [`PREFILL_CHUNK`], appending to `cache`; returns
/// the logits of the last position.
pub fn prefill(
    model: &Model,
    experts: &dyn ExpertBackend,
    tokens: &[u32],
    cache: &mut crate::model::KvCache,
) -> Result<Vec<f32>> {
    let mut logits = Vec::new();
    let chunks: Vec<&[u32]> = tokens.chunks(PREFILL_CHUNK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let want = if i + 1 == chunks.len() {
            WantLogits::Last
        } else {
            WantLogits::None
        };
        let mut steps = [SeqStep {
            tokens: chunk,
            cache: &mut *cache,
            want,
        }];
        logits = model
            .forward(&mut steps, experts)?
            .pop()
            .unwrap_or_default();
    }
    Ok(logits)
}
