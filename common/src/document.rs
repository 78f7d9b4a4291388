//! Config documents as text: their formats, the errors that refuse them,
//! and parsing (typed, or to a JSON value) behind the bounds of
//! [`crate::limits`].
//!
//! A service keeps its config in one [`Format`]: YAML (which, as before,
//! also reads JSON, since a JSON document is a YAML document), JSON only, or
//! TOML. Whatever the format, a document is checked and compared as a JSON
//! value: the schema check, the diff and the redaction of secrets work the
//! same for all three.
//!
//! ```text
//!   bytes ── size, UTF-8, empty ──▶ text ── shape bounds (limits.rs) ──▶ parser
//!                                                            │
//!                   typed `T: Deserialize` (unknown keys, types, at a path)
//!                   or a `serde_json::Value` (schema check, diff, redaction)
//! ```

use std::{fmt, str::FromStr};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::limits;

/// Largest config document accepted, in bytes. The coordinator enforces the
/// same bound, so a node never has to hold a document larger than this.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

/// The format a service keeps its config in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Format {
    /// YAML; a document that starts with `{` is read as JSON (every JSON
    /// document is a YAML document, and the JSON parser is the stricter).
    #[default]
    Yaml,
    /// JSON only.
    Json,
    /// TOML.
    Toml,
    /// Opaque text (an nginx.conf, an HAProxy config, anything): checked
    /// for size, UTF-8 and emptiness only, and seen by the schema check, the
    /// diff and redaction as one JSON string. What `confroll-agent`
    /// publishes for a program whose config confroll does not parse.
    Text,
}

impl Format {
    /// The name on the wire and in flags: `yaml`, `json` or `toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Yaml => "yaml",
            Format::Json => "json",
            Format::Toml => "toml",
            Format::Text => "text",
        }
    }

    /// The syntax `text` is read with under this format.
    pub fn syntax_of(self, text: &str) -> Syntax {
        match self {
            Format::Yaml if text.trim_start().starts_with('{') => Syntax::Json,
            Format::Yaml => Syntax::Yaml,
            Format::Json => Syntax::Json,
            Format::Toml => Syntax::Toml,
            Format::Text => Syntax::Text,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name that is not `yaml`, `json` or `toml`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown config format `{0}` (expected yaml, json, toml or text)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;
    /// Parses a format name; the empty name is YAML (what nodes published
    /// before formats were named).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "yaml" | "yml" => Ok(Format::Yaml),
            "json" => Ok(Format::Json),
            "toml" => Ok(Format::Toml),
            "text" | "txt" => Ok(Format::Text),
            _ => Err(UnknownFormat(s.to_owned())),
        }
    }
}

/// The syntax one document is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Syntax {
    /// YAML.
    Yaml,
    /// JSON.
    Json,
    /// TOML.
    Toml,
    /// Opaque text.
    Text,
}

impl Syntax {
    /// `YAML`, `JSON` or `TOML`, as error messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Syntax::Yaml => "YAML",
            Syntax::Json => "JSON",
            Syntax::Toml => "TOML",
            Syntax::Text => "text",
        }
    }
}

