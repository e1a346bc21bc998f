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
from .safetensors_io import SafeTensorsFile, save_file_streaming

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


def read_quantization(path: Path):
    """The quant.QuantScheme recorded in a checkpoint's config.json, or None."""
    d = json.loads((path / "config.json").read_text()).get("quantization_config")
    if d is None:
        return None
    from .quant import QuantScheme
    return QuantScheme.from_config(d, source=str(path / "config.json"))


def load_pretrained(path, dtype: torch.dtype | None = None, device="cpu", allow_pickle: bool = False,
                    quantize=None):
    """See HybridLM.from_pretrained. ``quantize`` (a quant.QuantScheme or its spelling, e.g. "int4"):
    quantize each linear weight as it is read, so memory never holds more than the quantized model plus
    one tensor. A checkpoint saved quantized loads into quantized layers by itself."""
    from .gguf import is_gguf, load_gguf
    if is_gguf(path):
        return load_gguf(path, dtype=dtype, device=device, quantize=quantize)
    from .quant import QuantLinear, QuantScheme
    path = Path(path)
    cfg = read_config(path)
    stored = read_quantization(path)
    scheme = QuantScheme.parse(quantize) if quantize is not None else stored
    if stored is not None and scheme != stored:
        raise ValueError(f"{path} is already quantized ({stored}); load it without quantize=/--quantize, or "
                         f"quantize the original bf16/fp32 checkpoint to {scheme} instead")
    files = find_weights(path, allow_pickle)
    model, expected = meta_model(cfg, scheme)
    loaded, unexpected, mismatched = set(), [], []
    for name, get, shape in _iter_tensors(files):
        layer_name, _, leaf = name.rpartition(".")
        layer = _submodule(model, layer_name)
        if stored is None and isinstance(layer, QuantLinear) and leaf == "weight":
            # a float weight for a quantized layer: quantize it now, straight from the file map
            if shape != (layer.out_features, layer.in_features):
                mismatched.append(f"{name}: expected {[layer.out_features, layer.in_features]}, found {list(shape)}")
                continue
            layer.quantize_(get().to(device))
            loaded.update(f"{layer_name}.{k}" for k in ("weight", "weight_scale", "weight_min"))
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        want = tuple(expected[name].shape)
        if shape != want:
            why = " (quantized with another scheme or group size?)" if isinstance(layer, QuantLinear) else ""
            mismatched.append(f"{name}: expected {list(want)}, found {list(shape)}{why}")
            continue
        t = get()
        keep = isinstance(layer, QuantLinear) and leaf != "bias"   # packed integers and their scales
        t = t.to(device=device, dtype=None if keep else dtype or t.dtype, copy=True)  # own the memory, not the map
        if keep and t.dtype != expected[name].dtype:
            mismatched.append(f"{name}: expected {expected[name].dtype}, found {t.dtype}")
            continue
        _assign(model, name, t)
        loaded.add(name)
    tied_head = {"lm_head.weight", "lm_head.weight_scale", "lm_head.weight_min"}
    if cfg.tie_word_embeddings and not loaded & tied_head and "model.embed_tokens.weight" in loaded:
        if isinstance(model.lm_head, QuantLinear):   # quantizing while loading: lm_head from the embeddings
            model.lm_head.quantize_(model.model.embed_tokens.weight)
            cfg.tie_word_embeddings = False
        loaded.update(tied_head)
    elif cfg.tie_word_embeddings and "lm_head.weight" in loaded:
        _untie_if_stored(model, path)
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
        for p in model.parameters():             # parameters only: quantized layers keep their scale dtype
            p.data = p.data.to(dtype)
    return model.eval()


