//! Property tests: no document, however malformed, makes [`Config::parse`]
//! or [`yaml_to_json`] panic, overflow the stack or allocate without bound,
//! and every document that parses diffs and redacts cleanly.
//!
//! Documents come from three families, over 100 000 of them per run by
//! default (set `PROPTEST_CASES` to run that many cases in each property
//! instead):
//!
//! - config documents in YAML (block, flow and mixed) and JSON built from the
//!   real schema's sections with random values, unknown keys, wrong types,
//!   random nesting, anchors and aliases;
//! - mutations of valid documents: byte flips, truncation, duplicated,
//!   dropped and swapped lines, inserted YAML tokens;
//! - token soup and arbitrary bytes.
//!
//! Every parse runs under `allocation_counter::measure`, whose global
//! allocator (it wraps `std::alloc::System`; the workspace forbids
//! `unsafe_code`, so it cannot be written here) counts the current and peak
//! bytes of each thread: the peak of each parse must stay under
//! [`MEMORY_BOUND`].

use std::collections::HashSet;

use confroll_node::{
    Config, ConfigError,
    config::{MAX_CONFIG_BYTES, yaml_to_json},
    diff::ConfigDiff,
    limits::{MAX_DEPTH, MAX_NODES},
};
use proptest::{
    prelude::*,
    sample::{Index, select},
    test_runner::{Config as ProptestConfig, RngAlgorithm},
};

/// Peak heap of one parse, per thread.
const MEMORY_BOUND: u64 = 64 * 1024 * 1024;

/// Default cases of each property: (cases, documents per case).
const CASES: [(u32, u32); 6] =
    [(YAML_CASES, 1), (JSON_CASES, 1), (PAIR_CASES, 2), (MUTATION_CASES, 1), (SOUP_CASES, 1), (BYTES_CASES, 1)];
const YAML_CASES: u32 = 20_000;
const JSON_CASES: u32 = 10_000;
const PAIR_CASES: u32 = 5_000;
const MUTATION_CASES: u32 = 20_000;
const SOUP_CASES: u32 = 25_000;
const BYTES_CASES: u32 = 20_000;

/// `cases` by default; `PROPTEST_CASES` overrides it for every property.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    ProptestConfig {
        cases,
        // No regression files: a failure prints its minimal document.
        failure_persistence: None,
        // ChaCha costs more than the parse in a debug build.
        rng_algorithm: RngAlgorithm::XorShift,
        // A fixed seed: CI runs the same 105k documents every time, so a
        // red run is reproducible. `PROPTEST_RNG_SEED=N` explores others.
        rng_seed: match std::env::var("PROPTEST_RNG_SEED") {
            Ok(_) => ProptestConfig::default().rng_seed,
            Err(_) => proptest::test_runner::RngSeed::Fixed(20_261_201),
        },
        ..ProptestConfig::default()
    }
}

/// Runs `f`, asserting that this thread's heap peak stays under the bound;
/// returns `f`'s value and the peak in bytes.
fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> (T, u64) {
    let mut out = None;
    let info = allocation_counter::measure(|| out = Some(f()));
    assert!(info.bytes_max < MEMORY_BOUND, "{what}: peak heap {} bytes", info.bytes_max);
    (out.expect("measured closure ran"), info.bytes_max)
}

/// Secrets long enough not to occur elsewhere in a document by chance (a
/// mutation can leave `postgres://app:db@db/app`); generated ones have 9 to
/// 13 characters.
fn long(secrets: Vec<String>) -> impl Iterator<Item = String> {
    secrets.into_iter().filter(|s| s.chars().count() >= 5)
}

