"""Generate a completion for every line of a file, with a progress bar; write one JSON object per line.

    python examples/batch_generate.py prompts.txt completions.jsonl --max_tokens 64 --chat

Prompts go to the engine in chunks of --batch_size, each chunk as one continuous batch.
"""

import argparse
import json

from tqdm import tqdm

from novallm_jax import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", help="a text file, one prompt per line")
    parser.add_argument("output", help="where to write the JSON lines")
    parser.add_argument("--model", default=None, help="HF directory, GGUF file or orbax checkpoint (default model)")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch_size", type=int, default=16, help="prompts handed to the engine at once")
    parser.add_argument("--chat", action="store_true", help="wrap each line as a user message (chat template)")
    args = parser.parse_args()

    with open(args.prompts, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    with (
        LLM(args.model) as llm,
        open(args.output, "w", encoding="utf-8") as out,
        tqdm(total=len(prompts), unit="prompt") as bar,
    ):
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            inputs = [llm.chat_prompt([{"role": "user", "content": p}]) for p in chunk] if args.chat else chunk
            for prompt, result in zip(chunk, llm.generate(inputs, params, use_tqdm=False)):
                completion = result.outputs[0]
                out.write(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "completion": completion.text,
                            "finish_reason": completion.finish_reason and completion.finish_reason.value,
                            "tokens": len(completion.token_ids),
                        }
                    )
                    + "\n"
                )
            bar.update(len(chunk))


if __name__ == "__main__":
    main()
