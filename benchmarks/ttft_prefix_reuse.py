"""Time to first token of a chat turn with a long document in the system prompt: turn 1 (cold) vs
turn 2 (the state after turn 1 restored), through the OpenAI-compatible server on 127.0.0.1.

bench-88m (random weights, bf16) with a byte-level BPE trained on Python's standard library; the
document is stdlib source cut to ``--doc-tokens`` tokens. Each round uses a different document, so
turn 1 is cold. Measured per round, as the latency of a ``max_tokens=1`` request (prefill + first
token + HTTP):

- turn 1: system(document) + question, nothing stored;
- turn 2: turn 1 + its reply + a follow-up question, with prompt-state reuse;
- turn 2 without reuse: the same request to a second server with the prefix cache off;
- new conversation, same document: another question, reusing the state after the system prompt.

    python benchmarks/ttft_prefix_reuse.py --doc-tokens 4096 --rounds 3 --out benchmarks/results/ttft_prefix_reuse
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

QUESTIONS = ["What does the first function in the document do?", "Which modules does it import, and why?",
             "Summarise the document in one sentence."]


def stdlib_text(names: list[str]) -> str:
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / n).read_text(encoding="utf-8") for n in names)


class Server:
    """uvicorn in a thread on 127.0.0.1 (a port the OS picks)."""

    def __init__(self, app):
        import uvicorn
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline:
                sys.exit("server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/v1"

    def idle(self):
        """Wait until the model thread has finished everything, including storing a reply's state."""
        engine = self.app.state.engine
        deadline = time.time() + 600
        while (engine.busy or engine.load()) and time.time() < deadline:
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)


