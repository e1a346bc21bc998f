"""The inference engine: cache, chunked prefill, decode, padding, sampling, stops, snapshots."""
import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.cache import Snapshot
from hybridlm.generate import Generation, Sampling, StopCriteria, left_pad, prefill, stream

LAYOUTS = {
    "jamba": dict(layout="mMaM"),
    "local+rope": dict(layout="maWm", sliding_window=5, rope_theta=10000.0),
    "attention-first": dict(layout="AmMa"),
    "pure-mamba": dict(layout="mMmm"),
}


def tiny(seed=0, **kw):
    cfg = preset("tiny", vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8, **kw)
    return HybridLM(cfg).init_weights(seed).eval()


def ids(b, l, seed=0, vocab=101):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


def assert_decode_matches_forward(m, x, prompt: int = 6):
    """Teacher forcing: prefill ``prompt`` tokens of x [b, l], then feed the rest one token at a time; the
    logits equal the full forward's (test_mamba2 and test_nemotron_h call this for their layouts too)."""
    b, l = x.shape
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(b, l)
        steps = [m(x[:, :prompt], cache)] + [m(x[:, t:t + 1], cache) for t in range(prompt, l)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def assert_chunked_prefill_matches(m, x, chunk: int, room: int = 5):
    """Prefill of x in slices of ``chunk`` tokens gives the one-shot prefill's logits and leaves the same states."""
    b, l = x.shape
    c1, c2 = m.new_cache(b, l + room), m.new_cache(b, l + room)
    a = prefill(m, c1, x, chunk=l)
    got = prefill(m, c2, x, chunk=chunk)
    assert (a - got).abs().max().item() < 1e-5
    for s1, s2 in zip(c1.layers, c2.layers):  # and the states they leave behind agree
        if s1 is None:                        # a feed-forward-only layer keeps no state
            assert s2 is None
            continue
        for t1, t2 in zip(vars(s1).values(), vars(s2).values()):
            if isinstance(t1, torch.Tensor):
                assert (t1 - t2).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cached_decode_reproduces_full_forward(name):
    assert_decode_matches_forward(tiny(**LAYOUTS[name]), ids(3, 19))


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("chunk", [1, 3, 7, 19, 64])
def test_chunked_prefill_equals_one_shot(name, chunk):
    assert_chunked_prefill_matches(tiny(**LAYOUTS[name]), ids(2, 19, seed=1), chunk)


@pytest.mark.parametrize("name", ["jamba", "local+rope"])
def test_padded_batch_equals_each_prompt_alone(name):
    m = tiny(**LAYOUTS[name])
    prompts = [ids(1, n, seed=n)[0].tolist() for n in (3, 11, 7)]
    x, mask = left_pad(prompts)
    batch = m.generate(x, max_new_tokens=9, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = m.generate(torch.tensor([p]), max_new_tokens=9)
        assert batch[i, -9:].tolist() == alone[0, -9:].tolist()


def test_padded_prefill_leaves_the_state_a_single_prompt_leaves():
    m = tiny(**LAYOUTS["jamba"])
    p = ids(1, 6, seed=3)[0].tolist()
    x, mask = left_pad([p, p + p])
    cache = m.new_cache(2, 16)
    prefill(m, cache, x, mask)
    alone = m.new_cache(1, 16)
    prefill(m, alone, torch.tensor([p]))
    ssm_batch = cache.layers[0].ssm[0]
    assert (ssm_batch - alone.layers[0].ssm[0]).abs().max() < 1e-6


def test_seeded_sampling_is_reproducible():
    m = tiny()
    x = ids(2, 5)
    kw = dict(max_new_tokens=12, temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.2)
    a = m.generate(x, seed=7, **kw)
    b = m.generate(x, seed=7, **kw)
    c = m.generate(x, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_degenerate_sampling_equals_greedy():
    m = tiny()
    x = ids(2, 5)
    greedy = m.generate(x, max_new_tokens=8)
    assert torch.equal(m.generate(x, max_new_tokens=8, temperature=1.0, top_k=1, seed=0), greedy)
    assert torch.equal(m.generate(x, max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=0), greedy)


def test_repetition_penalty_changes_choices():
    m = tiny()
    x = ids(1, 5)
    plain = m.generate(x, max_new_tokens=24)
    penal = m.generate(x, max_new_tokens=24, repetition_penalty=5.0)
    assert len(set(penal[0, 5:].tolist())) > len(set(plain[0, 5:].tolist()))


def test_stop_token_and_stop_string():
    m = tiny()
    x = ids(1, 5)
    free = m.generate(x, max_new_tokens=10)[0, 5:].tolist()
    stop_tok = free[3]
    first = free.index(stop_tok)
    out = m.generate(x, max_new_tokens=10, stop_token_ids=[stop_tok])
    assert out.shape[1] == 5 + first + 1 and out[0, -1].item() == stop_tok
    decode = lambda t: "".join(f"<{i}>" for i in t)  # noqa: E731
    target = f"<{free[2]}><{free[3]}>"
    out = m.generate(x, max_new_tokens=10, stop_strings=[target], decode=decode)
    assert target in decode(out[0, 5:].tolist())
    first_hit = next(j for j in range(10) if target in decode(free[:j + 1]))
    assert first_hit <= 3 and out.shape[1] == 5 + first_hit + 1


def test_stop_in_one_row_pads_it_while_others_continue():
    m = tiny()
    x = ids(2, 5)
    free = m.generate(x, max_new_tokens=8)
    stop = free[0, 5 + 2].item()
    if stop in free[1, 5:].tolist():
        pytest.skip("the stop token also occurs in row 1 for this seed")
    out = m.generate(x, max_new_tokens=8, stop_token_ids=[stop], pad_token_id=-7)
    first = free[0, 5:].tolist().index(stop)
    assert out[0, 5 + first + 1:].eq(-7).all()
    assert torch.equal(out[1], free[1])


def test_snapshot_save_load_fork_rollback(tmp_path):
    m = tiny(**LAYOUTS["local+rope"])
    x = ids(1, 12)
    gen = Generation(max_new_tokens=10)
    want = torch.stack(list(stream(m, x, gen)), 1)

    cache = m.new_cache(1, 32)
    logits = prefill(m, cache, x)
    snap = cache.snapshot(logits)
    snap.save(tmp_path / "state.safetensors")

    # load in a "new process": a fresh model object with the same weights
    m2 = tiny(**LAYOUTS["local+rope"])
    loaded = Snapshot.load(tmp_path / "state.safetensors")
    for _ in range(2):  # fork twice from the same snapshot
        c = loaded.to_cache(m2, max_len=32)
        got = torch.stack(list(stream(m2, x[:, :0], gen, cache=c, logits=loaded.logits)), 1)
        assert torch.equal(got, want)
    # roll back: run on, restore, run again
    list(stream(m, x[:, :0], gen, cache=cache, logits=logits))
    assert cache.pos > 12
    cache.restore(snap)
    assert cache.pos == 12
    again = torch.stack(list(stream(m, x[:, :0], gen, cache=cache, logits=snap.logits)), 1)
    assert torch.equal(again, want)


def test_snapshot_of_another_model_or_dtype_is_refused(tmp_path):
    m = tiny()
    cache = m.new_cache(1, 8)
    snap = cache.snapshot(prefill(m, cache, ids(1, 4)))
    with pytest.raises(ValueError, match="different model"):
        snap.to_cache(tiny(seed=1))
    with pytest.raises(ValueError, match="snapshot state is float32 but the model runs in bfloat16"):
        snap.to_cache(tiny().to(torch.bfloat16))
    (tmp_path / "x.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="not a hybridlm state snapshot"):
        Snapshot.load(tmp_path / "x.safetensors")


def test_cache_is_preallocated_and_ssm_state_fp32():
    m = tiny(**LAYOUTS["local+rope"]).to(torch.bfloat16)
    cache = m.new_cache(2, 100)
    kinds = [type(s).__name__ for s in cache.layers]
    assert kinds == ["MambaState", "KVState", "KVState", "MambaState"]
    assert cache.layers[0].ssm.dtype == torch.float32 and cache.layers[0].conv.dtype == torch.bfloat16
    assert cache.layers[1].k.shape == (2, 2, 100, 8)     # full attention: s_max slots
    assert cache.layers[2].k.shape == (2, 2, 5, 8)       # local attention: the window only
    ptrs = [s.k.data_ptr() for s in cache.layers if hasattr(s, "k")]
    prefill(m, cache, ids(2, 40))
    assert [s.k.data_ptr() for s in cache.layers if hasattr(s, "k")] == ptrs  # written in place
    nb = cache.nbytes()
    assert nb["kv"] == 2 * (2 * 2 * 100 * 8 + 2 * 2 * 5 * 8) * 2
    assert nb["ssm"] == 2 * (2 * 64 * 8 * 4)


def test_local_attention_window():
    """window >= length is full attention; window 1 lets each token see only itself."""
    base = dict(layout="wwww", rope_theta=None)
    wide = tiny(sliding_window=50, **base)
    full = tiny(**dict(base, layout="aaaa"))
    x = ids(2, 13)
    with torch.no_grad():
        assert (wide(x) - full(x)).abs().max() < 1e-6
        one = tiny(sliding_window=1, **base)
        y = one(x)
        assert (y[:, 5] - one(x[:, 5:6])[:, 0]).abs().max() < 1e-5


def test_cache_overflow_is_a_clear_error():
    m = tiny()
    cache = m.new_cache(1, 4)
    with pytest.raises(ValueError, match="cache is full"):
        prefill(m, cache, ids(1, 6))


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="stop strings need a decode"):
        StopCriteria(strings=("x",))


def test_snapshot_continues_in_another_process(tmp_path):
    """Save the state after a prompt here; a separate Python process loads the checkpoint and the
    snapshot and generates exactly what this process generates without interruption."""
    import subprocess
    import sys
    m = tiny(**LAYOUTS["jamba"])
    m.save_pretrained(tmp_path / "ckpt")
    x = ids(1, 10)
    gen = Generation(max_new_tokens=8, sampling=Sampling(temperature=0.9, seed=3))
    want = torch.stack(list(stream(m, x, gen)), 1)[0].tolist()
    cache = m.new_cache(1, 32)
    cache.snapshot(prefill(m, cache, x)).save(tmp_path / "state.safetensors")
    code = f"""
import torch
from hybridlm import HybridLM
from hybridlm.cache import Snapshot
from hybridlm.generate import Generation, Sampling, stream
m = HybridLM.from_pretrained({str(tmp_path / 'ckpt')!r})
snap = Snapshot.load({str(tmp_path / 'state.safetensors')!r})
gen = Generation(max_new_tokens=8, sampling=Sampling(temperature=0.9, seed=3))
toks = stream(m, torch.zeros(1, 0, dtype=torch.long), gen, cache=snap.to_cache(m, 32), logits=snap.logits)
print(torch.stack(list(toks), 1)[0].tolist())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert eval(r.stdout.strip()) == want
