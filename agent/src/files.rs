//! The managed files: what one version carries, how the agent reads it,
//! and how it lands on disk.
//!
//! ```text
//!   one file, no schema   content = the file's text       format text  (opaque)
//!   one file + --schema   content = the file's text       format yaml|json, checked
//!                                                         against the schema
//!   several files         content = a YAML map            format yaml, schema: exactly
//!                         relative path → text            these paths, each a string
//! ```
//!
//! Writes are atomic per file (temp file in the same directory, fsync,
//! rename, fsync of the directory) and grouped per version: every temp file
//! is written and synced before the first rename, so a crash leaves either
//! nothing renamed, or a set the agent finishes on its next start (it
//! re-applies the version its state dir holds; see [`crate::program`]).

use std::{
    collections::BTreeMap,
    fmt,
    io::Write,
    path::{Component as PathPart, Path, PathBuf},
    sync::Arc,
};

use confroll_common::document::{self, ConfigError, Format, Violation};
use confroll_node::{ServiceConfig, service::Described};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Value, json};

/// How the content of a version maps to files.
#[derive(Clone)]
pub enum Mode {
    /// One file, opaque text.
    Text,
    /// One YAML or JSON file checked against a JSON Schema (by the
    /// coordinator at submit, and by the agent before anything is written).
    Structured {
        /// Its format.
        format: Format,
        /// The schema, as given.
        schema: Value,
        /// The schema, compiled once.
        validator: Arc<jsonschema::Validator>,
    },
    /// Several files as one YAML map of relative path to text.
    Bundle,
}

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Text => f.write_str("Text"),
            Mode::Structured { format, .. } => write!(f, "Structured({format})"),
            Mode::Bundle => f.write_str("Bundle"),
        }
    }
}

/// Why a layout was refused at start.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// No `--file`.
    #[error("no file to manage: give at least one --file")]
    NoFile,
    /// A path that is absolute, empty or climbs out of the directory.
    #[error("`{0}`: a managed file is a relative path inside --dir, without `..`")]
    BadPath(String),
    /// The same file twice.
    #[error("`{0}` is given twice")]
    Duplicate(String),
    /// A format that does not fit the layout.
    #[error("{0}")]
    Format(String),
    /// A schema that does not compile.
    #[error("--schema: {0}")]
    Schema(String),
}

/// Which files the agent manages, where, and how their content is read.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory the relative paths are under.
    pub dir: PathBuf,
    /// The managed files, relative to `dir`; the first is the main one
    /// (`{file}` in commands).
    pub files: Vec<String>,
    /// How a version's content maps to them.
    pub mode: Mode,
}

/// A version's files, ready to write: the agent's config type.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Files {
    /// Relative path → content.
    pub files: BTreeMap<String, String>,
    /// A structured file's parsed value: what diffs compare (field by
    /// field, with the schema's secret marks).
    #[serde(skip)]
    pub value: Option<Value>,
}

/// Diffs see a structured file as its fields, anything else as its files
/// (path → text).
impl Serialize for Files {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.value {
            Some(v) => v.serialize(s),
            None => self.files.serialize(s),
        }
    }
}

/// The type-level schema is never published: the agent's [`Layout`] gives
/// the node a [`confroll_node::Codec`] with the real one.
impl schemars::JsonSchema for Files {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Files".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "object" })
    }
}

impl ServiceConfig for Files {}