/// Parses `bytes` both ways under the memory bound; checks what holds for
/// every config that parses; returns it.
fn check_doc(bytes: &[u8]) -> Option<Config> {
    let (parsed, _) = bounded("Config::parse", || Config::parse(bytes));
    if let Ok(text) = std::str::from_utf8(bytes) {
        let (json, _) = bounded("yaml_to_json", || yaml_to_json(text));
        let json = json.map_err(|e| e.to_string());
        // Both readings refuse what the shape limits refuse.
        if let Err(
            e @ (ConfigError::TooDeep { .. }
            | ConfigError::TooManyNodes { .. }
            | ConfigError::AliasBomb { .. }
            | ConfigError::TooManyAliases { .. }),
        ) = &parsed
            && !text.trim_start().starts_with('{')
        {
            assert_eq!(json, Err(e.to_string()));
        }
    }
    let config = parsed.ok()?;
    assert!(ConfigDiff::between(&config, &config).is_empty(), "a config differs from itself: {config:?}");
    // The secret fields come out redacted. (The generator may also write a
    // password string into a field that is not secret, such as
    // `server.host`: that value is the author's choice, shown as written.)
    let redacted = config.redacted_json();
    let secret_fields: Vec<String> = [("database", "url"), ("redis", "url"), ("llm", "endpoint")]
        .iter()
        .map(|(section, key)| redacted[*section][*key].to_string())
        .collect();
    for secret in long(config.secrets()) {
        for field in &secret_fields {
            assert!(!field.contains(&secret), "secret `{secret}` in a secret field: {redacted}");
        }
    }
    Some(config)
}

// ---------------------------------------------------------------------------
// A small YAML value model, rendered as block or flow YAML, or as JSON.

#[derive(Debug, Clone)]
enum V {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<V>),
    Map(Vec<(String, V)>),
    /// `&aN node`
    Anchor(u8, Box<V>),
    /// `*aN`
    Alias(u8),
}

fn s(v: &str) -> V {
    V::Str(v.to_owned())
}

/// Text that YAML reads back as the same string without quotes.
fn plain_ok(t: &str) -> bool {
    const WORDS: &[&str] = &["true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"];
    t.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && t.chars().all(|c| c.is_ascii_alphanumeric() || "_./@-".contains(c))
        && !WORDS.contains(&t.to_ascii_lowercase().as_str())
}

fn scalar(v: &V) -> Option<String> {
    Some(match v {
        V::Null => "~".into(),
        V::Bool(b) => b.to_string(),
        V::Int(i) => i.to_string(),
        V::Float(f) if f.is_nan() => ".nan".into(),
        V::Float(f) if f.is_infinite() => if *f > 0.0 { ".inf" } else { "-.inf" }.into(),
        V::Float(f) => format!("{f:?}"),
        V::Str(t) if plain_ok(t) => t.clone(),
        V::Str(t) => serde_json::to_string(t).expect("a string serializes"),
        V::Alias(n) => format!("*a{n}"),
        V::Seq(items) if items.is_empty() => "[]".into(),
        V::Map(entries) if entries.is_empty() => "{}".into(),
        _ => return None,
    })
}

/// YAML text: collections at levels below `block_levels` in block style,
/// the rest in flow style.
fn yaml(v: &V, block_levels: usize) -> String {
    let mut out = String::new();
    if block_levels == 0 {
        // A document starting with `{` is read as JSON.
        out.push_str("# flow\n");
        flow(v, &mut out);
        out.push('\n');
    } else {
        block(v, 0, block_levels, &mut out);
    }
    out
}

fn flow(v: &V, out: &mut String) {
    match v {
        V::Seq(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                flow(item, out);
            }
            out.push(']');
        }
        V::Map(entries) if !entries.is_empty() => {
            out.push('{');
            for (i, (k, val)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&scalar(&V::Str(k.clone())).expect("a key is a scalar"));
                out.push_str(": ");
                flow(val, out);
            }
            out.push('}');
        }
        V::Anchor(n, inner) => {
            out.push_str(&format!("&a{n} "));
            flow(inner, out);
        }
        other => out.push_str(&scalar(other).expect("a scalar")),
    }
}

/// Renders `v` as the value after `key:` or `-` (the caller wrote those),
/// then a newline.
fn block_value(v: &V, indent: usize, levels: usize, out: &mut String) {
    let (anchor, inner) = match v {
        V::Anchor(n, inner) => (Some(*n), inner.as_ref()),
        other => (None, other),
    };
    if let Some(n) = anchor {
        out.push_str(&format!(" &a{n}"));
    }
    match inner {
        V::Seq(items) if !items.is_empty() && levels > 1 => {
            out.push('\n');
            block(inner, indent + 2, levels - 1, out);
        }
        V::Map(entries) if !entries.is_empty() && levels > 1 => {
            out.push('\n');
            block(inner, indent + 2, levels - 1, out);
        }
        other => {
            out.push(' ');
            flow(other, out);
            out.push('\n');
        }
    }
}

