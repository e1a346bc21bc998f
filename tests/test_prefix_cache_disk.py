"""Prompt states on disk (issue 14 part 3): a new PrefixCache on the same directory (a restarted server)
finds a stored conversation and continues it exactly as a cold run does; the directory stays under its
byte budget, least recently used first; corrupted, truncated, foreign and stray files are skipped with a
warning, never trusted; two models' directories do not cross."""
import logging
import os

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.generate import Generation, Sampling, decode_step, stream
from hybridlm.prefix_cache import PrefillJob, PrefixCache, SnapshotDir, remember_reply

V = 101
LAYOUT = "mMaMwMmM"   # Mamba, MoE, full and sliding-window attention


def make_model(seed=0):
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, mamba_d_state=8, layout=LAYOUT, sliding_window=6)
    return HybridLM(cfg).init_weights(seed).eval()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return make_model(0)


def tokens(n, seed=0):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(model, cache, logits, n):
    gen = Generation(max_new_tokens=n, sampling=Sampling(0.0))
    return [int(t[0]) for t in stream(model, torch.zeros(1, 0, dtype=torch.long), gen, cache=cache, logits=logits)]


def cold(model, ids, n):
    gen = Generation(max_new_tokens=n, sampling=Sampling(0.0))
    return [int(t[0]) for t in stream(model, torch.tensor([ids]), gen)]


def on_disk(path, budget, model, memory=64 << 20, background=True):
    return PrefixCache(memory, SnapshotDir(path, budget, model, background=background))


def one_turn(model, store, prompt, n=6):
    """Prefill ``prompt`` through ``store``, reply greedily with ``n`` tokens, store the state after the reply."""
    job = PrefillJob(model, prompt, len(prompt) + n + 1, store).run()
    reply, logits = [], job.logits
    for _ in range(n):
        reply.append(int(logits.argmax(-1)))
        if len(reply) < n:
            logits = decode_step(model, job.cache, torch.tensor([reply[-1]]))
    remember_reply(model, job.cache, prompt + reply, reply[-1], store)
    return job, reply


def state_files(path):
    return sorted(p for p in path.iterdir() if p.name.endswith(".safetensors"))


@pytest.mark.parametrize("background", [True, False])
def test_a_restarted_cache_continues_a_conversation_as_a_cold_run(model, tmp_path, background):
    prompt = tokens(30, seed=1)
    first = on_disk(tmp_path, 1 << 30, model, background=background)
    _, reply = one_turn(model, first, prompt)
    first.close()      # a server that stops writes what is queued
    # "restart": a new model object with the same weights, a new cache over the same directory, nothing in memory
    again = make_model(0)
    store = on_disk(tmp_path, 1 << 30, again)
    assert len(store) == 0 and len(store.disk) == 2          # the prompt's state and the reply's
    turn2 = prompt + reply + tokens(9, seed=2)
    job = PrefillJob(again, turn2, len(turn2) + 12, store).run()
    assert job.reused == len(prompt) + len(reply)
    assert store.stats()["disk"]["loads"] == 1 and len(store) >= 1   # now also in memory
    assert greedy(again, job.cache, job.logits, 12) == cold(again, turn2, 12)
    # the whole prompt stored: no model call, the stored logits continue it
    store.close()
    store2 = on_disk(tmp_path, 1 << 30, make_model(0))
    whole = PrefillJob(again, turn2, len(turn2) + 12, store2)
    assert whole.done and whole.reused == len(turn2)
    assert greedy(again, whole.cache, whole.logits, 12) == cold(again, turn2, 12)


def test_only_memory_or_only_disk(model, tmp_path):
    """Memory budget 0 keeps states on disk only; a lookup still finds them."""
    store = on_disk(tmp_path, 1 << 30, model, memory=0)
    ids = tokens(20, seed=3)
    PrefillJob(model, ids, 32, store).run()
    store.disk.flush()
    assert len(store) == 0 and len(store.disk) == 1
    assert PrefillJob(model, ids + [1, 2], 32, store).run().reused == 20


