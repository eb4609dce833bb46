//! The output guard: every command that writes (train, demo, average, translate
//! `--attention-out`, eval `--hyp-out`, and those to come) goes through here, so that no
//! command loses a user's file.
//!
//! The rules, in order:
//! 1. Validate before touching the disk: callers check their config, flags and inputs first,
//!    then call [`check_dir`] / [`check_file`] (which only read), and only then write.
//! 2. Never write to a path that is also an input: [`check_not_input`] compares canonicalized
//!    paths, so `./a/../ref.txt` and a symlink to `ref.txt` are both `ref.txt`.
//! 3. Never replace what is not a finished output of the same command without `--force`:
//!    a finished directory output carries [`MARKER_FILE`], written last, naming its command.
//!    An empty directory is free to use; anything else needs `--force`.
//! 4. Build beside, swap in when complete: [`StagedDir`] and [`write_file`] write into a
//!    sibling and rename it over the destination only at the end, so an error or a crash
//!    half-way leaves the old output as it was.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Written last into a finished directory output: which command made it.
pub const MARKER_FILE: &str = ".transformer-output.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    command: String,
    version: String,
}

/// `path` made absolute and free of symlinks and `..`, also when it does not exist yet: the
/// nearest existing ancestor is canonicalized and the rest appended.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    if let Ok(p) = abs.canonicalize() {
        return p;
    }
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        match (cur.canonicalize(), cur.parent(), cur.file_name()) {
            (Ok(base), _, _) => {
                let mut out = base;
                for part in rest.iter().rev() {
                    out.push(part);
                }
                return normalize(&out);
            }
            (Err(_), Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return normalize(&abs),
        }
    }
}