fn block(v: &V, indent: usize, levels: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        V::Seq(items) if !items.is_empty() => {
            for item in items {
                out.push_str(&pad);
                out.push('-');
                block_value(item, indent, levels, out);
            }
        }
        V::Map(entries) if !entries.is_empty() => {
            for (k, val) in entries {
                out.push_str(&pad);
                out.push_str(&scalar(&V::Str(k.clone())).expect("a key is a scalar"));
                out.push(':');
                block_value(val, indent, levels, out);
            }
        }
        other => {
            out.push_str(&pad);
            flow(other, out);
            out.push('\n');
        }
    }
}

fn json(v: &V) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        V::Null | V::Alias(_) => J::Null,
        V::Bool(b) => J::Bool(*b),
        V::Int(i) => J::from(*i),
        V::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        V::Str(t) => J::String(t.clone()),
        V::Seq(items) => J::Array(items.iter().map(json).collect()),
        V::Map(entries) => J::Object(entries.iter().map(|(k, v)| (k.clone(), json(v))).collect()),
        V::Anchor(_, inner) => json(inner),
    }
}

// ---------------------------------------------------------------------------
// Strategies. Each is built once per property; strings come from regexes
// compiled once (a `&str` strategy compiles its regex for every value).

fn re(regex: &str) -> BoxedStrategy<String> {
    proptest::string::string_regex(regex).expect("a valid regex").boxed()
}

/// Any value, a few levels deep, anchors and aliases included.
fn any_value() -> BoxedStrategy<V> {
    let leaf = prop_oneof![
        Just(V::Null),
        any::<bool>().prop_map(V::Bool),
        any::<i64>().prop_map(V::Int),
        select(vec![0.5, -1e300, f64::NAN, f64::INFINITY]).prop_map(V::Float),
        re("[a-z]{0,6}").prop_map(V::Str),
        re("[ -~]{0,8}").prop_map(V::Str),
        (0u8..3).prop_map(V::Alias),
    ];
    let key = re("[a-z_]{1,6}");
    leaf.prop_recursive(4, 16, 3, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(V::Seq),
            prop::collection::vec((key.clone(), inner.clone()), 0..3).prop_map(V::Map),
            ((0u8..3), inner).prop_map(|(n, v)| V::Anchor(n, Box::new(v))),
        ]
    })
    .boxed()
}

