//! Audio in: WAV files (8/16/24/32-bit integer or 32-bit float, any channel count, any rate)
//! read with `hound`, mixed down to mono, resampled with `rubato`, and Whisper's log-mel
//! spectrogram (transformers' `WhisperFeatureExtractor`, openai-whisper's `log_mel_spectrogram`).
//!
//! The spectrogram, for samples x at 16 kHz:
//! 1. x is reflect-padded by n_fft / 2 on both sides (`center=True`), cut into frames of n_fft
//!    samples every `hop_length`, each multiplied by the periodic Hann window
//!    w[n] = 0.5 − 0.5·cos(2πn / n_fft);
//! 2. power spectrum |rfft(frame)|², n_fft / 2 + 1 bins, the last frame dropped;
//! 3. mel = filters · power, with Slaney-style triangular filters (Slaney mel scale, area
//!    normalized: librosa's `norm="slaney"`) from 0 to 8 kHz;
//! 4. log10(max(mel, 1e-10)), floored at its maximum − 8, then (x + 4) / 4.
//!
//! Dimension letters: `M` mel bins, `N` frames (100 per second), `F` frequency bins.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

use crate::{Error, Result};

/// The rate Whisper's front end takes.
pub const WHISPER_SAMPLE_RATE: u32 = 16_000;

/// Mono samples in [-1, 1] and their rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

impl Audio {
    /// Length in seconds.
    pub fn duration(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }
}

/// Read a WAV file, mixed down to mono (the mean of the channels).
pub fn read_wav(path: &Path) -> Result<Audio> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    read_wav_from(std::io::BufReader::new(file), &path.display().to_string())
}

/// [`read_wav`] from any reader; `name` says where the bytes came from in errors.
pub fn read_wav_from<R: Read>(reader: R, name: &str) -> Result<Audio> {
    let bad = |problem: String| Error::Path {
        path: name.into(),
        problem,
    };
    let mut wav =
        hound::WavReader::new(reader).map_err(|e| bad(format!("not a readable WAV file ({e})")))?;
    let spec = wav.spec();
    if spec.channels == 0 {
        return Err(bad("a WAV file with 0 channels".into()));
    }
    if spec.sample_rate == 0 || spec.sample_rate > 768_000 {
        return Err(bad(format!(
            "sample rate {} Hz is outside 1..=768000",
            spec.sample_rate
        )));
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => {
            if spec.bits_per_sample != 32 {
                return Err(bad(format!(
                    "{}-bit float samples (only 32-bit float is read)",
                    spec.bits_per_sample
                )));
            }
            wav.samples::<f32>()
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(format!("truncated or corrupt samples ({e})")))?
        }
        hound::SampleFormat::Int => {
            let bits = spec.bits_per_sample;
            if !(1..=32).contains(&bits) {
                return Err(bad(format!("{bits}-bit integer samples")));
            }
            // Full scale is 2^(bits-1), as soundfile and torchaudio normalize.
            let scale = 1.0 / (1u64 << (bits - 1)) as f64;
            wav.samples::<i32>()
                .map(|s| s.map(|s| (s as f64 * scale) as f32))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(format!("truncated or corrupt samples ({e})")))?
        }
    };
    let channels = spec.channels as usize;
    let samples = if channels == 1 {
        interleaved
    } else {
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() / channels as f32)
            .collect()
    };
    if let Some(i) = samples.iter().position(|s| !s.is_finite()) {
        return Err(bad(format!("sample {i} is not finite")));
    }
    Ok(Audio {
        samples,
        sample_rate: spec.sample_rate,
    })
}

/// Resample mono samples from `from` Hz to `to` Hz with rubato's synchronous FFT resampler
/// (band-limited; the delay is trimmed so that the output lines up with the input).
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    use rubato::audioadapter_buffers::direct::SequentialSliceOfVecs;
    use rubato::{Fft, FixedSync, Resampler};

    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let err = |e: &dyn std::fmt::Display| Error::msg(format!("resampling {from} → {to} Hz: {e}"));
    let mut resampler = Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Both)
        .map_err(|e| err(&e))?;
    let input = vec![samples.to_vec()];
    let adapter = SequentialSliceOfVecs::new(&input, 1, samples.len()).map_err(|e| err(&e))?;
    let out = resampler
        .process_all(&adapter, samples.len(), None)
        .map_err(|e| err(&e))?;
    Ok(out.take_data())
}

