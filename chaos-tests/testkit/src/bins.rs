//! The workspace's binaries, wherever `cargo` put them.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The directory of this build's binaries (`target/<profile>`), from the
/// running executable: a test (`target/<profile>/deps/…`) or a binary.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") { dir.parent().expect("target dir").to_path_buf() } else { dir.to_path_buf() }
}

/// `name` next to the running executable, if it is there.
pub fn sibling_bin(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locate this binary: {e}"))?;
    let p = exe.parent().map(|d| d.join(name)).unwrap_or_default();
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found next to {} (build every binary first: `cargo build --bins`)",
            p.display(),
            exe.display()
        ))
    }
}

/// Builds the binaries of `packages` once per process (a test does not get
/// other packages' binaries built for it) and returns [`bin_dir`].
pub fn ensure_built(packages: &[&str]) -> Result<PathBuf, String> {
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
            other => return Err(format!("building {missing:?} failed: {other:?}")),
        }
    }
    Ok(bin_dir())
}

fn is_release(dir: &Path) -> bool {
    dir.ends_with("release")
}
