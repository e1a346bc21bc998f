"""A bounded loopback load test of the OpenAI-compatible server (issue 16, part 6).

The script starts ``hybridlm serve`` as a child process on 127.0.0.1 (a tiny seeded random checkpoint
it builds, or ``--model``), then ``--clients`` threads send requests for ``--duration`` seconds, each with
its own API key (so the server's per-client share of the queue is per thread, as for real users):

- well-formed (the rest, 70% by default): streaming and non-streaming /v1/completions and
  /v1/chat/completions, greedy or seeded sampling, prompts from a small pool (so the prefix cache fills and is reused);
- disconnecting (10%): a stream closed after its first chunk, or a non-streaming request abandoned
  after a short read timeout;
- hostile (``--hostile``, 20%; the kinds in turn): the values of issue 16 (temperature, top_p,
  repetition_penalty 1e-300, seeds past 64 bits, huge n, a 500,000-character stop string, logit_bias key
  "²", malformed JSON, a half-sent body).

Reported: requests and tokens per second, p50/p99 time to first token of well-formed streams, errors
among well-formed requests (target 0), hostile requests answered as expected (4xx, or 200 where the
value is clamped) vs otherwise, requests without an answer (target 0), whether the abandoned work
drained, and the server's RSS at the start, when the prefix cache is first full, and at the end
(target: within 10% of the full-cache figure).

    python benchmarks/load.py --clients 64 --duration 120 --out benchmarks/results/load
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

MODEL = "load-tiny"
PROMPTS = ["Summarise the plot of a detective story in three sentences.",
           "Write a Python function that reverses a linked list.",
           "What is the capital of France, and why is it famous?",
           "Explain the difference between a list and a tuple.",
           "You are a helpful assistant. Translate 'good morning' into German."]
# (kind, what the request sends, the status it must get): 200 where the server clamps the value
HOSTILE = {
    "temperature 1e-300": ({"temperature": 1e-300}, 200),
    "top_p 1e-300": ({"temperature": 1.0, "top_p": 1e-300}, 200),
    "repetition_penalty 1e-300": ({"repetition_penalty": 1e-300}, 400),
    "seed 2**64": ({"temperature": 1.0, "seed": 2**64}, 400),
    "seed -2**70": ({"temperature": 1.0, "seed": -2**70}, 400),
    "huge n": ({"n": 10**9}, 400),
    "500,000-character stop": ({"stop": "x" * 500_000}, 400),
    'logit_bias key "²"': ({"logit_bias": {"²": 5}}, 400),
    "malformed JSON": (None, 400),
    "half-sent body": (None, 408),
}


def build_checkpoint(path: Path, seed: int) -> Path:
    """A tiny random model (seeded) with a byte-level BPE trained on a few stdlib modules."""
    import sysconfig

    from hybridlm import HybridLM, preset
    from hybridlm.tokenizer import train_tokenizer
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / n).read_text(encoding="utf-8") for n in ("textwrap.py", "shlex.py"))
    tok = train_tokenizer([text, *PROMPTS], vocab_size=512, max_length=1024, show_progress=False)
    tok.save(path)
    cfg = preset("tiny", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, mamba_d_state=8, max_position_embeddings=1024)
    HybridLM(cfg).init_weights(seed).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class Server:
    """``hybridlm serve`` in a child process (its own GIL and memory, measured from outside)."""

    def __init__(self, model: str, args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "hybridlm", "serve", "--model", model, "--name", MODEL, "--port",
               str(self.port), "--threads", str(args.threads), "--log-level", "error", "--prefix-cache",
               args.prefix_cache, "--max-new-tokens", str(args.max_tokens), "--read-timeout", str(args.read_timeout)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": str(args.threads or os.cpu_count())})
        deadline = time.time() + 120
        while not self.health():
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                sys.exit(f"the server did not start: {self.proc.communicate()[1][-2000:]}")
            time.sleep(0.2)

    def health(self) -> dict | None:
        try:
            r = httpx.get(self.url + "/health", timeout=10)
            return r.json() if r.status_code == 200 else None
        except httpx.TransportError:
            return None

    def drained(self, seconds: float) -> bool:
        """The engine has nothing waiting, prefilling or decoding within ``seconds``."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            h = self.health()
            if h and not any(h["engine"][k] for k in ("waiting", "prefilling", "decoding")):
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> tuple[int, str]:
        """Ctrl-C; the exit code and what the server logged (errors only)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


# ---- the clients --------------------------------------------------------------------------------------
class Tally:
    """What every client saw, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()   # well_formed, well_formed_errors, disconnects, no_answer, tokens
        self.ttft: list[float] = []
        self.hostile: dict[str, Counter] = {k: Counter() for k in HOSTILE}
        self.errors: list[str] = []        # the first few, for the report
        self.sent_hostile = 0

    def next_hostile(self) -> str:
        """The hostile kinds in turn, so that a short run tries each."""
        with self.lock:
            self.sent_hostile += 1
            return list(HOSTILE)[(self.sent_hostile - 1) % len(HOSTILE)]

    def add(self, **counts):
        with self.lock:
            self.counts.update(counts)

    def error(self, what: str):
        with self.lock:
            self.counts["well_formed_errors"] += 1
            if len(self.errors) < 20:
                self.errors.append(what[:300])