fn pick(values: &[&'static str]) -> BoxedStrategy<V> {
    select(values.to_vec()).prop_map(s).boxed()
}

fn uint(range: std::ops::RangeInclusive<i64>) -> BoxedStrategy<V> {
    range.prop_map(V::Int).boxed()
}

/// A password: distinctive (`pw-`), with characters URLs escape or decode.
fn password() -> BoxedStrategy<String> {
    re("[A-Za-z0-9._~!*%@+-]{6,10}").prop_map(|p| format!("pw-{p}")).boxed()
}

/// Durations valid for every timeout of the schema (1ms..=300s).
const SHORT: &[&str] = &["250ms", "5s", "1m 30s", "2s", "100ms"];

/// A field's value: valid, or, with `noise`, sometimes of the wrong type or
/// shape, anchored, or an alias.
fn field(valid: BoxedStrategy<V>, noise: bool) -> BoxedStrategy<V> {
    if !noise {
        return valid;
    }
    prop_oneof![
        16 => valid.clone(),
        2 => any_value(),
        1 => pick(&["", "10 parsecs", "-1", "yes", "0", "1e9", "~"]),
        1 => (0u8..3).prop_map(V::Alias),
        1 => ((0u8..3), valid).prop_map(|(n, v)| V::Anchor(n, Box::new(v))),
    ]
    .boxed()
}

type Entry = Option<(String, V)>;

fn entry(name: &'static str, valid: BoxedStrategy<V>, noise: bool) -> BoxedStrategy<Entry> {
    prop::option::weighted(0.6, field(valid, noise)).prop_map(move |v| v.map(|v| (name.to_owned(), v))).boxed()
}

fn always(name: &'static str, valid: BoxedStrategy<V>, noise: bool) -> BoxedStrategy<Entry> {
    field(valid, noise).prop_map(move |v| Some((name.to_owned(), v))).boxed()
}

/// A section: its entries, plus (with `noise`) sometimes an unknown key.
fn section(entries: Vec<BoxedStrategy<Entry>>, noise: bool) -> BoxedStrategy<V> {
    let unknown = if noise {
        prop::option::weighted(0.06, (re("[a-z_]{1,10}"), any_value())).boxed()
    } else {
        Just(None).boxed()
    };
    (entries, unknown)
        .prop_map(|(entries, unknown)| V::Map(entries.into_iter().flatten().chain(unknown).collect()))
        .boxed()
}

fn log(noise: bool) -> BoxedStrategy<V> {
    section(
        vec![
            entry("level", pick(&["trace", "debug", "info", "warn", "error"]), noise),
            entry("format", pick(&["text", "json"]), noise),
        ],
        noise,
    )
}

fn database(noise: bool) -> BoxedStrategy<V> {
    let url = prop_oneof![
        password().prop_map(|p| format!("postgres://app:{p}@db:5432/app")),
        password().prop_map(|p| format!("postgresql://db/app?user=a&password={p}")),
        Just("postgres://db/app".to_owned()),
    ]
    .prop_map(V::Str)
    .boxed();
    section(
        vec![
            always("url", url, noise),
            always("max_conns", uint(1..=1000), noise),
            entry("min_conns", uint(0..=1000), noise),
            entry("acquire_timeout", pick(SHORT), noise),
            entry("idle_timeout", pick(&["1s", "10m", "1h", "600s"]), noise),
        ],
        noise,
    )
    .prop_map(|mut v| {
        // min_conns <= max_conns
        if let V::Map(entries) = &mut v {
            let max = entries.iter().find_map(|(k, v)| match v {
                V::Int(n) if k == "max_conns" => Some(*n),
                _ => None,
            });
            for (k, v) in entries.iter_mut() {
                if let (V::Int(min), Some(max)) = (v, max)
                    && k == "min_conns"
                {
                    *min = (*min).min(max);
                }
            }
        }
        v
    })
    .boxed()
}

fn redis(noise: bool) -> BoxedStrategy<V> {
    let url = prop_oneof![
        password().prop_map(|p| format!("redis://:{p}@cache:6379/0")),
        Just("rediss://cache:6380".to_owned()),
    ]
    .prop_map(V::Str)
    .boxed();
    section(
        vec![
            always("url", url, noise),
            entry("pool_size", uint(1..=1000), noise),
            entry("timeout", pick(SHORT), noise),
        ],
        noise,
    )
}

fn llm(noise: bool) -> BoxedStrategy<V> {
    let endpoint = prop_oneof![
        password().prop_map(|p| format!("https://u:{p}@llm.local/v1")),
        Just("http://127.0.0.1:8000/v1".to_owned()),
    ]
    .prop_map(V::Str)
    .boxed();
    section(
        vec![
            always("endpoint", endpoint, noise),
            always("model", re("[a-z][a-z0-9-]{0,10}").prop_map(V::Str).boxed(), noise),
            entry("timeout", pick(SHORT), noise),
            entry("max_retries", uint(0..=10), noise),
            entry("required", any::<bool>().prop_map(V::Bool).boxed(), noise),
        ],
        noise,
    )
}

fn metrics(noise: bool) -> BoxedStrategy<V> {
    let labels = prop::collection::btree_map(re("[a-m][a-z0-9_]{0,6}"), re("[a-z0-9 ]{0,10}").prop_map(V::Str), 0..4)
        .prop_map(|m| V::Map(m.into_iter().collect()))
        .boxed();
    let labels = if noise {
        prop_oneof![
            8 => labels,
            1 => prop::collection::vec((select(vec!["node", "__x", "9x", "a-b", ""]), re("[ -~]{0,300}")), 1..3)
                .prop_map(|v| V::Map(v.into_iter().map(|(k, val)| (k.to_owned(), V::Str(val))).collect())),
        ]
        .boxed()
    } else {
        labels
    };
    section(
        vec![entry("enabled", any::<bool>().prop_map(V::Bool).boxed(), noise), entry("labels", labels, noise)],
        noise,
    )
}

fn simple_sections(noise: bool) -> Vec<BoxedStrategy<Entry>> {
    vec![
        entry("log", log(noise), noise),
        entry("metrics", metrics(noise), noise),
        entry("cache", section(vec![entry("ttl", pick(&["0s", "30s", "1h 30m", "7days"]), noise)], noise), noise),
        entry(
            "server",
            section(
                vec![
                    entry("host", pick(&["127.0.0.1", "0.0.0.0", "localhost"]), noise),
                    entry("port", uint(1..=65535), noise),
                ],
                noise,
            ),
            noise,
        ),
        entry("storage", section(vec![entry("backend", pick(&["memory", "postgres"]), noise)], noise), noise),
    ]
}

/// A config document as a value: `profile: standard` with database and
/// redis, or `profile: lite` with them optional; llm optional. With `noise`,
/// sections come in any order, with unknown keys and bad values.
fn config_value(noise: bool) -> BoxedStrategy<V> {
    let standard = (
        Just(Some(("profile".to_owned(), s("standard")))),
        always("database", database(noise), noise),
        always("redis", redis(noise), noise),
    )
        .boxed();
    let lite = (
        Just(Some(("profile".to_owned(), s("lite")))),
        entry("database", database(noise), noise),
        entry("redis", redis(noise), noise),
    )
        .boxed();
    let unknown =
        if noise { prop::option::weighted(0.05, (re("[a-z]{1,8}"), any_value())).boxed() } else { Just(None).boxed() };
    // Sort keys: the order of the sections, with noise.
    let order = if noise { prop::collection::vec(any::<u16>(), 10).boxed() } else { Just(vec![0; 10]).boxed() };
    (prop_oneof![standard, lite], prop::option::weighted(0.3, llm(noise)), simple_sections(noise), unknown, order)
        .prop_map(|((profile, db, redis), llm, rest, unknown, order)| {
            let llm = llm.map(|v| ("llm".to_owned(), v));
            let entries = [profile, db, redis, llm].into_iter().chain(rest).chain([unknown]);
            let mut keyed: Vec<_> = order.into_iter().zip(entries).filter_map(|(k, e)| Some((k, e?))).collect();
            keyed.sort_by_key(|(k, _)| *k);
            V::Map(keyed.into_iter().map(|(_, e)| e).collect())
        })
        .boxed()
}

/// How a document is written.
#[derive(Debug, Clone, Copy)]
enum Style {
    /// Block collections this many levels deep, flow below (0: all flow).
    Yaml(usize),
    /// JSON, pretty or compact.
    Json(bool),
}

fn render(v: &V, style: Style) -> String {
    match style {
        Style::Yaml(levels) => yaml(v, levels),
        Style::Json(true) => serde_json::to_string_pretty(&json(v)).expect("JSON renders"),
        Style::Json(false) => json(v).to_string(),
    }
}

fn yaml_style() -> impl Strategy<Value = Style> {
    prop_oneof![4 => Just(Style::Yaml(8)), 1 => (0usize..3).prop_map(Style::Yaml)]
}

fn json_style() -> impl Strategy<Value = Style> {
    any::<bool>().prop_map(Style::Json)
}

/// A valid config document, YAML or JSON.
fn valid_doc() -> impl Strategy<Value = String> {
    (config_value(false), prop_oneof![3 => yaml_style(), 1 => json_style()]).prop_map(|(v, st)| render(&v, st))
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    DuplicateLine(Index),
    DropLine(Index),
    SwapLines(Index, Index),
    Insert(Index, &'static str),
}

const TOKENS: &[&str] = &[
    "a",
    "b: ",
    ": ",
    "- ",
    "-",
    "[",
    "]",
    "{",
    "}",
    ",",
    "&x ",
    "*x",
    "&y ",
    "*y",
    "\n",
    "  ",
    "\t",
    "'",
    "\"",
    "#",
    "|",
    ">",
    "!t ",
    "!!str ",
    "---\n",
    "...\n",
    "? ",
    "1",
    "~",
    "log:",
    "metrics:",
    "labels:",
    "level: info",
    "%YAML 1.1\n",
    "\\",
    "\0",
    "\u{feff}",
    "é",
    "\r\n",
    "<<: ",
    "null",
    "profile: lite\n",
    ":",
    "\"\\u12",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<Index>(), select(b"{}[]\":,-&*!|>#' \n\tx0\xff".to_vec())).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        any::<Index>().prop_map(Mutation::Truncate),
        any::<Index>().prop_map(Mutation::DuplicateLine),
        any::<Index>().prop_map(Mutation::DropLine),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<Index>(), select(TOKENS.to_vec())).prop_map(|(i, t)| Mutation::Insert(i, t)),
    ]
}