/// Why a config document was refused. Every variant names its cause; the
/// running config is never touched by a refused document. No variant
/// carries a value of the document (only paths, numbers and parser
/// messages), except where a parser quotes it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Zero bytes, or only whitespace and comments.
    #[error("config is empty")]
    Empty,
    /// Larger than [`MAX_CONFIG_BYTES`].
    #[error("config is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// Size of the refused document.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not UTF-8.
    #[error("config is not valid UTF-8: invalid byte at offset {offset}")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// Nested deeper than [`crate::limits::MAX_DEPTH`] levels (YAML aliases
    /// expanded); refused before parsing.
    #[error("document nests deeper than {limit} levels")]
    TooDeep {
        /// Nesting level at which the check stopped (at least `limit + 1`).
        depth: usize,
        /// The limit.
        limit: usize,
    },
    /// More than [`crate::limits::MAX_NODES`] YAML nodes, aliases expanded;
    /// refused before parsing.
    #[error("document has more than {limit} nodes after alias expansion")]
    TooManyNodes {
        /// Nodes counted when the check stopped.
        nodes: usize,
        /// The limit.
        limit: usize,
    },
    /// YAML aliases expanding to more than [`crate::limits::MAX_NODES`]
    /// nodes (billion laughs); refused before parsing, nothing expanded.
    #[error("aliases expand to more than {limit} nodes: refused (YAML alias bomb?)")]
    AliasBomb {
        /// Nodes counted when the check stopped (`usize::MAX` for an alias
        /// inside the node it names, whose expansion never ends).
        nodes: usize,
        /// The limit.
        limit: usize,
    },
    /// More than [`crate::limits::MAX_ALIASES`] YAML aliases; refused before
    /// parsing.
    #[error("document has more than {limit} aliases: refused (YAML alias bomb?)")]
    TooManyAliases {
        /// Aliases counted when the check stopped.
        aliases: usize,
        /// The limit.
        limit: usize,
    },
    /// Not YAML/JSON/TOML at all, or a limit of the parser itself (a second
    /// line of defence behind [`crate::limits`]).
    #[error("config is not valid {format}: {message}")]
    Syntax {
        /// `YAML`, `JSON` or `TOML`.
        format: &'static str,
        /// The parser's message, with its line and column.
        message: String,
    },
    /// Wrong type, unknown key or bad value at a path.
    #[error("at `{path}`: {message}")]
    Field {
        /// Dotted path of the offending field (`.` for the document).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Business rules broken (every violation listed).
    #[error("invalid config: {}", join_violations(.0))]
    Rules(Vec<Violation>),
    /// A restart-only field differs from the running config.
    #[error("`{path}` is restart-only and cannot be hot-reloaded ({old} -> {new}); restart the node to change it")]
    RestartOnly {
        /// The field.
        path: String,
        /// Running value (secrets redacted).
        old: String,
        /// Refused value (secrets redacted).
        new: String,
    },
}

fn join_violations(v: &[Violation]) -> String {
    v.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// One broken business rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Dotted path of the field.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl Violation {
    /// A violation at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Violation { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.path, self.message)
    }
}

/// The text of a document that passed the checks every format shares:
/// size, UTF-8, not empty, and the shape bounds of its syntax.
fn checked_text(bytes: &[u8], format: Format) -> Result<(&str, Syntax), ConfigError> {
    limits::check_size(bytes.len())?;
    let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::NotUtf8 { offset: e.valid_up_to() })?;
    let meaningful = text.lines().map(str::trim).any(|l| !l.is_empty() && !l.starts_with('#'));
    if !meaningful || text.trim() == "---" {
        return Err(ConfigError::Empty);
    }
    let syntax = format.syntax_of(text);
    match syntax {
        Syntax::Json => limits::check_json(text)?,
        Syntax::Yaml => limits::check_yaml(text)?,
        Syntax::Toml => limits::check_toml(text)?,
        Syntax::Text => {}
    }
    Ok((text, syntax))
}

/// Parses a document into `T`, strictly: size, UTF-8, emptiness, shape
/// bounds, syntax, then types and keys (as `T`'s serde attributes say, e.g.
/// `deny_unknown_fields`), each error with the path of its field. Business
/// rules are the caller's.
pub fn parse<T: DeserializeOwned>(bytes: &[u8], format: Format) -> Result<T, ConfigError> {
    let (text, syntax) = checked_text(bytes, format)?;
    match syntax {
        Syntax::Yaml => parse_yaml(text),
        Syntax::Json => parse_json(text),
        Syntax::Toml => parse_toml(text),
        Syntax::Text => T::deserialize(serde_json::Value::String(text.to_owned()))
            .map_err(|e| ConfigError::Syntax { format: syntax.name(), message: e.to_string() }),
    }
}

/// Parses a document into a JSON value, with the same checks as [`parse`]
/// but no type: what the schema check, the diff and redaction work on.
/// TOML dates and times become strings (RFC 3339).
pub fn to_value(bytes: &[u8], format: Format) -> Result<Value, ConfigError> {
    let (text, syntax) = checked_text(bytes, format)?;
    value_of(text, syntax)
}

