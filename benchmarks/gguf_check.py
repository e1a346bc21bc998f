"""GGUF both ways, end to end with llama.cpp (issue 13's full check; needs benchmarks/build_llama_cpp.sh's build).

1. ``hybridlm export`` writes the checkpoint as bf16 and Q8_0 GGUF files;
2. llama.cpp's own server loads each and decodes greedily from a prompt; hybridlm decodes greedily from the
   same ids, from the same GGUF file: the token ids must agree for every step (32 by default);
3. hybridlm loads each file back: bf16 gives the checkpoint's logits exactly, Q8_0 lands on int8 g32 without
   a second rounding (``hybridlm inspect`` says which path each tensor took).

    python benchmarks/gguf_check.py runs/quickstart            # a trained checkpoint: `hybridlm train --out ...`
    python benchmarks/gguf_check.py runs/quickstart --steps 64 --out /tmp/gguf-check

And a GGUF made elsewhere (llama.cpp's converter + llama-quantize) against the checkpoint it came from, both
loaded by hybridlm, on the same token ids (load time, peak RSS, logits, greedy tokens):

    python benchmarks/gguf_check.py --compare ckpt/model-Q8_0.gguf ckpt --quantize int8:g32:fp32

Prints one line per file and exits 1 on a mismatch. The tokens printed are the evidence; the numbers go into
benchmarks/results/gguf.md by hand, with the command.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hybridlm.bench import environment                      # noqa: E402
from hybridlm.model import HybridLM                         # noqa: E402
from hybridlm.tokenizer import load_tokenizer               # noqa: E402

PROMPT = "def fibonacci(n):\n    "


def llama_cpp_root() -> Path:
    return Path(os.environ.get("HYBRIDLM_LLAMA_CPP", Path.home() / ".cache" / "hybridlm" / "llama.cpp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp_greedy(server: Path, gguf: Path, ids: list[int], steps: int) -> tuple[list[int], str]:
    """Greedy tokens from llama.cpp's server for a prompt given as token ids."""
    port = free_port()
    proc = subprocess.Popen([str(server), "-m", str(gguf), "--port", str(port), "-t", "2", "-c", "1024",
                             "-np", "1", "--no-warmup"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        body = {"prompt": ids, "n_predict": steps, "temperature": 0.0, "return_tokens": True, "cache_prompt": False,
                "ignore_eos": True}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=600).read())
        return reply["tokens"], reply["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ours_greedy(model, ids: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=steps)
    return out[0, len(ids):].tolist()


def compare(args):
    """The GGUF and the checkpoint, each loaded in a child process (its own peak RSS), on the same ids."""
    env = environment()
    print(f"CPU {env.get('cpu')} | flags {env.get('cpu_flags')} | torch {torch.__version__}")
    ids = list(range(100, 100 + 24))                       # token ids, the same for both (no tokenizer involved)
    results = {}
    for name, spec, scheme in (("gguf", args.compare, ""), ("checkpoint", args.checkpoint, args.quantize)):
        code = ("import json, resource, sys, time, torch\n"
                "from hybridlm.checkpoint import load_model\n"
                "t0 = time.perf_counter(); m = load_model(sys.argv[1], quantize=sys.argv[2] or None)\n"
                "load = time.perf_counter() - t0\n"
                "x = torch.tensor([json.loads(sys.argv[3])])\n"
                "with torch.no_grad(): logits = m(x)[0, -1].float()\n"
                "out = m.generate(x, max_new_tokens=16)[0, x.shape[1]:].tolist()\n"
                "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
                "torch.save(logits, sys.argv[4])\n"
                "print(json.dumps({'load_s': load, 'rss_gib': rss, 'greedy': out}))\n")
        tmp = Path(args.out) / f"{name}-logits.pt"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-c", code, spec, scheme, json.dumps(ids), str(tmp)], capture_output=True,
                           text=True)
        if r.returncode:
            sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
        results[name] = {**json.loads(r.stdout.strip().splitlines()[-1]), "logits": torch.load(tmp)}
        print(f"{name:10s} {spec} {scheme}: loaded in {results[name]['load_s']:.1f} s, peak RSS "
              f"{results[name]['rss_gib']:.2f} GiB; greedy {results[name]['greedy']}")
    a, b = results["gguf"]["logits"], results["checkpoint"]["logits"]
    agree = sum(x == y for x, y in zip(results["gguf"]["greedy"], results["checkpoint"]["greedy"]))
    print(f"last-position logits: max |diff| {(a - b).abs().max().item():.4g} (logits span {b.min().item():.3g} .. "
          f"{b.max().item():.3g}); greedy tokens agree {agree}/16")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a hybridlm checkpoint directory with its tokenizer")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="/tmp/hybridlm-gguf-check")
    ap.add_argument("--types", default="bf16,q8_0")
    ap.add_argument("--compare", default="", help="a GGUF file to compare with CHECKPOINT (no llama.cpp needed)")
    ap.add_argument("--quantize", default="", help="with --compare: the scheme CHECKPOINT loads into")
    args = ap.parse_args()
    if args.compare:
        return compare(args)
    server = llama_cpp_root() / "build" / "bin" / "llama-server"
    if not server.exists():
        sys.exit(f"llama.cpp's llama-server is not at {server}: run benchmarks/build_llama_cpp.sh first")
    env = environment()
    print(f"CPU {env.get('cpu')} | flags {env.get('cpu_flags')} | torch {torch.__version__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.checkpoint)
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(PROMPT)
    ref = HybridLM.from_pretrained(args.checkpoint)
    ok = True
    for kind in args.types.split(","):
        path = out / f"model-{kind}.gguf"
        cmd = [sys.executable, "-m", "hybridlm", "export", args.checkpoint, "--gguf", str(path), "--type", kind,
               "--overwrite"]
        print("$ " + " ".join(cmd[2:]).replace("-m hybridlm", "hybridlm"))
        subprocess.run(cmd, check=True)
        model = HybridLM.from_pretrained(path)
        ours = ours_greedy(model, ids, args.steps)
        theirs, text = llama_cpp_greedy(server, path, ids, args.steps)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        match = ours == theirs
        ok &= match
        with torch.no_grad():
            x = torch.tensor([ids])
            diff = (model(x).float() - ref(x).float()).abs().max().item()
        print(f"{kind}: {path.stat().st_size / 2**20:.1f} MiB; greedy tokens agree for {same}/{args.steps} steps "
              f"({'MATCH' if match else 'MISMATCH'}); max |logits - checkpoint's| {diff:.3g}")
        print(f"  hybridlm : {ours}")
        print(f"  llama.cpp: {theirs}")
        print(f"  text     : {text!r}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
