"""Whisper, ours against faster-whisper (issue 13): WER, identical text and speed.

Both systems read the same 16 kHz float32 WAVs (resampled once by faster-whisper's own
`decode_audio`, PyAV), with the same CTranslate2 model file, float32 compute, the same
threads, temperature 0 (no fallback), timestamps on, and the same beam size. Each side runs as
a whole process (model load included), alternating, `--repeats` times; the table gives the
median wall time.

WER uses jiwer with one normalizer for both sides and the references: lowercase, bracketed
notes removed ("at [@]"), punctuation removed except in-word apostrophes, hyphens as spaces,
numbers 0-99 spelled out, blanks collapsed.

Usage (from the repo root, after `cargo build --release -p transformer-cli`):
  .venv/bin/python bench/whisper.py [--model tiny.en] [--beams 1,5] [--repeats 3]
                                    [--every K]   (every K-th asterisk clip; 1 = all 563)
Prints a markdown table; `--json FILE` also writes every transcript.
"""

import argparse
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("TRANSFORMER_BIN", os.path.join(ROOT, "target", "release", "transformer"))
WORK = "/tmp/whisper-bench"

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell(n):
    if n < 20:
        return ONES[n]
    t, o = divmod(n, 10)
    return TENS[t] + ("" if o == 0 else " " + ONES[o])


def normalize(text):
    text = text.lower()
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(\d{1,2})\b", lambda m: spell(int(m.group(1))), text)
    text = text.replace("-", " ")
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    text = re.sub(r"[^a-z0-9' ]", " ", text)
    return " ".join(text.split())


def last_line(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def clips(speech_root, every):
    """(set, name, wav path, reference text) for LibriVox and every K-th asterisk prompt."""
    out = []
    lib = os.path.join(speech_root, "usr/share/pocketsphinx/test/data/librivox")
    with open(os.path.join(lib, "transcription")) as f:
        for line in f:
            m = re.match(r"<s> (.*) </s> \((.*)\)", line.strip())
            out.append(("librivox", m.group(2), os.path.join(lib, m.group(2) + ".wav"), m.group(1)))
    snd = os.path.join(speech_root, "usr/share/asterisk/sounds/en_US_f_Allison")
    doc = os.path.join(speech_root, "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
    refs = []
    with gzip.open(doc, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            text = text.strip()
            path = os.path.join(snd, name.strip() + ".wav")
            # Tones are not speech; a reference that is only a note has no words.
            if not normalize(text) or not os.path.exists(path):
                continue
            refs.append(("asterisk", name.strip(), path, text))
    refs.sort(key=lambda r: r[1])
    out.extend(refs[::every])
    return out


def write_wav_f32(path, samples):
    import struct

    data = samples.astype("<f4").tobytes()
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE")
        f.write(b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, 16000, 16000 * 4, 4, 32))
        f.write(b"data" + struct.pack("<I", len(data)) + data)


def prepare(items):
    from faster_whisper.audio import decode_audio

    os.makedirs(WORK, exist_ok=True)
    paths, secs = [], 0.0
    for _, name, wav, _ in items:
        # Named by the source clip, so that runs over other subsets never reuse a wrong file.
        out = os.path.join(WORK, name.replace("/", "__") + ".wav")
        if not os.path.exists(out):
            write_wav_f32(out, decode_audio(wav, sampling_rate=16000))
        paths.append(out)
        with open(out, "rb") as f:
            secs += (os.path.getsize(out) - 44) / 4 / 16000
    return paths, secs


def run_ours(model_dir, paths, beam, threads):
    cmd = [BIN, "--threads", str(threads), "transcribe", "--model", model_dir, "--beam", str(beam), "--format", "json", *paths]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"ours failed: {p.stderr[-2000:]}")
    texts = {json.loads(l)["file"]: json.loads(l)["text"] for l in p.stdout.splitlines() if l.strip()}
    return wall, [texts[x] for x in paths]


def run_fw(model_dir, paths, beam, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--fw-worker", model_dir, str(beam), str(threads), *paths]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"faster-whisper failed: {p.stderr[-2000:]}")
    return wall, json.loads(p.stdout)


def fw_worker(model_dir, beam, threads, paths):
    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type="float32", cpu_threads=threads)
    out = []
    for path in paths:
        segments, _ = model.transcribe(
            path, beam_size=beam, temperature=0.0, vad_filter=False, without_timestamps=False
        )
        out.append("".join(s.text for s in segments).strip())
    json.dump(out, sys.stdout)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--fw-worker":
        fw_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--beams", default="1,5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    import faster_whisper
    import jiwer

    model_dir = last_line(["bash", os.path.join(ROOT, "scripts", "fetch-whisper.sh"), args.model])
    speech = last_line(["bash", os.path.join(ROOT, "scripts", "fetch-speech.sh")])
    items = clips(speech, args.every)
    paths, secs = prepare(items)
    print(f"{len(items)} clips, {secs:.0f} s of audio; CPU: {cpu_model()}, {args.threads} threads each; "
          f"faster-whisper {faster_whisper.__version__}", file=sys.stderr)
    rows, dump = [], {}
    for beam in [int(b) for b in args.beams.split(",")]:
        walls = {"ours": [], "fw": []}
        texts = {}
        for rep in range(args.repeats):
            for side in (["ours", "fw"] if rep % 2 == 0 else ["fw", "ours"]):
                run = run_ours if side == "ours" else run_fw
                wall, out = run(model_dir, paths, beam, args.threads)
                walls[side].append(wall)
                if side in texts and texts[side] != out:
                    print(f"warning: {side} gave different text on repeat {rep}", file=sys.stderr)
                texts[side] = out
                print(f"beam {beam} {side}: {wall:.1f} s", file=sys.stderr)
        for subset in ["librivox", "asterisk"]:
            idx = [i for i, it in enumerate(items) if it[0] == subset]
            ref = [normalize(items[i][3]) for i in idx]
            hyp = {s: [normalize(texts[s][i]) for i in idx] for s in texts}
            wer = {s: 100 * jiwer.wer(ref, [h if h else "<empty>" for h in hyp[s]]) for s in hyp}
            same = sum(a == b for a, b in zip(hyp["ours"], hyp["fw"])) / len(idx)
            rows.append((args.model, subset, len(idx), beam, wer["ours"], wer["fw"], 100 * same))
        med = {s: statistics.median(w) for s, w in walls.items()}
        rows.append((args.model, "speed", len(items), beam, med["ours"], med["fw"], med["fw"] / med["ours"]))
        dump[beam] = {"items": [it[:2] for it in items], **texts}
    print(f"\nCPU: {cpu_model()}; {args.threads} threads each; float32; {len(items)} clips ({secs:.0f} s)\n")
    print("| model | set | clips | beam | WER ours | WER faster-whisper | identical text |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r[1] != "speed":
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.1f}% |")
    print("\n| model | beam | wall ours (s) | wall faster-whisper (s) | speed, ours / faster-whisper |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r[1] == "speed":
            print(f"| {r[0]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)


if __name__ == "__main__":
    main()
