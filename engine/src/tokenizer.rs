//! Text in and out: `tokenizer.json` through the `tokenizers` crate, the chat template from
//! `tokenizer_config.json` (or `chat_template.jinja`) through minijinja, rendered the way
//! transformers renders it (trim_blocks and lstrip_blocks on, Python string methods available).
//! A GGUF file carries the same things in its `tokenizer.*` metadata; [`Tokenizer::from_gguf`]
//! builds the equivalent `tokenizer.json` from them.

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JValue, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// One chat message.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model's tokenizer and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(format!("{}: {e}", path.display()))
}

/// A special token's text from `tokenizer_config.json` (a string or `{"content": ...}`).
pub(crate) fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The chat template a `tokenizer_config.json` holds: a string, or a list of named templates
/// ("default", else the first).
pub(crate) fn template_in(tokenizer_config: &Value) -> Option<String> {
    match tokenizer_config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// A model directory's `chat_template.jinja`, when it has one.
pub(crate) fn template_file(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if !jinja.exists() {
        return Ok(None);
    }
    std::fs::read_to_string(&jinja)
        .map(Some)
        .map_err(|e| EngineError::io(&jinja, e))
}

impl Tokenizer {
    /// Loads `tokenizer.json` and the chat template from a model directory, or the tokenizer a
    /// `.gguf` file's metadata describes.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if crate::gguf_model::is_gguf(dir) {
            let file = crate::gguf::GgufFile::open(dir)?;
            return Self::from_gguf(&file);
        }
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::MissingFile {
                path,
                what: "the tokenizer (tokenizer.json)",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        let mut chat_template = None;
        let mut bos_token = None;
        let mut eos_token = None;
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| tok_err(&cfg_path, e))?;
            chat_template = template_in(&v);
            bos_token = token_text(v.get("bos_token"));
            eos_token = token_text(v.get("eos_token"));
        }
        if chat_template.is_none() {
            chat_template = template_file(dir)?;
        }
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token,
        })
    }

    /// The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`,
    /// `tokenizer.chat_template`): byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the
    /// pre-tokenizer `tokenizer.ggml.pre` names (llama.cpp's names: `gpt-2`, `qwen2`, `llama3`).
    pub fn from_gguf(file: &crate::gguf::GgufFile) -> Result<Self> {
        let (json, bos, eos) = gguf_tokenizer_json(file)?;
        let inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
            .map_err(|e| tok_err(file.path(), e))?;
        let chat_template = file
            .get("tokenizer.chat_template")
            .and_then(crate::gguf::Value::as_str)
            .map(str::to_string);
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token: bos,
            eos_token: eos,
        })
    }

    /// Builds a tokenizer from parts (GGUF metadata and tests).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        Tokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token,
        }
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer's post-processor adds (bos).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The eos token's text from `tokenizer_config.json`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders `messages` with the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            EngineError::Tokenizer("the model has no chat template (tokenizer_config.json)".into())
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }
}

/// Pre-tokenizer split patterns of the `tokenizer.ggml.pre` names whose Hugging Face tokenizers
/// split with a regex before the byte-level mapping (facts from the models' `tokenizer.json`).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` names whose split pattern a Hugging Face tokenizer states.
pub const GGUF_PRE_PATTERNS: &[(&str, &str)] =
    &[("qwen2", QWEN2_PATTERN), ("llama3", LLAMA3_PATTERN)];

/// The `tokenizer.ggml.pre` names we map.
pub const GGUF_PRE_TOKENIZERS: &[&str] = &["gpt-2", "qwen2", "llama3", "llama-v3", "llama-bpe"];

/// SentencePiece's mark for a space.
const SPM_SPACE: &str = "\u{2581}";