fn mutate(doc: &str, mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = doc.as_bytes().to_vec();
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        let len = bytes.len();
        let mut lines: Vec<Vec<u8>> = bytes.split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
        match m {
            Mutation::FlipBit(i, bit) => bytes[i.index(len)] ^= 1 << bit,
            Mutation::SetByte(i, b) => bytes[i.index(len)] = *b,
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            Mutation::DuplicateLine(i) => {
                let at = i.index(lines.len());
                lines.insert(at, lines[at].clone());
                bytes = lines.concat();
            }
            Mutation::DropLine(i) => {
                lines.remove(i.index(lines.len()));
                bytes = lines.concat();
            }
            Mutation::SwapLines(a, b) => {
                let n = lines.len();
                lines.swap(a.index(n), b.index(n));
                bytes = lines.concat();
            }
            Mutation::Insert(i, t) => {
                let at = i.index(bytes.len() + 1);
                bytes.splice(at..at, t.bytes());
            }
        }
    }
    bytes
}

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(select(TOKENS.to_vec()), 0..32).prop_map(|t| t.concat())
}

fn some_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..96),
        prop::collection::vec(select(b"{}[]\":,-&*a0 \n\t\\".to_vec()), 0..96),
    ]
}

// ---------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(config(YAML_CASES))]
    #[test]
    fn yaml_config_documents_never_panic_nor_blow_up((v, style) in (config_value(true), yaml_style())) {
        check_doc(render(&v, style).as_bytes());
    }
}

