"""The HF transformers baseline of the serving benchmark: static batches of `generate`.

Run by experiments/bench_serving.py in a separate process (torch and JAX must not share the
GPU's memory); prints one JSON line. Same workload as the engine (lengths from
bench_serving.workload), a Llama of the same shape with random weights (throughput does not
depend on the values), greedy, every request generating exactly its own output length; a batch
runs to its longest request, and only each request's own tokens count as useful.

    python experiments/hf_generate_baseline.py CONFIG_JSON N_REQUESTS BATCH PROMPT_LO PROMPT_HI OUT_LO OUT_HI
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import transformers


def main(argv):
    config, n, batch = json.loads(argv[0]), int(argv[1]), int(argv[2])
    p_lo, p_hi, o_lo, o_hi = map(int, argv[3:7])
    rng = np.random.default_rng(0)  # the engine's workload(): same draws in the same order
    prompt_lens = rng.integers(p_lo, p_hi + 1, n)
    output_lens = rng.integers(o_lo, o_hi + 1, n)
    prompts = [rng.integers(0, config["vocab_size"], int(p)).tolist() for p in prompt_lens]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **config, bos_token_id=None, eos_token_id=None, pad_token_id=0)).to(device, dtype).eval()
    useful, start = 0, time.perf_counter()
    for b in range(0, n, batch):
        chunk, outs = prompts[b:b + batch], output_lens[b:b + batch]
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding, as decoder-only generation needs
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = int(max(outs))
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False)
        useful += int(sum(outs))
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    print(json.dumps({"impl": "hf_generate", "wall_s": wall, "tok_per_s": useful / wall,
                      "output_tokens": useful, "device": device,
                      "transformers": transformers.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main(sys.argv[1:])
