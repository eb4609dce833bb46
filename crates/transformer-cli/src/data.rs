//! `transformer data fetch NAME [--mirror DIR]`: put a known data set into `data/NAME/`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use transformer::data::datasets::{self, FileSource, MIRROR_ENV};

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Put a known data set into data/NAME/ (relative to the current directory), verifying
    /// every file's sha256.
    ///
    /// Known data sets: tinyshakespeare (input.txt), multi30k (train, val and
    /// test_2016_flickr, .de and .en), fashion-mnist (the four IDX files). Without --mirror (or
    /// TRANSFORMER_DATA_MIRROR) the text files are downloaded from GitHub, and fashion-mnist is
    /// copied from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
    Fetch {
        /// The data set's name.
        name: String,
        /// Copy from this local mirror instead of downloading; it holds DIR/NAME/FILE, the same
        /// layout as data/. Defaults to $TRANSFORMER_DATA_MIRROR when set.
        #[arg(long, value_name = "DIR")]
        mirror: Option<PathBuf>,
    },
}

pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Fetch { name, mirror } => fetch(&name, mirror),
    }
}

fn fetch(name: &str, mirror: Option<PathBuf>) -> anyhow::Result<()> {
    // The flag wins over the environment; an empty variable counts as unset.
    let mirror = mirror.or_else(|| {
        std::env::var_os(MIRROR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(dir) = &mirror {
        if !dir.is_dir() {
            anyhow::bail!(
                "mirror {} is not a directory (it should hold {}/{name}/...)",
                dir.display(),
                dir.display()
            );
        }
    }

    let report = datasets::fetch(name, Path::new("data"), mirror.as_deref())
        .with_context(|| format!("data fetch {name}"))?;
    for file in &report.files {
        let what = match &file.source {
            FileSource::AlreadyPresent => "already present".to_string(),
            FileSource::Copied(from) => format!("copied from {}", from.display()),
            FileSource::Downloaded(url) => format!("downloaded from {url}"),
        };
        println!(
            "{}: {what} ({} bytes, sha256 {} ok)",
            file.path.display(),
            file.bytes,
            file.sha256
        );
    }
    println!(
        "{}: {} file(s) in {}",
        report.dataset,
        report.files.len(),
        report.dir.display()
    );
    Ok(())
}