/// A WAV file as mono samples at `rate` Hz.
pub fn load_audio(path: &Path, rate: u32) -> Result<Audio> {
    let audio = read_wav(path)?;
    let samples = resample(&audio.samples, audio.sample_rate, rate)
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    Ok(Audio {
        samples,
        sample_rate: rate,
    })
}

/// What the log-mel front end computes: transformers' `preprocessor_config.json` fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MelConfig {
    /// Mel bins (`feature_size`: 80, or 128 for large-v3).
    pub n_mels: usize,
    /// FFT size and window length.
    pub n_fft: usize,
    /// Samples between frames.
    pub hop_length: usize,
    /// Rate of the samples.
    pub sampling_rate: u32,
    /// Seconds of one window (`chunk_length`): the model's input is padded or trimmed to it.
    pub chunk_length: usize,
}

impl MelConfig {
    /// Whisper's front end with `n_mels` bins.
    pub fn whisper(n_mels: usize) -> Self {
        MelConfig {
            n_mels,
            n_fft: 400,
            hop_length: 160,
            sampling_rate: WHISPER_SAMPLE_RATE,
            chunk_length: 30,
        }
    }

    /// Samples in one window (480,000).
    pub fn n_samples(&self) -> usize {
        self.chunk_length * self.sampling_rate as usize
    }

    /// Frames in one window (3,000).
    pub fn n_frames(&self) -> usize {
        self.n_samples() / self.hop_length
    }
}

/// The log-mel spectrogram, with its filters, window and FFT plan made once.
pub struct LogMel {
    cfg: MelConfig,
    /// (M, F) row-major.
    filters: Vec<f64>,
    /// The first and one-past-last nonzero frequency bin of each filter.
    support: Vec<(usize, usize)>,
    window: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
}

/// Log-mel features of a stretch of audio.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// (M, N) row-major.
    pub data: Vec<f32>,
    pub n_mels: usize,
    pub n_frames: usize,
}

impl Features {
    /// Frames `start..start + len` as a (len, M) frame-major buffer (the model's (S, F)
    /// input), padded with zeros past the end (as openai-whisper's `pad_or_trim` pads).
    pub fn window_frames(&self, start: usize, len: usize) -> Vec<f32> {
        self.window_of(start, len, len)
    }

    /// The first `take` frames from `start` in a (len, M) window, zeros after them: how
    /// openai-whisper's `transcribe()` (and faster-whisper) fill a window whose audio ends
    /// early. The zeros are 0 in the normalized log-mel, not the floor that a spectrogram of
    /// silence gives (transformers' one-window features); the model reads the two differently
    /// on short clips.
    pub fn window_of(&self, start: usize, take: usize, len: usize) -> Vec<f32> {
        let mut out = vec![0f32; len * self.n_mels];
        for t in 0..take.min(len).min(self.n_frames.saturating_sub(start)) {
            for m in 0..self.n_mels {
                out[t * self.n_mels + m] = self.data[m * self.n_frames + start + t];
            }
        }
        out
    }
}

fn hz_to_mel_slaney(hz: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel) = (200.0 / 3.0, 1000.0, 15.0);
    let logstep = 6.4f64.ln() / 27.0;
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / logstep
    } else {
        hz / f_sp
    }
}

fn mel_to_hz_slaney(mel: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel) = (200.0 / 3.0, 1000.0, 15.0);
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        f_sp * mel
    }
}