/// `text`, already checked, as a JSON value.
fn value_of(text: &str, syntax: Syntax) -> Result<Value, ConfigError> {
    let syntax_error = |message: String| ConfigError::Syntax { format: syntax.name(), message };
    match syntax {
        Syntax::Json => serde_json::from_str(text).map_err(|e| syntax_error(e.to_string())),
        Syntax::Yaml => serde_yaml_ng::from_str(text).map_err(|e| syntax_error(e.to_string())),
        Syntax::Toml => {
            let table: toml::Table = toml::from_str(text).map_err(|e| syntax_error(toml_message(&e)))?;
            Ok(toml_to_json(toml::Value::Table(table)))
        }
        Syntax::Text => Ok(Value::String(text.to_owned())),
    }
}

/// Writes `value` back as a document of `syntax`: YAML, pretty JSON, or
/// TOML (whose root must be a table and which has no `null`).
pub fn render(value: &Value, syntax: Syntax) -> Result<String, RenderError> {
    let err = |message: String| RenderError { format: syntax.name(), message };
    match syntax {
        Syntax::Json => serde_json::to_string_pretty(value).map_err(|e| err(e.to_string())),
        Syntax::Yaml => serde_yaml_ng::to_string(value).map_err(|e| err(e.to_string())),
        Syntax::Toml => toml::to_string_pretty(value).map_err(|e| err(e.to_string())),
        Syntax::Text => match value {
            Value::String(s) => Ok(s.clone()),
            _ => Err(err("only a string is written as text".into())),
        },
    }
}

/// A value that cannot be written in a syntax (TOML: a `null`, or a root
/// that is not a table).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot be written as {format}: {message}")]
pub struct RenderError {
    /// `YAML`, `JSON` or `TOML`.
    pub format: &'static str,
    /// The serializer's message.
    pub message: String,
}

/// A YAML document as a JSON value (JSON Schema checks of free-form
/// documents), with the shape bounds of [`crate::limits::check_yaml`].
pub fn yaml_to_json(text: &str) -> Result<Value, YamlError> {
    limits::check_yaml(text)?;
    Ok(serde_yaml_ng::from_str(text)?)
}

/// Why [`yaml_to_json`] refused a document. Both are fatal for the
/// document; the Display text is the check's or the parser's own.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    /// Over a size, nesting, node-count or alias limit (refused before
    /// parsing; see [`crate::limits::check_yaml`]).
    #[error(transparent)]
    Limit(#[from] ConfigError),
    /// Not YAML, or not representable as JSON.
    #[error(transparent)]
    Syntax(#[from] serde_yaml_ng::Error),
}

/// Replaces every occurrence of each secret (of two bytes or more) in
/// `text` with `***`: for free text (errors from drivers, logs) that may
/// quote a secret value.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().filter(|s| s.len() >= 2) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_yaml_ng already prefixes some messages with the path.
        let message = inner.to_string();
        let message = message.strip_prefix(&format!("{path}: ")).map(str::to_owned).unwrap_or(message);
        if is_structural_yaml_error(&message) {
            ConfigError::Syntax { format: "YAML", message }
        } else {
            ConfigError::Field { path, message }
        }
    })
}

/// Whether a serde_yaml_ng message comes from the YAML layer (scanner,
/// parser, bomb limits) rather than from a field.
pub fn is_structural_yaml_error(message: &str) -> bool {
    [
        "while scanning",
        "while parsing",
        "did not find expected",
        "found character that cannot start",
        "mapping values are not allowed",
        "recursion limit exceeded",
        "repetition limit exceeded",
        "unknown anchor",
        "deserializing from YAML containing more than one document",
        "control characters are not allowed",
    ]
    .iter()
    .any(|m| message.contains(m))
}

fn parse_json<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ConfigError::Syntax { format: "JSON", message: inner.to_string() }
        } else {
            ConfigError::Field { path, message: inner.to_string() }
        }
    })?;
    de.end().map_err(|e| ConfigError::Syntax { format: "JSON", message: e.to_string() })?;
    Ok(value)
}

/// TOML is parsed into its own value first (syntax errors are told apart
/// from field errors that way), then deserialized into `T` with paths.
fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| ConfigError::Syntax { format: "TOML", message: toml_message(&e) })?;
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::Field { path, message: toml_message(e.inner()) }
    })
}

