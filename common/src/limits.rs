//! Bounds on the shape of a config document, checked before it is
//! deserialized.
//!
//! A config document comes from outside (a push, a watched file, the
//! coordinator's API), and its shape, not only its size, decides what parsing
//! it costs:
//!
//! - **Alias bombs.** YAML anchors and aliases let a few hundred bytes stand
//!   for billions of nodes (`a: &a [x,x,x,x,x,x,x,x,x]`, `b: &b [*a,*a,…]`,
//!   …). serde_yaml_ng expands aliases while it deserializes, and its own
//!   repetition limit grows with the size of the document, so it is no real
//!   bound for a 4 MiB document wherever a value of any shape is accepted
//!   ([`crate::document::yaml_to_json`], free-form fields).
//! - **Deep nesting.** `[[[[…]]]]` costs stack in every recursive consumer:
//!   deserializers, dropping a `serde_json::Value`, diffs, schema checks.
//!
//! [`check_yaml`] and [`check_json`] refuse such documents in time and memory
//! linear in the size of the input, before any value is built, with a typed
//! [`ConfigError`] that carries numbers only, never document content:
//!
//! | bound | YAML | JSON |
//! | --- | --- | --- |
//! | size, at most [`MAX_CONFIG_BYTES`] | yes | yes |
//! | nesting, at most [`MAX_DEPTH`] levels | yes, aliases expanded | yes |
//! | nodes after alias expansion, at most [`MAX_NODES`] | yes | no |
//! | aliases, at most [`MAX_ALIASES`] | yes | no |
//!
//! TOML ([`check_toml`]) is bounded in size and nesting too: table headers,
//! dotted keys, arrays and inline tables all count as levels.
//!
//! # How the YAML count works
//!
//! The document is read as a stream of events by yaml-rust2's parser and
//! nothing is expanded: when an anchored node ends, its size (its nodes, with
//! the aliases inside it expanded) and its height are remembered by anchor id,
//! and an alias adds that size and height where it stands. The scan stops at
//! the first bound exceeded, so a billion-laughs document costs a few dozen
//! events, and a document that passes has at most [`MAX_NODES`] nodes for the
//! deserializer to build.
//!
//! yaml-rust2 reads YAML 1.2 and is stricter than libyaml, the YAML 1.1
//! parser under serde_yaml_ng: it refuses, for instance, a tab after `key:`
//! or a flow collection continued at a smaller indentation, which libyaml
//! accepts. Such a document is not refused for that: the same bounds are then
//! counted over libyaml's own reading of it, which holds the document's
//! events (linear in its size) and expands aliases only until the node bound
//! is reached. A document that libyaml cannot read either passes the check,
//! and the parser then reports its syntax error as it always did.

use std::{collections::HashMap, fmt};

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, MapAccess, SeqAccess, VariantAccess, Visitor,
};
use yaml_rust2::parser::{Event, Parser};

use crate::document::{ConfigError, MAX_CONFIG_BYTES};

/// Deepest nesting of sequences and mappings (JSON arrays and objects)
/// accepted; the top-level collection is level 1.
pub const MAX_DEPTH: usize = 64;

/// Most YAML nodes (scalars, sequences, mappings and mapping keys) accepted
/// in a document, counted after alias expansion.
pub const MAX_NODES: usize = 100_000;

/// Most YAML aliases (`*name`) accepted in a document.
pub const MAX_ALIASES: usize = 10_000;

/// Refuses a document larger than [`MAX_CONFIG_BYTES`].
pub fn check_size(len: usize) -> Result<(), ConfigError> {
    if len > MAX_CONFIG_BYTES { Err(ConfigError::TooLarge { size: len, limit: MAX_CONFIG_BYTES }) } else { Ok(()) }
}

