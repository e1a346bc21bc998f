"""Loader errors name what is wrong; pickle is refused; our safetensors I/O matches the reference library."""
import json

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.safetensors_io import SafeTensorsFile, save_file

from .conftest import make_hf_checkpoint


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    make_hf_checkpoint(tmp_path)
    f = SafeTensorsFile(tmp_path / "model.safetensors")
    sd = {k: f.get(k).clone() for k in f.keys()}
    sd.pop("model.layers.0.mamba.A_log")
    sd["model.layers.0.mamba.extra"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        HybridLM.from_pretrained(tmp_path)
    assert "missing tensors (1): model.layers.0.mamba.A_log" in str(e.value)
    assert "unexpected tensors (1): model.layers.0.mamba.extra" in str(e.value)


def test_shape_mismatch_says_expected_and_found(tmp_path):
    make_hf_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mamba_d_state"] = 6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.layers.0.mamba.A_log: expected \[64, 6\], found \[64, 8\]"):
        HybridLM.from_pretrained(tmp_path)


def test_pickle_refused_unless_opted_in(tmp_path):
    model = make_hf_checkpoint(tmp_path / "src")
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle files can run code") as e:
        HybridLM.from_pretrained(tmp_path / "pkl")
    # the refusal names an option that exists (the old message advertised a CLI flag no command has)
    assert "--allow-pickle" not in str(e.value)
    assert "HybridLM.from_pretrained(path, allow_pickle=True).save_pretrained(new_path)" in str(e.value)
    ours = HybridLM.from_pretrained(tmp_path / "pkl", allow_pickle=True)
    x = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert (ours(x) - model(x, use_cache=False).logits).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "converted")       # the advice, followed: safetensors from then on
    with torch.no_grad():
        assert torch.equal(HybridLM.from_pretrained(tmp_path / "converted")(x), ours(x))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HybridLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HybridLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        HybridLM.from_pretrained(tmp_path)


def test_safetensors_io_matches_reference_library(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "e": torch.zeros(0, 2)}
    save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    theirs = safetensors.load_file(tmp_path / "ours.safetensors")
    for k, t in tensors.items():
        assert torch.equal(theirs[k], t) and theirs[k].dtype == t.dtype
    safetensors.save_file(tensors, tmp_path / "ref.safetensors")
    f = SafeTensorsFile(tmp_path / "ref.safetensors")
    assert sorted(f.keys()) == sorted(tensors)
    for k, t in tensors.items():
        assert torch.equal(f.get(k), t) and f.dtype(k) == t.dtype


def test_truncated_safetensors_is_reported(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-50])
    with pytest.raises(ValueError, match="truncated"):
        SafeTensorsFile(tmp_path / "x.safetensors")


def test_loaded_weights_do_not_alias_the_file(tmp_path):
    """Parameters own their memory: training can update them in place after loading."""
    make_hf_checkpoint(tmp_path)
    m = HybridLM.from_pretrained(tmp_path)
    for p in m.parameters():
        p.data.add_(1.0)   # would crash on a read-only file mapping


def test_loading_does_not_need_twice_the_checkpoint_in_memory(tmp_path):
    """Peak RSS growth while loading a 354 MB checkpoint stays well under 2x its size (measured in a
    fresh process: the model on the meta device, tensors materialised one at a time)."""
    import subprocess
    import sys

    from hybridlm.checkpoint import load_model
    load_model("bench-88m").save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    code = ("import sys; from hybridlm import HybridLM; from hybridlm.bench import peak_rss_bytes as p; "
            "b = p(); HybridLM.from_pretrained(sys.argv[1]); print(p() - b)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    growth = int(r.stdout.strip())
    assert size <= growth < 1.5 * size


def test_from_pretrained_gives_trainable_parameters(tmp_path):
    """As transformers and plain PyTorch do: fine-tuning a loaded model from the Python API works (the old
    loader froze every parameter: 'element 0 of tensors does not require grad')."""
    make_hf_checkpoint(tmp_path)
    m = HybridLM.from_pretrained(tmp_path)
    assert all(p.requires_grad for p in m.parameters())
    x = torch.randint(0, 97, (2, 9))
    m.train().loss(x[:, :-1], x[:, 1:])["loss"].backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "experts" not in n)
    with torch.no_grad():                               # inference: no graph, as generate/serve/bench run
        assert not m.eval()(x).requires_grad


def test_quantized_load_stays_frozen(tmp_path):
    """Quantized weights are integer buffers: a quantized model is for inference and its remaining
    float parameters (norms, biases) stay frozen, as quantize_model leaves them."""
    make_hf_checkpoint(tmp_path)
    m = HybridLM.from_pretrained(tmp_path, quantize="int8")
    assert not any(p.requires_grad for p in m.parameters())
