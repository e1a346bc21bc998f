"""Snapshots from untrusted files: the header is checked against the tensors and the model's config
before anything is allocated; every state tensor is required; NaN/inf state is refused; the weights
hash covers every weight, so a model that differs anywhere is refused."""
import time

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.cache import Cache, Snapshot, weights_fingerprint
from hybridlm.generate import decode_step, prefill
from hybridlm.prefix_cache import PrefillJob, PrefixCache

V = 101
# a Mamba layer, a full-attention layer, a local-attention (ring) layer
CFG = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, mamba_d_state=8, layout="maWm", sliding_window=5, rope_theta=10000.0)


def make_model(seed=0):
    torch.manual_seed(seed)
    return HybridLM(preset("tiny", **CFG)).init_weights(seed).eval()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return make_model()


def tokens(n, seed=0):
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def snap(model):
    cache = model.new_cache(1, 16)
    return cache.snapshot(prefill(model, cache, tokens(7)), model)


def variant(snap, drop=(), meta=None, **tensors) -> Snapshot:
    t = {k: v.clone() for k, v in snap.tensors.items() if k not in drop}
    t.update(tensors)
    return Snapshot(t, {**snap.meta, **(meta or {})})


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if a cache is allocated."""
    def refuse(*a, **k):
        raise AssertionError("a cache was allocated before the snapshot was checked")
    monkeypatch.setattr(Cache, "allocate", classmethod(refuse))


@pytest.mark.parametrize("meta", [{"batch": "100000"}, {"pos": "100000000"}, {"pos": "1e8"}, {"batch": "0"},
                                  {"pos": "9" * 40}])
def test_a_header_that_contradicts_its_tensors_is_refused_before_allocating(model, snap, tmp_path, no_allocation,
                                                                           meta):
    bad = variant(snap, meta=meta)
    bad.save(tmp_path / "s.safetensors")
    t0 = time.perf_counter()
    for load in (lambda: Snapshot.load(tmp_path / "s.safetensors"),            # the file alone
                 lambda: Snapshot.load(tmp_path / "s.safetensors", model),     # the file and the model
                 lambda: bad.to_cache(model, 32)):                              # in memory
        with pytest.raises(ValueError, match="header|batch|pos"):
            load()
    assert time.perf_counter() - t0 < 2


def test_every_state_tensor_is_required_and_checked(model, snap, no_allocation):
    cases = {
        "missing state tensors .*layers.0.ssm": variant(snap, drop=["layers.0.ssm"]),
        "missing state tensors .*layers.2.k": variant(snap, drop=["layers.2.k"]),
        "unexpected tensors .*layers.9.ssm": variant(snap, **{"layers.9.ssm": torch.zeros(1, 64, 8)}),
        r"layers.0.conv: shape \[1, 32, 3\]": variant(snap, **{"layers.0.conv": torch.zeros(1, 32, 3)}),
        "layers.0.ssm: dtype float16": variant(snap, **{"layers.0.ssm": snap.tensors["layers.0.ssm"].half()}),
        r"layers.1.k: shape \[1, 2, 9, 8\], expected \[1, 2, 7, 8\]":
            variant(snap, **{"layers.1.k": torch.zeros(1, 2, 9, 8)}),
        r"layers.2.v: shape \[1, 2, 6, 8\], expected \[1, 2, 5..5, 8\]":   # a ring longer than the window
            variant(snap, **{"layers.2.v": torch.zeros(1, 2, 6, 8)}),
        r"logits: float32 \[1, 7\]": variant(snap, logits=torch.zeros(1, 7)),
    }
    for match, bad in cases.items():
        with pytest.raises(ValueError, match=match):
            bad.to_cache(model)
        with pytest.raises(ValueError, match=match):
            bad.check(model)


@pytest.mark.parametrize("name,value", [("layers.0.ssm", float("nan")), ("layers.1.k", float("inf")),
                                        ("layers.0.conv", float("-inf")), ("logits", float("nan"))])
def test_nan_or_inf_state_is_refused(model, snap, tmp_path, name, value):
    t = snap.tensors[name].clone()
    t.view(-1)[3] = value
    bad = variant(snap, **{name: t})
    with pytest.raises(ValueError, match=f"{name} holds NaN or infinite"):
        bad.to_cache(model)
    bad.save(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="NaN or infinite"):
        Snapshot.load(tmp_path / "s.safetensors", model)


def test_restore_checks_everything_before_writing(model, snap):
    cache = model.new_cache(1, 16)
    prefill(model, cache, tokens(3, seed=1))
    before = {k: v.clone() for k, v in cache.tensors().items()}
    seen = snap.tensors["seen"] + 1                                       # contradicts the validity mask
    for bad, match in ((variant(snap, drop=["layers.3.ssm"]), "missing state tensors"),
                       (variant(snap, seen=seen), "does not count the valid positions")):
        with pytest.raises(ValueError, match=match):
            cache.restore(bad)
        assert cache.pos == 3 and all(torch.equal(v, before[k]) for k, v in cache.tensors().items())


def test_the_weights_hash_covers_every_weight(model, tmp_path):
    """A model that differs from the snapshot's in one weight element the sampled fingerprint does not
    read: the prefix cache (and a chat's /save file) refuse it."""
    other = make_model()
    w = other.model.embed_tokens.weight
    stride = max(1, w.numel() // 64)
    with torch.no_grad():
        w.view(-1)[stride // 2] += 1.0                                    # between two sampled elements
    assert other.fingerprint() == model.fingerprint()                      # the sampled fingerprint misses it
    assert weights_fingerprint(other) != weights_fingerprint(model)
    store = PrefixCache()
    ids = tokens(9)[0].tolist()
    PrefillJob(model, ids, 16, store).run()
    _, snap = store.lookup(ids)
    with pytest.raises(ValueError, match="its weights differ"):
        PrefillJob(other, ids + [1], 16, store)                           # a shared store, another model
    snap.save(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="its weights differ"):
        Snapshot.load(tmp_path / "s.safetensors", other)
    with pytest.raises(ValueError, match="its weights differ"):
        Snapshot.load(tmp_path / "s.safetensors").check(other)
    job = PrefillJob(make_model(), ids + [1], 16, store).run()             # an identical model is accepted
    assert job.reused == 9


def test_every_snapshot_of_a_models_cache_carries_the_weights_hash_and_one_without_is_refused(model, tmp_path):
    """cache.snapshot(logits), without the model, still records the weights hash (the cache remembers the
    model that allocated it), so a model differing where the sampled fingerprint does not look is refused;
    a snapshot with no weights hash (a cache built without its model, or a file that drops the field) can
    no longer pass on the sampled fingerprint alone."""
    cache = model.new_cache(1, 16)
    snap = cache.snapshot(prefill(model, cache, tokens(7)))
    assert snap.meta["weights"] == weights_fingerprint(model)
    snap.save(tmp_path / "owned.safetensors")
    other = make_model()
    with torch.no_grad():
        other.model.embed_tokens.weight.view(-1)[1] += 1.0               # not a sampled element
    assert other.fingerprint() == model.fingerprint()
    with pytest.raises(ValueError, match="its weights differ"):
        Snapshot.load(tmp_path / "owned.safetensors", other)
    bare = Cache.allocate(model.config, 1, 16, torch.float32)
    bare.fingerprint = model.fingerprint()
    bare.restore(snap)                                                    # in memory, between caches: fine
    unhashed = bare.snapshot()
    assert "weights" not in unhashed.meta
    unhashed.save(tmp_path / "bare.safetensors")
    for load in (lambda: Snapshot.load(tmp_path / "bare.safetensors", model), lambda: unhashed.to_cache(model)):
        with pytest.raises(ValueError, match="no hash of its model's weights"):
            load()


def test_the_weights_hash_is_cached_until_a_weight_changes():
    m = make_model()
    first = weights_fingerprint(m)
    assert weights_fingerprint(m) == first and m._weights_fingerprint[1] == first
    with torch.no_grad():
        m.model.final_layernorm.weight[0] += 1                             # in place: its version counter moves
    assert weights_fingerprint(m) != first


def test_a_local_ring_from_a_cache_shorter_than_its_window_restores(model):
    """A cache of 4 positions keeps a local layer of window 5 in 4 slots; restoring its snapshot into a
    longer cache used to fail on the shape."""
    x = tokens(4)
    short = model.new_cache(1, 4)
    prefill(model, short, x[:, :3])
    snap = short.snapshot(None, model)
    long = snap.to_cache(model, 16)
    nxt = torch.tensor([5])
    torch.testing.assert_close(decode_step(model, long, nxt), decode_step(model, short, nxt))


def test_prefix_cache_budget_must_be_whole_bytes():
    for bad in (float("inf"), float("nan"), -1, 1.5, True):
        with pytest.raises(ValueError, match="whole number of bytes"):
            PrefixCache(bad)
    assert PrefixCache(10 ** 30).max_bytes == 10 ** 30