/// Checks a JSON document's size and nesting with one pass over its bytes
/// (brackets inside strings do not count). Syntax is left to the parser.
pub fn check_json(text: &str) -> Result<(), ConfigError> {
    check_size(text.len())?;
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(ConfigError::TooDeep { depth, limit: MAX_DEPTH });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a YAML document's size, nesting, node count after alias expansion
/// and alias count, without expanding any alias (see the module docs).
/// Syntax is left to the parser.
pub fn check_yaml(text: &str) -> Result<(), ConfigError> {
    check_size(text.len())?;
    match scan_events(text) {
        Ok(()) => Ok(()),
        Err(Stop::Refused(e)) => Err(e),
        Err(Stop::Unreadable) => count_libyaml_reading(text),
    }
}

/// Checks a TOML document's size and nesting with one pass over its bytes.
/// Nesting is counted conservatively: the levels of the current table
/// header (`[a.b]` is 3 with the root, `[[a.b]]` 4), plus the dotted
/// segments of the key, plus every open array and inline table (with the
/// dotted keys inside it). Strings and comments do not count. Syntax is left
/// to the parser.
pub fn check_toml(text: &str) -> Result<(), ConfigError> {
    check_size(text.len())?;
    toml_nesting(text).map(drop)
}

/// The deepest nesting [`check_toml`] counts in `text` (an upper bound of
/// the parsed document's), or the error at the first level over the bound.
fn toml_nesting(text: &str) -> Result<usize, ConfigError> {
    let b = text.as_bytes();
    let mut max = 0usize;
    let mut too_deep = |depth: usize| {
        max = max.max(depth);
        if depth > MAX_DEPTH { Err(ConfigError::TooDeep { depth, limit: MAX_DEPTH }) } else { Ok(()) }
    };
    // Levels of the table the current header opened (root: 0).
    let mut header = 0usize;
    // Dots in the key of the current top-level key/value line.
    let mut line_dots = 0usize;
    // Open arrays (`[`) and inline tables (`{`, with the dots of the key of
    // its current entry).
    let mut open: Vec<(u8, usize)> = Vec::new();
    let (mut key_pos, mut line_start, mut i) = (true, true, 0usize);
    let depth = |header: usize, line_dots: usize, open: &[(u8, usize)]| {
        1 + header + line_dots + open.iter().map(|(_, dots)| 1 + dots).sum::<usize>()
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' => {
                i = skip_toml_string(b, i);
                line_start = false;
                continue;
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'\n' => {
                if open.is_empty() {
                    (line_start, key_pos, line_dots) = (true, true, 0);
                }
            }
            b' ' | b'\t' | b'\r' => {}
            b'[' if open.is_empty() && line_start => {
                // A table header: `[a.b]` or `[[a.b]]`.
                let array = b.get(i + 1) == Some(&b'[');
                let mut dots = 0;
                i += 1;
                while i < b.len() && b[i] != b']' && b[i] != b'\n' {
                    match b[i] {
                        b'"' | b'\'' => {
                            i = skip_toml_string(b, i);
                            continue;
                        }
                        b'.' => dots += 1,
                        _ => {}
                    }
                    i += 1;
                }
                header = dots + 1 + usize::from(array);
                too_deep(1 + header)?;
                (line_start, key_pos) = (false, false);
                while i < b.len() && b[i] == b']' {
                    i += 1;
                }
                continue;
            }
            _ if key_pos => {
                line_start = false;
                match (c, open.last_mut()) {
                    (b'.', None) => line_dots += 1,
                    (b'.', Some((_, dots))) => *dots += 1,
                    (b'=', _) => {
                        key_pos = false;
                        too_deep(depth(header, line_dots, &open))?;
                    }
                    _ => {}
                }
            }
            b'[' | b'{' => {
                open.push((c, 0));
                key_pos = c == b'{';
                too_deep(depth(header, line_dots, &open))?;
            }
            b']' | b'}' => {
                open.pop();
            }
            b',' => {
                if let Some((b'{', dots)) = open.last_mut() {
                    *dots = 0;
                    key_pos = true;
                }
            }
            _ => line_start = false,
        }
        i += 1;
    }
    Ok(max)
}

/// The index just past the TOML string that starts at `b[i]` (basic or
/// literal, single- or multi-line); the end of the text if it never closes.
fn skip_toml_string(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let multi = b.get(i + 1) == Some(&q) && b.get(i + 2) == Some(&q);
    let mut j = if multi { i + 3 } else { i + 1 };
    while j < b.len() {
        match b[j] {
            b'\\' if q == b'"' => j += 2,
            b'\n' if !multi => return j,
            x if x == q && (!multi || (b.get(j + 1) == Some(&q) && b.get(j + 2) == Some(&q))) => {
                return if multi { j + 3 } else { j + 1 };
            }
            _ => j += 1,
        }
    }
    b.len()
}

/// Why the event scan stopped early.
enum Stop {
    /// A bound was exceeded.
    Refused(ConfigError),
    /// yaml-rust2 cannot read the document.
    Unreadable,
}

