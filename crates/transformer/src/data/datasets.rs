//! Known data sets and `fetch`: put a data set's files into `DEST/NAME/`, downloaded from their
//! public home or copied from a local mirror, and verified against sha256 checksums kept here.
//!
//! Every file is written to a temporary file beside its target and renamed into place only after
//! its checksum matched, without overwriting anything: a failed or interrupted fetch leaves no
//! partial file behind, and a file that is already there with the right checksum is kept as is.
//!
//! A mirror has the same layout as the destination: `DIR/tinyshakespeare/input.txt`,
//! `DIR/multi30k/train.de`, ... (decompressed, like the fetched files).
//!
//! Downloading needs the crate's `fetch` feature (an HTTP client and a gzip decoder, which a
//! library user who never downloads should not have to compile). Without it, copying from a
//! mirror and verifying work the same, and a file that would be downloaded fails with
//! [`FetchError::FeatureDisabled`].

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
#[cfg(feature = "fetch")]
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Where Debian's `dataset-fashion-mnist` installs the gzipped IDX files.
pub const FASHION_MNIST_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The environment variable that names a mirror directory when no `--mirror DIR` is given.
pub const MIRROR_ENV: &str = "TRANSFORMER_DATA_MIRROR";

/// How long to wait for a TCP connection (and for name resolution): without network access the
/// fetch should fail quickly with the hint to use a mirror, not hang.
#[cfg(feature = "fetch")]
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the response headers once connected.
#[cfg(feature = "fetch")]
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the whole body may take (the largest file is about 2 MB).
#[cfg(feature = "fetch")]
const BODY_TIMEOUT: Duration = Duration::from_secs(300);

/// One file of a data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    /// File name inside `DEST/NAME/` (and inside `MIRROR/NAME/`).
    pub name: String,
    /// Where to download it from; none for a data set that only comes from a system package
    /// or a mirror.
    pub url: Option<String>,
    /// Whether the download (or the system package's `NAME.gz`) is gzip-compressed
    /// (decompressed while writing).
    pub gzip: bool,
    /// Size of the (decompressed) file in bytes.
    pub size: u64,
    /// sha256 of the (decompressed) file, lowercase hex.
    pub sha256: String,
}

/// A data set: a name and the files that make it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// The name used on the command line and as the directory name.
    pub name: String,
    /// One line saying what it is and where it comes from.
    pub about: String,
    /// The files, fetched in this order.
    pub files: Vec<DataFile>,
    /// A distribution package that installs the files, copied from when no mirror is given.
    pub system: Option<SystemPackage>,
}

/// A distribution package holding a data set's files (`DIR/FILE`, or `DIR/FILE.gz` when the
/// file is `gzip`), e.g. Debian's `dataset-fashion-mnist` in `/usr/share/datasets/fashion-mnist`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemPackage {
    /// Where the package installs the files.
    pub dir: PathBuf,
    /// The command that installs it, for the error when it is missing.
    pub install: String,
}