/// Drop `.` and fold `..` lexically (for the part of a path that does not exist yet).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Refuse when `output` (named by `flag`) is one of `inputs`, lies inside one, or holds one:
/// writing or replacing it would destroy what the command reads.
pub fn check_not_input(flag: &str, output: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let out = resolve(output);
    for (what, input) in inputs {
        let inp = resolve(input);
        if out == inp {
            bail!(
                "{flag} {}: it is also the input {what} ({}); choose another output path",
                output.display(),
                input.display()
            );
        }
        if out.starts_with(&inp) {
            bail!(
                "{flag} {}: it lies inside the input {what} ({}); choose an output outside it",
                output.display(),
                input.display()
            );
        }
        if inp.starts_with(&out) {
            bail!(
                "{flag} {}: it holds the input {what} ({}), which writing there would \
                 replace; choose another output path",
                output.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// What a directory output's destination holds now.
#[derive(Debug, PartialEq, Eq)]
pub enum Existing {
    /// Nothing there (or an empty directory).
    Free,
    /// A finished output of the same command: replaced without `--force`.
    SameCommand,
}

/// Check the destination of a directory output made by `command`: a file there is refused;
/// a directory that is neither empty nor a finished output of `command` is refused unless
/// `force`. Reads only.
pub fn check_dir(flag: &str, dest: &Path, command: &str, force: bool) -> Result<Existing> {
    let meta = match std::fs::symlink_metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Free),
        Err(e) => return Err(e).with_context(|| format!("{flag} {}", dest.display())),
    };
    if !meta.is_dir() && !dest.is_dir() {
        bail!(
            "{flag} {}: a file is there; {flag} names a directory (choose another path, or \
             remove the file)",
            dest.display()
        );
    }
    let mut entries =
        std::fs::read_dir(dest).with_context(|| format!("{flag} {}", dest.display()))?;
    if entries.next().is_none() {
        return Ok(Existing::Free);
    }
    if marker_command(dest).as_deref() == Some(command) {
        return Ok(Existing::SameCommand);
    }
    if force {
        return Ok(Existing::Free);
    }
    let what = match marker_command(dest) {
        Some(other) => format!("the output of `transformer {other}`"),
        None if crate::train::holds_a_run(dest) => "a training run".to_string(),
        None => format!("files that no `transformer {command}` wrote"),
    };
    bail!(
        "{flag} {}: already holds {what}; pass --force to replace it, or choose another {flag}",
        dest.display()
    )
}

/// The command named by `dir`'s marker, when it has one.
pub fn marker_command(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(MARKER_FILE)).ok()?;
    serde_json::from_str::<Marker>(&text)
        .ok()
        .map(|m| m.command)
}

/// Write the marker that makes `dir` a finished output of `command`.
pub fn write_marker(dir: &Path, command: &str) -> Result<()> {
    let marker = Marker {
        command: command.to_string(),
        version: transformer::version().to_string(),
    };
    let path = dir.join(MARKER_FILE);
    std::fs::write(&path, serde_json::to_string(&marker)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// `.NAME.SUFFIX` beside `dest`.
fn sibling(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    dest.with_file_name(format!(".{name}.{suffix}"))
}

/// If a crash came between the two renames of a swap, put the previous output back.
pub fn recover(dest: &Path) -> Result<()> {
    let old = sibling(dest, "old");
    if !dest.exists() && old.is_dir() {
        std::fs::rename(&old, dest).with_context(|| format!("restoring {}", dest.display()))?;
    }
    Ok(())
}

/// A directory output built in a sibling (`.NAME.staging`) and swapped in by
/// [`StagedDir::commit`]; dropped without a commit, the staging directory is removed and the
/// destination never touched.
pub struct StagedDir {
    dest: PathBuf,
    tmp: PathBuf,
    command: &'static str,
    committed: bool,
}

impl StagedDir {
    /// Check `dest` ([`check_dir`]) and create the empty staging directory beside it.
    pub fn begin(flag: &str, dest: &Path, command: &'static str, force: bool) -> Result<Self> {
        // Absolute, so that `--out .` has a name to put the staging directory beside.
        let resolved = resolve(dest);
        recover(&resolved)?;
        check_dir(flag, dest, command, force)?;
        let dest = &resolved;
        let tmp = sibling(dest, "staging");
        if let Some(parent) = tmp.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        // A leftover of an attempt that was killed.
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(StagedDir {
            dest: dest.to_path_buf(),
            tmp,
            command,
            committed: false,
        })
    }

    /// Where to write the new output.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Mark the output finished and swap it in: the old one goes to `.NAME.old` (restored by
    /// [`recover`] after a crash between the renames), the new one takes its place, then the
    /// old one is deleted.
    pub fn commit(mut self) -> Result<()> {
        write_marker(&self.tmp, self.command)?;
        let old = sibling(&self.dest, "old");
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        if self.dest.exists() {
            std::fs::rename(&self.dest, &old)
                .with_context(|| format!("moving {} aside", self.dest.display()))?;
        }
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("moving the new output to {}", self.dest.display()))?;
        self.committed = true;
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Where `train --force` keeps the run it replaces, inside the run directory, until the new
/// run has written its first checkpoint: a bad start (an error, a crash) puts it back.
pub const SET_ASIDE_DIR: &str = ".replaced-run";

/// Entries of a directory output moved aside (into [`SET_ASIDE_DIR`]) while their
/// replacement is built in their place; see [`settle_set_aside`].
pub struct SetAside {
    dir: PathBuf,
}

/// Move those of `entries` (paths inside `dir`) that exist into `dir/.replaced-run/`. Renames
/// within one directory: nothing is copied and nothing is deleted yet.
pub fn set_aside(dir: &Path, entries: &[PathBuf]) -> Result<SetAside> {
    let aside = dir.join(SET_ASIDE_DIR);
    if aside.exists() {
        // Left by a replacement that was itself replaced: the user asked for --force twice.
        std::fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))?;
    }
    std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
    for e in entries.iter().filter(|e| e.exists()) {
        let name = e.file_name().context("an entry without a name")?;
        std::fs::rename(e, aside.join(name))
            .with_context(|| format!("moving {} aside", e.display()))?;
    }
    Ok(SetAside {
        dir: dir.to_path_buf(),
    })
}

impl SetAside {
    /// The replacement is kept when `keep_new` (it has a checkpoint of its own): the old
    /// entries are deleted. Otherwise what the replacement wrote is removed and the old
    /// entries go back.
    pub fn settle(self, keep_new: bool) -> Result<()> {
        settle_set_aside(&self.dir, keep_new)
    }
}

/// Finish (or, after a crash, recover) a [`set_aside`] of `dir`: delete the old entries when
/// `keep_new`, else put them back over whatever the new run wrote under the same names.
pub fn settle_set_aside(dir: &Path, keep_new: bool) -> Result<()> {
    let aside = dir.join(SET_ASIDE_DIR);
    if !aside.is_dir() {
        return Ok(());
    }
    if !keep_new {
        for entry in std::fs::read_dir(&aside).with_context(|| aside.display().to_string())? {
            let old = entry?.path();
            let dst = dir.join(old.file_name().context("an entry without a name")?);
            if dst.is_dir() {
                std::fs::remove_dir_all(&dst)
                    .with_context(|| format!("removing {}", dst.display()))?;
            } else if dst.exists() {
                std::fs::remove_file(&dst)
                    .with_context(|| format!("removing {}", dst.display()))?;
            }
            std::fs::rename(&old, &dst).with_context(|| format!("restoring {}", dst.display()))?;
        }
    }
    std::fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))
}

