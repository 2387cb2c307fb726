//! The OpenAI wire types (the subset moeshard serves) and their validation into a
//! [`Generation`]: what to generate, checked field by field with OpenAI-style error answers.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use moeshard_engine::sampling::SamplingParams;

/// Longest stop string list accepted.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string accepted, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// An error answer: HTTP status plus the OpenAI body `{"error": {message, type, param, code}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, ...).
    pub kind: &'static str,
    /// The offending parameter, if one.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about one parameter.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 with a code.
    pub fn bad_request(message: impl Into<String>, code: &'static str) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The sampling and length fields both endpoints share.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonParams {
    /// Which model.
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Newer spelling of `max_tokens` (chat).
    pub max_completion_tokens: Option<i64>,
    /// 0..=2; 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus threshold, (0, 1].
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens (0 or -1: off). An extension (vLLM spells it so).
    pub top_k: Option<i64>,
    /// Seed of the sampler.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<StopSpec>,
    /// Stream as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Choices to generate; only 1.
    pub n: Option<i64>,
    /// Keep generating past end-of-sequence (an extension, for benchmarks).
    pub ignore_eos: Option<bool>,
}

/// One message's content: a string or a list of parts.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": ...}`).
    Parts(Vec<ContentPart>),
}

/// A content part.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    pub text: Option<String>,
}

/// A chat message as clients send it.
#[derive(Clone, Debug, Deserialize)]
pub struct InMessage {
    /// `system`, `developer`, `user`, `assistant`, ...
    pub role: String,
    /// The content (may be null for assistant messages).
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<InMessage>,
    /// Everything else.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// A completions prompt: text, token ids, or a one-element batch of either.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<i64>),
    /// A batch of texts.
    Texts(Vec<String>),
    /// A batch of token lists.
    TokenLists(Vec<Vec<i64>>),
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Everything else.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// What to generate, once the fields are checked (the prompt is tokenized later).
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Requested `max_tokens`, if given.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream the answer.
    pub stream: bool,
    /// Send a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Ignore end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// Parses a JSON body, naming the offending field on failure.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            format!("the request body is not valid JSON: {e}"),
            "invalid_json",
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
            "invalid_json",
        ));
    }
    check_field_types(&value)?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid request: {e}"), "invalid_request"))
}

/// Names the field of a type error before serde's untyped message would (serde does not say
/// which field of a flattened struct failed).
fn check_field_types(v: &Value) -> Result<(), ApiError> {
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let expect = |name: &str, ok: bool, want: &str, got: &Value| {
        if ok {
            Ok(())
        } else {
            Err(ApiError::invalid(
                name,
                format!("{name} must be {want}, got {}", kind(got)),
            ))
        }
    };
    let Some(obj) = v.as_object() else {
        return Ok(());
    };
    for (name, val) in obj {
        if val.is_null() {
            continue;
        }
        match name.as_str() {
            "model" => expect(name, val.is_string(), "a string", val)?,
            "max_tokens" | "max_completion_tokens" | "n" | "top_k" | "seed" => {
                expect(name, val.is_i64() || val.is_u64(), "an integer", val)?
            }
            "temperature" | "top_p" => expect(name, val.is_number(), "a number", val)?,
            "stream" | "ignore_eos" => expect(name, val.is_boolean(), "a boolean", val)?,
            "stream_options" => expect(name, val.is_object(), "an object", val)?,
            "stop" => expect(
                name,
                val.is_string()
                    || val
                        .as_array()
                        .is_some_and(|a| a.iter().all(Value::is_string)),
                "a string or a list of strings",
                val,
            )?,
            "messages" => {
                let Some(list) = val.as_array() else {
                    return expect(name, false, "a list of messages", val);
                };
                for (i, m) in list.iter().enumerate() {
                    let p = format!("messages[{i}]");
                    let Some(o) = m.as_object() else {
                        return expect(&p, false, "an object", m);
                    };
                    match o.get("role") {
                        Some(r) if r.is_string() => {}
                        Some(r) => return expect(&format!("{p}.role"), false, "a string", r),
                        None => {
                            return Err(ApiError::invalid(
                                format!("{p}.role"),
                                format!("{p}.role is missing"),
                            ));
                        }
                    }
                    if let Some(c) = o.get("content")
                        && !(c.is_null() || c.is_string() || c.is_array())
                    {
                        return expect(
                            &format!("{p}.content"),
                            false,
                            "a string or a list of content parts",
                            c,
                        );
                    }
                }
            }
            "prompt" => expect(
                name,
                val.is_string() || val.is_array(),
                "a string, a list of token ids, or a list of one of these",
                val,
            )?,
            _ => {}
        }
    }
    Ok(())
}

fn non_negative(name: &str, v: i64) -> Result<usize, ApiError> {
    usize::try_from(v).map_err(|_| ApiError::invalid(name, format!("{name} must be >= 0, got {v}")))
}

