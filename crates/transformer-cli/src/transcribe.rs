//! `transformer transcribe --model DIR FILE...`: speech to text with Whisper, one transcript
//! per WAV file (any sample format, rate and channel count), as text, JSON lines, SRT or
//! WebVTT. A file that fails is reported by name and the others still run; the exit status
//! is then non-zero. The real-time factor of each file goes to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use transformer::data::audio::{load_audio, WHISPER_SAMPLE_RATE};
use transformer::decode::whisper::{Task, Transcript, WhisperOptions};
use transformer::pipelines::transcribe::SpeechModel;

#[derive(Args)]
pub struct TranscribeArgs {
    /// A Whisper model directory: CTranslate2's (model.bin, config.json, tokenizer.json; as
    /// faster-whisper uses) or Hugging Face's (config.json, model.safetensors, tokenizer.json,
    /// generation_config.json).
    #[arg(long)]
    model: PathBuf,
    /// WAV files to transcribe.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Beams of the beam search; 1 decodes greedily.
    #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
    beam: usize,
    /// Finished candidates a beam search collects, as a multiple of the beams.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    patience: f64,
    /// Spoken language (multilingual models: en, de, fr, ...) [default: detected].
    #[arg(long)]
    language: Option<String>,
    /// Transcribe, or translate into English (multilingual models).
    #[arg(long, value_enum, default_value_t = TaskArg::Transcribe)]
    task: TaskArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Txt)]
    format: Format,
    /// Decode without timestamp tokens (one segment per 30-second window).
    #[arg(long)]
    no_timestamps: bool,
    /// Do not prompt each 30-second window with the text of the previous ones.
    #[arg(long)]
    no_condition_on_previous_text: bool,
    /// Write each transcript to DIR/<file stem>.<format> instead of stdout.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Replace existing files in --output-dir.
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TaskArg {
    Transcribe,
    Translate,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// The text, one line per file.
    Txt,
    /// One JSON object per file: file, language, duration, text, segments with times.
    Json,
    /// SubRip subtitles.
    Srt,
    /// WebVTT subtitles.
    Vtt,
}

impl Format {
    fn extension(self) -> &'static str {
        match self {
            Format::Txt => "txt",
            Format::Json => "json",
            Format::Srt => "srt",
            Format::Vtt => "vtt",
        }
    }
}

#[derive(Serialize)]
struct JsonSegment {
    start: f64,
    end: f64,
    text: String,
    avg_logprob: f64,
    no_speech_prob: f64,
}

#[derive(Serialize)]
struct JsonTranscript<'a> {
    file: &'a str,
    language: Option<&'a str>,
    duration: f64,
    text: String,
    segments: Vec<JsonSegment>,
}

/// `HH:MM:SS,mmm` (SRT) or `HH:MM:SS.mmm` (WebVTT).
fn timestamp(seconds: f64, sep: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{h:02}:{m:02}:{s:02}{sep}{ms:03}")
}

fn render(
    format: Format,
    file: &str,
    duration: f64,
    t: &Transcript,
    texts: &[String],
) -> Result<String> {
    let full: String = texts.concat();
    Ok(match format {
        Format::Txt => format!("{}\n", full.trim()),
        Format::Json => {
            let segments = t
                .segments
                .iter()
                .zip(texts)
                .map(|(s, text)| JsonSegment {
                    start: s.start,
                    end: s.end,
                    text: text.clone(),
                    avg_logprob: s.avg_logprob,
                    no_speech_prob: s.no_speech_prob,
                })
                .collect();
            let j = JsonTranscript {
                file,
                language: t.language.as_deref(),
                duration,
                text: full.trim().to_string(),
                segments,
            };
            format!("{}\n", serde_json::to_string(&j)?)
        }
        Format::Srt => {
            let mut out = String::new();
            for (i, (s, text)) in t.segments.iter().zip(texts).enumerate() {
                out.push_str(&format!(
                    "{}\n{} --> {}\n{}\n\n",
                    i + 1,
                    timestamp(s.start, ','),
                    timestamp(s.end, ','),
                    text.trim()
                ));
            }
            out
        }
        Format::Vtt => {
            let mut out = String::from("WEBVTT\n\n");
            for (s, text) in t.segments.iter().zip(texts) {
                out.push_str(&format!(
                    "{} --> {}\n{}\n\n",
                    timestamp(s.start, '.'),
                    timestamp(s.end, '.'),
                    text.trim()
                ));
            }
            out
        }
    })
}