/// Check the destination of a file output: a directory there is refused, an existing file
/// unless `force` (a plain file carries no marker, so nothing says which command wrote it).
/// Reads only.
pub fn check_file(flag: &str, dest: &Path, force: bool) -> Result<()> {
    if dest.is_dir() {
        bail!(
            "{flag} {}: a directory is there; {flag} names a file",
            dest.display()
        );
    }
    if dest.exists() && !force {
        bail!(
            "{flag} {}: the file exists; pass --force to replace it, or choose another {flag}",
            dest.display()
        );
    }
    Ok(())
}

/// Write a file output whole: into a sibling first, renamed over `dest` when complete.
pub fn write_file(dest: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(&resolve(dest), "partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("writing {}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_sees_through_dot_dot_and_links() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a.txt");
        std::fs::write(&a, "x").unwrap();
        let via_dots = root.path().join("sub/../a.txt");
        assert_eq!(resolve(&via_dots), resolve(&a));
        std::os::unix::fs::symlink(&a, root.path().join("link")).unwrap();
        let e = check_not_input("--out", &root.path().join("link"), &[("--ref", &a)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("also the input --ref"), "{e}");
        let e = check_not_input("--out", root.path(), &[("--ref", &a)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds the input"), "{e}");
        assert!(check_not_input("--out", &root.path().join("new/b.txt"), &[("--ref", &a)]).is_ok());
    }

    #[test]
    fn staged_dir_swaps_in_only_on_commit() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("mine.txt"), "keep").unwrap();
        // Not an output of this command: refused without --force, untouched.
        let e = StagedDir::begin("--out", &dest, "average", false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--force"), "{e}");
        {
            let staged = StagedDir::begin("--out", &dest, "average", true).unwrap();
            std::fs::write(staged.path().join("new.txt"), "n").unwrap();
            // Dropped without commit.
        }
        assert_eq!(
            std::fs::read_to_string(dest.join("mine.txt")).unwrap(),
            "keep"
        );
        let staged = StagedDir::begin("--out", &dest, "average", true).unwrap();
        std::fs::write(staged.path().join("new.txt"), "n").unwrap();
        staged.commit().unwrap();
        assert!(!dest.join("mine.txt").exists() && dest.join("new.txt").exists());
        // Now a finished output of `average`: replaced without --force.
        assert_eq!(
            check_dir("--out", &dest, "average", false).unwrap(),
            Existing::SameCommand
        );
    }
}