/// Slaney-style mel filters (M, F), from 0 Hz to `f_max`, each normalized to unit area
/// (2 / bandwidth), as librosa's `mel(htk=False, norm="slaney")`.
pub fn mel_filters(n_mels: usize, n_fft: usize, sampling_rate: u32, f_max: f64) -> Vec<f64> {
    let n_freq = n_fft / 2 + 1;
    let (mel_min, mel_max) = (hz_to_mel_slaney(0.0), hz_to_mel_slaney(f_max));
    // n_mels + 2 edges, evenly spaced in mels.
    let edges: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz_slaney(mel_min + (mel_max - mel_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let nyquist = (sampling_rate / 2) as f64;
    let mut out = vec![0f64; n_mels * n_freq];
    for m in 0..n_mels {
        let (lo, mid, hi) = (edges[m], edges[m + 1], edges[m + 2]);
        let norm = 2.0 / (hi - lo);
        for f in 0..n_freq {
            let hz = nyquist * f as f64 / (n_freq - 1) as f64;
            let down = (hz - lo) / (mid - lo);
            let up = (hi - hz) / (hi - mid);
            out[m * n_freq + f] = down.min(up).max(0.0) * norm;
        }
    }
    out
}

impl LogMel {
    pub fn new(cfg: MelConfig) -> Result<Self> {
        if cfg.n_mels == 0 || cfg.n_fft < 2 || cfg.hop_length == 0 || cfg.sampling_rate == 0 {
            return Err(Error::Config(format!(
                "log-mel front end: n_mels {}, n_fft {}, hop_length {}, sampling_rate {} must be > 0 (n_fft ≥ 2)",
                cfg.n_mels, cfg.n_fft, cfg.hop_length, cfg.sampling_rate
            )));
        }
        let n_freq = cfg.n_fft / 2 + 1;
        // Whisper's filters stop at 8 kHz whatever the rate (transformers passes 8000).
        let filters = mel_filters(cfg.n_mels, cfg.n_fft, cfg.sampling_rate, 8000.0);
        let support = (0..cfg.n_mels)
            .map(|m| {
                let row = &filters[m * n_freq..(m + 1) * n_freq];
                let first = row.iter().position(|&v| v != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&v| v != 0.0).map_or(0, |i| i + 1);
                (first, last.max(first))
            })
            .collect();
        let n = cfg.n_fft;
        let window = (0..n)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
            .collect();
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(n);
        Ok(LogMel {
            cfg,
            filters,
            support,
            window,
            fft,
        })
    }

    pub fn config(&self) -> &MelConfig {
        &self.cfg
    }

    /// Features of one window, as transformers computes them: the samples zero-padded or
    /// trimmed to `chunk_length` seconds, then the spectrogram (M, 3000 for Whisper).
    pub fn window(&self, samples: &[f32]) -> Result<Features> {
        let n = self.cfg.n_samples();
        let mut x = samples[..samples.len().min(n)].to_vec();
        x.resize(n, 0.0);
        self.spectrogram(&x)
    }

    /// Features of a whole recording for long-form transcription, as openai-whisper computes
    /// them: `chunk_length` seconds of zeros appended, one spectrogram (so one maximum for
    /// the floor) over all of it. Frames past the audio are read as the padding.
    pub fn long_form(&self, samples: &[f32]) -> Result<Features> {
        let mut x = samples.to_vec();
        x.resize(samples.len() + self.cfg.n_samples(), 0.0);
        self.spectrogram(&x)
    }

    /// The log-mel spectrogram of `x` (steps 1-4 of the module docs), (M, len / hop) frames.
    pub fn spectrogram(&self, x: &[f32]) -> Result<Features> {
        let (n_fft, hop) = (self.cfg.n_fft, self.cfg.hop_length);
        let pad = n_fft / 2;
        if x.len() <= pad {
            return Err(Error::input(
                "audio for the spectrogram",
                format!("more than {pad} samples"),
                format!("{} samples", x.len()),
            ));
        }
        // Reflect padding (numpy's "reflect": the edge sample is not repeated).
        let len = x.len();
        let at = |i: isize| -> f64 {
            let j = if i < 0 {
                (-i) as usize
            } else if i as usize >= len {
                2 * (len - 1) - i as usize
            } else {
                i as usize
            };
            x[j] as f64
        };
        let padded_len = len + 2 * pad;
        let n_frames_all = 1 + (padded_len - n_fft) / hop;
        // The last frame is dropped, as both references do.
        let n_frames = n_frames_all - 1;
        let n_freq = n_fft / 2 + 1;
        let n_mels = self.cfg.n_mels;
        let mut mel = vec![0f64; n_mels * n_frames];
        let mut buf = self.fft.make_input_vec();
        let mut spec = self.fft.make_output_vec();
        let mut power = vec![0f64; n_freq];
        for t in 0..n_frames {
            let start = (t * hop) as isize - pad as isize;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = at(start + i as isize) * self.window[i];
            }
            self.fft
                .process(&mut buf, &mut spec)
                .map_err(|e| Error::msg(format!("FFT: {e}")))?;
            for (p, c) in power.iter_mut().zip(&spec) {
                *p = c.norm_sqr();
            }
            for m in 0..n_mels {
                let (lo, hi) = self.support[m];
                let row = &self.filters[m * n_freq..(m + 1) * n_freq];
                let v: f64 = (lo..hi).map(|f| row[f] * power[f]).sum();
                mel[m * n_frames + t] = v;
            }
        }
        let mut max = f64::NEG_INFINITY;
        for v in mel.iter_mut() {
            *v = v.max(1e-10).log10();
            max = max.max(*v);
        }
        let data = mel
            .iter()
            .map(|&v| ((v.max(max - 8.0) + 4.0) / 4.0) as f32)
            .collect();
        Ok(Features {
            data,
            n_mels,
            n_frames,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav_bytes(
        spec: hound::WavSpec,
        write: impl FnOnce(&mut hound::WavWriter<std::io::Cursor<&mut Vec<u8>>>),
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        {
            let mut w = hound::WavWriter::new(std::io::Cursor::new(&mut bytes), spec).unwrap();
            write(&mut w);
            w.finalize().unwrap();
        }
        bytes
    }

    fn spec(channels: u16, bits: u16, format: hound::SampleFormat) -> hound::WavSpec {
        hound::WavSpec {
            channels,
            sample_rate: 8000,
            bits_per_sample: bits,
            sample_format: format,
        }
    }

    #[test]
    fn every_sample_format_reads_to_the_same_scale_and_channels_mix_down() {
        use hound::SampleFormat::{Float, Int};
        let half = |bits: u16| 1i32 << (bits - 2);
        for bits in [8u16, 16, 24, 32] {
            let bytes = wav_bytes(spec(2, bits, Int), |w| {
                // Left at +0.5 of full scale, right at 0: the mix is 0.25.
                for _ in 0..10 {
                    w.write_sample(half(bits)).unwrap();
                    w.write_sample(0i32).unwrap();
                }
            });
            let a = read_wav_from(&bytes[..], "x.wav").unwrap();
            assert_eq!(a.samples.len(), 10, "{bits} bits");
            assert!(
                a.samples.iter().all(|&s| (s - 0.25).abs() < 1e-6),
                "{bits}: {:?}",
                a.samples
            );
            assert_eq!(a.sample_rate, 8000);
        }
        let bytes = wav_bytes(spec(1, 32, Float), |w| {
            for i in 0..5 {
                w.write_sample(i as f32 * 0.1).unwrap();
            }
        });
        let a = read_wav_from(&bytes[..], "x.wav").unwrap();
        assert_eq!(a.samples, vec![0.0, 0.1, 0.2, 0.3, 0.4]);
    }

    #[test]
    fn bad_wav_files_are_errors_naming_the_file() {
        let e = read_wav_from(&b"RIFF not a wave"[..], "clip.wav").unwrap_err();
        assert!(e.to_string().contains("clip.wav"), "{e}");
        let good = wav_bytes(spec(1, 16, hound::SampleFormat::Int), |w| {
            for _ in 0..100 {
                w.write_sample(1000i16).unwrap();
            }
        });
        let e = read_wav_from(&good[..good.len() - 51], "cut.wav").unwrap_err();
        assert!(e.to_string().contains("cut.wav"), "{e}");
    }

    /// Every truncation of a good file, and random bytes written over its header and its
    /// first samples, read to audio or to an error naming the file; never to a panic.
    #[test]
    fn damaged_wav_files_never_panic() {
        use hound::SampleFormat::{Float, Int};
        let mut files = Vec::new();
        for (channels, bits, format) in [(1, 16, Int), (2, 24, Int), (1, 32, Float), (3, 8, Int)] {
            files.push(wav_bytes(spec(channels, bits, format), |w| {
                // 60 samples: whole frames of 1, 2 or 3 channels.
                for i in 0..60 {
                    match format {
                        Float => w.write_sample(i as f32 / 60.0).unwrap(),
                        Int => w.write_sample(i - 30).unwrap(),
                    }
                }
            }));
        }
        let check = |bytes: &[u8], what: &str| {
            if let Err(e) = read_wav_from(bytes, "damaged.wav") {
                assert!(e.to_string().contains("damaged.wav"), "{what}: {e}");
            }
        };
        let mut rng = crate::rng::Rng::new(7);
        for good in &files {
            for len in 0..good.len() {
                check(&good[..len], &format!("cut at {len}"));
            }
            for trial in 0..2000 {
                let mut bytes = good.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len().min(64) as u64) as usize;
                    bytes[at] = rng.below(256) as u8;
                }
                check(&bytes, &format!("trial {trial}"));
            }
            // A data chunk that claims 4 GiB of samples in a file of a few bytes.
            let mut bytes = good.clone();
            let at = bytes.windows(4).position(|w| w == b"data").unwrap() + 4;
            bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            check(&bytes, "4 GiB data chunk");
        }
    }

    #[test]
    fn resampling_keeps_a_tone_and_its_length() {
        let (from, to) = (8000u32, 16000u32);
        let secs = 1.0;
        let x: Vec<f32> = (0..(from as f64 * secs) as usize)
            .map(|i| (2.0 * std::f64::consts::PI * 440.0 * i as f64 / from as f64).sin() as f32)
            .collect();
        let y = resample(&x, from, to).unwrap();
        assert!((y.len() as i64 - 16000).abs() <= 2, "{}", y.len());
        // Away from the edges, the 440 Hz tone at the new rate.
        let max_err = (2000..14000)
            .map(|i| {
                let want = (2.0 * std::f64::consts::PI * 440.0 * i as f64 / to as f64).sin();
                (y[i] as f64 - want).abs()
            })
            .fold(0.0, f64::max);
        assert!(max_err < 1e-2, "{max_err}");
    }

    #[test]
    fn slaney_filters_are_triangles_of_unit_area() {
        let f = mel_filters(80, 400, 16000, 8000.0);
        let n_freq = 201;
        // librosa's first filter peaks at bin 1 with 2/(edges[2]-edges[0]) = 0.0247...
        let hz_per_bin = 8000.0 / 200.0;
        for m in 0..80 {
            let row = &f[m * n_freq..(m + 1) * n_freq];
            assert!(row.iter().all(|&v| v >= 0.0));
            // Area in Hz of the sampled triangle ≈ 1 (the normalization), loosely for the
            // narrow low filters that the 40 Hz bins sample coarsely.
            let area: f64 = row.iter().sum::<f64>() * hz_per_bin;
            assert!((area - 1.0).abs() < 0.35, "filter {m}: {area}");
        }
    }

    #[test]
    fn silence_floors_at_the_maximum_and_a_window_has_3000_frames() {
        let lm = LogMel::new(MelConfig::whisper(80)).unwrap();
        let tone: Vec<f32> = (0..16000)
            .map(|i| (2.0 * std::f64::consts::PI * 1000.0 * i as f64 / 16000.0).sin() as f32 * 0.5)
            .collect();
        let f = lm.window(&tone).unwrap();
        assert_eq!((f.n_mels, f.n_frames), (80, 3000));
        let max = f.data.iter().cloned().fold(f32::MIN, f32::max);
        let min = f.data.iter().cloned().fold(f32::MAX, f32::min);
        // The floor is max − 8 in log10 units, i.e. 2 after (x + 4) / 4.
        assert!((max - min - 2.0).abs() < 1e-5, "{max} {min}");
        // The padded half-minute is all floor.
        assert!(f.data[2999] == min && f.data[79 * 3000 + 2000] == min);
    }
}
