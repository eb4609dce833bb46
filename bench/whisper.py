"""Whisper, ours against faster-whisper (issue 13): WER, identical text and speed.

Both systems read the same 16 kHz float32 WAVs (resampled once by faster-whisper's own
`decode_audio`, PyAV), with the same CTranslate2 model file, float32 compute, the same
threads, temperature 0 (no fallback), timestamps on, and the same beam size. Each side runs as
a whole process (model load included), alternating, `--repeats` times; the table gives the
median wall time.

WER uses jiwer with one normalizer for both sides and the references: lowercase, bracketed
notes removed ("at [@]"), punctuation removed except in-word apostrophes, hyphens as spaces,
numbers 0-99 spelled out, blanks collapsed.

`--int8` adds faster-whisper with int8 compute to the speed table (its text is not scored).
`--long` times one long file instead of the clips: every Asterisk prompt with words, in name
order, concatenated (about 25 minutes), and scores its whole transcript against the joined
references. Peak memory is each process's maximum resident set (wait4's ru_maxrss).

Usage (from the repo root, after `cargo build --release -p transformer-cli` and
`bash scripts/py-env-whisper.sh`):
  .venv/bin/python bench/whisper.py [--model tiny.en] [--beams 1,5] [--repeats 3]
                                    [--every K]   (every K-th asterisk clip; 1 = all 563)
                                    [--int8] [--long]
Prints markdown tables; `--json FILE` also writes every transcript.
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
import tempfile
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


def timed(cmd, who):
    """(wall seconds, stdout, peak resident MiB) of one whole process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            sys.exit(f"{who} failed: {err.read()[-2000:]}")
        return wall, out.read(), usage.ru_maxrss / 1024


def run_ours(model_dir, paths, beam, threads):
    cmd = [BIN, "--threads", str(threads), "transcribe", "--model", model_dir, "--beam", str(beam), "--format", "json", *paths]
    wall, out, mib = timed(cmd, "ours")
    texts = {json.loads(l)["file"]: json.loads(l)["text"] for l in out.splitlines() if l.strip()}
    return wall, [texts[x] for x in paths], mib


def run_fw(model_dir, paths, beam, threads, compute="float32"):
    cmd = [sys.executable, os.path.abspath(__file__), "--fw-worker", model_dir, str(beam), str(threads), compute, *paths]
    wall, out, mib = timed(cmd, f"faster-whisper {compute}")
    return wall, json.loads(out), mib


def fw_worker(model_dir, beam, threads, compute, paths):
    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type=compute, cpu_threads=threads)
    out = []
    for path in paths:
        segments, _ = model.transcribe(
            path, beam_size=beam, temperature=0.0, vad_filter=False, without_timestamps=False
        )
        out.append("".join(s.text for s in segments).strip())
    json.dump(out, sys.stdout)


def long_file(items):
    """One WAV of every asterisk clip of `items` in order (their prepared 16 kHz floats)."""
    import numpy as np

    paths, _ = prepare(items)
    audio = np.concatenate([np.fromfile(p, dtype="<f4", offset=44) for p in paths])
    out = os.path.join(WORK, f"asterisk-long-{len(items)}.wav")
    if not os.path.exists(out):
        write_wav_f32(out, audio)
    ref = " ".join(it[3] for it in items)
    return [("long", os.path.basename(out), out, ref)], [out], len(audio) / 16000


SIDES = {"ours": "ours", "fw": "faster-whisper f32", "fw8": "faster-whisper int8"}


def run_side(side, model_dir, paths, beam, threads):
    if side == "ours":
        return run_ours(model_dir, paths, beam, threads)
    return run_fw(model_dir, paths, beam, threads, "int8" if side == "fw8" else "float32")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--fw-worker":
        fw_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--beams", default="1,5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8", action="store_true", help="also time faster-whisper with int8 compute")
    ap.add_argument("--long", action="store_true", help="one long file of the asterisk clips")
    ap.add_argument("--json")
    args = ap.parse_args()
    import faster_whisper
    import jiwer

    model_dir = last_line(["bash", os.path.join(ROOT, "scripts", "fetch-whisper.sh"), args.model])
    speech = last_line(["bash", os.path.join(ROOT, "scripts", "fetch-speech.sh")])
    items = clips(speech, args.every)
    if args.long:
        items, paths, secs = long_file([it for it in items if it[0] == "asterisk"])
        subsets = ["long"]
    else:
        paths, secs = prepare(items)
        subsets = ["librivox", "asterisk"]
    sides = ["ours", "fw"] + (["fw8"] if args.int8 else [])
    print(f"{len(items)} clips, {secs:.0f} s of audio; CPU: {cpu_model()}, {args.threads} threads each; "
          f"faster-whisper {faster_whisper.__version__}", file=sys.stderr)
    rows, speed, dump = [], [], {}
    for beam in [int(b) for b in args.beams.split(",")]:
        walls = {s: [] for s in sides}
        peak = {s: [] for s in sides}
        texts = {}
        for rep in range(args.repeats):
            # Each repeat starts one side later, so that no side always runs first.
            order = sides[rep % len(sides):] + sides[: rep % len(sides)]
            for side in order:
                wall, out, mib = run_side(side, model_dir, paths, beam, args.threads)
                walls[side].append(wall)
                peak[side].append(mib)
                if side in texts and texts[side] != out:
                    print(f"warning: {side} gave different text on repeat {rep}", file=sys.stderr)
                texts[side] = out
                print(f"beam {beam} {side}: {wall:.1f} s, {mib:.0f} MiB", file=sys.stderr)
        for subset in subsets:
            idx = [i for i, it in enumerate(items) if it[0] == subset]
            ref = [normalize(items[i][3]) for i in idx]
            hyp = {s: [normalize(texts[s][i]) for i in idx] for s in ("ours", "fw")}
            wer = {s: 100 * jiwer.wer(ref, [h if h else "<empty>" for h in hyp[s]]) for s in hyp}
            same = sum(a == b for a, b in zip(hyp["ours"], hyp["fw"])) / len(idx)
            rows.append((args.model, subset, len(idx), beam, wer["ours"], wer["fw"], 100 * same))
        med = {s: statistics.median(w) for s, w in walls.items()}
        mem = {s: max(m) for s, m in peak.items()}
        speed.append((beam, med, mem))
        dump[beam] = {"items": [it[:2] for it in items], **texts}
    what = "one long file" if args.long else f"{len(items)} clips"
    print(f"\nCPU: {cpu_model()}; {args.threads} threads each; {what} ({secs:.0f} s of audio)\n")
    print("| model | set | clips | beam | WER ours | WER faster-whisper | identical text |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.1f}% |")
    others = [s for s in sides if s != "ours"]
    head = ["model", "input", "beam"] + [f"{SIDES[s]} (s)" for s in sides]
    head += [f"ours / {SIDES[s]}" for s in others] + ["RTF ours"]
    head += [f"peak MiB {SIDES[s]}" for s in sides]
    print(f"\nSpeed: median wall time of {args.repeats} alternating runs (whole process, model load "
          "included); ours / X is X's time over ours (above 1: ours is faster); RTF = wall / audio.\n")
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    for beam, med, mem in speed:
        cells = [args.model, what, str(beam)] + [f"{med[s]:.1f}" for s in sides]
        cells += [f"{med[s] / med['ours']:.2f}x" for s in others] + [f"{med['ours'] / secs:.3f}"]
        cells += [f"{mem[s]:.0f}" for s in sides]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)


if __name__ == "__main__":
    main()
