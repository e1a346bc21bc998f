"""Measured model quality on held-out text: perplexity, and agreement with a reference model.

The text is cut into non-overlapping windows of ``context`` tokens, as training packs it
(``data.PackedSequences``): window i gives inputs ids[iL : iL+L] and targets ids[iL+1 : iL+L+1], so every
token but the first of the text is scored exactly once, with the tokens before it in its window as
context. A last, shorter window takes the tail. Log-probabilities are taken in fp32 whatever the weights'
dtype, so a bf16 or quantized model is judged on its logits, not on a low-precision softmax.

    nll   mean -log p_model(target)                        nats per token; ppl = exp(nll)
    kl    mean KL(reference || model) over positions       sum_v q_v (log q_v - log p_v), nats per token
    top1  fraction of positions where argmax p == argmax q
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def windows(ids: torch.Tensor, context: int, batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ids [n] -> batches of (inputs [b, L], targets [b, L]) with L = context (views of ids); the tail,
    shorter than L, comes last in a batch of its own."""
    if context < 1:
        raise ValueError(f"context must be positive, got {context}")
    k = (len(ids) - 1) // context
    x = ids[:k * context].view(k, context)
    y = ids[1:k * context + 1].view(k, context)
    out = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, k, batch_size)]
    if len(ids) - 1 > k * context:
        out.append((ids[k * context:-1][None], ids[k * context + 1:][None]))
    return out


def _log_probs(model, x: torch.Tensor) -> torch.Tensor:
    """[b, l] -> fp32 log-softmax of the next-token logits [b, l, v], on the model's device."""
    return model(x.to(model.model.embed_tokens.weight.device)).float().log_softmax(-1)


def _ppl(nll: float) -> float:
    return math.exp(min(nll, 700.0))        # exp overflows a float past ~709


@torch.no_grad()
def compare(model, reference, ids: torch.Tensor | Sequence[int], context: int = 1024, batch_size: int = 4,
            progress: bool = False) -> dict:
    """Score ``model`` (and ``reference``, when not None) on the same windows of ``ids``.

    Returns {'tokens', 'nll', 'ppl'}, and with a reference also 'reference_nll', 'reference_ppl',
    'kl' (mean KL(reference || model), nats per token) and 'top1' (argmax agreement)."""
    from ..data import _progress
    ids = torch.as_tensor(ids, dtype=torch.long)
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); scoring needs at least 2")
    if reference is not None and reference.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the models' vocabularies differ ({model.config.vocab_size} vs "
                         f"{reference.config.vocab_size} tokens); compare models that share a tokenizer")
    batches = windows(ids, context, batch_size)
    bar = _progress(sum(len(x) for x, _ in batches), "eval", "window", progress)
    nll = ref_nll = kl = top1 = 0.0
    for x, y in batches:
        logp = _log_probs(model, x)                                          # [b, l, v]
        y = y.to(logp.device)
        nll -= logp.gather(-1, y[..., None]).sum().item()
        if reference is not None:
            logq = _log_probs(reference, x).to(logp.device)                  # [b, l, v]
            ref_nll -= logq.gather(-1, y[..., None]).sum().item()
            kl += F.kl_div(logp, logq, reduction="sum", log_target=True).item()
            top1 += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
        bar.update(len(x))
    bar.close()
    n = len(ids) - 1
    out = {"tokens": n, "nll": nll / n, "ppl": _ppl(nll / n)}
    if reference is not None:
        out.update(reference_nll=ref_nll / n, reference_ppl=_ppl(ref_nll / n), kl=kl / n, top1=top1 / n)
    return out


def perplexity(model, ids: torch.Tensor | Sequence[int], context: int = 1024, batch_size: int = 4,
               progress: bool = False) -> dict:
    """{'tokens', 'nll' (nats per token), 'ppl'} of ``model`` on ``ids`` (see ``compare``)."""
    return compare(model, None, ids, context, batch_size, progress)