proptest! {
    #![proptest_config(config(JSON_CASES))]
    #[test]
    fn json_config_documents_never_panic_nor_blow_up((v, style) in (config_value(true), json_style())) {
        check_doc(render(&v, style).as_bytes());
    }
}

proptest! {
    #![proptest_config(config(PAIR_CASES))]
    #[test]
    fn valid_documents_parse_and_diff_cleanly(a in valid_doc(), b in valid_doc()) {
        let x = check_doc(a.as_bytes());
        let y = check_doc(b.as_bytes());
        let (Some(x), Some(y)) = (x, y) else {
            panic!("a valid document was refused:\n{a}\n---\n{b}\n{:?}\n{:?}", Config::parse(a.as_bytes()), Config::parse(b.as_bytes()));
        };
        let diff = ConfigDiff::between(&x, &y);
        prop_assert_eq!(diff.is_empty(), x == y, "{:?}", diff);
        let _ = diff.check_restart_only();
        let shown = format!("{diff:?}");
        for secret in long(x.secrets()).chain(long(y.secrets())) {
            prop_assert!(!shown.contains(&secret), "secret `{}` in the diff {}", secret, shown);
        }
    }
}

proptest! {
    #![proptest_config(config(MUTATION_CASES))]
    #[test]
    fn mutated_documents_never_panic_nor_blow_up(doc in valid_doc(), mutations in prop::collection::vec(mutation(), 1..4)) {
        check_doc(&mutate(&doc, &mutations));
    }
}

proptest! {
    #![proptest_config(config(SOUP_CASES))]
    #[test]
    fn token_soup_never_panics_nor_blows_up(doc in token_soup()) {
        check_doc(doc.as_bytes());
    }
}

proptest! {
    #![proptest_config(config(BYTES_CASES))]
    #[test]
    fn arbitrary_bytes_never_panic_nor_blow_up(bytes in some_bytes()) {
        check_doc(&bytes);
    }
}

#[test]
fn the_default_cases_add_up_to_over_100k_documents() {
    let documents: u32 = CASES.iter().map(|(cases, docs)| cases * docs).sum();
    assert!(documents >= 100_000, "{documents}");
}

// ---------------------------------------------------------------------------
// Explicit refusals.

/// `levels` levels of nine-fold aliases, as entries `x0: &a0 [...]`, ... joined by `sep`.
fn billion_laughs(levels: usize, sep: &str) -> String {
    let mut entries = vec!["x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]".to_owned()];
    for i in 1..levels {
        let p = i - 1;
        entries.push(format!("x{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]"));
    }
    entries.join(sep)
}

fn assert_alias_bomb(e: &ConfigError) {
    assert!(matches!(e, ConfigError::AliasBomb { nodes, limit: MAX_NODES } if *nodes > MAX_NODES), "{e:?}");
    assert_eq!(e.to_string(), "aliases expand to more than 100000 nodes: refused (YAML alias bomb?)");
}

