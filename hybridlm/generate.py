"""Generation (placeholder: greedy/temperature; the engine issue replaces this)."""
import torch


@torch.no_grad()
def generate(model, input_ids, max_new_tokens=64, temperature=0.0, seed=None):
    b, l = input_ids.shape
    cache = model.new_cache(b, l + max_new_tokens)
    logits = model(input_ids, cache, last_only=True)[:, -1]
    out = [input_ids]
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for i in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=g)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits = model(nxt, cache)[:, -1]
    return torch.cat(out, 1)
