"""Reading and writing HuggingFace-format Jamba checkpoints (config.json + safetensors).

Loading builds the model on the meta device and materialises one tensor at a time from the
memory-mapped safetensors files, so peak memory is the model plus one tensor, not twice the model.
Pickle files (pytorch_model*.bin) can run code when loaded; they are refused unless the caller opts
in with ``allow_pickle=True`` (and then read with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import HybridConfig
from .safetensors_io import SafeTensorsFile, save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def find_weights(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in index order for sharded checkpoints."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {path}: {missing}")
        return [path / f for f in files]
    if single.exists():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise ValueError(f"{path} holds only pickle weights ({pickles[0].name}); pickle files can run code "
                             f"when loaded, so they are refused. Convert them to safetensors, or if you trust the "
                             f"source pass allow_pickle=True (CLI: --allow-pickle)")
        return pickles
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def _iter_tensors(files: list[Path]):
    """(name, lazy getter, shape) of every tensor in hub naming, expanding fused expert tensors."""
    for name, get, shape in _iter_raw(files):
        prefix, _, leaf = name.rpartition(".experts.")
        if leaf not in ("gate_up_proj", "down_proj") or len(shape) != 3:
            yield name, get, shape
            continue
        # transformers >= 5 keeps experts fused in memory: gate_up_proj [e, 2*ff, d], down_proj [e, d, ff]
        for e in range(shape[0]):
            if leaf == "down_proj":
                yield f"{prefix}.experts.{e}.down_proj.weight", (lambda g=get, e=e: g()[e]), shape[1:]
            else:
                ff = shape[1] // 2
                for part, sl in (("gate_proj", slice(0, ff)), ("up_proj", slice(ff, None))):
                    yield (f"{prefix}.experts.{e}.{part}.weight", (lambda g=get, e=e, sl=sl: g()[e, sl]),
                           (ff, shape[2]))


def _iter_raw(files: list[Path]):
    """Yield (name, lazy getter, shape) for every stored tensor, without reading the data yet."""
    for f in files:
        if f.suffix == ".bin":
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            for k, t in sd.items():
                yield k, (lambda t=t: t), tuple(t.shape)
            continue
        sf = SafeTensorsFile(f)
        for k in sf.keys():
            yield k, (lambda sf=sf, k=k: sf.get(k)), sf.shape(k)
            sf.release(k)  # the consumer has copied it by now


def read_config(path: Path) -> HybridConfig:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint directory (with config.json)")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} is not a Jamba checkpoint: it has no config.json")
    return HybridConfig.from_json(cfg_file)


def load_pretrained(path, dtype: torch.dtype | None = None, device="cpu", allow_pickle: bool = False):
    from .model import HybridLM
    path = Path(path)
    cfg = read_config(path)
    files = find_weights(path, allow_pickle)
    with torch.device("meta"):
        model = HybridLM(cfg)
    expected = dict(model.named_parameters(remove_duplicate=False))
    loaded, unexpected, mismatched = set(), [], []
    for name, get, shape in _iter_tensors(files):
        if name not in expected:
            unexpected.append(name)
            continue
        want = tuple(expected[name].shape)
        if shape != want:
            mismatched.append(f"{name}: expected {list(want)}, found {list(shape)}")
            continue
        t = get()
        t = t.to(device=device, dtype=dtype or t.dtype, copy=True)  # own the memory, never the file map
        _assign(model, name, t)
        loaded.add(name)
    if cfg.tie_word_embeddings and "lm_head.weight" not in loaded and "model.embed_tokens.weight" in loaded:
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:10]))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:10])}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match its config.json: " + " | ".join(problems))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is None:  # one dtype for the whole model: the checkpoint's majority dtype
        dtype = max(((p.dtype, p.numel()) for p in model.parameters()), key=lambda x: x[1])[0]
        model.to(dtype)
    return model.eval()


def _assign(model: nn.Module, name: str, t: torch.Tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[attr] = nn.Parameter(t, requires_grad=False)


def save_pretrained(model, path, max_shard_bytes: int | None = None):
    """Write the hub layout: config.json and model.safetensors, or shards + model.safetensors.index.json
    when ``max_shard_bytes`` is set. Files are written under temporary names and renamed, so a crash
    never leaves a half-written checkpoint under the final names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += nbytes
    meta = {"format": "pt"}
    written = []
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, path / (name + ".tmp"), metadata=meta)
        written.append(name)
    for name in written:
        os.replace(path / (name + ".tmp"), path / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        _write_atomic(path / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True))
    else:
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
    cfg = model.config.to_dict()
    cfg["dtype"] = _dtype_name(next(model.parameters()).dtype)
    _write_atomic(path / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_model(spec: str | Path, dtype: torch.dtype | None = None, device="cpu", seed: int = 0):
    """A checkpoint directory, or a preset name (randomly initialised with ``seed``; on the meta device
    only shapes exist, which is enough to count parameters of models too large for this machine)."""
    from .config import PRESETS, preset
    from .model import HybridLM
    if str(spec) in PRESETS:
        with torch.device("meta" if str(device) == "meta" else "cpu"):
            model = HybridLM(preset(str(spec)))
        if str(device) != "meta":
            model.init_weights(seed).to(device=device, dtype=dtype)
        return model.eval()
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"{spec!r} is neither a checkpoint directory nor a preset "
                                f"(presets: {', '.join(PRESETS)})")
    if str(device) == "meta":
        with torch.device("meta"):
            return HybridLM(read_config(p)).eval()
    return load_pretrained(p, dtype=dtype, device=device)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[name]
