"""Reading and writing HuggingFace-format Jamba checkpoints (config.json + safetensors), and those of
transformers' Mamba-2 hybrids Granite 4.0-H and Bamba (their names mapped in families.py).

Loading builds the model on the meta device and materialises one tensor at a time from the
memory-mapped safetensors files, so peak memory is the model plus one tensor, not twice the model.
Pickle files (pytorch_model*.bin) can run code when loaded; they are refused unless the caller opts
in with ``allow_pickle=True`` (and then read with ``torch.load(weights_only=True)``).

Checkpoints come from the internet: a malformed one (config.json, the shard index, a safetensors file)
is a ValueError or an OSError that names the file, never another exception's traceback.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .config import MAX_EXPERTS, HybridConfig, read_json
from .safetensors_io import SafeTensorsFile, save_file_streaming

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)   # what a float parameter loads from


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def find_weights(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in index order for sharded checkpoints."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_weight_map(index).values()))
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
            # the commands have no flag for this on purpose: converting once is the safe path
            raise ValueError(f"{path} holds only pickle weights ({pickles[0].name}); pickle files can run code "
                             f"when loaded, so they are refused. If you trust the source, convert them to "
                             f"safetensors once from Python: HybridLM.from_pretrained(path, allow_pickle=True)"
                             f".save_pretrained(new_path)")
        return pickles
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file map, checked: shards are plain file names beside the index."""
    d = read_json(index)
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict):
        raise ValueError(f"{index} is not a safetensors index: it needs a \"weight_map\" object mapping tensor "
                         f"names to shard files")
    bad = [f for f in wm.values() if not isinstance(f, str) or f in ("", ".", "..") or "/" in f or "\\" in f]
    if bad:
        raise ValueError(f"{index}: weight_map names shards that are not file names in its directory: {bad[:3]}")
    return wm


def _iter_tensors(files: list[Path]):
    """(name, lazy getter, shape) of every tensor in hub naming, expanding fused expert tensors."""
    for name, get, shape in _iter_raw(files):
        prefix, _, leaf = name.rpartition(".experts.")
        # a fused tensor of more experts than a config may have is left whole (and reported unexpected):
        # an empty one of shape [10**18, 0, 4] would otherwise be split for ever
        if leaf not in ("gate_up_proj", "down_proj") or len(shape) != 3 or not 0 < shape[0] <= MAX_EXPERTS:
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
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:      # pickle, zip and torch errors of many types
                raise ValueError(f"{f} is not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
            if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
                raise ValueError(f"{f} is not a state dict of tensors")
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
    d = read_json(path / "config.json")
    d = d.get("quantization_config") if isinstance(d, dict) else None
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"{path / 'config.json'}: quantization_config must be an object, got {d!r}")
    from .quant import QuantScheme
    return QuantScheme.from_config(d, source=str(path / "config.json"))


def _quant_layout(path: Path) -> str:
    """How a quantized checkpoint stores its integers: quant.LAYOUT, or "rows" (written before the tiles)."""
    from .quant import LAYOUT
    layout = read_json(path / "config.json")["quantization_config"].get("layout", "rows")
    if layout not in ("rows", LAYOUT):
        raise ValueError(f"{path / 'config.json'}: quantization_config has layout {layout!r}, which this version "
                         f"of hybridlm does not read ({LAYOUT!r} or 'rows'); upgrade hybridlm or re-quantize the "
                         f"original checkpoint with `hybridlm quantize`")
    return layout