/// The data sets that [`fetch`] knows, with their files, URLs, sizes and checksums.
pub fn known() -> Vec<Dataset> {
    let tinyshakespeare = Dataset {
        name: "tinyshakespeare".into(),
        about: "Shakespeare plays, 1.1 MB of text (karpathy/char-rnn)".into(),
        files: vec![DataFile {
            name: "input.txt".into(),
            url: Some("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt".into()),
            gzip: false,
            size: 1_115_394,
            sha256: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed".into(),
        }],
        system: None,
    };

    // Multi30k task 1, raw (not tokenized, not lowercased), German-English, gunzipped.
    // (split, lang, bytes, sha256 of the decompressed file)
    #[rustfmt::skip]
    let multi30k_files = [
        ("train",            "de", 2_110_398, "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72"),
        ("train",            "en", 1_801_238, "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6"),
        ("val",              "de",    75_981, "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660"),
        ("val",              "en",    63_297, "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227"),
        ("test_2016_flickr", "de",    70_649, "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"),
        ("test_2016_flickr", "en",    62_076, "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"),
    ];
    let mut files = Vec::new();
    for (split, lang, size, sha256) in multi30k_files {
        files.push(DataFile {
            name: format!("{split}.{lang}"),
            url: Some(format!(
                "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{split}.{lang}.gz"
            )),
            gzip: true,
            size,
            sha256: sha256.into(),
        });
    }
    let multi30k = Dataset {
        name: "multi30k".into(),
        about: "Multi30k task 1, German-English image captions: train, val, test_2016_flickr \
                (multi30k/dataset)"
            .into(),
        files,
        system: None,
    };

    // Fashion-MNIST (Xiao et al. 2017, MIT), as Debian's dataset-fashion-mnist ships it: the
    // four IDX files gzipped. Debian recompressed them (its .gz bytes differ from upstream's),
    // so the checksums are of the decompressed files, which are the same everywhere.
    // (file, bytes, sha256 of the decompressed file)
    #[rustfmt::skip]
    let fashion_files = [
        ("train-images-idx3-ubyte", 47_040_016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        ("train-labels-idx1-ubyte",     60_008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        ("t10k-images-idx3-ubyte",   7_840_016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        ("t10k-labels-idx1-ubyte",      10_008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ];
    let fashion_mnist = Dataset {
        name: "fashion-mnist".into(),
        about: "Fashion-MNIST: 60,000 + 10,000 grey 28x28 images of 10 kinds of clothing \
                (zalandoresearch/fashion-mnist), from Debian's dataset-fashion-mnist"
            .into(),
        files: fashion_files
            .iter()
            .map(|&(name, size, sha256)| DataFile {
                name: name.into(),
                url: None,
                gzip: true,
                size,
                sha256: sha256.into(),
            })
            .collect(),
        system: Some(SystemPackage {
            dir: PathBuf::from(FASHION_MNIST_SYSTEM_DIR),
            install: "sudo apt-get install dataset-fashion-mnist".into(),
        }),
    };

    vec![tinyshakespeare, multi30k, fashion_mnist]
}

/// The names of the known data sets, in order.
pub fn known_names() -> Vec<String> {
    known().into_iter().map(|d| d.name).collect()
}

/// Look a data set up by name.
pub fn find(name: &str) -> Result<Dataset, FetchError> {
    known()
        .into_iter()
        .find(|d| d.name == name)
        .ok_or_else(|| FetchError::UnknownDataset {
            name: name.to_string(),
            known: known_names().join(", "),
        })
}

/// Where a file in a [`FetchReport`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// The target was already there with the right checksum and was left untouched.
    AlreadyPresent,
    /// Copied from this mirror file.
    Copied(PathBuf),
    /// Downloaded from this URL.
    Downloaded(String),
}

/// One verified file of a [`FetchReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedFile {
    /// Where the file now is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its sha256 (lowercase hex), equal to the expected one.
    pub sha256: String,
    /// Where it came from.
    pub source: FileSource,
}

/// What [`fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// The data set's name.
    pub dataset: String,
    /// The directory that now holds every file of the data set.
    pub dir: PathBuf,
    /// One entry per file, in the data set's order.
    pub files: Vec<FetchedFile>,
}

/// Why a fetch failed. Every message names the file or URL concerned.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The name is not one of [`known_names`].
    #[error("unknown data set `{name}`; known data sets: {known}")]
    UnknownDataset { name: String, known: String },

    /// The copied or downloaded content does not have the expected checksum. It was not kept.
    #[error(
        "{file}: sha256 mismatch: expected {expected} ({expected_bytes} bytes), got {actual} \
         ({actual_bytes} bytes) from {source_desc}; the file was not kept"
    )]
    Checksum {
        file: PathBuf,
        source_desc: String,
        expected: String,
        actual: String,
        expected_bytes: u64,
        actual_bytes: u64,
    },

    /// The target already exists with a different checksum; it was left untouched.
    #[error(
        "{file} already exists but its sha256 is {actual}, expected {expected}; it was left \
         untouched: delete it and fetch again"
    )]
    ExistingMismatch {
        file: PathBuf,
        expected: String,
        actual: String,
    },

    /// The source holds more bytes than the file should have.
    #[error("{source_desc}: more than the expected {expected_bytes} bytes for {file}; the file was not kept")]
    TooLarge {
        file: PathBuf,
        source_desc: String,
        expected_bytes: u64,
    },

    /// Downloading failed (no network, refused, HTTP error, broken or undecodable stream).
    #[error(
        "downloading {url} failed: {reason}. Without network access, fetch from a local mirror \
         laid out as DIR/{dataset}/{file}: pass `--mirror DIR` or set {MIRROR_ENV}=DIR"
    )]
    Download {
        url: String,
        reason: String,
        dataset: String,
        file: String,
    },

    /// The file would be downloaded, but this build of the crate has no HTTP client. The
    /// variant exists in both builds so that callers match on the same enum.
    #[error(
        "cannot download {url}: the transformer crate was built without its `fetch` feature \
         (enable it with `features = [\"fetch\"]`), or fetch from a local mirror laid out as \
         DIR/{dataset}/{file}: pass `--mirror DIR` or set {MIRROR_ENV}=DIR"
    )]
    FeatureDisabled {
        url: String,
        dataset: String,
        file: String,
    },

    /// The data set comes from a system package (or a mirror) only, and neither has the file.
    #[error(
        "{file} is not installed: install it with `{install}` (it puts the files in \
         {system_dir}), or fetch from a local mirror laid out as DIR/{dataset}/{name} (or \
         {name}.gz): pass `--mirror DIR` or set {MIRROR_ENV}=DIR"
    )]
    NotInstalled {
        file: PathBuf,
        name: String,
        dataset: String,
        system_dir: PathBuf,
        install: String,
    },

    /// The file has no download URL and no system package names it (a malformed [`Dataset`]).
    #[error("{dataset}/{file}: no mirror, system package or URL to fetch it from")]
    NoSource { dataset: String, file: String },

    /// A file of the mirror could not be read.
    #[error("mirror file {path}: {source} (a mirror holds DIR/<data set>/<file>)")]
    Mirror {
        path: PathBuf,
        source: std::io::Error,
    },

    /// Reading, writing or renaming a file under the destination failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<FetchError> for crate::Error {
    fn from(e: FetchError) -> Self {
        crate::Error::Msg(e.to_string())
    }
}

