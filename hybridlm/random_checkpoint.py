"""A seeded random-weight checkpoint of any config, written without ever holding the model.

Building a 3B model in fp32 to save it would need ~13 GB. Here names and shapes come from the model
built on the meta device, and each tensor is drawn a block of rows at a time (fp32, then cast to the
target dtype) and written straight into its safetensors shard, so peak memory is one block.

The values are exactly ``HybridLM(cfg).init_weights(seed)`` cast to ``dtype``: the same rules
(``model.init_value``) drawn from one generator in the same order. Blocks drawn one after another
equal one draw of the whole tensor because torch's CPU ``randn`` turns uniforms into normals 16 at a
time (Box-Muller on values 8 apart), so every block but the last is a multiple of 16 values and the last
has at least 16 (tests/test_presets.py checks the equality).

A config with ``family`` set (Granite 4.0-H, Bamba, Nemotron-H) is written in that family's format:
its config.json and tensor names, Granite's fused gate|up and stacked expert tensors included, as
``save_pretrained`` writes them (so transformers loads the files).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import _dtype_name, write_checkpoint
from .config import HybridConfig, preset
from .model import HybridLM, init_value

BLOCK = 1 << 22  # values per block: 16 MiB in fp32


def write_random_checkpoint(cfg_or_preset_name: HybridConfig | str, out_dir: str | Path, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int | None = 2 * 2**30,
                            block: int = BLOCK, progress=None) -> Path:
    """Write config.json and the weights of ``HybridLM(cfg).init_weights(seed).to(dtype)`` in the hub
    layout (shards of at most ``max_shard_bytes`` + index), ``block`` values at a time. ``progress``,
    when given, is called with the byte count of every block written. Returns ``out_dir``."""
    cfg = preset(cfg_or_preset_name) if isinstance(cfg_or_preset_name, str) else cfg_or_preset_name
    with torch.device("meta"):
        model = HybridLM(cfg)
    # named_parameters is init_weights' order, and state_dict's names without the tied lm_head.weight
    # then the buffers (a sigmoid router's e_score_correction_bias: zeros, nothing drawn)
    ours = {name: tuple(p.shape) for name, p in [*model.named_parameters(), *model.named_buffers()]}
    g = torch.Generator().manual_seed(seed)
    # the file's tensors: each a row-major concatenation of ours (one, unless a family fuses several)
    files = _family_layout(cfg, ours) if cfg.family is not None else {k: (v, [k]) for k, v in ours.items()}
    order = [part for _, parts in files.values() for part in parts]
    states = None
    if order != list(ours):
        # a family stores them in another order (Granite's experts stacked): note where g stands before
        # each of ours, drawing (and dropping) everything once, so any tensor can be drawn on its own
        states = {}
        for name, shape in ours.items():
            states[name] = g.get_state()
            for start, stop in _row_blocks(shape, block):
                init_value(name, (stop - start, *shape[1:]), cfg.initializer_range, g)

    def make(key):  # write_checkpoint calls this in file order; g is drawn as init_weights draws it
        for name in files[key][1]:
            shape = ours[name]
            if states is not None:
                g.set_state(states[name])
            for start, stop in _row_blocks(shape, block):
                t = init_value(name, (stop - start, *shape[1:]), cfg.initializer_range, g).to(dtype)
                if progress:
                    progress(t.numel() * t.element_size())
                yield t

    config = {**cfg.to_dict(), "dtype": _dtype_name(dtype)}
    write_checkpoint(out_dir, config, {k: (shape, dtype) for k, (shape, _) in files.items()}, make,
                     max_shard_bytes)
    return Path(out_dir)


def _family_layout(cfg: HybridConfig, ours: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple, list[str]]]:
    """``cfg.family``'s tensors (the names save_pretrained writes): name -> (shape, our tensors it holds, in
    row-major order). Found by running families.ours_to_hub twice, on empty tensors of our shapes (the
    file's shapes) and on one-element tensors holding each tensor's index (which of ours each holds, in
    which order: it only renames, concatenates and stacks along the first dimension)."""
    from .families import ours_to_hub
    names = list(ours)
    shapes = ours_to_hub(cfg, {k: torch.empty(v, device="meta") for k, v in ours.items()})
    parts = ours_to_hub(cfg, {k: torch.tensor([float(i)]) for i, k in enumerate(names)})
    return {k: (tuple(shapes[k].shape), [names[int(i)] for i in parts[k].flatten().tolist()]) for k in shapes}


def _row_blocks(shape: tuple[int, ...], block: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of about ``block`` values: a multiple of 16 values each, the last >= 16."""
    rows = shape[0]
    row = torch.Size(shape[1:]).numel()
    step = max(16, block // row // 16 * 16)
    starts = list(range(0, rows, step))
    if len(starts) > 1 and (rows - starts[-1]) * row < 16:
        starts.pop()  # fold a short tail into the block before it
    return list(zip(starts, starts[1:] + [rows]))
