"""The long fuzz run over the malformed-input corpus (issue 16, part 7).

It drives the strategies and the per-example checks of the CI fuzz tests (tests/test_malformed.py for
safetensors files, tests/test_fuzz.py for snapshots, config.json, chat templates and server request
bodies) with many more examples and a random seed, and instead of stopping at the first failure it
classifies every example:

    ok         loaded / rendered / answered correctly
    refused    refused with a clear error: a ValueError (OSError for a checkpoint) naming the file, a
               template's ValueError, or a 4xx in OpenAI's error format for a request
    unclear    refused with the promised type, but the message does not name the file   (must be 0)
    wrong      a wrong result: the check's assertion failed                             (must be 0)
    traceback  any other exception escaped hybridlm (for a request: a 5xx)              (must be 0)
    hang       the example took longer than --time-bound seconds                        (must be 0)
    memory     the process's peak RSS grew more than --memory-bound MiB during the example, or an
               allocation past the address-space cap raised MemoryError                 (must be 0)

Peak RSS growth is measured per example by resetting Linux's high-water mark (``hybridlm.bench.PeakRSS``)
before it and reading it after. The inputs are small (a safetensors file under 1 KB, a 2-layer model),
so the 256 MiB default bound is far above what a correct refusal or load needs and far below the GBs of
the unbounded allocations issue 16 found. The address space is capped (--address-space GiB above the
start) so that such an allocation raises instead of taking the machine. An example still running after
max(60 s, 6 x --time-bound) is a hang that never returns: the results so far are written, with it, and
the script exits 3.

    python benchmarks/fuzz.py --examples 1000 --out benchmarks/results/fuzz
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))        # the strategies and checks live in tests/

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hybridlm.bench import PeakRSS, _status_kib, environment, environment_md  # noqa: E402
from tests import test_fuzz as tf  # noqa: E402
from tests import test_malformed as tm  # noqa: E402

OUTCOMES = ["ok", "refused", "unclear", "wrong", "traceback", "hang", "memory"]
MUST_BE_ZERO = ["unclear", "wrong", "traceback", "hang", "memory"]
CLASSES = ["safetensors", "snapshots", "config.json", "chat templates", "request bodies"]
SHOWN = 5            # failing inputs kept per class
REPR_CHARS = 2000    # of each kept input in the JSON (the table shows 200)


@contextlib.contextmanager
def fuzz_targets(directory: Path):
    """{class: (strategy, check(example) -> "ok" | "refused", show(example) -> str)}, built as the tests'
    fixtures build them."""
    model = tf.make_model()
    valid = tf.save_valid_snapshot(model, directory)
    ckpt, base = tf.make_config_checkpoint(directory / "ckpt")
    with tf.serving_client(directory) as client:
        yield {
            "safetensors": (tm.mutated_files(), lambda data: tm.check_mutated_file(directory, data), repr),
            "snapshots": (tf.snapshot_edits(), lambda edit: tf.check_snapshot(model, valid, directory, edit), repr),
            "config.json": (tf.config_texts(base), lambda text: tf.check_config(ckpt, text),
                            lambda text: config_change(base, text)),
            "chat templates": (st.tuples(tf.TEMPLATES, st.booleans()), lambda x: tf.check_template(*x), repr),
            "request bodies": (tf.request_bodies(), lambda sent: tf.check_request(client, sent), repr),
        }


def config_change(base: dict, text: str) -> str:
    """A config.json example as its change to the valid one (the whole text would hide it)."""
    try:
        d = json.loads(text)
    except ValueError:
        return repr(text)
    if not isinstance(d, dict):
        return repr(text)
    changed = {k: v for k, v in d.items() if k not in base or base[k] != v}
    return f"set {changed!r}, removed {sorted(set(base) - set(d))}"


def classify(check, example) -> tuple[str, str | None]:
    """(outcome, error) of one example, from what the check returned or raised."""
    try:
        return check(example), None
    except MemoryError as e:
        return "memory", repr(e)
    except Exception as e:  # noqa: BLE001 (classified here)
        kind = ("unclear" if isinstance(e, tm.Unclear) else "traceback" if isinstance(e, tf.ServerError)
                else "wrong" if isinstance(e, AssertionError) else "traceback")
        return kind, f"{type(e).__name__}: {e}"[:REPR_CHARS]


class Run:
    """The tally of every class, and a watchdog that writes it and exits if one example never returns."""

    def __init__(self, args, write):
        self.args, self.write = args, write
        self.results: dict[str, dict] = {}
        self.current: tuple | None = None     # (class, started, shown input) while an example runs
        self.hard_limit = max(60.0, 6 * args.time_bound)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            time.sleep(1.0)
            cur = self.current
            if cur is not None and time.perf_counter() - cur[1] > self.hard_limit:
                self.record(cur[0], cur[2], "hang", time.perf_counter() - cur[1], 0,
                            f"still running after {self.hard_limit:.0f} s; the run stopped here")
                self.write(self.results, stopped=True)
                os._exit(3)

    def record(self, name, shown: str, outcome, seconds, growth, error):
        r = self.results.setdefault(name, {"tried": 0, "outcomes": dict.fromkeys(OUTCOMES, 0), "slowest_s": 0.0,
                                           "slowest_input": None, "max_rss_growth_mib": 0.0, "seconds": 0.0,
                                           "failures": []})
        r["tried"] += 1
        r["outcomes"][outcome] += 1
        r["seconds"] += seconds
        r["max_rss_growth_mib"] = max(r["max_rss_growth_mib"], growth / 2**20)
        if seconds > r["slowest_s"]:
            r["slowest_s"], r["slowest_input"] = seconds, shown[:REPR_CHARS]
        if outcome in MUST_BE_ZERO and len(r["failures"]) < SHOWN:
            r["failures"].append({"outcome": outcome, "input": shown[:REPR_CHARS], "error": error})

    def fuzz(self, name, strategy, check, show):
        """Run ``check`` on --examples examples of ``strategy`` (or until --seconds), classifying each."""
        args = self.args
        t_end = time.perf_counter() + (args.seconds or float("inf"))

        @seed(args.seed)
        @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(example=strategy)
        def one(example):
            if time.perf_counter() > t_end:
                return                       # out of time: the remaining examples are drawn, not run
            self.current = (name, time.perf_counter(), show(example))
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                outcome, error = classify(check, example)
                seconds = time.perf_counter() - t0
            self.current = None
            growth = peak.bytes - peak.start if peak.exact else 0
            if outcome not in MUST_BE_ZERO:
                if seconds > args.time_bound:
                    outcome, error = "hang", f"took {seconds:.3g} s (bound {args.time_bound:g} s)"
                elif growth > args.memory_bound * 2**20:
                    outcome, error = "memory", f"peak RSS grew {growth / 2**20:.1f} MiB (bound {args.memory_bound} MiB)"
            self.record(name, show(example), outcome, seconds, growth, error)
        one()


def markdown(res: dict) -> list[str]:
    a = res["args"]
    lines = ["# Fuzz run over the malformed-input corpus", "", f"`{res['command']}`", "", f"- date: {res['date']}",
             environment_md(res["env"]).rstrip(),
             f"- seed {a['seed']}; up to {a['examples']} examples per class"
             + (f" or {a['seconds']:g} s" if a["seconds"] else "")
             + f"; time bound {a['time_bound']:g} s, peak-RSS growth bound {a['memory_bound']} MiB per example"
             + ("" if res["rss_exact"] else " (NOT measured: this kernel cannot reset the RSS high-water mark)")
             + ("; STOPPED at a hang" if res.get("stopped") else ""), "",
             "Generators: `mutated_files` (tests/test_malformed.py), `snapshot_edits`, `config_texts`, the chat "
             "template pieces and `request_bodies` (tests/test_fuzz.py); the checks are those tests' `check_*`.", "",
             "| input class | tried | " + " | ".join(OUTCOMES) + " | slowest | max RSS growth | total |",
             "|---|" + "---:|" * (len(OUTCOMES) + 4)]
    for name, r in res["classes"].items():
        lines.append(f"| {name} | {r['tried']} | " + " | ".join(str(r["outcomes"][o]) for o in OUTCOMES)
                     + f" | {r['slowest_s']:.2f} s | {r['max_rss_growth_mib']:.1f} MiB | {r['seconds']:.1f} s |")
    lines += ["", "Must be 0: " + ", ".join(MUST_BE_ZERO) + f" (total {res['must_be_zero']})."]
    for name, r in res["classes"].items():
        lines += ["", f"Slowest {name} example ({r['slowest_s']:.2f} s): `{(r['slowest_input'] or '')[:200]}`"]
        if r["failures"]:
            lines += [f"First failing {name} inputs:"]
            lines += [f"- {f['outcome']}: `{f['input'][:200]}` -> {(f['error'] or '')[:300]}" for f in r["failures"]]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="examples per input class")
    ap.add_argument("--seconds", type=float, default=0.0, help="also stop a class after this many seconds (0: no)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", default=",".join(CLASSES), help="comma-separated subset of: " + ", ".join(CLASSES))
    ap.add_argument("--time-bound", type=float, default=10.0, help="seconds per example (over it: a hang)")
    ap.add_argument("--memory-bound", type=int, default=256, help="MiB of peak-RSS growth per example")
    ap.add_argument("--address-space", type=float, default=8.0, help="GiB of address space above the start")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: 1 is fastest)")
    ap.add_argument("--out", default="benchmarks/results/fuzz")
    args = ap.parse_args()
    classes = [c.strip() for c in args.classes.split(",")]
    if unknown := set(classes) - set(CLASSES):
        ap.error(f"unknown classes {sorted(unknown)}; choose from {CLASSES}")
    torch.set_num_threads(args.threads)
    env = environment()
    command = "python " + " ".join(sys.argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(results: dict, stopped: bool = False) -> dict:
        res = {"command": command, "date": date, "env": env, "args": vars(args), "rss_exact": exact, "stopped": stopped,
               "outcomes": OUTCOMES, "must_be_zero_outcomes": MUST_BE_ZERO, "classes": results,
               "must_be_zero": sum(r["outcomes"][o] for r in results.values() for o in MUST_BE_ZERO)}
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        lines = markdown(res)
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        return res

    with PeakRSS() as probe:
        exact = probe.exact
    size = (_status_kib("VmSize") or 0) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + int(args.address_space * 2**30), resource.RLIM_INFINITY))
    run = Run(args, write)
    with tempfile.TemporaryDirectory() as tmp, fuzz_targets(Path(tmp)) as targets:
        for name in classes:
            t0 = time.perf_counter()
            run.fuzz(name, *targets[name])
            r = run.results.get(name, {"tried": 0})
            print(f"{name}: {r['tried']} examples in {time.perf_counter() - t0:.0f} s", flush=True)
    res = write(run.results)
    return 1 if res["must_be_zero"] else 0


if __name__ == "__main__":
    sys.exit(main())