/// Fetch the known data set `name` into `dest_root/name/`: copy it from `mirror/name/` when a
/// mirror is given, download it otherwise, and verify every file's sha256.
pub fn fetch(
    name: &str,
    dest_root: &Path,
    mirror: Option<&Path>,
) -> Result<FetchReport, FetchError> {
    fetch_dataset(&find(name)?, dest_root, mirror)
}

/// [`fetch`] for any [`Dataset`] (the tests build small fake ones).
///
/// Files already present with the right checksum are kept; others are written to a temporary
/// file in `dest_root/NAME/`, verified, then renamed into place. On failure the file at fault is
/// not kept (files verified before it stay, so a retry only fetches the rest), and a
/// `dest_root/NAME/` created by this call is removed again if it is empty.
pub fn fetch_dataset(
    dataset: &Dataset,
    dest_root: &Path,
    mirror: Option<&Path>,
) -> Result<FetchReport, FetchError> {
    let dir = dest_root.join(&dataset.name);
    let created_dir = !dir.exists();
    std::fs::create_dir_all(&dir).map_err(|source| FetchError::Io {
        path: dir.clone(),
        source,
    })?;

    let mut fetcher = Fetcher::default();
    let mut files = Vec::with_capacity(dataset.files.len());
    for file in &dataset.files {
        match fetcher.fetch_file(dataset, file, &dir, mirror) {
            Ok(fetched) => files.push(fetched),
            Err(e) => {
                if created_dir {
                    // Only succeeds when empty, which is what we want: verified files stay.
                    let _ = std::fs::remove_dir(&dir);
                }
                return Err(e);
            }
        }
    }
    Ok(FetchReport {
        dataset: dataset.name.clone(),
        dir,
        files,
    })
}

/// sha256 (lowercase hex) and size of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((hex(&hasher.finalize()), bytes))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Holds the HTTP agent, built on the first download only (nothing without the `fetch`
/// feature).
#[derive(Default)]
struct Fetcher {
    #[cfg(feature = "fetch")]
    agent: Option<ureq::Agent>,
}

/// Why copying from a source into the temporary file stopped: the source (mirror file or
/// download) or the destination failed.
enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
    TooLarge,
}

/// The [`FetchError::Download`] of `file` from `url`, for any `reason`.
fn download_err(dataset: &Dataset, file: &DataFile, url: &str, reason: String) -> FetchError {
    FetchError::Download {
        url: url.to_string(),
        reason,
        dataset: dataset.name.clone(),
        file: file.name.clone(),
    }
}