impl From<ConfigError> for Stop {
    fn from(e: ConfigError) -> Self {
        Stop::Refused(e)
    }
}

fn scan_events(text: &str) -> Result<(), Stop> {
    let mut parser = Parser::new_from_str(text);
    let mut tally = Tally::default();
    loop {
        let event = match parser.next_token() {
            Ok((event, _)) => event,
            // The scanner's own bound on flow nesting (255 levels): deeper
            // than ours in any reading of the document.
            Err(e) if e.info() == "recursion limit exceeded" => {
                return Err(ConfigError::TooDeep { depth: usize::from(u8::MAX) + 1, limit: MAX_DEPTH }.into());
            }
            Err(_) => return Err(Stop::Unreadable),
        };
        match event {
            Event::StreamEnd => return Ok(()),
            Event::Scalar(_, _, anchor, _) => tally.scalar(anchor)?,
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => tally.start(anchor)?,
            Event::SequenceEnd | Event::MappingEnd => tally.end(),
            Event::Alias(id) => tally.alias(id)?,
            Event::Nothing | Event::StreamStart | Event::DocumentStart | Event::DocumentEnd => {}
        }
    }
}

/// Size of a node with its aliases expanded.
#[derive(Debug, Clone, Copy)]
struct Size {
    /// The node and everything under it.
    nodes: usize,
    /// 0 for a scalar, 1 + the height of its highest child for a collection.
    height: usize,
}

/// A collection whose end has not been seen yet.
#[derive(Debug)]
struct Open {
    /// Anchor id (0: none).
    anchor: usize,
    /// Size so far.
    size: Size,
}

/// Running totals of the event scan.
#[derive(Debug, Default)]
struct Tally {
    /// Collections not yet ended, outermost first.
    open: Vec<Open>,
    /// Size of each ended anchored node, by anchor id.
    anchors: HashMap<usize, Size>,
    /// Nodes so far, aliases expanded.
    nodes: usize,
    /// Of which added by aliases.
    through_aliases: usize,
    /// Aliases so far.
    aliases: usize,
}

impl Tally {
    fn start(&mut self, anchor: usize) -> Result<(), ConfigError> {
        self.count(1, false)?;
        let depth = self.open.len() + 1;
        if depth > MAX_DEPTH {
            return Err(ConfigError::TooDeep { depth, limit: MAX_DEPTH });
        }
        self.open.push(Open { anchor, size: Size { nodes: 1, height: 1 } });
        Ok(())
    }

    fn end(&mut self) {
        if let Some(done) = self.open.pop() {
            self.ended(done.anchor, done.size);
        }
    }

    fn scalar(&mut self, anchor: usize) -> Result<(), ConfigError> {
        self.count(1, false)?;
        self.ended(anchor, Size { nodes: 1, height: 0 });
        Ok(())
    }

    fn alias(&mut self, id: usize) -> Result<(), ConfigError> {
        self.aliases += 1;
        if self.aliases > MAX_ALIASES {
            return Err(ConfigError::TooManyAliases { aliases: self.aliases, limit: MAX_ALIASES });
        }
        // The parser knows every anchor it hands out; one without a size is
        // still open: an alias inside the node it names never stops expanding.
        let Some(size) = self.anchors.get(&id).copied() else {
            return Err(ConfigError::AliasBomb { nodes: usize::MAX, limit: MAX_NODES });
        };
        let depth = self.open.len() + size.height;
        if depth > MAX_DEPTH {
            return Err(ConfigError::TooDeep { depth, limit: MAX_DEPTH });
        }
        self.count(size.nodes, true)?;
        self.add_to_parent(size);
        Ok(())
    }

    fn ended(&mut self, anchor: usize, size: Size) {
        if anchor != 0 {
            self.anchors.insert(anchor, size);
        }
        self.add_to_parent(size);
    }

    fn add_to_parent(&mut self, size: Size) {
        if let Some(parent) = self.open.last_mut() {
            parent.size.nodes = parent.size.nodes.saturating_add(size.nodes);
            parent.size.height = parent.size.height.max(size.height + 1);
        }
    }

    fn count(&mut self, nodes: usize, through_alias: bool) -> Result<(), ConfigError> {
        self.nodes = self.nodes.saturating_add(nodes);
        if through_alias {
            self.through_aliases = self.through_aliases.saturating_add(nodes);
        }
        if self.nodes <= MAX_NODES {
            Ok(())
        } else if self.through_aliases > 0 {
            Err(ConfigError::AliasBomb { nodes: self.nodes, limit: MAX_NODES })
        } else {
            Err(ConfigError::TooManyNodes { nodes: self.nodes, limit: MAX_NODES })
        }
    }
}

