//! Incremental framing of upstream streams: server-sent events (OpenAI, Anthropic, Gemini)
//! and newline-delimited JSON (Ollama). Bytes may be split anywhere, inside a line or a
//! UTF-8 sequence; only complete events and lines come out.

use memchr::{memchr, memchr2};

use super::error::ProviderError;

/// Largest event or line accepted; a stream that grows one past this is broken or hostile.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One complete server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `None` for the default `message` type.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// An incremental SSE parser (WHATWG HTML "event stream interpretation").
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes not yet ending in a line terminator.
    pending: Vec<u8>,
    /// The previous chunk ended in `\r`; a leading `\n` belongs to that terminator.
    skip_lf: bool,
    /// The event being assembled.
    event: Option<String>,
    data: String,
    has_data: bool,
    started: bool,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        SseParser::default()
    }

    /// Feeds bytes; returns the events they complete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<SseEvent>, ProviderError> {
        let mut events = Vec::new();
        if self.skip_lf && !bytes.is_empty() {
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
            self.skip_lf = false;
        }
        while let Some(end) = memchr2(b'\n', b'\r', bytes) {
            let terminator = bytes[end];
            if self.pending.is_empty() {
                self.line(&bytes[..end], &mut events)?;
            } else {
                self.pending.extend_from_slice(&bytes[..end]);
                let line = std::mem::take(&mut self.pending);
                self.line(&line, &mut events)?;
            }
            bytes = &bytes[end + 1..];
            if terminator == b'\r' {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(ProviderError::Malformed(
                "server-sent event too large".into(),
            ));
        }
        Ok(events)
    }

    /// Ends the stream. A last event whose lines all ended is delivered even without the
    /// closing blank line (some servers omit it); an unterminated last line is a cut-off
    /// fragment and is dropped, so the decoder reports the stream as truncated.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        self.pending.clear();
        self.dispatch(&mut events);
        events
    }

    fn line(&mut self, mut line: &[u8], events: &mut Vec<SseEvent>) -> Result<(), ProviderError> {
        if !self.started {
            self.started = true;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(events);
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(()); // comment (keep-alive)
        }
        let (field, value) = match memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
                self.has_data = true;
                if self.data.len() > MAX_EVENT_BYTES {
                    return Err(ProviderError::Malformed(
                        "server-sent event too large".into(),
                    ));
                }
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {} // id, retry and unknown fields carry nothing the decoders need
        }
        Ok(())
    }

    fn dispatch(&mut self, events: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if !self.has_data {
            return;
        }
        self.has_data = false;
        events.push(SseEvent {
            event,
            data: std::mem::take(&mut self.data),
        });
    }
}

/// Splits newline-delimited JSON into lines; blank lines are skipped.
#[derive(Debug, Default)]
pub struct NdjsonSplitter {
    pending: Vec<u8>,
}

impl NdjsonSplitter {
    /// A splitter at the start of a stream.
    pub fn new() -> Self {
        NdjsonSplitter::default()
    }

    /// Feeds bytes; returns the complete lines they end, without terminators.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, ProviderError> {
        let mut lines = Vec::new();
        while let Some(end) = memchr(b'\n', bytes) {
            self.pending.extend_from_slice(&bytes[..end]);
            let line = std::mem::take(&mut self.pending);
            push_line(line, &mut lines);
            bytes = &bytes[end + 1..];
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() > MAX_EVENT_BYTES {
            return Err(ProviderError::Malformed("NDJSON line too large".into()));
        }
        Ok(lines)
    }

    /// Ends the stream; returns a last line that had no terminator.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let mut lines = Vec::new();
        push_line(std::mem::take(&mut self.pending), &mut lines);
        lines.pop()
    }
}

fn push_line(mut line: Vec<u8>, lines: &mut Vec<Vec<u8>>) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if !line.iter().all(u8::is_ascii_whitespace) {
        lines.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], size: usize) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for piece in input.chunks(size) {
            events.extend(parser.feed(piece).unwrap());
        }
        events.extend(parser.finish());
        events
    }

    #[test]
    fn events_survive_any_split() {
        let input = "\u{feff}: keep-alive\r\nevent: ping\r\nid: 7\r\ndata: {\"a\":\r\ndata:\"é\"}\r\n\r\n\
                     data: second\n\nevent: lonely\n\ndata: third\rdata: more\r\r";
        let expected = vec![
            SseEvent {
                event: Some("ping".into()),
                data: "{\"a\":\n\"é\"}".into(),
            },
            SseEvent {
                event: None,
                data: "second".into(),
            },
            SseEvent {
                event: None,
                data: "third\nmore".into(),
            },
        ];
        for size in 1..=input.len() {
            assert_eq!(
                parse_in_pieces(input.as_bytes(), size),
                expected,
                "size {size}"
            );
        }
    }

    #[test]
    fn finish_delivers_an_event_without_blank_line_but_not_a_cut_line() {
        assert_eq!(
            parse_in_pieces(b"data: [DONE]\n", 3),
            vec![SseEvent {
                event: None,
                data: "[DONE]".into()
            }]
        );
        assert_eq!(parse_in_pieces(b"data: [DO", 3), vec![]);
    }

    #[test]
    fn ndjson_lines() {
        let input = b"{\"a\":1}\n\n{\"b\":2}\r\n{\"c\":3}";
        for size in 1..=input.len() {
            let mut splitter = NdjsonSplitter::new();
            let mut lines = Vec::new();
            for piece in input.chunks(size) {
                lines.extend(splitter.feed(piece).unwrap());
            }
            lines.extend(splitter.finish());
            assert_eq!(
                lines,
                vec![
                    b"{\"a\":1}".to_vec(),
                    b"{\"b\":2}".to_vec(),
                    b"{\"c\":3}".to_vec()
                ]
            );
        }
    }
}