/// `reader`, decompressed when `gzip`.
fn maybe_gunzip(reader: impl Read + 'static, gzip: bool) -> Box<dyn Read> {
    if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    }
}

impl Fetcher {
    #[cfg(feature = "fetch")]
    fn agent(&mut self) -> &ureq::Agent {
        self.agent.get_or_insert_with(|| {
            ureq::Agent::config_builder()
                .timeout_resolve(Some(CONNECT_TIMEOUT))
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_recv_response(Some(RESPONSE_TIMEOUT))
                .timeout_recv_body(Some(BODY_TIMEOUT))
                .build()
                .into()
        })
    }

    /// The body of `url`, decompressed when `file.gzip`.
    #[cfg(feature = "fetch")]
    fn download(
        &mut self,
        dataset: &Dataset,
        file: &DataFile,
        url: &str,
    ) -> Result<Box<dyn Read>, FetchError> {
        let response = self
            .agent()
            .get(url)
            .call()
            .map_err(|e| download_err(dataset, file, url, e.to_string()))?;
        let body = response.into_body().into_reader();
        Ok(maybe_gunzip(body, file.gzip))
    }

    /// Without the `fetch` feature there is no HTTP client: say so, and how to use a mirror.
    #[cfg(not(feature = "fetch"))]
    fn download(
        &mut self,
        dataset: &Dataset,
        file: &DataFile,
        url: &str,
    ) -> Result<Box<dyn Read>, FetchError> {
        Err(FetchError::FeatureDisabled {
            url: url.to_string(),
            dataset: dataset.name.clone(),
            file: file.name.clone(),
        })
    }

    /// Where `file` is read from, in order: the mirror (`MIRROR/NAME/FILE`, or `FILE.gz` of
    /// a gzipped file, decompressed), the system package's directory, the download URL.
    fn open_source(
        &mut self,
        dataset: &Dataset,
        file: &DataFile,
        target: &Path,
        mirror: Option<&Path>,
    ) -> Result<(Box<dyn Read>, FileSource, String), FetchError> {
        let open = |path: PathBuf, gzip: bool, what: &str| -> Result<_, FetchError> {
            let f = File::open(&path).map_err(|source| FetchError::Mirror {
                path: path.clone(),
                source,
            })?;
            let desc = format!("{what} {}", path.display());
            Ok((maybe_gunzip(f, gzip), FileSource::Copied(path), desc))
        };
        if let Some(mirror) = mirror {
            let plain = mirror.join(&dataset.name).join(&file.name);
            let gz = mirror.join(&dataset.name).join(format!("{}.gz", file.name));
            // Copies of upstream's or Debian's gzipped files work as a mirror too: the checksum
            // is of the decompressed bytes.
            if file.gzip && !plain.exists() && gz.is_file() {
                return open(gz, true, "mirror file");
            }
            return open(plain, false, "mirror file");
        }
        if let Some(system) = &dataset.system {
            let name = if file.gzip {
                format!("{}.gz", file.name)
            } else {
                file.name.clone()
            };
            let path = system.dir.join(name);
            if path.is_file() {
                return open(path, file.gzip, "system package file");
            }
            if file.url.is_none() {
                return Err(FetchError::NotInstalled {
                    file: path,
                    name: file.name.clone(),
                    dataset: dataset.name.clone(),
                    system_dir: system.dir.clone(),
                    install: system.install.clone(),
                });
            }
        }
        let Some(url) = file.url.as_deref() else {
            return Err(FetchError::NoSource {
                dataset: dataset.name.clone(),
                file: target.display().to_string(),
            });
        };
        let reader = self.download(dataset, file, url)?;
        Ok((
            reader,
            FileSource::Downloaded(url.to_string()),
            url.to_string(),
        ))
    }

    fn fetch_file(
        &mut self,
        dataset: &Dataset,
        file: &DataFile,
        dir: &Path,
        mirror: Option<&Path>,
    ) -> Result<FetchedFile, FetchError> {
        let target = dir.join(&file.name);
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FetchError::Io { path, source }
        };

