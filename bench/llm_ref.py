# The references of bench/llm.sh on a GGUF file: llama.cpp (llama-cpp-python, the file as
# stored) or transformers (its GGUF loader, dequantized to float32). Prints one JSON line:
# prompt tokens/s, generation tokens/s, peak RSS.
#
#   llm_ref.py llama-cpp|transformers MODEL.gguf PROMPT.txt NEW_TOKENS THREADS
#
# The prompt is tokenized by the reference's tokenizer (ours agrees with it: tests/gguf_tokenizer.rs).
# Generation is greedy and does not stop at EOS, so that every run makes NEW_TOKENS tokens.
# "Generation" times the NEW_TOKENS - 1 decoding steps after the prompt's forward pass, as
# our CLI reports them.
import json
import os
import resource
import sys
import time

impl, model_path, prompt_path, new_tokens, threads = sys.argv[1:6]
new_tokens, threads = int(new_tokens), int(threads)
prompt = open(prompt_path, encoding="utf-8").read()


def rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


if impl == "llama-cpp":
    import llama_cpp

    base_rss = rss_kb()
    llm = llama_cpp.Llama(
        model_path=model_path,
        n_ctx=1024,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true", special=True)
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = llm.sample(temp=0.0)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
    t2 = time.perf_counter()
elif impl == "transformers":
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    base_rss = rss_kb()
    d, f = os.path.dirname(os.path.abspath(model_path)), os.path.basename(model_path)
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        tok = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
        t2 = time.perf_counter()
else:
    sys.exit(f"unknown reference {impl!r}")

print(
    json.dumps(
        {
            "impl": impl,
            "prompt_tokens": len(ids),
            "prompt_tps": len(ids) / (t1 - t0),
            "gen_tps": (new_tokens - 1) / (t2 - t1),
            "peak_rss_kb": rss_kb(),
            "interpreter_rss_kb": base_rss,
        }
    )
)
