//! Generated tokens to streamed text: incremental detokenization and stop strings. Pure functions
//! of their inputs (the tokenizer is passed in as a decode function), so they test without a model.

/// Turns a growing token list into text pieces in O(window) per token (not O(length)): it decodes
/// a short window ending at the new token and emits what the window adds, holding back a piece
/// while it ends in an incomplete UTF-8 character (text-generation-inference's scheme).
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the newly printable text (possibly empty).
    pub fn push<E>(
        &mut self,
        id: u32,
        decode: impl Fn(&[u32]) -> Result<String, E>,
    ) -> Result<String, E> {
        self.ids.push(id);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }
}

/// Ends the output at the first stop string, which is not included. Text that could be the start
/// of a stop string is held back until it is known not to be one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty ones are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds generated text; returns what can be emitted now and whether a stop string was hit
    /// (then the output ends with the returned text).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        // The earliest stop string wins.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let mut keep_from = self.held.len();
        for (i, _) in self.held.char_indices() {
            let tail = &self.held[i..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
            {
                keep_from = i;
                break;
            }
        }
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (out, false)
    }

    /// The held-back text, at the end of a generation that did not hit a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (o, stop) = m.push(p);
            out.push_str(&o);
            if stop {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_strings_table() {
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&[], &["ab", "cd"], "abcd", false),
            (&["cd"], &["ab", "cd", "ef"], "ab", true),
            (&["cd"], &["abc", "def"], "ab", true),
            (&["c", "bcd"], &["ab", "cd"], "a", true),
            (&["xyz"], &["axy", "b"], "axyb", false),
            (&["xyz"], &["axy"], "axy", false),
            (&["\n\n"], &["a\n", "\nb"], "a", true),
            (&["é!"], &["café", "?"], "café?", false),
            (&["é!"], &["café", "!"], "caf", true),
            (&[""], &["a"], "a", false),
        ];
        for (stops, pieces, want, stopped) in cases {
            assert_eq!(
                run(stops, pieces),
                (want.to_string(), *stopped),
                "stops {stops:?} pieces {pieces:?}"
            );
        }
    }

    #[test]
    fn held_text_is_released_once_it_cannot_stop() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), ("hello ".into(), false));
        assert_eq!(m.push("N"), ("".into(), false));
        assert_eq!(m.push("x"), ("ENx".into(), false));
    }

    #[test]
    fn decoder_holds_incomplete_characters() {
        // A toy byte-level vocabulary: id = byte.
        let decode = |ids: &[u32]| -> Result<String, ()> {
            let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        let mut d = IncrementalDecoder::new();
        let mut out = Vec::new();
        for b in "aé€b".bytes() {
            out.push(d.push(b as u32, decode).unwrap());
        }
        assert_eq!(out, vec!["a", "", "é", "", "", "€", "b"]);
    }
}