        // Never overwrite: a good file is kept, a bad one is reported and left for the user.
        if target.exists() {
            let (actual, bytes) = sha256_file(&target).map_err(io_err(&target))?;
            if actual != file.sha256 {
                return Err(FetchError::ExistingMismatch {
                    file: target,
                    expected: file.sha256.clone(),
                    actual,
                });
            }
            return Ok(FetchedFile {
                path: target,
                bytes,
                sha256: actual,
                source: FileSource::AlreadyPresent,
            });
        }

        let (reader, source, source_desc) = self.open_source(dataset, file, &target, mirror)?;

        // The temporary file lives beside the target so that the rename cannot cross file
        // systems; it is deleted on drop unless persisted.
        let prefix = format!(".{}.", file.name);
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".partial");
        #[cfg(unix)]
        {
            // tempfile's default 0600 suits secrets, not data files.
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o644));
        }
        let mut tmp = builder.tempfile_in(dir).map_err(io_err(dir))?;

        let (actual, bytes) = match copy_hashed(reader, tmp.as_file_mut(), file.size) {
            Ok(done) => done,
            Err(CopyError::Read(e)) => {
                return Err(match &source {
                    FileSource::Copied(path) => FetchError::Mirror {
                        path: path.clone(),
                        source: e,
                    },
                    FileSource::Downloaded(url) => download_err(dataset, file, url, e.to_string()),
                    FileSource::AlreadyPresent => FetchError::Io {
                        path: target.clone(),
                        source: e,
                    },
                })
            }
            Err(CopyError::Write(e)) => return Err(io_err(tmp.path())(e)),
            Err(CopyError::TooLarge) => {
                return Err(FetchError::TooLarge {
                    file: target,
                    source_desc,
                    expected_bytes: file.size,
                })
            }
        };
        if actual != file.sha256 {
            return Err(FetchError::Checksum {
                file: target,
                source_desc,
                expected: file.sha256.clone(),
                actual,
                expected_bytes: file.size,
                actual_bytes: bytes,
            });
        }
        tmp.persist_noclobber(&target)
            .map_err(|e| io_err(&target)(e.error))?;
        Ok(FetchedFile {
            path: target,
            bytes,
            sha256: actual,
            source,
        })
    }
}