/// The merges of a SentencePiece BPE vocabulary, which GGUF does not store: every split of a
/// normal token into two normal tokens, the token with the higher score merged first (ties: the
/// lower id), which is how SentencePiece's greedy pair merging ranks them.
fn spm_merges(file: &crate::gguf::GgufFile, tokens: &[&str], types: &[i64]) -> Result<Vec<Value>> {
    use crate::gguf::Value as G;
    let err = |msg: String| tok_err(file.path(), msg);
    let scores: Vec<f32> = match file.get("tokenizer.ggml.scores") {
        None => {
            return Err(err(
                "metadata tokenizer.ggml.scores is missing (SentencePiece)".into(),
            ));
        }
        Some(G::Array(a)) if a.len() == tokens.len() => a
            .iter()
            .enumerate()
            .map(|(i, v)| match *v {
                G::F32(x) => Ok(x),
                G::F64(x) => Ok(x as f32),
                _ => Err(err(format!("tokenizer.ggml.scores[{i}] is not a float"))),
            })
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(err(format!(
                "tokenizer.ggml.scores is not an array of {} floats",
                tokens.len()
            )));
        }
    };
    let normal: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == TOKEN_NORMAL)
        .map(|(id, (t, _))| (*t, id))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (&piece, &id) in &normal {
        for (k, _) in piece.char_indices().skip(1) {
            if let (Some(&a), Some(&b)) = (normal.get(&piece[..k]), normal.get(&piece[k..])) {
                merges.push((scores[id], id, a, b));
            }
        }
    }
    merges.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
            .then(x.3.cmp(&y.3))
    });
    Ok(merges
        .into_iter()
        .map(|(_, _, a, b)| serde_json::json!([tokens[a], tokens[b]]))
        .collect())
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_UNUSED: i64 = 5;

