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
        /// What it was building.
        target: String,
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
            BinError::Build { target, outcome } => write!(f, "cargo build {target} failed: {outcome:?}"),
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

/// Builds every binary of the workspace once per process (a test gets only
/// its own package's binaries built for it) and returns [`bin_dir`].
///
/// The whole workspace, never `-p`: cargo resolves features for the packages
/// it is asked for, so each `-p` set would build its own copy of every
/// dependency whose features differ. `cargo build --bins` (the demos) shares
/// this one.
pub fn ensure_built() -> Result<PathBuf, BinError> {
    build_once(&["--workspace", "--bins"])?;
    Ok(bin_dir())
}

/// Builds example `name` once per process and returns its path
/// (`target/<profile>/examples/<name>`). An example may use dev-dependencies,
/// so this resolves features as `cargo test --workspace` does and finds the
/// test run's build fresh.
pub fn ensure_example(name: &str) -> Result<PathBuf, BinError> {
    build_once(&["--workspace", "--example", name])?;
    Ok(bin_dir().join("examples").join(name))
}

/// `cargo build -q ARGS` (in this build's profile), unless this process
/// already ran it with these arguments.
fn build_once(args: &[&str]) -> Result<(), BinError> {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let target = args.join(" ");
    let mut done = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&target) {
        return Ok(());
    }
    let mut cmd = cargo();
    cmd.args(["build", "-q"]).args(args);
    if is_release(&bin_dir()) {
        cmd.arg("--release");
    }
    match cmd.status() {
        Ok(s) if s.success() => {
            done.push(target);
            Ok(())
        }
        outcome => Err(BinError::Build { target, outcome }),
    }
}

/// The `cargo` that runs this test, without the variables it set for the
/// test (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). Build scripts such as
/// ring's rerun when one of those changes: a nested build that kept them
/// would rebuild ring and all that depends on it, and the next top-level
/// build would rebuild it all again.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let set_for_a_crate = k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || matches!(
                k.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if set_for_a_crate {
            cmd.env_remove(&key);
        }
    }
    cmd
}

fn is_release(dir: &Path) -> bool {
    dir.ends_with("release")
}