def ask(client, server: Server, messages, max_tokens: int) -> tuple[float, object]:
    server.idle()
    t0 = time.perf_counter()
    r = client.chat.completions.create(model="bench-88m", messages=messages, max_tokens=max_tokens, temperature=0)
    return time.perf_counter() - t0, r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/ttft_prefix_reuse")
    a = ap.parse_args()

    import openai
    import torch

    from hybridlm.bench import environment, environment_md
    from hybridlm.checkpoint import load_model
    from hybridlm.prefix_cache import PrefixCache
    from hybridlm.serve import Limits, create_app
    from hybridlm.tokenizer import train_tokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    env = environment()
    tok = train_tokenizer([stdlib_text(["textwrap.py", "argparse.py", "dataclasses.py", "json/decoder.py"])],
                          vocab_size=8192, show_progress=False)
    corpus = tok.encode(stdlib_text(["inspect.py", "typing.py", "pathlib.py"]))
    need = (a.rounds + 1) * a.doc_tokens
    if len(corpus) < need:
        sys.exit(f"the document source has {len(corpus)} tokens; {need} are needed")
    # one document per round, so that turn 1 is cold; one more to warm up (kernel loading, allocator)
    *docs, warm_doc = [tok.decode(corpus[i * a.doc_tokens:(i + 1) * a.doc_tokens]) for i in range(a.rounds + 1)]

    model = load_model("bench-88m", dtype=torch.bfloat16)
    limits = Limits(context=a.doc_tokens + 1024, max_new_tokens=a.reply_tokens)
    reuse = Server(create_app(model, tok, name="bench-88m", limits=limits, prefix_cache=PrefixCache(1 << 30)))
    plain = Server(create_app(model, tok, name="bench-88m", limits=limits, prefix_cache=None))
    clients = {s: openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=900) for s in (reuse, plain)}
    warm = [{"role": "system", "content": warm_doc}, {"role": "user", "content": "warm up"}]
    for s in (reuse, plain):
        ask(clients[s], s, warm, 2)

    rows = []
    for r, doc in enumerate(docs):
        system = {"role": "system", "content": "Answer questions about this document.\n\n" + doc}
        turn1 = [system, {"role": "user", "content": QUESTIONS[0]}]
        t1, r1 = ask(clients[reuse], reuse, turn1, 1)
        _, reply = ask(clients[reuse], reuse, turn1, a.reply_tokens)
        turn2 = turn1 + [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": QUESTIONS[1]}]
        t2, r2 = ask(clients[reuse], reuse, turn2, 1)
        t2_plain, r2_plain = ask(clients[plain], plain, turn2, 1)
        t3, r3 = ask(clients[reuse], reuse, [system, {"role": "user", "content": QUESTIONS[2]}], 1)
        row = {"round": r, "turn1_prompt_tokens": r1.usage.prompt_tokens, "turn1_s": t1,
               "reply_tokens": reply.usage.completion_tokens,
               "turn2_prompt_tokens": r2.usage.prompt_tokens,
               "turn2_cached_tokens": r2.usage.prompt_tokens_details.cached_tokens, "turn2_s": t2,
               "turn2_no_reuse_s": t2_plain,
               "turn2_no_reuse_cached_tokens": r2_plain.usage.prompt_tokens_details.cached_tokens,
               "same_doc_prompt_tokens": r3.usage.prompt_tokens,
               "same_doc_cached_tokens": r3.usage.prompt_tokens_details.cached_tokens, "same_doc_s": t3}
        rows.append(row)
        print(f"round {r}: turn 1 {t1:.2f} s ({row['turn1_prompt_tokens']} tokens) | turn 2 {t2:.3f} s "
              f"({row['turn2_cached_tokens']}/{row['turn2_prompt_tokens']} reused) | turn 2 without reuse "
              f"{t2_plain:.2f} s | same document, new question {t3:.3f} s "
              f"({row['same_doc_cached_tokens']}/{row['same_doc_prompt_tokens']} reused)", flush=True)
    cache_stats = reuse.app.state.prefix_cache.stats()
    for s in (reuse, plain):
        s.stop()

    med = {k: statistics.median(r[k] for r in rows) for k in ("turn1_s", "turn2_s", "turn2_no_reuse_s", "same_doc_s")}
    env["load_average_end"] = list(os.getloadavg())
    result = {"command": "python " + " ".join(sys.argv), "env": env, "doc_tokens": a.doc_tokens, "rows": rows,
              "median": med, "speedup_turn2_vs_turn1": med["turn1_s"] / med["turn2_s"],
              "speedup_turn2_vs_no_reuse": med["turn2_no_reuse_s"] / med["turn2_s"], "prefix_cache": cache_stats}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Time to first token with prompt-state reuse ({a.doc_tokens}-token document)", "",
        f"`{result['command']}`", "",
        environment_md(env).rstrip(),
        f"- load average at end: {' / '.join(f'{x:.2f}' for x in env['load_average_end'])}",
        ("- model: bench-88m (random weights, bf16); tokenizer: byte-level BPE (8192) trained on Python's stdlib; "
         "through the OpenAI-compatible server on 127.0.0.1, `max_tokens=1` request latency"), "",
        "| round | turn 1 (cold) | turn 2 (reused state) | turn 2 without reuse | new question, same document |",
        "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['turn1_s']:.2f} s ({r['turn1_prompt_tokens']} tok) | {r['turn2_s']:.3f} s "
                     f"({r['turn2_cached_tokens']} of {r['turn2_prompt_tokens']} tok reused) | "
                     f"{r['turn2_no_reuse_s']:.2f} s | {r['same_doc_s']:.3f} s ({r['same_doc_cached_tokens']} of "
                     f"{r['same_doc_prompt_tokens']} tok reused) |")
    summary = (f"Median: turn 1 {med['turn1_s']:.2f} s, turn 2 {med['turn2_s']:.3f} s "
               f"({result['speedup_turn2_vs_turn1']:.0f}x faster; {result['speedup_turn2_vs_no_reuse']:.0f}x faster "
               f"than turn 2 without reuse, {med['turn2_no_reuse_s']:.2f} s); new question on the same document "
               f"{med['same_doc_s']:.3f} s.")
    lines += ["", summary,
              f"Prefix cache at the end: {cache_stats['entries']} states, {cache_stats['bytes'] / 2**20:.1f} MiB "
              f"(states are kept at message ends, prompt ends, reply ends and every 1024 prompt tokens).", "",
              "Reused tokens are the server's `usage.prompt_tokens_details.cached_tokens`. Prompts are tokenized "
              "afresh, so the state after a reply serves the next turn when the reply's text tokenizes back to the "
              "ids generated: the rule for a trained model, rarely the case for these random weights, whose turn 2 "
              "continues from the state after turn 1's prompt and its first token and so also processes the "
              f"{rows[0]['reply_tokens']}-token reply."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