impl Layout {
    /// Checks and builds a layout: `files` relative to `dir`; `format` and
    /// `schema` as given on the command line.
    pub fn new(
        dir: PathBuf,
        files: Vec<String>,
        format: Option<Format>,
        schema: Option<Value>,
    ) -> Result<Layout, LayoutError> {
        if files.is_empty() {
            return Err(LayoutError::NoFile);
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &files {
            if !is_relative_inside(f) {
                return Err(LayoutError::BadPath(f.clone()));
            }
            if !seen.insert(f.as_str()) {
                return Err(LayoutError::Duplicate(f.clone()));
            }
        }
        let mode = match (files.len(), schema) {
            (1, None) => match format {
                None | Some(Format::Text) => Mode::Text,
                Some(f) => {
                    return Err(LayoutError::Format(format!(
                        "--format {f} needs --schema (without one, a single file is opaque text)"
                    )));
                }
            },
            (1, Some(schema)) => {
                let format = match format {
                    None | Some(Format::Yaml) => Format::Yaml,
                    Some(Format::Json) => Format::Json,
                    Some(f) => {
                        return Err(LayoutError::Format(format!("--schema checks YAML or JSON files, not {f}")));
                    }
                };
                let validator = jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .build(&schema)
                    .map_err(|e| LayoutError::Schema(e.to_string()))?;
                Mode::Structured { format, schema, validator: Arc::new(validator) }
            }
            (_, Some(_)) => return Err(LayoutError::Format("--schema checks a single file, not a bundle".into())),
            (_, None) => match format {
                None | Some(Format::Yaml) => Mode::Bundle,
                Some(f) => {
                    return Err(LayoutError::Format(format!(
                        "several files travel as one YAML map (path → text), not as {f}"
                    )));
                }
            },
        };
        Ok(Layout { dir, files, mode })
    }

    /// The main file's path.
    pub fn main_file(&self) -> PathBuf {
        self.dir.join(&self.files[0])
    }

    /// The document format of a version's content.
    pub fn format(&self) -> Format {
        match &self.mode {
            Mode::Text => Format::Text,
            Mode::Structured { format, .. } => *format,
            Mode::Bundle => Format::Yaml,
        }
    }

    /// What the agent publishes at registration: its format and the schema
    /// the coordinator checks every submit against.
    pub fn described(&self) -> Described {
        let schema = match &self.mode {
            Mode::Text => json!({
                "type": "string",
                "description": format!("opaque text: the content of {}", self.files[0]),
            }),
            Mode::Structured { schema, .. } => schema.clone(),
            Mode::Bundle => {
                let props: serde_json::Map<String, Value> =
                    self.files.iter().map(|f| (f.clone(), json!({ "type": "string" }))).collect();
                json!({
                    "type": "object",
                    "description": "one version of several files: relative path → content",
                    "properties": props,
                    "required": self.files,
                    "additionalProperties": false,
                })
            }
        };
        Described::new(schema, Vec::new(), self.format())
    }

    /// Parses a version's content into its files: size, UTF-8, syntax, and
    /// the schema (structured) or the exact set of paths (bundle).
    pub fn parse(&self, bytes: &[u8]) -> Result<Files, ConfigError> {
        let value = document::to_value(bytes, self.format())?;
        match &self.mode {
            Mode::Text => {
                let Value::String(text) = value else { unreachable!("text documents parse to a string") };
                Ok(Files { files: BTreeMap::from([(self.files[0].clone(), text)]), value: None })
            }
            Mode::Structured { validator, .. } => {
                let violations: Vec<Violation> = validator
                    .iter_errors(&value)
                    .map(|e| Violation::new(e.instance_path().to_string(), e.to_string()))
                    .collect();
                if !violations.is_empty() {
                    return Err(ConfigError::Rules(violations));
                }
                // Text, so the file is written exactly as submitted.
                let text = String::from_utf8_lossy(bytes).into_owned();
                Ok(Files { files: BTreeMap::from([(self.files[0].clone(), text)]), value: Some(value) })
            }
            Mode::Bundle => {
                let Value::Object(map) = value else {
                    return Err(ConfigError::Rules(vec![Violation::new(
                        "",
                        "a bundle is a YAML map of relative path to file content",
                    )]));
                };
                let mut violations = Vec::new();
                let mut files = BTreeMap::new();
                for (k, v) in map {
                    match v {
                        _ if !self.files.contains(&k) => violations.push(Violation::new(
                            k,
                            format!("not a managed file (managed: {})", self.files.join(", ")),
                        )),
                        Value::String(text) => {
                            files.insert(k, text);
                        }
                        _ => violations.push(Violation::new(k, "the content of a file is a string")),
                    }
                }
                for f in &self.files {
                    if !files.contains_key(f) && !violations.iter().any(|v| &v.path == f) {
                        violations.push(Violation::new(f.clone(), "missing: a version carries every managed file"));
                    }
                }
                if violations.is_empty() {
                    Ok(Files { files, value: None })
                } else {
                    Err(ConfigError::Rules(violations))
                }
            }
        }
    }

    /// The content of a version holding `files` (what `confroll submit`
    /// sends for the bundle of files now on disk).
    pub fn render(&self, files: &BTreeMap<String, String>) -> String {
        match &self.mode {
            Mode::Text | Mode::Structured { .. } => files.get(&self.files[0]).cloned().unwrap_or_default(),
            Mode::Bundle => serde_yaml_ng::to_string(files).unwrap_or_default(),
        }
    }

    /// The managed files as they are on disk now (`None`: one is missing).
    pub fn read_disk(&self) -> std::io::Result<Option<BTreeMap<String, String>>> {
        let mut out = BTreeMap::new();
        for f in &self.files {
            match std::fs::read_to_string(self.dir.join(f)) {
                Ok(text) => {
                    out.insert(f.clone(), text);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(out))
    }

    /// Writes `files` into `root` (the managed directory, or a staging
    /// copy): every temp file written and synced first, then renamed in
    /// turn, then the directories synced.
    pub fn write_into(&self, root: &Path, files: &BTreeMap<String, String>) -> std::io::Result<()> {
        let mut staged = Vec::new();
        for (rel, text) in files {
            let target = root.join(rel);
            let parent = target.parent().unwrap_or(root).to_path_buf();
            std::fs::create_dir_all(&parent)?;
            let mut tmp = tempfile::Builder::new().prefix(".confroll-").suffix(".tmp").tempfile_in(&parent)?;
            tmp.write_all(text.as_bytes())?;
            tmp.as_file().sync_all()?;
            staged.push((tmp, target, parent));
        }
        let mut dirs = Vec::new();
        for (tmp, target, parent) in staged {
            // A new file gets the usual mode (a temp file is 0600).
            set_readable(tmp.path())?;
            tmp.persist(&target).map_err(|e| e.error)?;
            if !dirs.contains(&parent) {
                dirs.push(parent);
            }
        }
        for d in dirs {
            std::fs::File::open(&d)?.sync_all()?;
        }
        Ok(())
    }

    /// A staging copy of the managed directory with `files` in place of the
    /// managed ones: every other entry is a symlink to the real one, so a
    /// check command resolves relative includes exactly as the program will.
    /// Removed when dropped.
    pub fn stage(&self, scratch: &Path, files: &BTreeMap<String, String>) -> std::io::Result<tempfile::TempDir> {
        std::fs::create_dir_all(scratch)?;
        let root = tempfile::Builder::new().prefix("check-").tempdir_in(scratch)?;
        let dir = std::fs::canonicalize(&self.dir)?;
        mirror(&dir, root.path(), &self.files, "")?;
        self.write_into(root.path(), files)?;
        Ok(root)
    }
}

/// Links every entry of `from` into `to`, except managed files and the
/// directories that hold one (made real, and mirrored in turn).
fn mirror(from: &Path, to: &Path, managed: &[String], prefix: &str) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(from) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        if managed.contains(&rel) || name.starts_with(".confroll-") {
            continue;
        }
        let holds_managed = managed.iter().any(|m| m.starts_with(&format!("{rel}/")));
        if holds_managed && entry.file_type()?.is_dir() {
            std::fs::create_dir_all(to.join(&name))?;
            mirror(&entry.path(), &to.join(&name), managed, &format!("{rel}/"))?;
        } else {
            std::os::unix::fs::symlink(entry.path(), to.join(&name))?;
        }
    }
    Ok(())
}

fn set_readable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

/// A relative path with only normal parts.
fn is_relative_inside(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty() && path.components().all(|c| matches!(c, PathPart::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Layout {
        Layout::new("/nonexistent".into(), vec!["nginx.conf".into(), "conf.d/up.conf".into()], None, None).unwrap()
    }

    #[test]
    fn layouts_refuse_paths_outside_and_bad_formats() {
        let l = |files: &[&str], f: Option<Format>, s: Option<Value>| {
            Layout::new("/d".into(), files.iter().map(|s| s.to_string()).collect(), f, s)
        };
        assert!(matches!(l(&[], None, None), Err(LayoutError::NoFile)));
        assert!(matches!(l(&["../x"], None, None), Err(LayoutError::BadPath(_))));
        assert!(matches!(l(&["/etc/x"], None, None), Err(LayoutError::BadPath(_))));
        assert!(matches!(l(&["a", "a"], None, None), Err(LayoutError::Duplicate(_))));
        assert!(matches!(l(&["a"], Some(Format::Yaml), None), Err(LayoutError::Format(_))));
        assert!(matches!(l(&["a", "b"], None, Some(json!({}))), Err(LayoutError::Format(_))));
        assert!(matches!(l(&["a"], None, Some(json!({"type": 5}))), Err(LayoutError::Schema(_))));
        assert_eq!(l(&["a"], None, None).unwrap().format(), Format::Text);
        assert_eq!(l(&["a", "b"], None, None).unwrap().format(), Format::Yaml);
    }

    #[test]
    fn text_is_opaque_but_not_empty() {
        let l = Layout::new("/d".into(), vec!["nginx.conf".into()], None, None).unwrap();
        let f = l.parse(b"events {}\nhttp { server { listen 80; } }\n").unwrap();
        assert_eq!(f.files["nginx.conf"], "events {}\nhttp { server { listen 80; } }\n");
        assert!(matches!(l.parse(b"  \n"), Err(ConfigError::Empty)));
        assert!(matches!(l.parse(&[0xff, 0xfe]), Err(ConfigError::NotUtf8 { .. })));
        assert_eq!(l.described().published.0.format, "text");
    }

    #[test]
    fn a_bundle_carries_exactly_the_managed_files() {
        let l = bundle();
        let files = BTreeMap::from([
            ("nginx.conf".to_string(), "events {}\n".to_string()),
            ("conf.d/up.conf".to_string(), "upstream a { server 127.0.0.1:1; }\n".to_string()),
        ]);
        let text = l.render(&files);
        assert_eq!(l.parse(text.as_bytes()).unwrap().files, files);
        let err = l.parse(b"nginx.conf: x\nother.conf: y\n").unwrap_err().to_string();
        assert!(err.contains("other.conf") && err.contains("conf.d/up.conf"), "{err}");
        assert!(l.parse(b"nginx.conf: [1]\nconf.d/up.conf: x\n").unwrap_err().to_string().contains("string"));
        let schema = &l.described().schema;
        assert_eq!(schema["required"], json!(["nginx.conf", "conf.d/up.conf"]));
    }

    #[test]
    fn a_structured_file_is_checked_against_its_schema() {
        let schema = json!({"type": "object", "properties": {"port": {"type": "integer"}}, "required": ["port"]});
        let l = Layout::new("/d".into(), vec!["app.json".into()], Some(Format::Json), Some(schema)).unwrap();
        let f = l.parse(br#"{"port": 8080}"#).unwrap();
        assert_eq!(f.files["app.json"], r#"{"port": 8080}"#);
        assert_eq!(serde_json::to_value(&f).unwrap(), json!({"port": 8080}));
        let err = l.parse(br#"{"port": "x"}"#).unwrap_err().to_string();
        assert!(err.contains("/port"), "{err}");
    }

    #[test]
    fn writes_are_atomic_per_file_and_staging_mirrors_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("listen.conf"), "listen 1;").unwrap();
        let l = Layout::new(dir.path().into(), vec!["nginx.conf".into(), "conf.d/up.conf".into()], None, None).unwrap();
        let files = BTreeMap::from([
            ("nginx.conf".to_string(), "v1".to_string()),
            ("conf.d/up.conf".to_string(), "u1".to_string()),
        ]);
        l.write_into(&l.dir, &files).unwrap();
        assert_eq!(l.read_disk().unwrap().unwrap(), files);
        let scratch = tempfile::tempdir().unwrap();
        let mut next = files.clone();
        next.insert("nginx.conf".into(), "v2".into());
        let staged = l.stage(scratch.path(), &next).unwrap();
        assert_eq!(std::fs::read_to_string(staged.path().join("nginx.conf")).unwrap(), "v2");
        assert_eq!(std::fs::read_to_string(staged.path().join("listen.conf")).unwrap(), "listen 1;");
        assert_eq!(std::fs::read_to_string(staged.path().join("conf.d/up.conf")).unwrap(), "u1");
        // Staging never touches the real files, and leaves no temp file.
        assert_eq!(std::fs::read_to_string(dir.path().join("nginx.conf")).unwrap(), "v1");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }
}