fn options(args: &TranscribeArgs) -> Result<WhisperOptions> {
    if !(1..=64).contains(&args.beam) {
        bail!("--beam must be in [1, 64], got {}", args.beam);
    }
    if !args.patience.is_finite() || args.patience <= 0.0 || args.patience > 64.0 {
        bail!("--patience must be in (0, 64], got {}", args.patience);
    }
    Ok(WhisperOptions {
        beam_size: args.beam,
        patience: args.patience,
        language: args.language.clone(),
        task: match args.task {
            TaskArg::Transcribe => Task::Transcribe,
            TaskArg::Translate => Task::Translate,
        },
        timestamps: !args.no_timestamps,
        condition_on_previous_text: !args.no_condition_on_previous_text,
        ..WhisperOptions::default()
    })
}

/// Transcribe one file into its rendered output.
fn one(
    model: &SpeechModel,
    path: &Path,
    args: &TranscribeArgs,
    opts: &WhisperOptions,
) -> Result<String> {
    let audio = load_audio(path, WHISPER_SAMPLE_RATE)?;
    let duration = audio.duration();
    let start = Instant::now();
    // A progress bar for recordings longer than one window.
    let bar = (duration > 30.0).then(|| {
        let b = ProgressBar::new((duration * 100.0) as u64);
        b.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {percent}% {elapsed}<{eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_message(path.display().to_string());
        b
    });
    let progress_bar = bar.clone();
    let transcript = model.transcribe(&audio, opts, move |done, total| {
        if let Some(b) = &progress_bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{}: {duration:.1} s of audio in {secs:.2} s (real-time factor {:.3})",
        path.display(),
        secs / duration.max(1e-9)
    );
    let texts = transcript
        .segments
        .iter()
        .map(|s| model.text(&s.tokens))
        .collect::<transformer::Result<Vec<_>>>()?;
    render(
        args.format,
        &path.display().to_string(),
        duration,
        &transcript,
        &texts,
    )
}

pub fn run(args: TranscribeArgs) -> Result<()> {
    let opts = options(&args)?;
    let device = crate::device()?;
    let model = SpeechModel::load(&args.model, &device)
        .with_context(|| format!("loading the model {}", args.model.display()))?;
    if let Some(lang) = &opts.language {
        model.tokens.language(lang).context("--language")?;
    }
    if opts.task == Task::Translate && !model.tokens.is_multilingual() {
        bail!("--task translate: this model is English-only");
    }
    if let Some(dir) = &args.output_dir {
        if !dir.is_dir() {
            bail!("--output-dir {}: not a directory", dir.display());
        }
        // Every destination is checked before any audio is decoded.
        for f in &args.files {
            crate::output::check_file(
                "--output-dir",
                &destination(dir, f, args.format),
                args.force,
            )?;
        }
    }
    let stdout = std::io::stdout();
    let mut failed = Vec::new();
    for path in &args.files {
        match one(&model, path, &args, &opts) {
            Ok(text) => match &args.output_dir {
                Some(dir) => {
                    let dest = destination(dir, path, args.format);
                    crate::output::write_file(&dest, text.as_bytes())?;
                }
                None => {
                    let mut out = stdout.lock();
                    out.write_all(text.as_bytes())?;
                    out.flush()?;
                }
            },
            Err(e) => {
                let msg = crate::error_message(&e);
                let name = path.display().to_string();
                if msg.contains(&name) {
                    eprintln!("error: {msg}");
                } else {
                    eprintln!("error: {name}: {msg}");
                }
                failed.push(path.display().to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} files failed: {}",
            failed.len(),
            args.files.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn destination(dir: &Path, file: &Path, format: Format) -> PathBuf {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "transcript".into());
    dir.join(format!("{stem}.{}", format.extension()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtitle_timestamps() {
        assert_eq!(timestamp(0.0, ','), "00:00:00,000");
        assert_eq!(timestamp(3661.5, '.'), "01:01:01.500");
        assert_eq!(timestamp(59.9996, ','), "00:01:00,000");
    }
}