def meta_model(cfg: HybridConfig, scheme=None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A model of ``cfg`` on the meta device (its linear layers empty QuantLinears under ``scheme``) for a
    loader to fill, and every tensor it expects by name (tied ones under both names)."""
    from .model import HybridLM
    from .quant import quantize_structure
    with torch.device("meta"):
        model = HybridLM(cfg)
    if scheme is not None:
        quantize_structure(model, scheme)
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update(model.named_buffers())
    return model, expected


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _untie_if_stored(model, path: Path):
    """A config that says tie_word_embeddings but a checkpoint that stores its own lm_head.weight: when the
    two differ, the stored tensor is used and the model is untied (said once, here)."""
    import logging
    head, emb = model.lm_head.weight, model.model.embed_tokens.weight
    if head.shape == emb.shape and torch.equal(head, emb.to(head.dtype)):
        return
    logging.getLogger("hybridlm").warning(
        "%s: config.json says tie_word_embeddings but the checkpoint stores a different lm_head.weight; "
        "using the stored lm_head (the model is loaded untied)", path)
    model.config.tie_word_embeddings = False


def _assign(model: nn.Module, name: str, t: torch.Tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)


def save_pretrained(model, path, max_shard_bytes: int | None = None):
    """Write the hub layout: config.json and model.safetensors, or shards + model.safetensors.index.json
    when ``max_shard_bytes`` is set (see ``write_checkpoint``)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    config = {**model.config.to_dict(), "dtype": _dtype_name(next(model.parameters()).dtype)}
    from .quant import scheme_of
    scheme = scheme_of(model)
    if scheme is not None:
        config["quantization_config"] = scheme.to_config()
    write_checkpoint(path, config, {k: (tuple(sd[k].shape), sd[k].dtype) for k in sorted(sd)},
                     lambda k: [sd[k]], max_shard_bytes)


def write_checkpoint(path, config: dict, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], make,
                     max_shard_bytes: int | None = None):
    """Write ``config`` as config.json and the tensors of ``specs`` (name -> (shape, dtype), in file order)
    as model.safetensors, or as shards + model.safetensors.index.json past ``max_shard_bytes``.
    ``make(name)`` yields each tensor's data in row-major blocks, so peak memory is one block.
    Files are written under temporary names and renamed, so a crash never leaves a half-written
    checkpoint under the final names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = total = 0
    for k, (shape, dtype) in specs.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = (shape, dtype)
        size += nbytes
        total += nbytes
    meta = {"format": "pt"}
    written = []
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file_streaming(shard, make, path / (name + ".tmp"), metadata=meta)
        written.append(name)
    for name in written:
        os.replace(path / (name + ".tmp"), path / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        _write_atomic(path / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True))
    else:
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
    _write_atomic(path / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_model(spec: str | Path, dtype: torch.dtype | None = None, device="cpu", seed: int = 0, quantize=None):
    """A checkpoint directory, a ``.gguf`` file, or a preset name (randomly initialised with ``seed``; on the meta device
    only shapes exist, which is enough to count parameters of models too large for this machine).
    ``quantize``: a quant.QuantScheme or its spelling ("int8", "int4:g64", ...), applied while loading."""
    from .config import PRESETS, preset
    from .gguf import is_gguf
    from .model import HybridLM
    from .quant import QuantScheme, quantize_model, quantize_structure
    if is_gguf(spec):
        from .gguf import gguf_plan, load_gguf
        if str(device) == "meta":
            cfg, scheme, _ = gguf_plan(spec, quantize)
            return meta_model(cfg, scheme)[0].eval()
        return load_gguf(spec, dtype=dtype, device=device, quantize=quantize, progress=True)
    scheme = None if quantize in (None, "", "none") else QuantScheme.parse(quantize)
    if str(spec) in PRESETS:
        with torch.device("meta" if str(device) == "meta" else "cpu"):
            model = HybridLM(preset(str(spec)))
        if str(device) != "meta":
            model.init_weights(seed).to(device=device, dtype=dtype)
            if scheme is not None:
                quantize_model(model.requires_grad_(False), scheme)
        elif scheme is not None:
            quantize_structure(model, scheme)
        return model.eval()
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"{spec!r} is neither a checkpoint directory nor a preset "
                                f"(presets: {', '.join(PRESETS)})")
    if str(device) == "meta":
        with torch.device("meta"):
            model = HybridLM(read_config(p)).eval()
        scheme = scheme or read_quantization(p)
        return quantize_structure(model, scheme) if scheme is not None else model
    return load_pretrained(p, dtype=dtype, device=device, quantize=scheme)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[name]
