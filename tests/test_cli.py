"""CLI commands that need no optional extras: inspect, plan, generate on a preset; help and errors."""
import subprocess
import sys

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.cli import COMMANDS, build_parser, main
from hybridlm.summary import max_context, memory_plan, parse_bytes, transformer_twin


def test_every_command_parses_help():
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--help"])
        assert e.value.code == 0


def test_inspect_preset(capsys):
    assert main(["inspect", "bench-88m"]) == 0
    out = capsys.readouterr().out
    assert "layout mMmMaMmM" in out
    assert "total 88,557,504" in out
    assert "4  a  ATTENTION | MLP" in out and "1  M  Mamba     | MoE 4x top-2" in out


def test_inspect_checkpoint_and_big_preset(tmp_path, capsys):
    HybridLM(preset("tiny")).init_weights(0).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "layout mMmMaMmM" in capsys.readouterr().out
    assert main(["inspect", "jamba-v0.1"]) == 0   # 52B parameters: counted on the meta device
    out = capsys.readouterr().out
    assert "32 layers (4 attention, 28 Mamba; 16 MoE)" in out


def test_plan_matches_allocated_cache():
    cfg = preset("tiny", layout="mMwMaMmM", sliding_window=64)
    m = HybridLM(cfg).to(torch.bfloat16)
    cache = m.new_cache(2, 1000)
    plan = memory_plan(cfg, 1000, batch=2)
    nb = cache.nbytes()
    assert (plan.kv, plan.conv, plan.ssm) == (nb["kv"], nb["conv"], nb["ssm"])
    assert plan.weights == sum(p.numel() for p in m.parameters()) * 2


def test_plan_reproduces_jamba_kv_claim(capsys):
    """Jamba paper Table 1: 4 GB KV cache at 256K tokens vs 32 GB for an all-attention model."""
    cfg = preset("jamba-v0.1")
    hybrid = memory_plan(cfg, 262144).kv
    dense = memory_plan(transformer_twin(cfg), 262144).kv
    assert hybrid == 4 * 2**30 and dense == 32 * 2**30
    assert main(["plan", "jamba-v0.1", "--context", "262144", "--budget", "200GB"]) == 0
    out = capsys.readouterr().out
    assert "8.0x less" in out and "longest context within 200.0 GiB" in out


def test_max_context_and_budget_parsing():
    cfg = preset("bench-88m")
    budget = parse_bytes("1GB")
    n = max_context(cfg, budget)
    assert memory_plan(cfg, n).total <= budget < memory_plan(cfg, n + 1).total
    assert parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="cannot read memory size"):
        parse_bytes("lots")


def test_generate_cli_with_preset(capsys):
    assert main(["generate", "tiny", "--prompt", "5 6 7", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 4 and all(t.isdigit() for t in out)


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plan", "tiny", "--context", "many"])
    assert e.value.code == 2


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "hybridlm", "inspect", "tiny"], capture_output=True, text=True)
    assert r.returncode == 0 and "layout mMmMaMmM" in r.stdout


def test_absurd_sizes_are_one_line_errors(capsys):
    """--max-new-tokens past the context and memory sizes like 1e400 are refused before anything is
    allocated (issue 16: they gave a 25.6 GB allocation and an OverflowError traceback)."""
    assert main(["generate", "tiny", "--prompt", "5 6 7", "--max-new-tokens", "100000000"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    assert main(["plan", "tiny", "--budget", "1e400GB"]) == 2
    assert "out of range" in capsys.readouterr().err
    from hybridlm.summary import parse_bytes
    assert parse_bytes("8GB") == 8 << 30 and parse_bytes("1e9") == 10 ** 9
    with pytest.raises(ValueError):
        parse_bytes("1.2.3G")


def test_more_threads_than_cores_is_a_one_line_error(tmp_path, capsys):
    import os
    too_many = str((os.cpu_count() or 1) + 1)
    for argv in (["chat", "tiny", "--threads", too_many], ["bench", "tiny", "--threads", too_many],
                 ["serve", "tiny", "--threads", "-1"]):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
        # chat and serve refuse a preset first (no tokenizer); bench checks the threads before anything runs
        assert code == 2 and len(err.splitlines()) == 1, err
        if argv[0] == "bench":
            assert "--threads" in err and "CPU cores" in err
    from hybridlm.cli import CLIError, set_threads
    with pytest.raises(CLIError, match="CPU cores"):
        set_threads(int(too_many))
    with pytest.raises(CLIError, match="CPU cores"):
        set_threads(-1)
