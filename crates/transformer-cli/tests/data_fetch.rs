//! `transformer data fetch` end to end: the built binary copies from the shared mirror that
//! sits beside the repository (`<repo>/../shared/data`, as on CI) into a temporary working
//! directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The mirror beside the repository. Its absence is a failure, not a skip: a test that quietly
/// passes without its data would hide a broken setup.
fn mirror() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mirror = repo.join("../shared/data");
    assert!(
        mirror.join("tinyshakespeare").is_dir(),
        "the data mirror {} is missing: these tests need <repo>/../shared/data \
         (tinyshakespeare/input.txt, multi30k/*) beside the repository",
        mirror.display()
    );
    mirror.canonicalize().expect("canonical mirror path")
}

/// Run the binary in `cwd` with `args`, without any mirror from the environment.
fn transformer(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_transformer"))
        .args(args)
        .current_dir(cwd)
        .env_remove("TRANSFORMER_DATA_MIRROR")
        .output()
        .expect("run the transformer binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn fetch_tinyshakespeare_from_mirror() {
    let mirror = mirror();
    let cwd = tempfile::tempdir().unwrap();
    let mirror_arg = mirror.to_str().unwrap();

    let out = transformer(
        cwd.path(),
        &["data", "fetch", "tinyshakespeare", "--mirror", mirror_arg],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    let input = cwd.path().join("data/tinyshakespeare/input.txt");
    assert_eq!(std::fs::metadata(&input).unwrap().len(), 1_115_394);
    assert!(stdout.contains("copied from"), "{stdout}");

    // Again: the good file is kept and reported as already there.
    let out = transformer(
        cwd.path(),
        &["data", "fetch", "tinyshakespeare", "--mirror", mirror_arg],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(stdout.contains("already present"), "{stdout}");
}

#[test]
fn fetch_multi30k_from_mirror_env() {
    // Through the environment variable this time; this also checks every multi30k checksum
    // kept in the code against the mirror.
    let mirror = mirror();
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_transformer"))
        .args(["data", "fetch", "multi30k"])
        .current_dir(cwd.path())
        .env("TRANSFORMER_DATA_MIRROR", &mirror)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for (file, bytes) in [
        ("train.de", 2_110_398),
        ("train.en", 1_801_238),
        ("val.de", 75_981),
        ("val.en", 63_297),
        ("test_2016_flickr.de", 70_649),
        ("test_2016_flickr.en", 62_076),
    ] {
        let path = cwd.path().join("data/multi30k").join(file);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes, "{file}");
    }
}

#[test]
fn fetch_unknown_name_lists_known_names() {
    let cwd = tempfile::tempdir().unwrap();
    let out = transformer(cwd.path(), &["data", "fetch", "nosuch"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("nosuch"), "{stderr}");
    assert!(
        stderr.contains("tinyshakespeare") && stderr.contains("multi30k"),
        "{stderr}"
    );
    assert!(!cwd.path().join("data/nosuch").exists());
}
