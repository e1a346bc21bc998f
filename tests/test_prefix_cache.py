"""Prompt-state reuse: longest-prefix lookup, the byte budget, prefill that continues from a stored
state equals prefill from scratch, snapshots at boundaries, and the state kept after a reply."""
import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.chat_template import KnownTexts
from hybridlm.generate import decode_step, prefill
from hybridlm.prefix_cache import PrefillJob, PrefixCache, remember_reply

V = 101


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, mamba_d_state=8)
    return HybridLM(cfg).init_weights(0).eval()


def tokens(n, seed=0):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model, ids):
    cache = model.new_cache(1, len(ids))
    return prefill(model, cache, torch.tensor([ids]))


def test_longest_prefix_and_byte_budget(model):
    ids = tokens(12)
    snaps = {n: PrefillJob(model, ids[:n], 16).run() for n in (3, 5, 8)}
    snaps = {n: j.cache.snapshot(j.logits) for n, j in snaps.items()}
    store = PrefixCache()
    for n, s in snaps.items():
        assert store.store(ids[:n], s)
    assert store.lookup(ids)[0] == 8
    assert store.lookup(ids[:6] + [V - 1 - ids[6]])[0] == 5      # diverges after 6 tokens: the 5-token state
    assert store.lookup(ids[:3])[0] == 3                          # an exact match
    assert store.lookup([V - 1 - ids[0]] + ids[1:]) == (0, None)  # differs at the first token
    assert store.stats()["hits"] == 3 and store.stats()["reused_tokens"] == 16
    # a budget for two 8-token states: storing more evicts the least recently used
    small = PrefixCache(max_bytes=snaps[8].nbytes() * 2)
    small.store(ids[:3], snaps[3])
    small.store(ids[:5], snaps[5])
    small.lookup(ids[:4])                       # touches the 3-token state
    small.store(ids[:8], snaps[8])
    assert small.lookup(ids)[0] == 8 and small.lookup(ids[:6])[0] == 3   # the 5-token state went
    assert small.nbytes <= small.max_bytes and small.stats()["evictions"] == 1
    assert not PrefixCache(max_bytes=100).store(ids[:3], snaps[3])       # larger than the whole budget
    with pytest.raises(ValueError, match="snapshot holds 3 positions but its key has 4 tokens"):
        store.store(ids[:4], snaps[3])


@pytest.mark.parametrize("reuse", [1, 17, 39])
def test_prefill_from_a_stored_prefix_equals_prefill_from_scratch(model, reuse):
    ids = tokens(40, seed=1)
    store = PrefixCache()
    PrefillJob(model, ids[:reuse], 64, store).run()
    job = PrefillJob(model, ids, 64, store).run()
    assert job.reused == reuse
    torch.testing.assert_close(job.logits, full_logits(model, ids), rtol=1e-4, atol=1e-5)
    # and generation continues identically
    a, b = job.cache, model.new_cache(1, 64)
    prefill(model, b, torch.tensor([ids]))
    tok = job.logits.argmax(-1)
    for _ in range(5):
        la, lb = decode_step(model, a, tok), decode_step(model, b, tok)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
        tok = la.argmax(-1)
    # the whole prompt stored: no model call at all, the stored logits are used
    again = PrefillJob(model, ids, 64, store)
    assert again.done and again.reused == 40 and torch.equal(again.logits, job.logits)


def test_snapshots_at_boundaries_and_every_n_tokens(model):
    ids = tokens(50, seed=2)
    store = PrefixCache()
    PrefillJob(model, ids, 64, store, boundaries=[7, 33, 60], every=16).run()
    assert sorted(len(k) for k in store._entries) == [7, 16, 32, 33, 48, 50]
    for n in (7, 16, 32, 33, 48, 50):
        torch.testing.assert_close(store.lookup(ids[:n])[1].logits, full_logits(model, ids[:n]), rtol=1e-4, atol=1e-5)
    # a later prompt that shares 40 tokens starts from the 33-token boundary
    assert PrefillJob(model, ids[:40] + tokens(5, seed=3), 64, store).reused == 33


def test_prefill_in_slices_equals_one_go(model):
    ids = tokens(30, seed=4)
    job = PrefillJob(model, ids, 32, PrefixCache(), boundaries=[10])
    done = 0
    while not job.done:
        done += job.step(7)
    assert done == 30
    torch.testing.assert_close(job.logits, full_logits(model, ids), rtol=1e-4, atol=1e-5)


def test_state_after_a_reply_serves_the_next_turn(model):
    prompt = tokens(20, seed=5)
    store = PrefixCache()
    job = PrefillJob(model, prompt, 20 + 6 + 1, store).run()
    reply, logits = [], job.logits
    for _ in range(6):
        reply.append(int(logits.argmax(-1)))
        if len(reply) < 6:
            logits = decode_step(model, job.cache, torch.tensor([reply[-1]]))
    remember_reply(model, job.cache, prompt + reply, reply[-1], store)
    turn2 = prompt + reply + tokens(8, seed=6)
    nxt = PrefillJob(model, turn2, 40, store).run()
    assert nxt.reused == 26
    torch.testing.assert_close(nxt.logits, full_logits(model, turn2), rtol=1e-4, atol=1e-5)


def test_a_hybrid_state_grows_only_with_its_attention_layers(model):
    """Why reuse is cheap: Mamba layers keep a fixed-size state; only attention K/V grows per token."""
    cfg = model.config
    a = PrefillJob(model, tokens(64), 64).run().cache.snapshot()
    b = PrefillJob(model, tokens(128), 128).run().cache.snapshot()
    attn = sum(cfg.mixer(i) != "mamba" for i in range(cfg.num_hidden_layers))
    per_token_kv = attn * 2 * cfg.num_key_value_heads * cfg.head_size * 4     # fp32 K and V
    per_token_mask = 1                                                        # the validity flag
    assert b.nbytes() - a.nbytes() == 64 * (per_token_kv + per_token_mask)


def test_known_texts():
    known = KnownTexts(max_entries=2)
    known.add("hello", [1, 2])
    known.add("hello world", [1, 2, 3])
    assert known.longest_prefix("hello world!") == ("hello world", [1, 2, 3])
    assert known.longest_prefix("hello there") == ("hello", [1, 2])
    assert known.longest_prefix("goodbye") == ("", [])
    known.add("bye", [9])                       # evicts the least recently used ("hello world")
    assert len(known) == 2 and known.longest_prefix("hello world") == ("hello", [1, 2])
