"""Multi-turn chat time to first token, hybridlm's server side by side with llama.cpp's ``llama-server`` on the
same weights, over a conversation that grows past 8K tokens, and across a server restart (issue 14, part 3).

Each side is a server process on 127.0.0.1 (a free port), driven through ``/v1/chat/completions`` with
streaming; TTFT is the time from sending a request to the first chunk whose ``delta.content`` holds text.

1. hybridlm: ``hybridlm serve MODEL --prefix-cache-dir DIR --prefix-cache-disk 4GB`` (a fresh DIR per run).
   ``--turns`` turns (default 10): each user turn adds about ``--turn-tokens`` tokens (default 800) of
   stdlib source (the same text every run), the reply is ``--max-tokens`` (16) greedy tokens and goes back
   into the history as the assistant's message. Then the server is stopped (SIGTERM, then wait: it writes
   the prompt states still queued for disk and exits), started again on the same DIR, and turn N+1 is sent.
   For reference, turn N+1 is then sent again as another client (another API key: nothing of the
   conversation is visible to it), i.e. read from scratch: what the restart would cost without states on disk.
2. llama.cpp: the checkpoint exported by ``hybridlm export MODEL --gguf OUT --type bf16`` (tokenizer and chat
   template in the GGUF), ``llama-server -m OUT -c CTX -t T -np 1 --slot-save-path DIR``, the same
   conversation (its own replies in its history), then ``POST /slots/0?action=save`` after turn N, a restart,
   ``POST /slots/0?action=restore``, and turn N+1. ``timings.cache_n`` (prompt tokens llama.cpp did not
   process again) is recorded per turn. Without a llama.cpp build (``benchmarks/build_llama_cpp.sh``,
   found as quant_bench finds it) this side is skipped, and the report says so.

After each start, both sides get one short unrelated warm-up request (``--no-warmup``: off), so a first
request's one-time costs (thread pools, kernels) are not counted as the restart's; llama.cpp's slot is
restored after its warm-up.

Targets (issue 14): hybridlm's TTFT at every turn N >= 3 within 2x of turn 2's, and turn N+1 after the restart
within 2x of turn N before it.

    python benchmarks/multiturn.py --model /root/runs/quality-25m --threads 2
    python benchmarks/multiturn.py --model /root/runs/quickstart --quick --no-llama

The model's ``max_position_embeddings`` bounds the server's context (``serve --context`` may not exceed it).
When the conversation does not fit, the turns are shortened to fit, and the report says so;
``--context-override N`` instead serves a copy of the checkpoint (symlinked weights) whose config.json says
``max_position_embeddings = N``, allowed only for models without a position encoding (no ``rope_theta``:
Jamba's attention has none, so the number only bounds the cache), and recorded in the results.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_bench import CACHE, llama_cpp_paths  # noqa: E402  (benchmarks/ is not a package)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path("/root/runs/quality-25m")
# the conversation's text: large stdlib modules, in this order, cut into turns at line ends
SOURCES = ("argparse.py", "inspect.py", "typing.py", "pathlib.py", "dataclasses.py", "textwrap.py")
TARGET_FLAT, TARGET_RESTART = 2.0, 2.0
WARMUP = [{"role": "user", "content": "Say hello."}]


# ---- the conversation --------------------------------------------------------------------------------
def stdlib_turns(tok, turns: int, turn_tokens: int) -> list[str]:
    """``turns`` user messages of about ``turn_tokens`` tokens each (whole lines of stdlib source)."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    lines = [line for name in SOURCES for line in (root / name).read_text(encoding="utf-8").splitlines(keepends=True)]
    out, cur, n = [], [], 0
    for line in lines:
        cur.append(line)
        n += len(tok.encode(line))
        if n >= turn_tokens:
            out.append("".join(cur))
            cur, n = [], 0
            if len(out) == turns:
                return out
    sys.exit(f"the stdlib sources hold only {len(out)} turns of {turn_tokens} tokens")


def user_message(i: int, text: str) -> dict:
    return {"role": "user", "content": f"Part {i + 1} of the code:\n\n{text}"}