/// Counts nodes and nesting over libyaml's reading of a document that
/// yaml-rust2 cannot read. serde_yaml_ng holds the document's events and
/// replays an anchored node for each alias; the count stops the replay at the
/// first bound exceeded, so at most [`MAX_NODES`] nodes are visited and none
/// is kept.
fn count_libyaml_reading(text: &str) -> Result<(), ConfigError> {
    let mut counter = Counter::default();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let read = Node(&mut counter).deserialize(document);
        if let Some(refused) = counter.refused.take() {
            return Err(refused);
        }
        if read.is_err() {
            // Unreadable for libyaml too (after an error the iterator repeats
            // it forever): the parser reports it.
            break;
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Counter {
    nodes: usize,
    depth: usize,
    refused: Option<ConfigError>,
}

impl Counter {
    fn node<E: de::Error>(&mut self) -> Result<(), E> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return self.refuse(ConfigError::TooManyNodes { nodes: self.nodes, limit: MAX_NODES });
        }
        Ok(())
    }

    fn enter<E: de::Error>(&mut self) -> Result<(), E> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.refuse(ConfigError::TooDeep { depth: self.depth, limit: MAX_DEPTH });
        }
        Ok(())
    }

    fn refuse<E: de::Error>(&mut self, e: ConfigError) -> Result<(), E> {
        self.refused = Some(e);
        Err(E::custom("document refused by the limits check"))
    }
}