def test_eviction_keeps_the_disk_under_budget_least_recently_used_first(model, tmp_path):
    ids = tokens(40, seed=4)
    probe = on_disk(tmp_path / "probe", 1 << 30, model)
    PrefillJob(model, ids[:40], 48, probe).run()
    probe.disk.flush()
    size = state_files(tmp_path / "probe")[0].stat().st_size   # the largest state stored below
    budget = 3 * size
    store = on_disk(tmp_path / "d", budget, model)
    for n in (10, 20, 30):
        PrefillJob(model, ids[:n], 48, store).run()
    store.disk.flush()
    os.utime(state_files(tmp_path / "d")[0], ns=(1, 1))   # file times are the order after a restart: make them distinct
    store.lookup(ids[:12])            # touches the 10-token state: the 20-token one is now the least recent
    PrefillJob(model, ids[:40], 48, store).run()
    store.disk.flush()
    files = state_files(tmp_path / "d")
    assert sum(p.stat().st_size for p in files) <= budget and store.disk.nbytes <= budget
    assert sorted(len(k) for k in store.disk._files) == [10, 30, 40] and store.disk.evictions == 1
    # a restart with a smaller budget evicts down to it, by the files' use order
    small = on_disk(tmp_path / "d", budget - size, model)
    assert sum(p.stat().st_size for p in state_files(tmp_path / "d")) <= budget - size
    assert sorted(len(k) for k in small.disk._files) == [10, 40]
    # a state larger than the whole budget is not written
    tiny = on_disk(tmp_path / "t", 100, model)
    PrefillJob(model, ids[:10], 16, tiny).run()
    tiny.disk.flush()
    assert state_files(tmp_path / "t") == [] and len(tiny.disk) == 0


def test_corrupt_truncated_foreign_and_stray_files_are_skipped_with_a_warning(model, tmp_path, caplog):
    ids = tokens(40, seed=5)
    store = on_disk(tmp_path, 1 << 30, model)
    PrefillJob(model, ids, 48, store, boundaries=[10, 20, 30]).run()
    store.close()
    by_len = {len(k): f.path for k, f in store.disk._files.items()}
    assert sorted(by_len) == [10, 20, 30, 40]
    # 40: a bit flipped in a tensor (the header stays valid): only the checksum can tell
    raw = bytearray(by_len[40].read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little") + 1] ^= 0x10     # a mantissa bit of the first state tensor
    by_len[40].write_bytes(bytes(raw))
    # 30: truncated (a crash mid-copy)
    by_len[30].write_bytes(by_len[30].read_bytes()[:-100])
    # a file of another model with weights of the same shapes, under a name it would have here
    other = make_model(1)
    theirs = on_disk(tmp_path / "other", 1 << 30, other)
    PrefillJob(other, ids[:35], 48, theirs).run()
    theirs.close()
    (tmp_path / state_files(tmp_path / "other")[0].name).write_bytes(state_files(tmp_path / "other")[0].read_bytes())
    # not safetensors at all; and a leftover temporary of an interrupted write
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / ".x.safetensors.123.tmp").write_bytes(b"partial")
    caplog.set_level(logging.WARNING, logger="hybridlm.prefix_cache")
    restarted = on_disk(tmp_path, 1 << 30, model)
    skipped = [r.getMessage() for r in caplog.records]
    assert restarted.disk.skipped == 3 and len(skipped) == 3
    assert any("another model" in m for m in skipped) and any("truncated" in m for m in skipped)
    assert any("junk.safetensors" in m for m in skipped)
    assert sorted(len(k) for k in restarted.disk._files) == [10, 20, 40]   # the flipped bit is not visible yet
    caplog.clear()
    # the longest prefix is the corrupted 40-token file: refused on load, and the 20-token state serves
    job = PrefillJob(model, ids + [7], 48, restarted).run()
    assert job.reused == 20
    assert any("checksum" in r.getMessage() for r in caplog.records)
    assert greedy(model, job.cache, job.logits, 5) == cold(model, ids + [7], 5)
    assert 40 not in {len(k) for k in restarted.disk._files}
    # nothing it did not write itself is deleted
    assert (tmp_path / "junk.safetensors").exists() and by_len[30].exists()