# ---- processes and HTTP ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30,
              headers: dict | None = None) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        raw = r.read().decode("utf-8", "replace")
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw
    finally:
        conn.close()


class Server:
    """A server process: started, waited for (``/health``), stopped with SIGTERM and waited for."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, env: dict | None = None):
        self.name, self.argv, self.port, self.log_path = name, argv, port, log
        self.env = env
        self.proc = None

    def start(self, timeout: float = 600) -> float:
        t0 = time.perf_counter()
        self.log = open(self.log_path, "a")
        self.log.write(f"\n==== {' '.join(self.argv)}\n")
        self.log.flush()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited with code {self.proc.returncode} while starting; its log "
                         f"({self.log_path}) ends:\n{self.tail()}")
            try:
                status, body = http_json(self.port, "GET", "/health", timeout=5)
                if status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.2)
        self.kill()
        sys.exit(f"{self.name} did not answer /health within {timeout:.0f} s; its log ends:\n{self.tail()}")

    def stop(self, timeout: float = 300) -> dict:
        """SIGTERM, then wait (a graceful exit writes what the server keeps); SIGKILL after ``timeout``."""
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
            killed = False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code, killed = self.proc.wait(), True
        self.log.close()
        return {"seconds": time.perf_counter() - t0, "exit_code": code, "killed": killed}

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def chat(port: int, model: str, messages: list[dict], max_tokens: int, timeout: float = 1800,
         api_key: str = "multiturn", extra: dict | None = None) -> dict:
    """One streamed chat completion: TTFT (first text delta), total time, the reply, usage and timings."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    out = {"ttft_s": None, "content": "", "usage": None, "timings": None, "finish_reason": None}
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read().decode('utf-8', 'replace')[:2000]}")
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                raise RuntimeError(f"error event: {ev['error']}")
            for c in ev.get("choices") or []:
                text = (c.get("delta") or {}).get("content")
                if text:
                    if out["ttft_s"] is None:
                        out["ttft_s"] = time.perf_counter() - t0
                    out["content"] += text
                if c.get("finish_reason"):
                    out["finish_reason"] = c["finish_reason"]
            if ev.get("usage"):
                out["usage"] = ev["usage"]
            if ev.get("timings"):
                out["timings"] = ev["timings"]
        out["total_s"] = time.perf_counter() - t0
    finally:
        conn.close()
    return out