/// The `tokenizer.json` equivalent of a GGUF file's tokenizer metadata, with the bos and eos texts.
fn gguf_tokenizer_json(
    file: &crate::gguf::GgufFile,
) -> Result<(Value, Option<String>, Option<String>)> {
    use crate::gguf::Value as G;
    use serde_json::json;
    let path = file.path();
    let err = |msg: String| tok_err(path, msg);
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(G::as_str)
        .ok_or_else(|| err("metadata tokenizer.ggml.model is missing".into()))?;
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(err(format!(
                "tokenizer.ggml.model {other:?} is not supported (\"gpt2\": byte-level BPE, \
                 \"llama\": SentencePiece BPE)"
            )));
        }
    };
    let tokens: Vec<&str> = file
        .get("tokenizer.ggml.tokens")
        .and_then(G::as_array)
        .ok_or_else(|| err("metadata tokenizer.ggml.tokens is missing".into()))?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| err(format!("tokenizer.ggml.tokens[{i}] is not a string")))
        })
        .collect::<Result<_>>()?;
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => {
            let a = v
                .as_array()
                .ok_or_else(|| err("tokenizer.ggml.token_type is not an array".into()))?;
            if a.len() != tokens.len() {
                return Err(err(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    a.len(),
                    tokens.len()
                )));
            }
            a.iter()
                .map(|t| match *t {
                    G::I32(x) => Ok(i64::from(x)),
                    ref o => o
                        .as_u64()
                        .map(|x| x as i64)
                        .ok_or_else(|| err(format!("token type {o:?} is not an integer"))),
                })
                .collect::<Result<_>>()?
        }
    };
    let merges: Vec<Value> = match file.get("tokenizer.ggml.merges") {
        None if spm => spm_merges(file, &tokens, &types)?,
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or_else(|| err("tokenizer.ggml.merges is not an array".into()))?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.as_str()
                    .and_then(|m| m.split_once(' '))
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| err(format!("tokenizer.ggml.merges[{i}] is not \"a b\"")))
            })
            .collect::<Result<_>>()?,
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        // Unused slots (vocabulary padding) are not tokens: the Hugging Face tokenizer lacks them.
        if ty == TOKEN_UNUSED {
            continue;
        }
        vocab.insert(tok.to_string(), json!(id));
        if matches!(ty, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED) {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty != TOKEN_USER_DEFINED,
            }));
        }
    }
    let pre = match file.get("tokenizer.ggml.pre").and_then(G::as_str) {
        // SentencePiece: no pre-tokenizer (the name recorded is "default").
        _ if spm => "(sentencepiece)",
        Some(p) => p,
        None => "(none)",
    };
    // SentencePiece marks spaces with U+2581 and (unless told otherwise) a leading one.
    let space_prefix = file
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(G::as_bool)
        .unwrap_or(true);
    let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
             "invert": false},
            byte_level(false),
        ]})
    };
    // Hugging Face's Qwen2 tokenizer NFC-normalises; GGUF does not record a normaliser, so it
    // is applied for the names whose tokenizers have it (our gpt2-style fixtures too).
    let (pre_tokenizer, normalizer) = match pre {
        "(sentencepiece)" if space_prefix => (
            Value::Null,
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPM_SPACE}, replace(" ", SPM_SPACE)]}),
        ),
        "(sentencepiece)" => (Value::Null, replace(" ", SPM_SPACE)),
        "gpt-2" => (byte_level(true), json!({"type": "NFC"})),
        "qwen2" => (split(QWEN2_PATTERN), json!({"type": "NFC"})),
        "llama3" | "llama-v3" | "llama-bpe" => (split(LLAMA3_PATTERN), Value::Null),
        other => {
            return Err(err(format!(
                "tokenizer.ggml.pre {other:?} is not supported; supported: {}",
                GGUF_PRE_TOKENIZERS.join(", ")
            )));
        }
    };
    let id_of = |key: &str| -> Result<Option<(u32, String)>> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => {
                let id = v
                    .as_u64()
                    .filter(|&i| (i as usize) < tokens.len())
                    .ok_or_else(|| err(format!("{key} {v:?} is not a token id")))?;
                Ok(Some((id as u32, tokens[id as usize].to_string())))
            }
        }
    };
    let bos = id_of("tokenizer.ggml.bos_token_id")?;
    let eos = id_of("tokenizer.ggml.eos_token_id")?;
    let flag = |key: &str| file.get(key).and_then(G::as_bool).unwrap_or(false);
    let mut single = Vec::new();
    let mut specials = serde_json::Map::new();
    let mut special = |t: &(u32, String)| {
        specials.insert(
            t.1.clone(),
            json!({"id": t.1, "ids": [t.0], "tokens": [t.1]}),
        );
        json!({"SpecialToken": {"id": t.1, "type_id": 0}})
    };
    if flag("tokenizer.ggml.add_bos_token")
        && let Some(b) = &bos
    {
        single.push(special(b));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if flag("tokenizer.ggml.add_eos_token")
        && let Some(e) = &eos
    {
        single.push(special(e));
    }
    let post_processor = if single.len() > 1 {
        json!({"type": "TemplateProcessing", "single": single, "pair": single,
               "special_tokens": specials})
    } else {
        Value::Null
    };
    let (decoder, unk_token) = if spm {
        let mut steps = vec![
            replace(SPM_SPACE, " "),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if space_prefix {
            steps.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let unk = id_of("tokenizer.ggml.unknown_token_id")?
            .map(|(_, t)| t)
            .or_else(|| {
                types
                    .iter()
                    .position(|&t| t == TOKEN_UNKNOWN)
                    .map(|i| tokens[i].to_string())
            });
        (json!({"type": "Sequence", "decoders": steps}), unk)
    } else {
        (
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                   "use_regex": true}),
            None,
        )
    };
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": null, "unk_token": unk_token,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": spm, "byte_fallback": spm, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    Ok((json, bos.map(|b| b.1), eos.map(|e| e.1)))
}

/// Renders a Jinja chat template as transformers does.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JValue, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |_fmt: String| -> String {
        // Templates use this for a date line; a fixed date keeps renders reproducible.
        "26 Nov 2026".to_string()
    });
    let err = |e: JinjaError| EngineError::Tokenizer(format!("chat template: {e:#}"));
    env.add_template("chat", template).map_err(err)?;
    let tmpl = env.get_template("chat").map_err(err)?;
    tmpl.render(context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(err)
}

/// Turns a growing list of token ids into text pieces as they become printable.
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        StreamDecoder {
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the newly printable text (empty while a character is incomplete).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return Ok(String::new());
        }
        let piece = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}