impl CommonParams {
    /// Checks the fields (not the model name, nor the prompt against the context).
    pub fn validate(&self) -> Result<Generation, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                "n",
                format!("n = {n} is not supported: moeshard generates exactly one choice (n = 1)"),
            ));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => Some(("max_completion_tokens", v)),
            (None, Some(v)) => Some(("max_tokens", v)),
            (None, None) => None,
        };
        let max_tokens = match max_tokens {
            Some((name, v)) if v < 1 => {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} must be at least 1, got {v}"),
                ));
            }
            Some((name, v)) => Some(non_negative(name, v)?),
            None => None,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k) => non_negative("top_k", k)?,
        };
        let seed = match self.seed {
            Some(s) => s as u64,
            None => random_seed(),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopSpec::One(s)) => vec![s.clone()],
            Some(StopSpec::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings are accepted, got {}",
                    stop.len()
                ),
            ));
        }
        if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "a stop string may have at most {MAX_STOP_BYTES} bytes, got {}",
                    s.len()
                ),
            ));
        }
        let stream = self.stream.unwrap_or(false);
        let include_usage = self
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(Generation {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k,
                seed,
            },
            stop,
            stream,
            include_usage,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

/// A seed for requests that give none: different every time, like OpenAI's default.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl ChatRequest {
    /// The messages as the chat template takes them (text parts joined).
    pub fn messages(&self) -> Result<Vec<moeshard_engine::tokenizer::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "messages must hold at least one message",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(s)) => s.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        format!("messages[{i}].content[{j}]"),
                                        format!(
                                            "content parts of type {:?} are not supported (text only)",
                                            p.kind
                                        ),
                                    ));
                                }
                            }
                        }
                        s
                    }
                };
                Ok(moeshard_engine::tokenizer::ChatMessage {
                    role: m.role.clone(),
                    content,
                })
            })
            .collect()
    }
}

/// A completions prompt once checked: text to tokenize or token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    /// Text (tokenized with the tokenizer's special tokens).
    Text(String),
    /// Token ids as given.
    Tokens(Vec<u32>),
}

impl CompletionRequest {
    /// The one prompt of the request.
    pub fn prompt(&self) -> Result<PromptInput, ApiError> {
        let ids = |v: &[i64]| -> Result<Vec<u32>, ApiError> {
            v.iter()
                .map(|&t| {
                    u32::try_from(t).map_err(|_| {
                        ApiError::invalid("prompt", format!("token id {t} is out of range"))
                    })
                })
                .collect()
        };
        let one = |n: usize| {
            if n == 1 {
                Ok(())
            } else {
                Err(ApiError::invalid(
                    "prompt",
                    format!("a batch of {n} prompts is not supported: send one prompt per request"),
                ))
            }
        };
        match &self.prompt {
            Prompt::Text(s) => Ok(PromptInput::Text(s.clone())),
            Prompt::Tokens(t) => Ok(PromptInput::Tokens(ids(t)?)),
            Prompt::Texts(v) => {
                one(v.len())?;
                Ok(PromptInput::Text(v[0].clone()))
            }
            Prompt::TokenLists(v) => {
                one(v.len())?;
                Ok(PromptInput::Tokens(ids(&v[0])?))
            }
        }
    }
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// One model of `GET /v1/models`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelCard {
    /// Its name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// `moeshard`.
    pub owned_by: &'static str,
    /// Context limit (an extension vLLM also reports).
    pub max_model_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Generation, ApiError> {
        let r: ChatRequest = parse_body(body.as_bytes())?;
        r.messages()?;
        r.params.validate()
    }

    #[test]
    fn field_errors_table() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"{"messages":[{"role":"user","content":"hi"}]}"#, None),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#,
                Some("n"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"n":1}"#,
                None,
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":"x"}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"temperature":3}"#,
                Some("temperature"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"top_p":0}"#,
                Some("top_p"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"top_k":-5}"#,
                Some("top_k"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"stop":[1]}"#,
                Some("stop"),
            ),
            (r#"{"messages":"hi"}"#, Some("messages")),
            (r#"{"messages":[]}"#, Some("messages")),
            (
                r#"{"messages":[{"content":"hi"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                Some("messages[0].content[0]"),
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"}]}],"stop":"x","stream":true,"stream_options":{"include_usage":true},"seed":-3}"#,
                None,
            ),
        ];
        for (body, param) in cases {
            match (chat(body), param) {
                (Ok(_), None) => {}
                (Err(e), Some(p)) => {
                    assert_eq!(e.status, 400, "{body}");
                    assert_eq!(e.param.as_deref(), Some(*p), "{body}: {e:?}");
                }
                (got, want) => panic!("{body}: got {got:?}, wanted an error on {want:?}"),
            }
        }
    }

    #[test]
    fn malformed_json_is_a_400() {
        for body in ["{", "[1,2]", "", "null"] {
            let e = parse_body::<ChatRequest>(body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.code, Some("invalid_json"));
        }
        let e = parse_body::<ChatRequest>(b"{}").unwrap_err();
        assert_eq!(e.status, 400, "missing messages");
    }

    #[test]
    fn prompts() {
        let p = |s: &str| parse_body::<CompletionRequest>(s.as_bytes()).and_then(|r| r.prompt());
        assert_eq!(p(r#"{"prompt":"hi"}"#), Ok(PromptInput::Text("hi".into())));
        assert_eq!(
            p(r#"{"prompt":[1,2]}"#),
            Ok(PromptInput::Tokens(vec![1, 2]))
        );
        assert_eq!(p(r#"{"prompt":["a"]}"#), Ok(PromptInput::Text("a".into())));
        assert!(p(r#"{"prompt":["a","b"]}"#).is_err());
        assert!(p(r#"{"prompt":[-1]}"#).is_err());
    }

    #[test]
    fn defaults_follow_openai() {
        let g = chat(r#"{"messages":[{"role":"user","content":"hi"}],"seed":7}"#).unwrap();
        assert_eq!(g.sampling.temperature, 1.0);
        assert_eq!(g.sampling.seed, 7);
        assert!(!g.stream && !g.include_usage && g.max_tokens.is_none());
    }
}
