//! The workspace's binaries, wherever `cargo` put them.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::OnceLock,
};

/// Why a workspace binary could not be found or built.
#[derive(Debug)]
pub enum BinError {
    /// The path of the running executable could not be read.
    CurrentExe(std::io::Error),
    /// The binary is not next to the running executable.
    NotFound {
        /// Where it was looked for.
        path: PathBuf,
        /// The running executable.
        exe: PathBuf,
    },
    /// `cargo build` could not run, or failed.
    Build {
        /// Packages it was building.
        packages: Vec<String>,
        /// Its exit status, or why it did not start.
        outcome: std::io::Result<ExitStatus>,
    },
}

impl fmt::Display for BinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BinError::CurrentExe(e) => write!(f, "locate this binary: {e}"),
            BinError::NotFound { path, exe } => write!(
                f,
                "{} not found next to {} (build every binary first: `cargo build --bins`)",
                path.display(),
                exe.display()
            ),
            BinError::Build { packages, outcome } => write!(f, "building {packages:?} failed: {outcome:?}"),
        }
    }
}

impl std::error::Error for BinError {}

/// The directory of this build's binaries (`target/<profile>`), from the
/// running executable: a test (`target/<profile>/deps/…`) or a binary.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") { dir.parent().expect("target dir").to_path_buf() } else { dir.to_path_buf() }
}

/// `name` next to the running executable, if it is there.
pub fn sibling_bin(name: &str) -> Result<PathBuf, BinError> {
    let exe = std::env::current_exe().map_err(BinError::CurrentExe)?;
    let p = exe.parent().map(|d| d.join(name)).unwrap_or_default();
    if p.is_file() { Ok(p) } else { Err(BinError::NotFound { path: p, exe }) }
}

/// Builds the binaries of `packages` once per process (a test does not get
/// other packages' binaries built for it) and returns [`bin_dir`].
pub fn ensure_built(packages: &[&str]) -> Result<PathBuf, BinError> {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut done = built.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !done.iter().any(|d| d == p)).collect();
    if !missing.is_empty() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "--bins"]);
        for p in &missing {
            cmd.args(["-p", p]);
        }
        if is_release(&bin_dir()) {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => done.extend(missing.iter().map(|p| p.to_string())),
            outcome => {
                let packages = missing.iter().map(|p| p.to_string()).collect();
                return Err(BinError::Build { packages, outcome });
            }
        }
    }
    Ok(bin_dir())
}

/// Builds example `name` of `package` once per process and returns its
/// path (`target/<profile>/examples/<name>`).
pub fn ensure_example(package: &str, name: &str) -> Result<PathBuf, BinError> {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let mut done = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{package}/{name}");
    if !done.contains(&key) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--example", name]);
        if is_release(&bin_dir()) {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => done.push(key),
            outcome => return Err(BinError::Build { packages: vec![key], outcome }),
        }
    }
    Ok(bin_dir().join("examples").join(name))
}

fn is_release(dir: &Path) -> bool {
    dir.ends_with("release")
}