def wait_idle(port: int, ours: bool, timeout: float = 600):
    """Until the server has finished everything a reply leaves behind (hybridlm stores the reply's state
    after the stream ends; llama.cpp's slot is released)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ours:
                _, h = http_json(port, "GET", "/health")
                e = h.get("engine", {}) if isinstance(h, dict) else {}
                if not (e.get("busy") or e.get("waiting") or e.get("prefilling") or e.get("decoding")):
                    return
            else:
                status, slots = http_json(port, "GET", "/slots")
                if status != 200 or not isinstance(slots, list) or not any(s.get("is_processing") for s in slots):
                    return
        except OSError:
            pass
        time.sleep(0.05)


# ---- the two sides -----------------------------------------------------------------------------------
def turn_row(i: int, r: dict, ours: bool) -> dict:
    u, t = r.get("usage") or {}, r.get("timings") or {}
    reused = ((u.get("prompt_tokens_details") or {}).get("cached_tokens") if ours else t.get("cache_n"))
    prompt = u.get("prompt_tokens") if ours or u.get("prompt_tokens") else None
    if not ours and t.get("prompt_n") is not None:
        prompt = t["prompt_n"] + (t.get("cache_n") or 0)
    return {"turn": i, "ttft_s": r["ttft_s"], "total_s": r["total_s"], "prompt_tokens": prompt,
            "reused_tokens": reused, "reply_chars": len(r["content"]), "finish_reason": r["finish_reason"],
            **({"timings": t} if t else {})}


def say(side: str, row: dict, note: str = ""):
    ttft = f"{row['ttft_s']:.3f} s" if row["ttft_s"] is not None else f"no text (end at {row['total_s']:.3f} s)"
    print(f"  [{side}] turn {row['turn']:>2}{note}: TTFT {ttft}, {row['prompt_tokens']} prompt tokens, "
          f"{row['reused_tokens']} reused", flush=True)


def run_side(side: str, server: Server, model_name: str, turns: list[str], max_tokens: int, warmup: bool,
             ours: bool, before_stop=None, after_start=None) -> dict:
    res = {"starts": [], "rows": []}
    res["starts"].append(server.start())
    if warmup:
        chat(server.port, model_name, WARMUP, 2, api_key="warmup")
        wait_idle(server.port, ours)
    history: list[dict] = []
    n = len(turns) - 1                  # the last turn is sent after the restart
    for i in range(n):
        history.append(user_message(i, turns[i]))
        wait_idle(server.port, ours)
        r = chat(server.port, model_name, history, max_tokens)
        row = turn_row(i + 1, r, ours)
        res["rows"].append(row)
        say(side, row)
        history.append({"role": "assistant", "content": r["content"]})
    wait_idle(server.port, ours)
    if ours:
        _, h = http_json(server.port, "GET", "/health")
        res["prefix_cache_before_stop"] = h.get("prefix_cache") if isinstance(h, dict) else None
    if before_stop:
        res["save"] = before_stop(server)
    res["stop"] = server.stop()
    res["starts"].append(server.start())
    if warmup:
        chat(server.port, model_name, WARMUP, 2, api_key="warmup")
        wait_idle(server.port, ours)
    if after_start:
        res["restore"] = after_start(server)
    history.append(user_message(n, turns[n]))
    r = chat(server.port, model_name, history, max_tokens)
    row = turn_row(n + 1, r, ours)
    row["after_restart"] = True
    res["rows"].append(row)
    say(side, row, " after restart")
    if ours:
        wait_idle(server.port, ours)
        _, h = http_json(server.port, "GET", "/health")
        res["prefix_cache_after_restart"] = h.get("prefix_cache") if isinstance(h, dict) else None
        # the same prompt as a client with nothing stored: what the restart costs without states kept
        r = chat(server.port, model_name, history, max_tokens, api_key="cold-reference")
        res["cold_reference"] = turn_row(n + 1, r, ours)
        say(side, res["cold_reference"], " read from scratch (another client)")
    res["final_stop"] = server.stop()
    return res


def ours_side(a, model: Path, name: str, turns: list[str], work: Path, context: int) -> dict:
    cache_dir = work / "prefix-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    port = free_port()
    argv = [sys.executable, "-m", "hybridlm", "serve", str(model), "--port", str(port), "--name", name,
            "--threads", str(a.threads), "--dtype", a.dtype, "--context", str(context),
            "--max-new-tokens", str(max(a.max_tokens, 16)), "--prefix-cache-dir", str(cache_dir),
            "--prefix-cache-disk", a.prefix_cache_disk, "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    server = Server("hybridlm serve", argv, port, work / "hybridlm-serve.log", env)
    try:
        res = run_side("hybridlm", server, name, turns, a.max_tokens, a.warmup, ours=True)
    finally:
        server.kill()
    res["command"] = " ".join(argv)
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    res["disk"] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    first = next((line for line in server.tail(100000).splitlines() if line.startswith("serving ")), None)
    res["banner"] = first
    return res


def llama_side(a, model: Path, turns: list[str], work: Path, context: int) -> dict:
    paths = llama_cpp_paths(a.llama_cpp)
    binary = paths["root"] / "build" / "bin" / "llama-server"
    if not binary.exists():
        return {"skipped": f"no llama-server at {binary} (build it with benchmarks/build_llama_cpp.sh, or point "
                           f"--llama-cpp / HYBRIDLM_LLAMA_CPP at a build)"}
    gguf = work / f"model-{a.gguf_type}.gguf"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "hybridlm", "export", str(model), "--gguf", str(gguf), "--type",
                        a.gguf_type, "--overwrite"], capture_output=True, text=True)
    if r.returncode:
        return {"skipped": f"hybridlm export failed: {(r.stderr or r.stdout)[-2000:]}"}
    export = {"seconds": time.perf_counter() - t0, "output": r.stdout.strip().splitlines()[-1:]}
    slots = work / "llama-slots"
    shutil.rmtree(slots, ignore_errors=True)
    slots.mkdir(parents=True)
    port = free_port()
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", str(context),
            "-t", str(a.threads), "-tb", str(a.threads), "-np", "1", "--slot-save-path", str(slots)]
    server = Server("llama-server", argv, port, work / "llama-server.log")

    def save(s: Server) -> dict:
        t = time.perf_counter()
        status, body = http_json(s.port, "POST", "/slots/0?action=save", {"filename": "multiturn.bin"}, timeout=600)
        return {"status": status, "response": body, "seconds": time.perf_counter() - t}

    def restore(s: Server) -> dict:
        t = time.perf_counter()
        status, body = http_json(s.port, "POST", "/slots/0?action=restore", {"filename": "multiturn.bin"},
                                 timeout=600)
        return {"status": status, "response": body, "seconds": time.perf_counter() - t}

    try:
        res = run_side("llama.cpp", server, gguf.name, turns, a.max_tokens, a.warmup, ours=False,
                       before_stop=save, after_start=restore)
    finally:
        server.kill()
    res["command"] = " ".join(argv)
    res["export"] = export
    src = a.llama_cpp / "SOURCE"
    res["source"] = src.read_text().strip() if src.exists() else None
    v = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    res["build"] = " ".join((v.stdout + v.stderr).split()) or None
    return res


# ---- the context ---------------------------------------------------------------------------------------
def with_context(model: Path, n: int, work: Path) -> Path:
    """A copy of the checkpoint (files symlinked) whose config.json says max_position_embeddings = n."""
    cfg = json.loads((model / "config.json").read_text())
    if cfg.get("rope_theta") is not None or cfg.get("model_type") != "jamba":
        sys.exit(f"--context-override: {model} is not a Jamba model without a position encoding (model_type "
                 f"{cfg.get('model_type')!r}, rope_theta {cfg.get('rope_theta')!r}); its positions past "
                 f"{cfg.get('max_position_embeddings')} would be out of its training")
    out = work / f"{model.name}-ctx{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in model.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith((".pt", ".png", ".jsonl")):
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": n}, indent=2) + "\n")
    return out


# ---- the report ----------------------------------------------------------------------------------------
def ratios(rows: list[dict]) -> dict:
    """Turn N / turn 2 (the flatness target) and the turn after the restart / the turn before it."""
    by = {r["turn"]: r for r in rows}
    out = {}
    before = [r for r in rows if not r.get("after_restart")]
    after = next((r for r in rows if r.get("after_restart")), None)
    if 2 in by and by[2]["ttft_s"]:
        later = [r for r in before if r["turn"] >= 3 and r["ttft_s"] is not None]
        if later:
            worst = max(later, key=lambda r: r["ttft_s"])
            out["flat"] = {"turn": worst["turn"], "ratio": worst["ttft_s"] / by[2]["ttft_s"],
                           "last_ratio": before[-1]["ttft_s"] / by[2]["ttft_s"] if before[-1]["ttft_s"] else None}
    if after and after["ttft_s"] and before and before[-1]["ttft_s"]:
        out["restart"] = {"ratio": after["ttft_s"] / before[-1]["ttft_s"], "before_turn": before[-1]["turn"]}
    return out


def target_lines(side: str, r: dict) -> list[str]:
    lines = []
    if "flat" in r:
        f = r["flat"]
        lines.append(f"{side}: worst turn N >= 3 / turn 2 = {f['ratio']:.2f}x (turn {f['turn']}); target <= "
                     f"{TARGET_FLAT:.0f}x -> {'met' if f['ratio'] <= TARGET_FLAT else 'NOT met'}")
    if "restart" in r:
        x = r["restart"]
        lines.append(f"{side}: turn after restart / turn {x['before_turn']} before = {x['ratio']:.2f}x; target <= "
                     f"{TARGET_RESTART:.0f}x -> {'met' if x['ratio'] <= TARGET_RESTART else 'NOT met'}")
    return lines


def fmt_ttft(row: dict | None) -> str:
    if row is None:
        return "–"
    if row["ttft_s"] is None:
        return f"no text ({row['total_s']:.3f} s to end)"
    return f"{row['ttft_s']:.3f}"


def write_report(res: dict, out: Path):
    from hybridlm.bench import environment_md
    ours, llama = res["hybridlm"], res["llama_cpp"]
    lrows = {r["turn"]: r for r in llama.get("rows", [])}
    load = res.get("load_average_end")
    lines = ["# Multi-turn chat: time to first token per turn, and after a server restart\n",
             f"`{res['command']}` ({res['wall_seconds'] / 60:.1f} min)\n", environment_md(res["env"]).rstrip()]
    if load:
        lines.append(f"- load average at end (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    lines += [f"- model: `{res['model']}` ({res['params'] / 1e6:.1f}M parameters, max_position_embeddings "
              f"{res['max_position_embeddings']}); served context {res['context']}",
              f"- conversation: {res['turns']} turns, user turns of ~{res['turn_tokens']} tokens of stdlib source "
              f"({', '.join(SOURCES)}, in order, cut at line ends), replies of {res['max_tokens']} greedy tokens "
              f"kept in each side's own history; turn {res['turns']} sent after a restart",
              f"- hybridlm: `{ours.get('command', '')}` ({ours.get('banner') or ''})",
              "- llama.cpp: " + (f"`{llama['command']}` ({llama.get('source') or '?'}; {llama.get('build') or '?'}); "
                                 f"GGUF by `hybridlm export --type {res['gguf_type']}`"
                                 if "command" in llama else f"**not run**: {llama.get('skipped')}"),
              "- each side's first request after a start is a short warm-up (not timed)" if res["warmup"] else
              "- no warm-up requests"]
    for note in res["notes"]:
        lines.append(f"- **note**: {note}")
    lines += ["", "| turn | prompt tokens | hybridlm TTFT (s) | reused (hybridlm) | llama.cpp TTFT (s) | "
              "reused (llama.cpp cache_n) |", "|---:|---:|---:|---:|---:|---:|"]
    for r in ours["rows"]:
        lr = lrows.get(r["turn"])
        label = f"{r['turn']} (after restart)" if r.get("after_restart") else str(r["turn"])
        lines.append(f"| {label} | {r['prompt_tokens']} | {fmt_ttft(r)} | {r['reused_tokens']} | {fmt_ttft(lr)} | "
                     f"{lr['reused_tokens'] if lr else '–'} |")
    cold = ours.get("cold_reference")
    if cold:
        lines.append(f"| {cold['turn']} read from scratch (hybridlm, another client) | {cold['prompt_tokens']} | "
                     f"{fmt_ttft(cold)} | {cold['reused_tokens']} | | |")
    lines += ["", "## Against the targets (issue 14)\n"]
    lines += [f"- {x}" for x in res["target_lines"]]
    lines += [f"- (llama.cpp, for comparison) {x}" for x in res["llama_lines"]]
    lines += ["", "## Restarts\n",
              f"- hybridlm: stop (SIGTERM to exit, prompt states flushed to disk) {ours['stop']['seconds']:.2f} s, "
              f"{stop_note(ours['stop'])}; starts "
              + ", ".join(f"{s:.1f} s" for s in ours["starts"]) + f"; on disk after the run: {ours['disk']['files']} "
              f"files, {ours['disk']['bytes'] / 2**20:.1f} MiB"]
    if "command" in llama:
        sv, rs = llama.get("save", {}), llama.get("restore", {})
        lines.append(f"- llama.cpp: `/slots/0?action=save` -> HTTP {sv.get('status')} "
                     f"{json.dumps(sv.get('response'))}; "
                     f"after the restart `/slots/0?action=restore` -> HTTP {rs.get('status')} "
                     f"{json.dumps(rs.get('response'))}; stop {llama['stop']['seconds']:.2f} s; starts "
                     + ", ".join(f"{s:.1f} s" for s in llama["starts"]))
    lines += ["", paragraph(res)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def stop_note(stop: dict) -> str:
    if stop["killed"]:
        return "did not exit in time: killed, so states still queued for disk were lost"
    if stop["exit_code"] == -signal.SIGTERM:
        return "exit code -15 (uvicorn re-raises SIGTERM after its graceful shutdown)"
    return f"exit code {stop['exit_code']}"


def paragraph(res: dict) -> str:
    ours, llama = res["hybridlm"], res["llama_cpp"]
    rows = [r for r in ours["rows"] if not r.get("after_restart")]
    after = next(r for r in ours["rows"] if r.get("after_restart"))
    parts = []
    if rows and rows[0]["ttft_s"] and rows[-1]["ttft_s"]:
        parts.append(f"hybridlm's TTFT goes from {rows[0]['ttft_s']:.2f} s at turn 1 ({rows[0]['prompt_tokens']} "
                     f"prompt tokens, nothing stored) to {rows[-1]['ttft_s']:.2f} s at turn {rows[-1]['turn']} "
                     f"({rows[-1]['prompt_tokens']} prompt tokens, {rows[-1]['reused_tokens']} of them reused).")
    if after["ttft_s"] is not None:
        cold = ours.get("cold_reference") or {}
        parts.append(f"After the restart, turn {after['turn']} reused {after['reused_tokens']} of "
                     f"{after['prompt_tokens']} prompt tokens from disk and took {after['ttft_s']:.2f} s" +
                     (f", against {cold['ttft_s']:.2f} s read from scratch." if cold.get("ttft_s") else "."))
    if "rows" in llama:
        lr = [r for r in llama["rows"] if not r.get("after_restart")]
        la = next((r for r in llama["rows"] if r.get("after_restart")), None)
        if lr and lr[-1]["ttft_s"] and la and la["ttft_s"]:
            parts.append(f"llama.cpp: turn {lr[-1]['turn']} {lr[-1]['ttft_s']:.2f} s ({lr[-1]['reused_tokens']} "
                         f"tokens reused), and after its restart with the slot restored, turn {la['turn']} "
                         f"{la['ttft_s']:.2f} s ({la['reused_tokens']} reused).")
    else:
        parts.append(f"llama.cpp was not run: {llama.get('skipped')}.")
    return " ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help=f"checkpoint directory (default {DEFAULT_MODEL})")
    ap.add_argument("--turns", type=int, default=11, help="turns in all, the last one after the restart")
    ap.add_argument("--turn-tokens", type=int, default=800, help="tokens of source per user turn")
    ap.add_argument("--max-tokens", type=int, default=16, help="reply tokens per turn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", help="hybridlm's weight dtype (the GGUF is --gguf-type)")
    ap.add_argument("--gguf-type", default="bf16")
    ap.add_argument("--context", type=int, default=16384, help="served context (capped by the model's)")
    ap.add_argument("--context-override", type=int, default=0,
                    help="serve a copy whose max_position_embeddings is this (models without a position encoding)")
    ap.add_argument("--prefix-cache-disk", default="4GB")
    ap.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("HYBRIDLM_LLAMA_CPP", CACHE / "llama.cpp")))
    ap.add_argument("--no-llama", action="store_true", help="hybridlm only")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--workdir", type=Path, default=None, help="GGUF, state directories, server logs "
                    "(default: a fresh temporary directory, removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep --workdir")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--out", type=Path, default=None, help="results file stem (default: benchmarks/results/"
                    "multiturn; with --quick, a temporary directory)")
    a = ap.parse_args()
    if a.quick:
        a.turns, a.turn_tokens, a.max_tokens = 4, 48, 4
    if a.turns < 3:
        sys.exit("--turns must be >= 3 (turn 2 is the reference, the last turn follows the restart)")
    if a.out is None:
        a.out = (Path(tempfile.gettempdir()) / "hybridlm-quick" / "multiturn") if a.quick else \
            REPO / "benchmarks" / "results" / "multiturn"
    model = a.model or DEFAULT_MODEL
    if not (model / "config.json").exists():
        sys.exit(f"{model}: no config.json (not a saved checkpoint{'' if a.model else '; pass --model DIR'})")
    t_start = time.perf_counter()
    from hybridlm.bench import environment, load_average
    from hybridlm.checkpoint import load_model
    from hybridlm.tokenizer import load_tokenizer
    import torch
    torch.set_num_threads(a.threads)
    env = environment()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="hybridlm-multiturn-"))
    work.mkdir(parents=True, exist_ok=True)
    notes = []
    try:
        served = with_context(model, a.context_override, work) if a.context_override else model
        if a.context_override:
            own = json.loads((model / "config.json").read_text())["max_position_embeddings"]
            notes.append(f"served a copy of the checkpoint with max_position_embeddings = {a.context_override} "
                         f"(the checkpoint says {own}"
                         f"; Jamba's attention has no position encoding, so this only bounds the cache; the model was "
                         f"trained on shorter sequences)")
        m = load_model(served, device="meta")
        cap = m.config.max_position_embeddings
        tok = load_tokenizer(served)
        context = min(a.context, cap)
        per_turn = a.turn_tokens + 16 + a.max_tokens         # chat-template tokens and the reply, roughly
        fits = (context - a.max_tokens - 64) // a.turns - 16 - a.max_tokens
        if per_turn * a.turns + 64 > context:
            if fits < 16:
                sys.exit(f"context {context} holds no {a.turns}-turn conversation")
            notes.append(f"the model's max_position_embeddings is {cap}: the conversation ({a.turns} turns of "
                         f"~{a.turn_tokens} tokens) does not fit, so turns were shortened to ~{fits} tokens "
                         f"(pass --context-override 16384 to serve a copy with a larger context)")
            print("note:", notes[-1], file=sys.stderr)
            a.turn_tokens = fits
        turns = stdlib_turns(tok, a.turns, a.turn_tokens)
        name = served.name
        print(f"model {served} ({m.num_params() / 1e6:.1f}M parameters), context {context}, {a.turns} turns of "
              f"~{a.turn_tokens} tokens; work dir {work}", flush=True)
        ours = ours_side(a, served, name, turns, work, context)
        llama = {"skipped": "--no-llama"} if a.no_llama else llama_side(a, served, turns, work, context)
        if "skipped" in llama:
            print(f"llama.cpp side not run: {llama['skipped']}", file=sys.stderr)
        res = {"command": " ".join(["python", "benchmarks/multiturn.py", *sys.argv[1:]]), "env": env,
               "model": str(model), "served": str(served), "params": m.num_params(), "max_position_embeddings": cap,
               "context": context, "turns": a.turns, "turn_tokens": a.turn_tokens, "max_tokens": a.max_tokens,
               "threads": a.threads, "dtype": a.dtype, "gguf_type": a.gguf_type, "warmup": a.warmup, "notes": notes,
               "hybridlm": ours, "llama_cpp": llama, "ratios": {"hybridlm": ratios(ours["rows"])}}
        if "rows" in llama:
            res["ratios"]["llama_cpp"] = ratios(llama["rows"])
        res["target_lines"] = target_lines("hybridlm", res["ratios"]["hybridlm"])
        res["llama_lines"] = target_lines("llama.cpp", res["ratios"].get("llama_cpp", {}))
        res["load_average_end"] = load_average()
        res["wall_seconds"] = time.perf_counter() - t_start
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        write_report(res, a.out)
        print()
        for line in res["target_lines"]:
            print(line)
        for line in res["llama_lines"]:
            print("(llama.cpp, for comparison)", line)
        print(f"wrote {a.out.with_suffix('.md')} and {a.out.with_suffix('.json')}")
    finally:
        if a.workdir is None and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif a.workdir is None:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