def load_pretrained(path, dtype: torch.dtype | None = None, device="cpu", allow_pickle: bool = False,
                    quantize=None):
    """See HybridLM.from_pretrained. ``quantize`` (a quant.QuantScheme or its spelling, e.g. "int4"):
    quantize each linear weight as it is read, so memory never holds more than the quantized model plus
    one tensor. A checkpoint saved quantized loads into quantized layers by itself."""
    from .gguf import is_gguf, load_gguf
    if is_gguf(path):
        return _trainable(load_gguf(path, dtype=dtype, device=device, quantize=quantize))
    from .quant import QuantLinear, QuantScheme
    path = Path(path)
    cfg = read_config(path)
    stored = read_quantization(path)
    scheme = QuantScheme.parse(quantize) if quantize is not None else stored
    if stored is not None and scheme != stored:
        raise ValueError(f"{path} is already quantized ({stored}); load it without quantize=/--quantize, or "
                         f"quantize the original bf16/fp32 checkpoint to {scheme} instead")
    files = find_weights(path, allow_pickle)
    from .families import hub_to_ours
    _check_counts(cfg, path, hub_to_ours(cfg, _iter_tensors(files)))
    model, expected = meta_model(cfg, scheme)
    loaded, unexpected, mismatched = set(), [], []
    rows = {} if stored is not None and _quant_layout(path) == "rows" else None   # layer -> its row tensors
    for name, get, shape in hub_to_ours(cfg, _iter_tensors(files)):     # a Granite/Bamba file's names -> ours
        layer_name, _, leaf = name.rpartition(".")
        layer = _submodule(model, layer_name)
        if rows is not None and isinstance(layer, QuantLinear) and leaf in ("weight", "weight_scale", "weight_min"):
            # a checkpoint written before the tiles (quant.py): a layer's tensors in rows, tiled once all read
            part = rows.setdefault(layer_name, {})
            part[leaf] = get().to(device, copy=True)
            need = ("weight", "weight_scale") + (("weight_min",) if layer.weight_min is not None else ())
            if all(k in part for k in need):
                try:
                    part = rows.pop(layer_name)
                    layer.set_packed_rows(*(part.get(k) for k in ("weight", "weight_scale", "weight_min")))
                    loaded.update(f"{layer_name}.{k}" for k in need)
                except (ValueError, RuntimeError) as e:
                    mismatched.append(f"{layer_name}: {e}")
            continue
        if stored is None and isinstance(layer, QuantLinear) and leaf == "weight":
            # a float weight for a quantized layer: quantize it now, straight from the file map
            if shape != (layer.out_features, layer.in_features):
                mismatched.append(f"{name}: expected {[layer.out_features, layer.in_features]}, found {list(shape)}")
                continue
            w = get()
            if w.dtype not in _FLOATS:
                mismatched.append(f"{name}: expected a float tensor (F32, BF16, F16, F64), found {w.dtype}")
                continue
            layer.quantize_(w.to(device))
            del w
            release_freed_memory()
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
        if not keep and t.dtype not in _FLOATS:
            mismatched.append(f"{name}: expected a float tensor (F32, BF16, F16, F64), found {t.dtype}")
            continue
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
    return _trainable(model.eval())


_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.(?:.*\.experts\.(\d+)\.)?")


def _check_counts(cfg: HybridConfig, path: Path, tensors):
    """The config's layer and expert counts against the tensor names in the weights, before a model of that
    size is built: a config.json claiming 3,842 layers over a 2-layer file took 12-18 s and 110 MiB to
    build and refuse (benchmarks/fuzz.py), and 4,096 layers of 4,096 experts would take hours. Every layer
    and every expert has tensors of its own, so fewer in the file is the mismatch reported later anyway."""
    layers, experts = set(), set()
    for name, _, _ in tensors:
        if m := _LAYER_INDEX.match(name):
            layers.add(m.group(1))
            experts.add(m.group(2))
    experts.discard(None)
    moe = any(c.isupper() for c in cfg.pattern)
    if cfg.num_hidden_layers > len(layers) or (moe and cfg.num_experts > len(experts)):
        raise ValueError(f"checkpoint {path} does not match its config.json: the config has "
                         f"{cfg.num_hidden_layers} layers" + (f" of {cfg.num_experts} experts" if moe else "")
                         + f", the weights hold {len(layers)} layers" + (f" of {len(experts)} experts" if moe else ""))


def release_freed_memory():
    """Hand memory freed by the C allocator back to the OS (glibc's malloc_trim). Quantizing while loading
    frees an fp32 temporary between each two small quantized results, which leaves the heap fragmented and
    the freed pages resident: a 3B model quantized to int8 (3.1 GiB) held 4.4 GiB after loading without
    this. A no-op where the C library has no malloc_trim (macOS, musl)."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _trainable(model: nn.Module) -> nn.Module:
    """Parameters that require grad, as transformers' and PyTorch's modules have them, so fine-tuning a
    loaded model works; inference runs under torch.no_grad/inference_mode (generate, serve, bench, eval).
    A quantized model stays frozen: its weights are integer buffers (quant.py)."""
    from .quant import scheme_of
    return model.requires_grad_(scheme_of(model) is None)


def meta_model(cfg: HybridConfig, scheme=None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A model of ``cfg`` on the meta device (its linear layers empty QuantLinears under ``scheme``) for a
    loader to fill, and every tensor it expects by name (tied ones under both names)."""
    from .model import HybridLM
    from .quant import quantize_structure
    with torch.device("meta"):
        model = HybridLM(cfg)
    if scheme is not None:
        quantize_structure(model, scheme)
    return model, expected_tensors(model)


def expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer a loader fills, by name (tied ones under both names)."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update(model.named_buffers())
    return expected


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
    else:   # frozen while loading; load_pretrained makes the finished model trainable (_trainable)
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)


def save_pretrained(model, path, max_shard_bytes: int | None = None):
    """Write the hub layout: config.json and model.safetensors, or shards + model.safetensors.index.json
    when ``max_shard_bytes`` is set (see ``write_checkpoint``)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    config = {**model.config.to_dict(), "dtype": _dtype_name(next(model.parameters()).dtype)}
    if model.config.family is not None:          # Granite 4.0-H / Bamba: their tensor names (families.py)
        from .families import ours_to_hub
        sd = ours_to_hub(model.config, sd)
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
        from .gguf import gguf_meta_model, load_gguf
        if str(device) == "meta":
            return gguf_meta_model(spec, quantize)
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