def well_formed_body(rng: random.Random, chat: bool, stream: bool, max_tokens: int) -> dict:
    text = rng.choice(PROMPTS) + ("" if rng.random() < 0.5 else f" (request {rng.randrange(10**6)})")
    body = {"model": MODEL, "max_tokens": rng.randint(1, max_tokens), "stream": stream}
    body.update({"temperature": 0} if rng.random() < 0.5 else {"temperature": 0.8, "seed": rng.randrange(2**32)})
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def path_of(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def stream_events(r: httpx.Response):
    """The parsed data lines of a server-sent event stream ("[DONE]" as a string)."""
    for line in r.iter_lines():
        if line.startswith("data: "):
            yield line[6:] if line == "data: [DONE]" else json.loads(line[6:])


def has_token(event: dict) -> bool:
    """A chunk carrying generated text or a finish reason (not the chat role chunk, not the usage chunk)."""
    return any(c.get("text") or c.get("delta", {}).get("content") or c.get("finish_reason")
               for c in event.get("choices", []))


def well_formed(client: httpx.Client, url: str, rng: random.Random, tally: Tally, max_tokens: int):
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    body = well_formed_body(rng, chat, stream, max_tokens)
    what = f"{'chat' if chat else 'completion'} {'stream' if stream else 'json'}"
    tally.add(well_formed=1)
    t0 = time.perf_counter()
    try:
        if not stream:
            r = client.post(url + path_of(chat), json=body)
            if r.status_code != 200:
                return tally.error(f"{what}: {r.status_code} {r.text}")
            return tally.add(tokens=r.json()["usage"]["completion_tokens"])
        first, done, usage = None, False, None
        with client.stream("POST", url + path_of(chat), json=body) as r:
            if r.status_code != 200:
                r.read()
                return tally.error(f"{what}: {r.status_code} {r.text}")
            for event in stream_events(r):
                if event == "[DONE]":
                    done = True
                elif "error" in event:
                    return tally.error(f"{what}: error event {event}")
                else:
                    if first is None and has_token(event):
                        first = time.perf_counter() - t0
                    usage = event.get("usage") or usage
        if not done or first is None or usage is None:
            return tally.error(f"{what}: stream ended without [DONE], a token or usage")
        with tally.lock:
            tally.ttft.append(first)
        tally.add(tokens=usage["completion_tokens"])
    except httpx.TimeoutException:
        tally.add(no_answer=1)
        tally.error(f"{what}: no answer")
    except httpx.HTTPError as e:
        tally.error(f"{what}: {type(e).__name__}: {e}")


def disconnecting(client: httpx.Client, url: str, rng: random.Random, tally: Tally, max_tokens: int):
    """Go away mid-request: close a stream after its first chunk, or stop waiting for a JSON answer."""
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    body = {**well_formed_body(rng, chat, stream, max_tokens), "max_tokens": max_tokens}
    tally.add(disconnects=1)
    try:
        if stream:
            with client.stream("POST", url + path_of(chat), json=body) as r:
                next(r.iter_lines(), None)
        else:
            client.post(url + path_of(chat), json=body, timeout=httpx.Timeout(60, read=rng.uniform(0.02, 0.3)))
    except httpx.HTTPError:
        pass


def half_sent(url: str, timeout: float) -> int | None:
    """Headers promising 1000 bytes, then 20: the status the server answers with (None: no answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"model": "load-tiny"')
        try:
            head = s.recv(64)
        except OSError:
            return None
    parts = head.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def hostile(client: httpx.Client, url: str, rng: random.Random, tally: Tally, read_timeout: float):
    kind = tally.next_hostile()
    fields, _ = HOSTILE[kind]
    try:
        if kind == "half-sent body":
            status = half_sent(url, read_timeout + 30)
        elif kind == "malformed JSON":
            status = client.post(url + "/v1/completions", content=b'{"model": "load-tiny", "prompt": "hi",',
                                 headers={"Content-Type": "application/json"}).status_code
        else:
            body = {**well_formed_body(rng, True, False, 4), **fields}
            status = client.post(url + "/v1/chat/completions", json=body).status_code
    except (httpx.HTTPError, OSError):
        status = None
    with tally.lock:
        tally.hostile[kind][status] += 1


def client_loop(i: int, url: str, stop_at: float, tally: Tally, args):
    rng = random.Random(args.seed * 1000 + i)
    headers = {"Authorization": f"Bearer load-client-{i}"}
    with httpx.Client(headers=headers, timeout=args.request_timeout) as client:
        while time.time() < stop_at:
            roll = rng.random()
            if roll < args.hostile:
                hostile(client, url, rng, tally, args.read_timeout)
            elif roll < args.hostile + 0.1:
                disconnecting(client, url, rng, tally, args.max_tokens)
            else:
                well_formed(client, url, rng, tally, args.max_tokens)


class Monitor(threading.Thread):
    """Samples, every second, the server's RSS and whether its prefix cache is full."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.samples, self.stopped = server, [], threading.Event()

    def run(self):
        while not self.stopped.wait(1.0):
            h = self.server.health()
            cache = h["prefix_cache"] if h else None
            full = bool(cache) and (cache["evictions"] > 0 or cache["bytes"] >= 0.9 * cache["max_bytes"])
            self.samples.append((rss_bytes(self.server.proc.pid), full))


# ---- the report -----------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (None without samples)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def rss_when_cache_full(samples: list[tuple[int, bool]]) -> tuple[int | None, bool]:
    """RSS at the first sample whose prefix cache was full (evicting, or at 90% of its budget); without
    one, at the middle sample, and False."""
    for rss, full in samples:
        if full:
            return rss, True
    return (samples[len(samples) // 2][0] if samples else None), False


def summarise(tally: Tally, seconds: float, rss: dict, drained: bool, cache_full: bool) -> dict:
    c = tally.counts
    by_kind = {k: {str(s): n for s, n in v.items()} for k, v in tally.hostile.items()}
    expected = sum(v[HOSTILE[k][1]] for k, v in tally.hostile.items())
    total_hostile = sum(sum(v.values()) for v in tally.hostile.values())
    four = sum(n for v in tally.hostile.values() for s, n in v.items() if s is not None and 400 <= s < 500)
    unanswered = c["no_answer"] + sum(v[None] for v in tally.hostile.values())
    requests = c["well_formed"] + c["disconnects"] + total_hostile
    growth = rss["end"] / rss["cache_full"] - 1 if rss["cache_full"] else None
    return {"seconds": seconds, "requests": requests, "requests_per_s": requests / seconds,
            "tokens": c["tokens"], "tokens_per_s": c["tokens"] / seconds,
            "well_formed": c["well_formed"], "well_formed_errors": c["well_formed_errors"],
            "ttft_p50_s": percentile(tally.ttft, 0.5), "ttft_p99_s": percentile(tally.ttft, 0.99),
            "ttft_samples": len(tally.ttft), "disconnects": c["disconnects"],
            "hostile": total_hostile, "hostile_4xx": four, "hostile_as_expected": expected,
            "hostile_otherwise": total_hostile - expected, "hostile_by_kind": by_kind,
            "no_answer": unanswered, "drained_after": drained, "rss_bytes": rss, "rss_growth": growth,
            "prefix_cache_filled": cache_full, "first_errors": tally.errors}



def markdown(res: dict, args, command: str, env_md: str) -> list[str]:
    s = res["summary"]
    ms = (lambda x: f"{x * 1000:.0f} ms" if x is not None else "n/a")
    mib = (lambda x: f"{x / 2**20:.1f} MiB" if x is not None else "n/a")
    rss = s["rss_bytes"]
    growth = f"{s['rss_growth'] * 100:+.1f}%" if s["rss_growth"] is not None else "n/a"
    rows = [("clients x seconds", f"{args.clients} x {s['seconds']:.0f} s"),
            ("requests / s", f"{s['requests_per_s']:.1f} ({s['requests']} requests)"),
            ("tokens / s", f"{s['tokens_per_s']:.1f} ({s['tokens']} completion tokens)"),
            ("time to first token p50 / p99 (well-formed streams)",
             f"{ms(s['ttft_p50_s'])} / {ms(s['ttft_p99_s'])} ({s['ttft_samples']} streams)"),
            ("errors among well-formed requests (target 0)", f"{s['well_formed_errors']} of {s['well_formed']}"),
            ("hostile answered as expected / 4xx / otherwise",
             f"{s['hostile_as_expected']} / {s['hostile_4xx']} / {s['hostile_otherwise']} of {s['hostile']}"),
            ("requests without an answer (target 0)", str(s["no_answer"])),
            ("disconnected mid-request; engine drained after", f"{s['disconnects']}; {s['drained_after']}"),
            ("server RSS start / cache full / end", f"{mib(rss['start'])} / {mib(rss['cache_full'])} / "
                                                     f"{mib(rss['end'])} ({growth}; target within 10%)"
             + ("" if s["prefix_cache_filled"] else "; the prefix cache never filled: middle sample"))]
    lines = ["# Load test of the OpenAI-compatible server", "", f"`{command}`", "", env_md.rstrip(),
             f"- model: {res['model']}; server: `hybridlm serve --threads {args.threads} --prefix-cache "
             f"{args.prefix_cache} --read-timeout {args.read_timeout:g}` on 127.0.0.1", "",
             "| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows),
             f"| tracebacks in the server's log (target 0) | {res['server_tracebacks']} |", "",
             "| hostile request | expected | answers |", "|---|---|---|"]
    for kind, counts in s["hostile_by_kind"].items():
        got = ", ".join(f"{n} x {'no answer' if st == 'None' else st}" for st, n in sorted(counts.items())) or "none"
        lines.append(f"| {kind} | {HOSTILE[kind][1]} | {got} |")
    if s["first_errors"]:
        lines += ["", "First errors among well-formed requests:", *(f"- {e}" for e in s["first_errors"])]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    ap.add_argument("--model", default="", help="checkpoint directory (default: a tiny seeded random one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hostile", type=float, default=0.2, help="share of hostile requests (10%% disconnect, the "
                                                                  "rest are well-formed)")
    ap.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: torch's default)")
    ap.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens a client asks for")
    ap.add_argument("--prefix-cache", default="8MB", help="the server's prefix cache (small, so it fills)")
    ap.add_argument("--read-timeout", type=float, default=3.0, help="the server's --read-timeout (half-sent bodies)")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request counts unanswered")
    ap.add_argument("--out", default="benchmarks/results/load")
    args = ap.parse_args()

    from hybridlm.bench import environment, environment_md

    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_checkpoint(Path(tmp) / MODEL, args.seed))
        server = Server(model, args)
        tally, monitor = Tally(), Monitor(server)
        rss_start = rss_bytes(server.proc.pid)
        monitor.start()
        t0 = time.time()
        threads = [threading.Thread(target=client_loop, args=(i, server.url, t0 + args.duration, tally, args))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.time() - t0
        drained = server.drained(30)
        monitor.stopped.set()
        monitor.join()
        rss_end = rss_bytes(server.proc.pid)
        full, filled = rss_when_cache_full(monitor.samples)
        exit_code, log = server.stop()
    summary = summarise(tally, seconds, {"start": rss_start, "cache_full": full, "end": rss_end}, drained, filled)
    command = "python " + " ".join(sys.argv)
    res = {"command": command, "env": env, "model": args.model or f"{MODEL} (random, seed {args.seed})",
           "args": vars(args), "server_exit_code": exit_code, "server_tracebacks": log.count("Traceback"),
           "server_log_tail": log[-3000:], "summary": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = markdown(res, args, command, environment_md(env))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