/// Copy `reader` into `out` while hashing, reading at most `max_bytes + 1` bytes so that an
/// endless or oversized source stops early.
fn copy_hashed(
    reader: impl Read,
    out: &mut File,
    max_bytes: u64,
) -> Result<(String, u64), CopyError> {
    let mut reader = reader.take(max_bytes.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        bytes += n as u64;
        if bytes > max_bytes {
            return Err(CopyError::TooLarge);
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
    out.sync_all().map_err(CopyError::Write)?;
    Ok((hex(&hasher.finalize()), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::TempDir;

    fn sha256_hex(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    /// A fake data set "fake" with two files, whose contents are returned alongside.
    fn fake_dataset(url: &str) -> (Dataset, Vec<(&'static str, &'static [u8])>) {
        let contents: Vec<(&'static str, &'static [u8])> = vec![
            ("a.txt", b"first file\n"),
            ("b.txt", b"second file, a little longer\n"),
        ];
        let files = contents
            .iter()
            .map(|(name, data)| DataFile {
                name: name.to_string(),
                url: Some(url.to_string()),
                gzip: false,
                size: data.len() as u64,
                sha256: sha256_hex(data),
            })
            .collect();
        let dataset = Dataset {
            name: "fake".into(),
            about: "test data".into(),
            files,
            system: None,
        };
        (dataset, contents)
    }

    fn write_mirror(root: &Path, contents: &[(&str, &[u8])]) -> PathBuf {
        let mirror = root.join("mirror");
        std::fs::create_dir_all(mirror.join("fake")).unwrap();
        for (name, data) in contents {
            std::fs::write(mirror.join("fake").join(name), data).unwrap();
        }
        mirror
    }

    /// Every entry of a directory, sorted (hidden temporary files included).
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn known_data_sets_are_well_formed() {
        let names = known_names();
        assert_eq!(names, ["tinyshakespeare", "multi30k", "fashion-mnist"]);
        for d in known() {
            // Every file can come from somewhere.
            assert!(d.system.is_some() || d.files.iter().all(|f| f.url.is_some()));
            for f in &d.files {
                assert_eq!(f.sha256.len(), 64, "{}/{}", d.name, f.name);
                assert!(f
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                if let Some(url) = &f.url {
                    assert!(url.starts_with("https://"), "{url}");
                    assert_eq!(f.gzip, url.ends_with(".gz"), "{url}");
                }
            }
        }
        let m = find("multi30k").unwrap();
        let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "train.de",
                "train.en",
                "val.de",
                "val.en",
                "test_2016_flickr.de",
                "test_2016_flickr.en"
            ]
        );
        assert_eq!(
            m.files[0].url.as_deref(),
            Some("https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/train.de.gz")
        );
    }

    /// A gzipped one-file data set installed by a (fake) system package in `system_dir`.
    fn system_dataset(system_dir: &Path) -> (Dataset, Vec<u8>) {
        let data = b"pixels and labels\n".repeat(50);
        let dataset = Dataset {
            name: "fake-images".into(),
            about: "test data".into(),
            files: vec![DataFile {
                name: "images".into(),
                url: None,
                gzip: true,
                size: data.len() as u64,
                sha256: sha256_hex(&data),
            }],
            system: Some(SystemPackage {
                dir: system_dir.to_path_buf(),
                install: "sudo apt-get install dataset-fake".into(),
            }),
        };
        (dataset, data)
    }

    fn gzip_bytes(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn system_package_files_are_decompressed_and_verified() {
        let tmp = TempDir::new("fetch-system");
        let system = tmp.path().join("usr-share-datasets");
        std::fs::create_dir_all(&system).unwrap();
        let (dataset, data) = system_dataset(&system);
        std::fs::write(system.join("images.gz"), gzip_bytes(&data)).unwrap();
        let dest = tmp.path().join("data");
        let report = fetch_dataset(&dataset, &dest, None).unwrap();
        assert_eq!(
            report.files[0].source,
            FileSource::Copied(system.join("images.gz"))
        );
        assert_eq!(
            std::fs::read(dest.join("fake-images/images")).unwrap(),
            data
        );

        // A mirror may hold the decompressed file or the gzipped one.
        let mirror = tmp.path().join("mirror");
        std::fs::create_dir_all(mirror.join("fake-images")).unwrap();
        std::fs::write(mirror.join("fake-images/images.gz"), gzip_bytes(&data)).unwrap();
        let dest2 = tmp.path().join("data2");
        let report = fetch_dataset(&dataset, &dest2, Some(&mirror)).unwrap();
        assert_eq!(
            report.files[0].source,
            FileSource::Copied(mirror.join("fake-images/images.gz"))
        );
        assert_eq!(
            std::fs::read(dest2.join("fake-images/images")).unwrap(),
            data
        );

        // Damaged bytes inside the gzip stream fail the checksum and leave nothing.
        std::fs::write(system.join("images.gz"), gzip_bytes(b"other\n")).unwrap();
        let dest3 = tmp.path().join("data3");
        let err = fetch_dataset(&dataset, &dest3, None).unwrap_err();
        assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
        assert!(!dest3.join("fake-images").exists());
    }

    #[test]
    fn missing_system_package_names_the_apt_command() {
        let tmp = TempDir::new("fetch-no-system");
        let (dataset, _) = system_dataset(&tmp.path().join("not-installed"));
        let dest = tmp.path().join("data");
        let err = fetch_dataset(&dataset, &dest, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::NotInstalled { .. }), "{msg}");
        assert!(msg.contains("sudo apt-get install dataset-fake"), "{msg}");
        assert!(msg.contains("not-installed"), "{msg}");
        assert!(msg.contains("--mirror DIR"), "{msg}");
        assert!(!dest.join("fake-images").exists());
    }

    #[test]
    fn unknown_name_lists_known_names() {
        let tmp = TempDir::new("fetch-unknown");
        let err = fetch("nosuch", tmp.path(), None).unwrap_err().to_string();
        assert!(err.contains("nosuch"), "{err}");
        assert!(
            err.contains("tinyshakespeare, multi30k, fashion-mnist"),
            "{err}"
        );
        assert!(
            listing(tmp.path()).is_empty(),
            "nothing created: {:?}",
            listing(tmp.path())
        );
    }

    #[test]
    fn mirror_copy_succeeds_and_verifies() {
        let tmp = TempDir::new("fetch-mirror");
        let (dataset, contents) = fake_dataset("http://127.0.0.1:9/x");
        let mirror = write_mirror(tmp.path(), &contents);
        let dest = tmp.path().join("data");

        let report = fetch_dataset(&dataset, &dest, Some(&mirror)).unwrap();
        assert_eq!(report.dataset, "fake");
        assert_eq!(report.dir, dest.join("fake"));
        assert_eq!(report.files.len(), 2);
        for (fetched, (name, data)) in report.files.iter().zip(&contents) {
            assert_eq!(fetched.path, dest.join("fake").join(name));
            assert_eq!(std::fs::read(&fetched.path).unwrap(), *data);
            assert_eq!(fetched.bytes, data.len() as u64);
            assert_eq!(fetched.sha256, sha256_hex(data));
            assert_eq!(
                fetched.source,
                FileSource::Copied(mirror.join("fake").join(name))
            );
        }
        // No temporary files left beside them.
        assert_eq!(listing(&dest.join("fake")), ["a.txt", "b.txt"]);

        // A second fetch finds both files already there (and does not need the mirror).
        std::fs::remove_dir_all(&mirror).unwrap();
        let again = fetch_dataset(&dataset, &dest, Some(&mirror)).unwrap();
        for fetched in &again.files {
            assert_eq!(fetched.source, FileSource::AlreadyPresent);
        }
    }

    #[test]
    fn corrupted_mirror_file_fails_and_leaves_nothing() {
        let tmp = TempDir::new("fetch-corrupt");
        let (dataset, contents) = fake_dataset("http://127.0.0.1:9/x");
        // Same length, one byte different.
        let corrupted: Vec<(&str, &[u8])> = vec![("a.txt", b"first fil3\n")];
        let mirror = write_mirror(tmp.path(), &corrupted);
        let dest = tmp.path().join("data");

        let err = fetch_dataset(&dataset, &dest, Some(&mirror)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Checksum { .. }), "{msg}");
        assert!(msg.contains("a.txt"), "{msg}");
        assert!(
            msg.contains(&sha256_hex(contents[0].1)),
            "expected sha256 missing: {msg}"
        );
        assert!(
            msg.contains(&sha256_hex(corrupted[0].1)),
            "actual sha256 missing: {msg}"
        );
        // Neither the file nor a temporary file is left; the directory this call created is gone.
        assert!(
            !dest.join("fake").exists(),
            "{:?}",
            listing(&dest.join("fake"))
        );
    }

    #[test]
    fn corrupted_second_file_keeps_the_verified_first() {
        let tmp = TempDir::new("fetch-corrupt-second");
        let (dataset, contents) = fake_dataset("http://127.0.0.1:9/x");
        let mirror = write_mirror(tmp.path(), &[contents[0], ("b.txt", b"tampered\n")]);
        let dest = tmp.path().join("data");

        let msg = fetch_dataset(&dataset, &dest, Some(&mirror))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("b.txt"), "{msg}");
        assert_eq!(listing(&dest.join("fake")), ["a.txt"]);
    }

    #[test]
    fn oversized_mirror_file_is_refused() {
        let tmp = TempDir::new("fetch-oversized");
        let (dataset, contents) = fake_dataset("http://127.0.0.1:9/x");
        let long = [contents[0].1, b"and more".as_slice()].concat();
        let mirror = write_mirror(tmp.path(), &[("a.txt", &long)]);
        let dest = tmp.path().join("data");

        let err = fetch_dataset(&dataset, &dest, Some(&mirror)).unwrap_err();
        assert!(matches!(err, FetchError::TooLarge { .. }), "{err}");
        assert!(!dest.join("fake").exists());
    }

    #[test]
    fn existing_good_file_is_kept() {
        let tmp = TempDir::new("fetch-existing");
        let (dataset, contents) = fake_dataset("http://127.0.0.1:9/x");
        let dest = tmp.path().join("data");
        std::fs::create_dir_all(dest.join("fake")).unwrap();
        let a = dest.join("fake").join("a.txt");
        std::fs::write(&a, contents[0].1).unwrap();
        let modified = std::fs::metadata(&a).unwrap().modified().unwrap();
        // The mirror's a.txt is bad: it must not be read, since the good file is already there.
        let mirror = write_mirror(tmp.path(), &[("a.txt", b"bad\n"), contents[1]]);

        let report = fetch_dataset(&dataset, &dest, Some(&mirror)).unwrap();
        assert_eq!(report.files[0].source, FileSource::AlreadyPresent);
        assert_eq!(report.files[0].bytes, contents[0].1.len() as u64);
        assert!(matches!(report.files[1].source, FileSource::Copied(_)));
        assert_eq!(std::fs::read(&a).unwrap(), contents[0].1);
        assert_eq!(std::fs::metadata(&a).unwrap().modified().unwrap(), modified);
    }

    #[test]
    fn existing_bad_file_is_reported_and_left_alone() {
        let tmp = TempDir::new("fetch-existing-bad");
        let (dataset, contents) = fake_dataset("http://127.0.0.1:9/x");
        let dest = tmp.path().join("data");
        std::fs::create_dir_all(dest.join("fake")).unwrap();
        let a = dest.join("fake").join("a.txt");
        std::fs::write(&a, b"user's own edits\n").unwrap();
        let mirror = write_mirror(tmp.path(), &contents);

        let msg = fetch_dataset(&dataset, &dest, Some(&mirror))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("a.txt") && msg.contains("already exists"),
            "{msg}"
        );
        assert!(msg.contains(&sha256_hex(b"user's own edits\n")), "{msg}");
        assert_eq!(std::fs::read(&a).unwrap(), b"user's own edits\n");
        assert_eq!(listing(&dest.join("fake")), ["a.txt"]);
    }

    #[test]
    fn missing_mirror_file_names_the_path() {
        let tmp = TempDir::new("fetch-mirror-missing");
        let (dataset, _) = fake_dataset("http://127.0.0.1:9/x");
        let mirror = tmp.path().join("no-mirror-here");
        let msg = fetch_dataset(&dataset, &tmp.path().join("data"), Some(&mirror))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&mirror.join("fake").join("a.txt").display().to_string()),
            "{msg}"
        );
        assert!(!tmp.path().join("data").join("fake").exists());
    }

    #[cfg(feature = "fetch")]
    #[test]
    fn unreachable_url_without_mirror_says_how_to_get_the_data() {
        let tmp = TempDir::new("fetch-offline");
        // Port 9 (discard) on localhost refuses the connection at once.
        let url = "http://127.0.0.1:9/x";
        let (dataset, _) = fake_dataset(url);
        let dest = tmp.path().join("data");

        let err = fetch_dataset(&dataset, &dest, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Download { .. }), "{msg}");
        assert!(msg.contains(url), "{msg}");
        assert!(msg.contains("--mirror DIR"), "{msg}");
        assert!(msg.contains(MIRROR_ENV), "{msg}");
        assert!(!dest.join("fake").exists());
    }

    #[cfg(not(feature = "fetch"))]
    #[test]
    fn without_the_fetch_feature_a_download_says_so_and_how_to_use_a_mirror() {
        let tmp = TempDir::new("fetch-no-feature");
        let url = "http://127.0.0.1:9/x";
        let (dataset, _) = fake_dataset(url);
        let dest = tmp.path().join("data");

        let err = fetch_dataset(&dataset, &dest, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::FeatureDisabled { .. }), "{msg}");
        assert!(msg.contains(url), "{msg}");
        assert!(msg.contains("`fetch` feature"), "{msg}");
        assert!(msg.contains("--mirror DIR"), "{msg}");
        assert!(msg.contains(MIRROR_ENV), "{msg}");
        assert!(!dest.join("fake").exists());
    }

    #[cfg(feature = "fetch")]
    #[test]
    fn gzip_download_is_decompressed_before_verifying() {
        // The download path cannot reach the network here; check the decoder chain on its own.
        let data = b"ein Hund rennt\n".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&data).unwrap();
        let compressed = gz.finish().unwrap();
        let tmp = TempDir::new("fetch-gzip");
        let mut out = File::create(tmp.path().join("out")).unwrap();
        let reader = flate2::read::MultiGzDecoder::new(compressed.as_slice());
        let (sha, bytes) = match copy_hashed(reader, &mut out, data.len() as u64) {
            Ok(done) => done,
            Err(_) => panic!("copy failed"),
        };
        assert_eq!(bytes, data.len() as u64);
        assert_eq!(sha, sha256_hex(&data));
        assert_eq!(sha256_file(&tmp.path().join("out")).unwrap(), (sha, bytes));
    }
}
