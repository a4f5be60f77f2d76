"""Host time per sequence per decode step spent on text: the stop-string check and a stream's new piece, after
N generated tokens, decoding everything so far (what zinfer did before) against a tail window (what it does).

python benchmarks/host_text.py [--tokens 2000]   (SmolLM2's tokenizer, from the embedded model; CPU only)
"""

import argparse
import json
import time

from transformers import AutoTokenizer

from zinfer.runtime.text import TextReader, tail_text
from zinfer.weights.default_model import default_model_dir

TEXT = "The quick brown fox jumps over the lazy dog, and then some more words follow here. "


def per_call_ms(fn, calls: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731 - as LLM.decode
    ids = tok(TEXT * (args.tokens // 10))["input_ids"][: args.tokens + 20]
    prompt, new = ids[:20], ids[20:]
    reader = TextReader(decode, prompt)
    reader.feed(new[:-1])

    def stream_step():  # the newest token's piece, the reader rewound by one token each call
        reader.prefix, reader.read = len(reader.ids) - 2, len(reader.ids) - 1
        return reader.feed(new)

    result = dict(tokens=len(new),
                  stop_check_everything_ms=per_call_ms(lambda: "###" in decode(new)),
                  stop_check_tail_ms=per_call_ms(lambda: "###" in tail_text(decode, new, 3)),
                  stream_everything_ms=per_call_ms(lambda: decode(prompt + new)[len(decode(prompt)):]),
                  stream_window_ms=per_call_ms(stream_step))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
