"""One sampler and one owner of the cache's rows (issue 14 part 1): the server's logit transforms (logit
bias, presence/frequency penalties, a vocabulary padded past the tokenizer's) are ``generate.Sampling``'s,
drawn by ``generate.sample`` exactly as the server's own sampler drew them; ``generate`` takes them too;
``Cache.gather`` builds what the model would allocate; nothing outside cache.py reads the cache's fields."""
import re
from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.cache import Cache
from hybridlm.generate import Generation, Sampling, generate, prefill, sample, stream

V = 97


def old_server_sample(logits, sampling, ids, generated, generator, bias, presence, frequency, blocked):
    """The server's sampler before this change (serve.Engine._sample), for one row: the reference."""
    x = logits.float().clone()
    if blocked is not None:
        x[blocked] = float("-inf")
    if bias:
        x[torch.tensor(list(bias))] += torch.tensor(list(bias.values()), dtype=x.dtype)
    if (presence or frequency) and generated:
        counts = torch.bincount(torch.tensor(generated), minlength=x.shape[0]).to(x)
        x -= frequency * counts + presence * (counts > 0).to(x)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(1, x.shape[0], dtype=torch.bool)
        seen[0, torch.tensor(ids + generated)] = True
    return int(sample(x[None], sampling, generator, seen)[0])


@pytest.mark.parametrize("case", range(12))
def test_sample_draws_what_the_servers_sampler_drew(case):
    rng = torch.Generator().manual_seed(case)
    temperature = [0.0, 0.7, 1.3][case % 3]
    top_k, top_p, rep = [(0, 1.0, 1.0), (5, 1.0, 1.3), (0, 0.8, 0.9), (10, 0.9, 1.1)][case % 4]
    presence, frequency = [(0.0, 0.0), (0.5, 0.0), (0.0, 1.5), (-0.3, 0.7)][(case // 3) % 4]
    bias = {int(i): float(torch.randn(1, generator=rng)) * 5 for i in torch.randint(0, V, (7,), generator=rng)}
    limit = [0, 90][case % 2]
    ids = torch.randint(0, V, (20,), generator=rng).tolist()
    s_old = Sampling(temperature, top_k, top_p, rep, seed=case)
    s_new = Sampling(temperature, top_k, top_p, rep, seed=case, presence_penalty=presence,
                     frequency_penalty=frequency, logit_bias=bias, vocab_limit=limit)
    g_old, g_new = torch.Generator().manual_seed(case), torch.Generator().manual_seed(case)
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, torch.tensor(ids)] = True
    counts = torch.zeros(1, V)
    generated = []
    for _ in range(30):
        logits = torch.randn(V, generator=rng) * 3
        a = old_server_sample(logits, s_old, ids, generated, g_old, bias, presence, frequency,
                              slice(limit, V) if limit else None)
        b = int(sample(logits[None], s_new, g_new, seen if rep != 1.0 else None, counts)[0])
        assert a == b
        assert not limit or b < limit
        generated.append(b)
        seen[0, b] = True
        counts[0, b] += 1


def test_sample_does_not_modify_the_logits():
    logits = torch.randn(2, V)
    before = logits.clone()
    s = Sampling(0.8, logit_bias={3: 2.0}, presence_penalty=1.0, vocab_limit=50, seed=0)
    sample(logits, s, torch.Generator().manual_seed(0), counts=torch.ones(2, V))
    assert torch.equal(logits, before)


def test_sampling_refuses_non_finite_transforms():
    for bad in (dict(presence_penalty=float("nan")), dict(frequency_penalty=float("inf")),
                dict(logit_bias={1: float("-inf")}), dict(vocab_limit=-1)):
        with pytest.raises(ValueError):
            Sampling(**bad)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    cfg = preset("tiny", vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, mamba_d_state=8, layout="mMaMwMmM", sliding_window=6)
    return HybridLM(cfg).init_weights(0).eval()


def test_generate_takes_the_servers_transforms(model):
    prompt = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    plain = generate(model, prompt, max_new_tokens=12)

    def run(**kw):
        gen = Generation(12, Sampling(0.0, **kw))
        return torch.stack(list(stream(model, prompt, gen)), 1)
    assert torch.equal(run(), plain[:, 6:])                                  # defaults: unchanged
    assert (run(logit_bias={5: 1e4}) == 5).all()                             # bias forces a token
    assert (run(vocab_limit=10) < 10).all()                                  # a padded vocabulary is never sampled
    once = run(frequency_penalty=1e4)                                        # a token generated is not generated again
    assert all(len(set(r.tolist())) == 12 for r in once)


def test_gather_builds_what_the_model_allocates(model):
    a, b = model.new_cache(2, 12), model.new_cache(1, 7)
    prefill(model, a, torch.randint(0, V, (2, 9)))
    prefill(model, b, torch.randint(0, V, (1, 4)))
    out = Cache.gather([(a, 1), (b, 0), (a, 0)], room=5)
    ref = model.new_cache(3, out.max_len)
    assert out.fingerprint == ref.fingerprint and out.device == ref.device and out.pos == 9
    for (k, t), (k2, t2) in zip(out.tensors().items(), ref.tensors().items()):
        if k != "valid":
            assert k == k2 and t.shape == t2.shape and t.dtype == t2.dtype
    assert out.seen.tolist() == [9, 4, 9] and out.valid[1].tolist()[:9] == [False] * 5 + [True] * 4


def test_nothing_outside_the_cache_reads_its_fields():
    """serve.py, prefix_cache.py and summary.py reach the cache through its methods only (issue 14)."""
    root = Path(__file__).resolve().parents[1] / "hybridlm"
    for name in ("serve.py", "prefix_cache.py", "summary.py"):
        src = (root / name).read_text()
        assert not re.search(r"\.(valid|layers)\b|MambaState|KVState|__dict__", src), name