/// Visits one node and everything under it, counting, keeping nothing.
struct Node<'a>(&'a mut Counter);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.0.node()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.0.node()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.0.node()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.0.node()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.0.node()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.0.node()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.0.node()
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<(), E> {
        self.0.node()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.node()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.0.node()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let c = self.0;
        c.node()?;
        c.enter()?;
        while seq.next_element_seed(Node(&mut *c))?.is_some() {}
        c.depth -= 1;
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let c = self.0;
        c.node()?;
        c.enter()?;
        while map.next_key_seed(Node(&mut *c))?.is_some() {
            map.next_value_seed(Node(&mut *c))?;
        }
        c.depth -= 1;
        Ok(())
    }

    /// A tagged node (`!name value`): the tag is part of the node.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let (IgnoredAny, value) = data.variant::<IgnoredAny>()?;
        value.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes counted by the event scan, or its refusal.
    fn nodes(text: &str) -> Result<usize, ConfigError> {
        let mut parser = Parser::new_from_str(text);
        let mut tally = Tally::default();
        loop {
            match parser.next_token().expect("yaml-rust2 reads the test document").0 {
                Event::StreamEnd => return Ok(tally.nodes),
                Event::Scalar(_, _, a, _) => tally.scalar(a)?,
                Event::SequenceStart(a, _) | Event::MappingStart(a, _) => tally.start(a)?,
                Event::SequenceEnd | Event::MappingEnd => tally.end(),
                Event::Alias(id) => tally.alias(id)?,
                _ => {}
            }
        }
    }

    /// The same count over libyaml's reading.
    fn libyaml_nodes(text: &str) -> Result<usize, ConfigError> {
        let mut counter = Counter::default();
        let read = Node(&mut counter).deserialize(serde_yaml_ng::Deserializer::from_str(text));
        match counter.refused {
            Some(e) => Err(e),
            None => {
                read.expect("libyaml reads the test document");
                Ok(counter.nodes)
            }
        }
    }

    fn bomb(levels: usize) -> String {
        let mut doc = String::from("a0: &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
        for i in 1..levels {
            let p = i - 1;
            doc.push_str(&format!("a{i}: &a{i} [*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p}]\n"));
        }
        doc
    }

    #[test]
    fn aliases_add_the_size_of_their_anchored_node() {
        // map, key a, [seq, 1, 2, {map, k, v}], key b, alias (6 nodes), key c, alias of a scalar
        let doc = "a: &x [1, 2, {k: v}]\nb: *x\nc: &s hi\nd: *s\n";
        assert_eq!(nodes(doc), Ok(1 + 1 + 6 + 1 + 6 + 1 + 1 + 1 + 1));
        assert_eq!(libyaml_nodes(doc), nodes(doc), "both readings count alike");
        // Nested expansion: b holds two copies of a, c two copies of b.
        let doc = "a: &a [1, 2]\nb: &b [*a, *a]\nc: [*b, *b]\n";
        assert_eq!(nodes(doc), Ok(1 + 1 + 3 + 1 + 7 + 1 + 15));
        assert_eq!(libyaml_nodes(doc), nodes(doc));
        // A redefined anchor: the alias names the latest definition.
        let doc = "- &a [1, 2, 3]\n- &a z\n- *a\n";
        assert_eq!(nodes(doc), Ok(1 + 4 + 1 + 1));
        assert_eq!(libyaml_nodes(doc), nodes(doc));
        // Tagged nodes count once.
        assert_eq!(nodes("a: !t [1]\n"), Ok(4));
        assert_eq!(libyaml_nodes("a: !t [1]\n"), Ok(4));
    }

    #[test]
    fn a_billion_laughs_stops_at_the_bound() {
        // 9^5 = 59049 leaves at a5, 531441 at a6: stops while counting a6's first aliases.
        let e = check_yaml(&bomb(10)).unwrap_err();
        match e {
            ConfigError::AliasBomb { nodes, limit } => {
                assert_eq!(limit, MAX_NODES);
                assert!(nodes > MAX_NODES && nodes < 2 * MAX_NODES, "{nodes}");
            }
            other => panic!("expected an alias bomb, got {other:?}"),
        }
        assert_eq!(e.to_string(), "aliases expand to more than 100000 nodes: refused (YAML alias bomb?)");
        // Five levels (about 66 thousand nodes) pass.
        assert_eq!(check_yaml(&bomb(5)), Ok(()));
    }

    #[test]
    fn a_document_yaml_rust2_cannot_read_is_counted_over_libyamls_reading() {
        // libyaml takes a tab after `key:`, yaml-rust2 does not.
        let doc = format!("x:\ty\n{}", bomb(10));
        assert!(matches!(scan_events(&doc), Err(Stop::Unreadable)));
        let e = check_yaml(&doc).unwrap_err();
        assert!(matches!(e, ConfigError::TooManyNodes { nodes: 100_001, limit: MAX_NODES }), "{e:?}");
        assert_eq!(e.to_string(), "document has more than 100000 nodes after alias expansion");
        let deep = format!("x:\ty\nz: {}1{}\n", "[".repeat(100), "]".repeat(100));
        assert_eq!(check_yaml(&deep), Err(ConfigError::TooDeep { depth: 65, limit: 64 }));
        // Accepted when within the bounds; left to the parser when libyaml
        // cannot read it either.
        assert_eq!(check_yaml("x:\ty\nz: [1, 2]\n"), Ok(()));
        assert_eq!(check_yaml("x:\ty\nz: [1, 2\n"), Ok(()));
        assert_eq!(check_yaml("a: *nowhere\n"), Ok(()));
    }

    #[test]
    fn an_alias_inside_its_own_anchor_is_refused() {
        let e = check_yaml("a: &a [1, *a]\n").unwrap_err();
        assert!(matches!(e, ConfigError::AliasBomb { .. }), "{e:?}");
    }

    #[test]
    fn nesting_is_bounded_in_every_style_and_through_aliases() {
        let flow = format!("a: {}1{}\n", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(check_yaml(&flow), Err(ConfigError::TooDeep { limit: 64, .. })));
        let flow = format!("{}{}\n", "{a: ".repeat(65), "}".repeat(65));
        assert!(matches!(check_yaml(&flow), Err(ConfigError::TooDeep { depth: 65, limit: 64 })));
        let block: String = (0..100).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        assert_eq!(check_yaml(&block), Err(ConfigError::TooDeep { depth: 65, limit: 64 }));
        let block = format!("{}x\n", "- ".repeat(10_000));
        assert_eq!(check_yaml(&block), Err(ConfigError::TooDeep { depth: 65, limit: 64 }));
        let ok = format!("a: {}1{}\n", "[".repeat(63), "]".repeat(63));
        assert_eq!(check_yaml(&ok), Ok(()));
        // 40 levels anchored, used 40 levels down: 80.
        let doc = format!("a: &d {}1{}\nb: {}*d{}\n", "[".repeat(40), "]".repeat(40), "[".repeat(40), "]".repeat(40));
        assert_eq!(check_yaml(&doc), Err(ConfigError::TooDeep { depth: 1 + 40 + 40, limit: 64 }));
        let json = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(check_json(&json), Err(ConfigError::TooDeep { depth: 65, limit: 64 }));
        // Brackets in strings, escaped quotes included, are not nesting.
        let json = format!("{{\"a\": \"{}\\\"{}\"}}", "[".repeat(100), "{".repeat(100));
        assert_eq!(check_json(&json), Ok(()));
        assert_eq!(ConfigError::TooDeep { depth: 65, limit: 64 }.to_string(), "document nests deeper than 64 levels");
    }

    #[test]
    fn node_alias_and_size_bounds() {
        let flat = format!("[{}]", vec!["1"; MAX_NODES].join(","));
        assert_eq!(check_yaml(&flat), Err(ConfigError::TooManyNodes { nodes: MAX_NODES + 1, limit: MAX_NODES }));
        let flat = format!("[{}]", vec!["1"; MAX_NODES - 1].join(","));
        assert_eq!(check_yaml(&flat), Ok(()));
        let many = format!("- &a 1\n{}", "- *a\n".repeat(MAX_ALIASES + 1));
        assert_eq!(
            check_yaml(&many),
            Err(ConfigError::TooManyAliases { aliases: MAX_ALIASES + 1, limit: MAX_ALIASES })
        );
        let big = "#".repeat(MAX_CONFIG_BYTES + 1);
        assert!(matches!(check_yaml(&big), Err(ConfigError::TooLarge { .. })));
        assert!(matches!(check_json(&big), Err(ConfigError::TooLarge { .. })));
        assert_eq!(check_size(MAX_CONFIG_BYTES), Ok(()));
    }

    /// Collections nested in a TOML document, the root table included.
    fn toml_depth(text: &str) -> usize {
        fn depth(v: &toml::Value) -> usize {
            match v {
                toml::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
                toml::Value::Table(t) => 1 + t.values().map(depth).max().unwrap_or(0),
                _ => 0,
            }
        }
        depth(&toml::Value::Table(toml::from_str(text).unwrap()))
    }

    #[test]
    fn toml_nesting_is_bounded_however_it_is_written() {
        let deep = |n: usize| (0..n).map(|i| format!("k{i}")).collect::<Vec<_>>().join(".");
        let nested = |open: &str, n: usize, inner: &str, close: &str| {
            format!("a = {}{inner}{}\n", open.repeat(n), close.repeat(n))
        };
        // Dotted keys, headers, arrays of tables, arrays and inline tables
        // (with dotted keys inside): the first of each pair has 64 levels,
        // the second 65.
        for (ok, bad) in [
            (format!("{} = 1\n", deep(64)), format!("{} = 1\n", deep(65))),
            (format!("[{}]\nx = 1\n", deep(63)), format!("[{}]\nx = 1\n", deep(64))),
            (format!("[[{}]]\nx = 1\n", deep(62)), format!("[[{}]]\nx = 1\n", deep(63))),
            (nested("[", 63, "1", "]"), nested("[", 64, "1", "]")),
            (nested("{ b = ", 62, "{}", " }"), nested("{ b.c = ", 32, "1", " }")),
        ] {
            assert_eq!(toml_nesting(&ok), Ok(64), "{ok:.80}");
            assert_eq!(toml_depth(&ok), 64, "the count is exact here: {ok:.80}");
            assert_eq!(check_toml(&bad), Err(ConfigError::TooDeep { depth: 65, limit: 64 }), "{bad:.80}");
        }
    }

    #[test]
    fn toml_strings_and_comments_are_not_nesting_and_the_count_is_never_low() {
        let strings = "a = \"[[[[{{.x.y\\\"[\"\nb = '[[[.'\nc = \"\"\"\n[[[.\n\"\"\"\n# [[[[.[.\n";
        assert_eq!(toml_nesting(strings), Ok(1));
        for doc in [
            "[t.u] # c\nv.w = [1, {x.y = [2]}]\n",
            "[a]\nb = 1\n[[c.d]]\ne.f = [[1], {g = {h = 1}}]\n",
            "x = [\n  [1,\n   [2]],\n]\ny.z = 1\n",
            "t = { a.b = 1, c = { d = [1] } }\n",
            "\"q.r\" = { 's.t' = 1 }\n",
        ] {
            let (counted, real) = (toml_nesting(doc).unwrap(), toml_depth(doc));
            assert!(counted >= real, "{doc}: counted {counted} < real {real}");
            assert!(counted <= real + 2, "{doc}: counted {counted}, real {real}");
        }
    }
}