#[test]
fn a_billion_laughs_inside_metrics_labels_is_refused_unexpanded() {
    // 9^9 = 387 million strings if expanded.
    let inside = format!("log:\n  level: info\nmetrics:\n  labels:\n    defs: {{ {} }}\n", billion_laughs(9, ", "));
    let aliased = format!("{}\nlog:\n  level: info\nmetrics:\n  labels: *a8\n", billion_laughs(9, "\n"));
    let anchored_in_labels = format!(
        "metrics:\n  labels: &l {{ {} }}\ncache: *l\n",
        billion_laughs(9, ", ").replace("x0:", "k0:").replace("x8:", "k8:")
    );
    for (case, doc) in [("inside", inside), ("aliased", aliased), ("anchored", anchored_in_labels)] {
        let (parsed, peak) = bounded(case, || Config::parse(doc.as_bytes()));
        assert_alias_bomb(&parsed.unwrap_err());
        eprintln!("alias bomb in metrics.labels ({case}): refused, peak heap {peak} bytes");
    }
}

#[test]
fn a_billion_laughs_as_an_any_value_document_is_refused_unexpanded() {
    // The coordinator turns any YAML into JSON for its schema check: no
    // schema stops the expansion there.
    let doc = billion_laughs(9, "\n");
    let (json, peak) = bounded("yaml_to_json", || yaml_to_json(&doc));
    let json = json.map_err(|e| e.to_string());
    assert_eq!(json, Err("aliases expand to more than 100000 nodes: refused (YAML alias bomb?)".to_owned()));
    eprintln!("alias bomb through yaml_to_json: refused, peak heap {peak} bytes");
    let (parsed, _) = bounded("Config::parse", || Config::parse(doc.as_bytes()));
    assert_alias_bomb(&parsed.unwrap_err());
    // Deeper bombs cost no more: the count stops at the bound.
    let doc = billion_laughs(30, "\n");
    let (json, peak30) = bounded("yaml_to_json", || yaml_to_json(&doc));
    assert!(json.unwrap_err().to_string().contains("YAML alias bomb"));
    eprintln!("30-level alias bomb through yaml_to_json: refused, peak heap {peak30} bytes");
}

#[test]
fn a_bomb_hidden_behind_yaml_that_only_libyaml_reads_is_refused() {
    // A tab after `key:` is fine for libyaml, not for the YAML 1.2 event
    // scanner: the bound is then counted over libyaml's reading.
    // Fifty-fold aliases: 50^3 nodes in three levels, within serde_yaml_ng's
    // own repetition limit, which would otherwise refuse it first.
    let wide = |n: usize| vec![format!("*w{n}"); 50].join(", ");
    let doc = format!(
        "log:\n  level:\tinfo\nw0: &w0 [{}]\nw1: &w1 [{}]\nw2: &w2 [{}]\n",
        vec!["lol"; 50].join(", "),
        wide(0),
        wide(1)
    );
    let (parsed, peak) = bounded("Config::parse", || Config::parse(doc.as_bytes()));
    let e = parsed.unwrap_err();
    assert!(matches!(e, ConfigError::TooManyNodes { nodes, limit: MAX_NODES } if nodes == MAX_NODES + 1), "{e:?}");
    assert_eq!(e.to_string(), "document has more than 100000 nodes after alias expansion");
    eprintln!("alias bomb read by libyaml only: refused, peak heap {peak} bytes");
    // Such documents still parse when they are within the bounds.
    let ok = "profile:\tlite\ncache: {ttl: &t 5s}\nlog: {level: info}\n";
    assert_eq!(Config::parse(ok.as_bytes()).unwrap().cache.ttl.0, std::time::Duration::from_secs(5));
}

#[test]
fn anchors_and_aliases_within_the_bounds_still_work() {
    let doc = "profile: lite\ndatabase:\n  url: postgres://db/app\n  acquire_timeout: &t 2s\nllm:\n  endpoint: http://127.0.0.1:8000/v1\n  model: m\n  timeout: *t\nmetrics:\n  labels: &l {team: core}\n";
    let config = Config::parse(doc.as_bytes()).unwrap();
    assert_eq!(config.llm.unwrap().timeout.0, std::time::Duration::from_secs(2));
    assert_eq!(config.metrics.labels.get("team").map(String::as_str), Some("core"));
    let json = yaml_to_json("a: &x [1, {b: 2}]\nc: *x\n").unwrap();
    assert_eq!(json["c"], serde_json::json!([1, {"b": 2}]));
}