def test_two_models_directories_do_not_cross(tmp_path, caplog):
    a, b = make_model(0), make_model(1)
    ids = tokens(25, seed=6)
    for m, d in ((a, "a"), (b, "b")):
        store = on_disk(tmp_path / d, 1 << 30, m)
        PrefillJob(m, ids, 32, store).run()
        store.close()
    caplog.set_level(logging.WARNING, logger="hybridlm.prefix_cache")
    b_on_a = on_disk(tmp_path / "a", 1 << 30, b)
    assert len(b_on_a.disk) == 0 and b_on_a.lookup(ids) == (0, None)
    assert any("another model" in r.getMessage() for r in caplog.records)
    assert len(state_files(tmp_path / "a")) == 1        # skipped, not deleted
    b_on_b = on_disk(tmp_path / "b", 1 << 30, b)
    assert b_on_b.lookup(ids)[0] == 25
    # a snapshot of one model is never written into the other's directory
    snap = PrefillJob(a, ids[:5], 8).run()
    assert not b_on_b.disk.put(tuple(ids[:5]), snap.cache.snapshot(snap.logits, a))


def test_the_client_key_survives_a_restart(model, tmp_path):
    d = SnapshotDir(tmp_path, 1 << 20, model)
    key = d.secret()
    assert len(key) == 32 and SnapshotDir(tmp_path, 1 << 20, model).secret() == key
    assert (tmp_path / "client.key").stat().st_mode & 0o077 == 0


def test_a_restarted_server_answers_the_next_turn_from_disk(tmp_path):
    """Through the HTTP server: turn 1, a new server process (new model object, new app) on the same
    directory, turn 2 reuses the stored prompt and answers exactly as a server without any cache."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from hybridlm.serve import Limits, create_app
    from hybridlm.tokenizer import load_tokenizer
    from tests.test_chat import make_chat_checkpoint
    ckpt = make_chat_checkpoint(tmp_path / "ckpt")

    def ask(messages, disk):
        m = HybridLM.from_pretrained(ckpt)
        store = PrefixCache(64 << 20, SnapshotDir(disk, 1 << 30, m)) if disk else None
        app = create_app(m, load_tokenizer(ckpt), name="t", checkpoint_dir=ckpt, prefix_cache=store,
                         limits=Limits(context=512, max_new_tokens=16))
        with TestClient(app) as c:
            r = c.post("/v1/chat/completions", headers={"Authorization": "Bearer k1"},
                       json={"model": "t", "messages": messages, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    turn1 = [{"role": "system", "content": "You answer briefly."},
             {"role": "user", "content": "Tell me about the weather in the hills today."}]
    first = ask(turn1, tmp_path / "states")
    turn2 = turn1 + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And tomorrow?"}]
    warm = ask(turn2, tmp_path / "states")
    cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"]
    assert warm["choices"][0]["message"] == ask(turn2, None)["choices"][0]["message"]


def test_a_failed_write_is_a_warning_and_the_old_file_stands(model, tmp_path, caplog, monkeypatch):
    ids = tokens(12, seed=7)
    store = on_disk(tmp_path, 1 << 30, model, background=False)
    job = PrefillJob(model, ids, 16, store).run()
    assert len(store.disk) == 1

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("hybridlm.safetensors_io.save_file", full_disk)
    caplog.set_level(logging.WARNING, logger="hybridlm.prefix_cache")
    assert not store.disk.put(tuple(ids), job.cache.snapshot(job.logits, model))
    assert any("No space left" in r.getMessage() for r in caplog.records)
    assert len(store.disk) == 1 and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert on_disk(tmp_path, 1 << 30, model).lookup(ids)[0] == 12