/// A toml error on one line (its Display spans several, with a caret).
fn toml_message(e: &toml::de::Error) -> String {
    let mut m = e.message().to_owned();
    if let Some(span) = e.span() {
        m.push_str(&format!(" (at byte {})", span.start));
    }
    m
}

/// A TOML value as JSON; dates and times as their RFC 3339 text.
fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Flags {
        rate_limit: u32,
        #[serde(default)]
        features: Vec<String>,
        limits: Limits,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        burst: u32,
    }

    #[test]
    fn the_three_formats_give_the_same_value_and_the_same_type() {
        let yaml = "rate_limit: 10\nfeatures: [a, b]\nlimits:\n  burst: 3\n";
        let json = r#"{"rate_limit": 10, "features": ["a", "b"], "limits": {"burst": 3}}"#;
        let toml = "rate_limit = 10\nfeatures = [\"a\", \"b\"]\n[limits]\nburst = 3\n";
        let want = json!({"rate_limit": 10, "features": ["a", "b"], "limits": {"burst": 3}});
        assert_eq!(to_value(yaml.as_bytes(), Format::Yaml).unwrap(), want);
        assert_eq!(to_value(json.as_bytes(), Format::Yaml).unwrap(), want, "YAML services read JSON");
        assert_eq!(to_value(json.as_bytes(), Format::Json).unwrap(), want);
        assert_eq!(to_value(toml.as_bytes(), Format::Toml).unwrap(), want);
        let typed: Flags = parse(toml.as_bytes(), Format::Toml).unwrap();
        assert_eq!(typed, parse::<Flags>(yaml.as_bytes(), Format::Yaml).unwrap());
    }

    #[test]
    fn field_errors_carry_their_path_in_every_format() {
        for (doc, format) in [
            ("rate_limit: 1\nlimits:\n  burst: x\n", Format::Yaml),
            (r#"{"rate_limit": 1, "limits": {"burst": "x"}}"#, Format::Json),
            ("rate_limit = 1\n[limits]\nburst = \"x\"\n", Format::Toml),
        ] {
            match parse::<Flags>(doc.as_bytes(), format) {
                Err(ConfigError::Field { path, .. }) => assert_eq!(path, "limits.burst", "{format}"),
                other => panic!("{format}: {other:?}"),
            }
        }
        let e = parse::<Flags>(b"rate_limit = 1\nbogus = 2\n[limits]\nburst = 1\n", Format::Toml).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_format() {
        let e = to_value(b"rate_limit = = 1", Format::Toml).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { format: "TOML", .. }), "{e:?}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
        let e = to_value(b"{\"a\": ", Format::Yaml).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { format: "JSON", .. }), "{e:?}");
        let e = to_value(b"a: 1", Format::Json).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { format: "JSON", .. }), "a JSON service reads no YAML: {e:?}");
    }

    #[test]
    fn empty_and_oversized_documents_are_refused_in_every_format() {
        for format in [Format::Yaml, Format::Json, Format::Toml] {
            assert_eq!(to_value(b"# nothing\n\n", format), Err(ConfigError::Empty));
            let big = vec![b' '; MAX_CONFIG_BYTES + 1];
            assert!(matches!(to_value(&big, format), Err(ConfigError::TooLarge { .. })));
        }
    }

    #[test]
    fn toml_renders_back_and_dates_become_text() {
        let v = to_value(b"at = 1979-05-27T07:32:00Z\n[t]\nx = 1\n", Format::Toml).unwrap();
        assert_eq!(v, json!({"at": "1979-05-27T07:32:00Z", "t": {"x": 1}}));
        let text = render(&v, Syntax::Toml).unwrap();
        assert_eq!(to_value(text.as_bytes(), Format::Toml).unwrap(), v);
        assert!(render(&json!({"a": null}), Syntax::Toml).is_err(), "TOML has no null");
    }

    #[test]
    fn format_names() {
        assert_eq!("".parse::<Format>().unwrap(), Format::Yaml);
        assert_eq!("TOML".parse::<Format>().unwrap(), Format::Toml);
        assert!("ini".parse::<Format>().is_err());
        for f in [Format::Yaml, Format::Json, Format::Toml] {
            assert_eq!(f.as_str().parse::<Format>().unwrap(), f);
        }
    }
}
