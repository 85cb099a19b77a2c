//! Key path (`openai_clients[2].fallback`) → line and column in the file.
//!
//! serde_yaml reports no positions for values, so the text is walked once
//! more with a marked event parser. Only used to point at errors.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Default)]
pub struct SourceMap {
    keys: HashMap<String, Pos>,
    values: HashMap<String, Pos>,
}

impl SourceMap {
    /// Builds the map, or returns the YAML syntax error with its position.
    pub fn build(text: &str) -> Result<SourceMap, (Pos, String)> {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        parser
            .load(&mut builder, false)
            .map_err(|e| (pos(e.marker()), e.info().to_owned()))?;
        Ok(builder.map)
    }

    /// Where the key of `path` is written, else its value, else the nearest
    /// ancestor's; line 1 column 1 when nothing matches.
    pub fn key(&self, path: &str) -> Pos {
        self.lookup(path, true)
    }

    /// Where the value of `path` starts, else its key, else the nearest ancestor's.
    pub fn value(&self, path: &str) -> Pos {
        self.lookup(path, false)
    }

    fn lookup(&self, path: &str, key_first: bool) -> Pos {
        let mut p = path;
        loop {
            let (first, second) = if key_first {
                (&self.keys, &self.values)
            } else {
                (&self.values, &self.keys)
            };
            if let Some(pos) = first.get(p).or_else(|| second.get(p)) {
                return *pos;
            }
            match parent(p) {
                Some(up) => p = up,
                None => return Pos { line: 1, col: 1 },
            }
        }
    }
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

fn pos(m: &Marker) -> Pos {
    Pos {
        line: m.line().max(1),
        col: m.col() + 1,
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    map: SourceMap,
}

impl Builder {
    /// The path of the node that starts now as a value of the top frame.
    fn next_value_path(&mut self) -> Option<String> {
        match self.stack.last_mut()? {
            Frame::Map { path, key } => {
                let key = key.take()?;
                Some(join(path, &key))
            }
            Frame::Seq { path, index } => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
        }
    }

    /// True when the top frame is a mapping waiting for its next key.
    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let at = pos(&mark);
        match ev {
            Event::Scalar(text, ..) if self.expecting_key() => {
                if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                    self.map.keys.insert(join(path, &text), at);
                    *key = Some(text);
                }
            }
            Event::Scalar(..) | Event::Alias(_) => {
                if let Some(p) = self.next_value_path() {
                    self.map.values.insert(p, at);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = if self.stack.is_empty() {
                    Some(String::new())
                } else if self.expecting_key() {
                    // A mapping or sequence used as a key: nothing sensible
                    // to point at, and serde_yaml rejects it anyway.
                    None
                } else {
                    self.next_value_path()
                };
                let path = path.unwrap_or_else(|| "?".to_owned());
                self.map.values.entry(path.clone()).or_insert(at);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
server:
  listen: \"127.0.0.1:8000\"
openai_clients:
  - name: a
    model_match: { type: exact, value: [x, y] }
  - name: b
    api_keys:
      - k1
      - k2
";

    #[test]
    fn maps_keys_and_values_to_lines_and_columns() {
        let map = SourceMap::build(TEXT).unwrap();
        assert_eq!(map.key("server.listen"), Pos { line: 2, col: 3 });
        assert_eq!(map.value("server.listen"), Pos { line: 2, col: 11 });
        assert_eq!(map.key("openai_clients[0].name"), Pos { line: 4, col: 5 });
        assert_eq!(
            map.value("openai_clients[0].model_match.value[1]"),
            Pos { line: 5, col: 44 }
        );
        assert_eq!(
            map.value("openai_clients[1].api_keys[1]"),
            Pos { line: 9, col: 9 }
        );
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(
            map.key("openai_clients[1].nope"),
            map.value("openai_clients[1]")
        );
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let (pos, msg) = SourceMap::build("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(pos.line >= 1, "{pos:?}");
        assert!(!msg.is_empty());
    }
}
