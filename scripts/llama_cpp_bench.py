"""llama.cpp's side of `nomoat bench engine --vs-llama-cpp`.

Loads one GGUF file with llama-cpp-python (which builds llama.cpp from
source; a benchmark dependency only) and answers, one JSON line each,
requests read from stdin, one JSON line each:
  {"prompt": [token ids], "decode": N}
with the prompt's prefill speed, the speed of N greedy decode steps and the
tokens chosen. The first line written says it is ready.
"""

import json
import sys
import time


def main() -> int:
    path, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    extra_bufts = len(sys.argv) <= 4 or sys.argv[4] != "no-extra-bufts"
    try:
        import llama_cpp
        import numpy as np
    except ImportError as e:
        print(json.dumps({"error": f"llama-cpp-python is not installed ({e}): "
                          "pip install llama-cpp-python (needs cmake and a C++ compiler)"}),
              flush=True)
        return 1
    if not extra_bufts:
        # llama.cpp's extra CPU buffer types repack some weights (and use
        # AMX where the CPU has it, which faults where the kernel does not
        # grant it to the process).
        default = llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(
        model_path=path,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=n_ctx,
        n_batch=512,
        n_gpu_layers=0,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def argmax() -> int:
        # The last position's logits, as llama.cpp left them.
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        return int(np.argmax(logits))

    print(json.dumps({"ready": True, "version": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        prompt, decode = req["prompt"], int(req["decode"])
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - t
        tok = argmax()
        tokens = []
        t = time.perf_counter()
        for _ in range(decode):
            tokens.append(tok)
            llm.eval([tok])
            tok = argmax()
        decode_s = time.perf_counter() - t
        print(json.dumps({
            "prefill_tokens_per_s": len(prompt) / prefill_s,
            "decode_tokens_per_s": decode / decode_s if decode else 0.0,
            "tokens": tokens,
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