def eval_cli(model: str, data: str = "", reference: str = "", context: int = 1024, max_tokens: int = 0,
             batch_size: int = 4, dtype: str = "auto", quantize: str = "", reference_quantize: str = "",
             threads: int = 0, json: bool = False) -> int:
    """Measure a checkpoint's quality on held-out text: perplexity, and KL divergence and top-1 agreement
    against a reference model (e.g. a quantized model against its bf16 original).

    The text is tokenized with MODEL's tokenizer (documents joined by its EOS, cached like training data)
    and cut into non-overlapping windows of --context tokens; every token but the first is scored once,
    with the tokens before it in its window as context. Log-probabilities are fp32. NLL and KL are in
    nats per token; KL is KL(reference || model).

    Args:
        model: checkpoint directory with a tokenizer
        data: held-out text (required): a text/JSONL/parquet file, a directory, a glob (as train's --data)
        reference: a second model to compare with on the same windows (same tokenizer)
        context: window length in tokens
        max_tokens: score at most this many tokens (0: all)
        batch_size: windows per forward pass
        dtype: weight dtype of both models: auto (the checkpoint's), bfloat16, float32
        quantize: quantize MODEL when loading: int8 or int4 (empty: off)
        reference_quantize: quantize the reference when loading: int8 or int4 (empty: off)
        threads: torch CPU threads (0: torch's default)
        json: print the results as JSON instead of a table

    Examples:
        hybridlm eval ./out --data held_out.txt
        hybridlm eval ./out --data held_out.txt --quantize int8 --reference ./out --max-tokens 100000
    """
    import json as json_

    from ..checkpoint import parse_dtype
    from ..cli import CLIError
    from ..data import Corpus, tokenize_corpus
    if not data:
        raise CLIError("give the held-out text to score: --data PATH (a text file, a directory, a glob)")
    if context < 1:
        raise CLIError(f"--context must be at least 1 token, got {context}")
    if threads:
        torch.set_num_threads(threads)
    tok = _tokenizer(model)
    if tok is None:
        raise CLIError(f"{model!r} is not a checkpoint directory with a tokenizer (tokenizer.json or "
                       f"tokenizer.model); eval tokenizes --data with MODEL's own tokenizer, so give one")
    ref_tok = _tokenizer(reference) if reference else None
    if ref_tok is not None and ref_tok.fingerprint() != tok.fingerprint():
        raise CLIError(f"{reference!r} has a different tokenizer from {model!r}; KL and top-1 compare "
                       f"next-token distributions, so pass a reference that shares MODEL's tokenizer")
    tokens = tokenize_corpus(Corpus(data, val_fraction=0.0), tok).train      # every document, EOS-joined
    ids = torch.from_numpy(tokens[:max_tokens + 1 if max_tokens > 0 else None].astype("int64"))
    if len(ids) < 2:
        raise CLIError(f"--data {data}: {len(ids)} token(s) of text; give at least 2 to score")
    dt = parse_dtype(dtype)
    m = _load(model, dt, quantize)
    ref = _load(reference, dt, reference_quantize) if reference else None
    r = compare(m, ref, ids, context, batch_size, progress=True)
    if json:
        print(json_.dumps(r, indent=2))
        return 0
    label = lambda name, q: f"{name} ({q})" if q else name  # noqa: E731
    rows = [(label(model, quantize), r["nll"], r["ppl"])]
    if ref is not None:
        rows.append((label(reference, reference_quantize) + " [reference]", r["reference_nll"], r["reference_ppl"]))
    w = max(len("model"), *(len(row[0]) for row in rows))
    print(f"{data}: {r['tokens']:,} tokens scored in windows of {context}")
    print(f"{'model':<{w}}  {'nll/token':>10}  {'ppl':>10}")
    for name, nll, ppl in rows:
        print(f"{name:<{w}}  {nll:>10.4f}  {ppl:>10.3f}")
    if ref is not None:
        print(f"KL(reference || model) {r['kl']:.6f} nats/token   top-1 agreement {r['top1']:.2%}")
    return 0


def _tokenizer(spec: str):
    """The tokenizer of a checkpoint directory; None for a preset or a checkpoint without one."""
    from ..tokenizer import load_tokenizer
    try:
        return load_tokenizer(spec)
    except FileNotFoundError:
        return None


def _load(spec: str, dtype: torch.dtype | None, quantize: str):
    """``load_model``, passing ``quantize`` only when asked for."""
    from ..checkpoint import load_model
    return load_model(spec, dtype=dtype, **({"quantize": quantize} if quantize else {}))