/// Runs `f` on a thread with a small stack: a parser that recursed per level
/// would overflow it long before 10 000 levels.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(256 * 1024).spawn(f).expect("thread starts").join().expect("no panic")
}

#[test]
fn documents_nested_10_000_levels_deep_are_refused_before_parsing() {
    let n = 10_000;
    let cases = [
        ("YAML flow", format!("log: {}x{}\n", "[".repeat(n), "]".repeat(n))),
        ("YAML flow mappings", format!("log: {}x{}\n", "{a: ".repeat(n), "}".repeat(n))),
        ("YAML block", format!("log:\n{}x\n", "- ".repeat(n))),
        ("YAML block mappings", (0..n).map(|i| format!("{}k:\n", " ".repeat(i % 300))).collect()),
        ("JSON arrays", format!("{{\"log\": {}1{}}}", "[".repeat(n), "]".repeat(n))),
        ("JSON objects", format!("{}1{}", "{\"a\": ".repeat(n), "}".repeat(n))),
    ];
    for (case, doc) in cases {
        let d = doc.clone();
        let (parsed, peak) = on_small_stack(move || {
            let mut out = None;
            let info = allocation_counter::measure(|| out = Some(Config::parse(d.as_bytes())));
            (out.unwrap(), info.bytes_max)
        });
        assert!(peak < MEMORY_BOUND, "{case}: peak {peak}");
        let e = parsed.unwrap_err();
        if case == "YAML block mappings" {
            // The indentation wraps every 300 lines: 300 levels at most.
            assert!(matches!(e, ConfigError::TooDeep { depth: 65, limit: MAX_DEPTH }), "{case}: {e:?}");
        } else {
            assert!(
                matches!(e, ConfigError::TooDeep { depth, limit: MAX_DEPTH } if depth > MAX_DEPTH),
                "{case}: {e:?}"
            );
        }
        assert_eq!(e.to_string(), "document nests deeper than 64 levels", "{case}");
        if !case.starts_with("JSON") {
            let json = on_small_stack(move || yaml_to_json(&doc).map_err(|e| e.to_string()));
            assert_eq!(json, Err("document nests deeper than 64 levels".to_owned()), "{case}");
        }
    }
}

#[test]
fn a_document_larger_than_the_limit_is_refused_before_parsing() {
    let mut big = String::from("profile: lite\n# ");
    big.push_str(&"x".repeat(MAX_CONFIG_BYTES));
    big.push('\n');
    let (parsed, peak) = bounded("Config::parse", || Config::parse(big.as_bytes()));
    assert_eq!(parsed.unwrap_err(), ConfigError::TooLarge { size: big.len(), limit: MAX_CONFIG_BYTES });
    assert!(peak < 1024 * 1024, "refused without copying: peak {peak}");
    let (json, _) = bounded("yaml_to_json", || yaml_to_json(&big));
    let json = json.map_err(|e| e.to_string());
    assert_eq!(json, Err(format!("config is {} bytes; the limit is 4194304 bytes", big.len())));
    // JSON too, and exactly at the limit is not refused for its size.
    let json_big = format!("{{\"log\": \"{}\"}}", "x".repeat(MAX_CONFIG_BYTES));
    assert!(matches!(Config::parse(json_big.as_bytes()), Err(ConfigError::TooLarge { .. })));
    let at_limit = format!("profile: lite\n#{}\n", "x".repeat(MAX_CONFIG_BYTES - 16));
    assert_eq!(at_limit.len(), MAX_CONFIG_BYTES);
    assert!(Config::parse(at_limit.as_bytes()).is_ok());
}

#[test]
fn refusals_name_no_document_content() {
    let secretish = "s3cr3t-value";
    let docs = [
        format!("{secretish}: {}1{}\n", "[".repeat(100), "]".repeat(100)),
        format!("{secretish}: &{secretish} [1, 2, 3, 4, 5, 6, 7, 8, 9]\n{}", billion_laughs(9, "\n")),
    ];
    let mut seen = HashSet::new();
    for doc in docs {
        let e = Config::parse(doc.as_bytes()).unwrap_err();
        let text = e.to_string();
        assert!(!text.contains(secretish) && !text.contains('['), "{text}");
        seen.insert(std::mem::discriminant(&e));
    }
    assert_eq!(seen.len(), 2, "both a nesting and an alias refusal were checked");
}
