"""Concurrent completions against a vLLM OpenAI server, and its own /metrics counters.

    python scripts/real_vllm/load.py BASE_URL MODEL [--requests N] [--concurrency C] [--seed S]
    python scripts/real_vllm/load.py BASE_URL --metrics      # only print the counters

Prompts of 1–120 words and outputs of 1–48 tokens (`ignore_eos`, so the random model emits
exactly max_tokens), with 1 in 8 requests streamed. Prints one JSON object: the requests sent,
the usage vLLM answered with, and the counters of its /metrics after the load (standard
library only, so it runs in either venv).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

WORDS = "the quick brown fox jumps over lazy dogs while seven wizards quietly judge boxing matches".split()
# Counter families of vLLM's /metrics (V1); each sample line summed over its labels.
COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
            "vllm:num_preemptions_total",
            # histogram sums: per request first_token - scheduled and last_token - first_token, the
            # same engine timestamps as the span's time_in_model_prefill / _decode
            "vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_sum",
            "vllm:request_prefill_time_seconds_count")


def scrape_counters(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=30) as response:
        text = response.read().decode()
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def plan(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [dict(words=rng.randint(1, 120), max_tokens=rng.randint(1, 48), stream=rng.random() < 0.125)
            for _ in range(count)]


def complete(base_url: str, model: str, index: int, item: dict) -> dict:
    rng = random.Random(index)
    prompt = " ".join(rng.choice(WORDS) for _ in range(item["words"]))
    body = {"model": model, "prompt": prompt, "max_tokens": item["max_tokens"], "temperature": 0.0,
            "ignore_eos": True, "stream": item["stream"]}
    if item["stream"]:
        body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(base_url.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.time()
    with urllib.request.urlopen(request, timeout=300) as response:
        raw = response.read().decode()
    usage = None
    if item["stream"]:
        for line in raw.splitlines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    else:
        usage = json.loads(raw)["usage"]
    return dict(item, index=index, started=started, ended=time.time(),
                prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])


def abort(base_url: str, model: str, index: int) -> str:
    """A streamed request for many tokens, abandoned after its first chunk: vLLM aborts it. Returns
    its request id (the stream's `id`, `gen_ai.request.id` on a span if one were sent)."""
    body = {"model": model, "prompt": "abandoned request %d" % index, "max_tokens": 400, "ignore_eos": True,
            "temperature": 0.0, "stream": True}
    request = urllib.request.Request(base_url.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    try:
        while True:
            line = response.readline().decode()
            if line.startswith("data: {"):
                return json.loads(line[6:])["id"]
            if not line:
                raise RuntimeError("the stream ended before its first chunk")
    finally:
        response.fp.raw._sock.close() if hasattr(response.fp, "raw") else None
        response.close()


def run(base_url: str, model: str, count: int, concurrency: int, seed: int, aborts: int = 0) -> dict:
    before = scrape_counters(base_url)
    with ThreadPoolExecutor(concurrency) as pool:
        aborted = [pool.submit(abort, base_url, model, i) for i in range(aborts)]
        results = list(pool.map(lambda pair: complete(base_url, model, *pair), enumerate(plan(count, seed))))
        aborted_ids = [future.result() for future in aborted]
    after = scrape_counters(base_url)
    return {
        "requests": results,
        "aborted_ids": aborted_ids,
        "usage": {"prompt_tokens": sum(r["prompt_tokens"] for r in results),
                  "completion_tokens": sum(r["completion_tokens"] for r in results)},
        "counters_before": before,
        "counters_after": after,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url")
    parser.add_argument("model", nargs="?")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--aborts", type=int, default=0, help="streamed requests abandoned after one chunk")
    parser.add_argument("--metrics", action="store_true")
    args = parser.parse_args(argv)
    if args.metrics:
        print(json.dumps(scrape_counters(args.base_url), indent=1))
        return
    if not args.model:
        parser.error("MODEL is required with load")
    print(json.dumps(run(args.base_url, args.model, args.requests, args.concurrency, args.seed, args.aborts), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
