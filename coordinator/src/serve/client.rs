//! A minimal blocking HTTP/1.1 client for talking to a moeshard server on a trusted address: the
//! end-to-end tests and `moeshard bench-serve` use it. One request per connection
//! (`Connection: close`), plain and chunked bodies, and server-sent events read as they arrive.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Largest response head or chunk-size line accepted.
const MAX_LINE: usize = 64 << 10;
/// Largest response body accepted.
const MAX_BODY: usize = 64 << 20;

/// What can go wrong talking to the server.
#[derive(Debug)]
pub enum ClientError {
    /// The connection failed.
    Io(std::io::Error),
    /// The answer is not HTTP as expected.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "connection: {e}"),
            ClientError::Protocol(m) => write!(f, "bad HTTP answer: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// A response whose body has not been read yet.
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    body: BodyReader,
}

enum Framing {
    Length(usize),
    Chunked { left_in_chunk: usize, done: bool },
    UntilClose,
}

struct BodyReader {
    inner: BufReader<TcpStream>,
    framing: Framing,
}

fn read_line(r: &mut BufReader<TcpStream>) -> Result<String, ClientError> {
    let mut buf = Vec::new();
    (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)?;
    if !buf.ends_with(b"\n") {
        return Err(ClientError::Protocol(
            "line too long or connection closed".into(),
        ));
    }
    let s = String::from_utf8(buf).map_err(|_| ClientError::Protocol("non-UTF-8 line".into()))?;
    Ok(s.trim_end_matches(['\r', '\n']).to_string())
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let proto = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        match &mut self.framing {
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let n = out.len().min(*left);
                let got = self.inner.read(&mut out[..n])?;
                if got == 0 {
                    return Err(proto("body ended early"));
                }
                *left -= got;
                Ok(got)
            }
            Framing::UntilClose => self.inner.read(out),
            Framing::Chunked {
                left_in_chunk,
                done,
            } => {
                if *done {
                    return Ok(0);
                }
                if *left_in_chunk == 0 {
                    let line = read_line(&mut self.inner).map_err(|e| proto(&e.to_string()))?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size, 16)
                        .map_err(|_| proto(&format!("bad chunk size {size:?}")))?;
                    if size == 0 {
                        // Trailers end with an empty line.
                        loop {
                            let l =
                                read_line(&mut self.inner).map_err(|e| proto(&e.to_string()))?;
                            if l.is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                    *left_in_chunk = size;
                }
                let n = out.len().min(*left_in_chunk);
                let got = self.inner.read(&mut out[..n])?;
                if got == 0 {
                    return Err(proto("chunk ended early"));
                }
                *left_in_chunk -= got;
                if *left_in_chunk == 0 {
                    let l = read_line(&mut self.inner).map_err(|e| proto(&e.to_string()))?;
                    if !l.is_empty() {
                        return Err(proto("no line end after a chunk"));
                    }
                }
                Ok(got)
            }
        }
    }
}

impl Response {
    /// The value of a header (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reads the whole body as text.
    pub fn text(mut self) -> Result<String, ClientError> {
        let mut buf = Vec::new();
        (&mut self.body)
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut buf)?;
        if buf.len() > MAX_BODY {
            return Err(ClientError::Protocol("body too large".into()));
        }
        String::from_utf8(buf).map_err(|_| ClientError::Protocol("non-UTF-8 body".into()))
    }

    /// Reads the whole body as JSON.
    pub fn json(self) -> Result<serde_json::Value, ClientError> {
        let text = self.text()?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Protocol(format!("body is not JSON ({e}): {text}")))
    }

    /// Reads server-sent events one at a time: the `data` of each.
    pub fn events(self) -> Events {
        Events {
            body: BufReader::new(self.body),
        }
    }
}

/// The `data` fields of a server-sent event stream, as they arrive.
pub struct Events {
    body: BufReader<BodyReader>,
}

impl Events {
    /// The next event's data, or `None` at the end of the stream.
    pub fn next_data(&mut self) -> Result<Option<String>, ClientError> {
        let mut data: Option<String> = None;
        loop {
            let mut buf = Vec::new();
            let n = (&mut self.body)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut buf)?;
            if n == 0 {
                return Ok(data);
            }
            let line = String::from_utf8(buf)
                .map_err(|_| ClientError::Protocol("non-UTF-8 event".into()))?;
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_some() {
                    return Ok(data);
                }
                continue;
            }
            if let Some(d) = line.strip_prefix("data:") {
                let d = d.strip_prefix(' ').unwrap_or(d);
                match &mut data {
                    Some(s) => {
                        s.push('\n');
                        s.push_str(d);
                    }
                    None => data = Some(d.to_string()),
                }
            }
        }
    }
}

/// Sends one request and reads the response head. `body` is sent as JSON when given.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    let mut w = &stream;
    w.write_all(head.as_bytes())?;
    if let Some(b) = body {
        w.write_all(b)?;
    }
    w.flush()?;
    let mut r = BufReader::new(stream);
    let status_line = read_line(&mut r)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(&mut r)?;
        if line.is_empty() {
            break;
        }
        if headers.len() > 256 {
            return Err(ClientError::Protocol("too many headers".into()));
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let framing = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        Framing::Chunked {
            left_in_chunk: 0,
            done: false,
        }
    } else if let Some(len) = find("content-length") {
        Framing::Length(
            len.parse()
                .map_err(|_| ClientError::Protocol(format!("bad content-length {len:?}")))?,
        )
    } else {
        Framing::UntilClose
    };
    Ok(Response {
        status,
        headers,
        body: BodyReader { inner: r, framing },
    })
}

/// `POST` a JSON value.
pub fn post_json(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<Response, ClientError> {
    request(
        addr,
        "POST",
        path,
        headers,
        Some(body.to_string().as_bytes()),
        timeout,
    )
}

/// `GET` a path.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<Response, ClientError> {
    request(addr, "GET", path, &[], None, timeout)
}
