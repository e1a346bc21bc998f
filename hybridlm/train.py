"""Training and fine-tuning: ``hybridlm train``, on one process or many (``torchrun``).

One optimizer step consumes ``batch_size`` sequences (the global batch), split into micro-batches of
``micro_batch`` sequences over ``world`` processes and ``accum`` accumulation steps:
``batch_size = micro_batch * world * accum``. The i-th sequence of training is fixed by the data order
alone (``data.SampleOrder``), whatever the world size, so 1 process and N processes see the same
batches and compute the same losses up to floating-point summation order.

Parallelism is PyTorch's own (torchtitan's approach, kept outside the model): DDP wraps the loss
module; FSDP2 (``fully_shard``) shards each decoder layer and then the root. Checkpoints hold full
(unsharded) state dicts keyed by parameter name (``torch.distributed.checkpoint.state_dict``), so a
run saved on N processes resumes on M.

The output directory is at every checkpoint a HuggingFace-format checkpoint (config.json,
model.safetensors, tokenizer files) plus ``train_state.pt`` (optimizer, scheduler, RNG, data position),
``metrics.jsonl`` and ``loss.png``. Resuming restores all of it and reproduces the uninterrupted
run's losses exactly.

Each file is replaced in one rename, but a checkpoint is several files: ``train_state.pt`` first (the
one file ``--resume`` reads), then the exported model. A run killed between the two renames leaves the
export one checkpoint behind (or absent); ``--resume`` compares the export with the state's weights
and re-exports it when they differ, and removes the temporary files a killed save leaves. The output
directory must be empty, this run's own (``train_state.pt``, or what a run leaves before its first
checkpoint), or given up with ``--overwrite``: a checkpoint from elsewhere is never silently mixed
with this run's files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import pickle
import random
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import PRESETS, HybridConfig, preset
from .model import HybridLM

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# every file a run writes into --out; each is written as NAME.tmp and renamed (loss.png as loss.png.tmp.png)
_RUN_FILES = (STATE_FILE, METRICS_FILE, "loss.png", "config.json", "model.safetensors",
              "model.safetensors.index.json", *_TOKENIZER_FILES)
_TEMP_FILES = tuple(f"{name}.tmp" for name in _RUN_FILES) + ("loss.png.tmp.png",)
# what a run killed before its first checkpoint leaves (nothing of value: no weights, no state)
_EARLY_FILES = (METRICS_FILE, "loss.png", *_TOKENIZER_FILES, *_TEMP_FILES)
# the files of a checkpoint directory that --overwrite removes, so that none of the old checkpoint (a
# weight shard, its chat template, its generation config) is left beside the new one
_CHECKPOINT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                     "config.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
                     "added_tokens.json", *_RUN_FILES, *_TEMP_FILES)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message says what was kept."""


@dataclass
class TrainConfig:
    """Train a hybrid model from scratch or fine-tune a checkpoint; OUT becomes a HuggingFace-format
    checkpoint (config.json, model.safetensors, tokenizer) with metrics.jsonl and loss.png beside it.

    Args:
        out: output directory (checkpoint, train_state.pt, metrics.jsonl, loss.png)
        preset: model preset to train from scratch (tiny, bench-88m, jamba-v0.1)
        init: checkpoint directory to fine-tune instead of a fresh preset (its tokenizer is used)
        overrides: model config changes, comma-separated key=value, e.g. "num_hidden_layers=4,layout=mmAm"
        data: stdlib (built-in corpus: this Python's standard library), a file, directory or glob of
            text / .jsonl / .parquet files, or hf:NAME[:CONFIG][@SPLIT] (HF datasets, online)
        text_field: field holding the text in JSONL / parquet / HF rows
        tokenizer: tokenizer.json, tokenizer.model or a directory holding one; default: the --init
            checkpoint's, else a byte-level BPE trained on the training split (cached)
        val_fraction: share of documents (by a hash of their path) held out for validation
        seq_len: tokens per training sequence
        batch_size: sequences per optimizer step, over all processes (the global batch)
        micro_batch: sequences per forward pass on each process; 0: batch_size / processes
        steps: optimizer steps in total
        lr: peak learning rate
        min_lr_ratio: final learning rate as a fraction of the peak (cosine decay)
        warmup: linear warmup steps
        weight_decay: AdamW weight decay (not applied to norms, biases, A_log, D)
        grad_clip: clip the global gradient norm to this (0: no clipping)
        dtype: bf16 (autocast; fp32 master weights), fp32, or auto: bf16 where its matmuls are fast (GPUs,
            CPUs with AVX512-BF16 or AMX), fp32 elsewhere (AVX2-only CPUs run torch's bf16 matmuls ~5x
            slower than fp32)
        checkpointing: activation checkpointing per layer (less memory, about a third more compute)
        activation_loss: Jamba-1.5 activation loss coefficient alpha (alpha * mean(x^2)); 0: off
        distill_from: a teacher checkpoint (same tokenizer): knowledge distillation, the teacher's logits on
            each batch are the target (a speculative decoding draft model: train a small model this way
            to agree with the model it drafts for)
        distill: with --distill-from: the loss is (1 - distill) * cross-entropy + distill * KL(teacher ||
            student)
        eval_every: validation every N steps (and at the end); 0: only at the end
        eval_sequences: validation sequences (a fixed, evenly spaced subset of the validation split)
        save_every: checkpoint every N steps (and at the end)
        seed: seed of the initial weights and of the data order
        resume: continue the run in OUT from its last checkpoint
        overwrite: replace what OUT holds (another run, or a checkpoint from elsewhere, including the
            --init checkpoint itself); without it a non-empty OUT that is not this run's is refused
        parallel: under torchrun: ddp or fsdp (FSDP2)
        threads: torch CPU threads per process; 0: torch's default
        cache_dir: token and tokenizer cache; default $HYBRIDLM_CACHE or ~/.cache/hybridlm
        plot: write loss.png at each checkpoint (needs matplotlib)
        sample_tokens: after training, generate this many tokens from --sample-prompt and print them
        sample_prompt: prompt of that sample
        progress: show progress bars

    Examples:
        hybridlm train --out runs/quickstart --sample-tokens 200
        hybridlm train --preset tiny --data ./my_texts --steps 1000 --save-every 100 --out runs/mine
        hybridlm train --init runs/tiny --data notes.jsonl --text-field body --lr 3e-4 --steps 200 --out runs/ft
        hybridlm train --out runs/quickstart --steps 300 --resume
        hybridlm train --init runs/tiny --data notes.txt --steps 50 --out runs/tiny --overwrite
        hybridlm train --init runs/quickstart --distill-from runs/big --lr 1e-3 --steps 300 --out runs/draft
        torchrun --nproc_per_node 2 -m hybridlm train --preset tiny --parallel fsdp --out runs/ddp
    """
    out: str = "runs/tiny"
    preset: str = "tiny"
    init: str = ""
    overrides: str = ""
    data: str = "stdlib"
    text_field: str = "text"
    tokenizer: str = ""
    val_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 8
    micro_batch: int = 0
    steps: int = 150
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "auto"
    checkpointing: bool = False
    activation_loss: float = 0.0
    distill_from: str = ""
    distill: float = 1.0
    eval_every: int = 50
    eval_sequences: int = 64
    save_every: int = 50
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    parallel: str = "ddp"
    threads: int = 0
    cache_dir: str = ""
    plot: bool = True
    sample_tokens: int = 0
    sample_prompt: str = "def "
    progress: bool = True

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        for name in ("seq_len", "batch_size", "steps", "save_every", "eval_sequences"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("micro_batch", "warmup", "eval_every", "threads", "sample_tokens"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} cannot be negative, got {getattr(self, name)}")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.grad_clip >= 0, f"--grad-clip cannot be negative (0 turns clipping off), got {self.grad_clip}")
        need(0 <= self.weight_decay < math.inf, f"--weight-decay must be a number >= 0, got {self.weight_decay}")
        need(0 <= self.activation_loss < math.inf,
             f"--activation-loss must be a number >= 0 (0 turns it off), got {self.activation_loss}")
        need(0 <= self.distill <= 1, f"--distill must be in [0, 1], got {self.distill}")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        need(abs(self.seed) < 2 ** 32, f"--seed must be in -4294967295..4294967295, got {self.seed}")
        from .cli import threads_problem
        need(threads_problem(self.threads) is None, threads_problem(self.threads))
        need(self.dtype in ("bf16", "fp32", "auto"), f"--dtype must be bf16, fp32 or auto, got {self.dtype!r}")
        need(self.parallel in ("ddp", "fsdp"), f"--parallel must be ddp or fsdp, got {self.parallel!r}")
        need(self.init or self.preset in PRESETS,
             f"unknown preset {self.preset!r}; available: {', '.join(PRESETS)} (or fine-tune with --init DIR)")

    # Flags that may differ on --resume: those that change how a run is carried out, not what it
    # computes (micro_batch changes the split of the global batch, so losses agree only to rounding),
    # and --steps, to extend a run (a note says that the schedule changes from there).
    RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "steps", "save_every", "eval_every", "threads", "cache_dir",
                         "plot", "sample_tokens", "sample_prompt", "progress", "micro_batch", "parallel")


def parse_overrides(text: str) -> dict:
    """"a=1,b=x,c=null" -> {'a': 1, 'b': 'x', 'c': None}: values read as JSON, else as strings."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--overrides: {item!r} is not key=value; write e.g. num_hidden_layers=4,layout=mmAm")
        if key.strip() not in {f.name for f in dataclasses.fields(HybridConfig)}:
            raise ValueError(f"--overrides: {key.strip()!r} is not a HybridConfig field")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


# ---- processes ---------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def all_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())


def _init_distributed() -> _Dist:
    """Read torchrun's environment; start the process group (gloo on CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world == 1:
        return _Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), device)


class LossModule(nn.Module):
    """The model's training loss as a module ``forward``: DDP and FSDP2 hook ``forward`` (gradient
    sync, parameter gathering), while the objective is ``HybridLM.loss``. ``teacher``: a frozen model
    whose logits the student learns (``--distill-from``); kept out of the module's parameters (a plain
    attribute in a tuple), so DDP/FSDP and the optimizer never see it."""

    def __init__(self, model: HybridLM, activation_loss: float, teacher: HybridLM | None = None,
                 distill: float = 1.0):
        super().__init__()
        self.model, self.activation_loss, self.distill = model, activation_loss, distill
        self._teacher = (teacher,)

    def forward(self, input_ids, targets):
        teacher = self._teacher[0]
        logits = None
        if teacher is not None:
            with torch.no_grad():
                logits = teacher(input_ids)
        return self.model.loss(input_ids, targets, activation_loss_coef=self.activation_loss,
                               teacher_logits=logits, distill=self.distill)


def autocast(device: torch.device | str, dtype: str):
    """The forward's precision context: bf16 autocast (fp32 master weights) or plain fp32."""
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """``auto``: bf16 where its matmuls are fast (GPUs, CPUs with AVX512-BF16 or AMX), else fp32."""
    if dtype != "auto":
        return dtype
    from . import kernels
    return "bf16" if torch.device(device).type != "cpu" or kernels._FAST_BF16 else "fp32"


KEYS = ("loss", "ce", "aux", "act", "kd", "agree")     # HybridLM.loss's terms, averaged over a step


def train_step(module: nn.Module, micro_batches, accum: int, params, grad_clip: float, dtype: str = "fp32",
               sync=None, reduce=None) -> dict:
    """Forward and backward of one optimizer step, gradients left in ``.grad`` (the caller steps the
    optimizer, after checking the loss is finite). ``hybridlm train`` and the ablation lab both train
    through this function.

    module: returns ``HybridLM.loss``'s dict from ``(input_ids, targets)`` (``LossModule``, possibly
        wrapped in DDP/FSDP); micro_batches: ``accum`` tuples (input_ids [b, l], targets [b, l], is_last);
        each micro-batch's loss is scaled by 1/accum, so the gradient is the global batch's mean.
    sync(is_last): a context for the backward (DDP's ``no_sync`` before the last micro-batch);
    reduce(t): averages a tensor over processes. Returns loss, ce, aux, act, kd, agree (HybridLM.loss) and
    the pre-clip grad_norm."""
    parts = None
    for x, y, last in micro_batches:
        with sync(last) if sync else contextlib.nullcontext():
            with autocast(x.device, dtype):
                out = module(x, y)
            (out["loss"] / accum).backward()
        p = torch.stack([out[k].detach().float() for k in KEYS]) / accum
        parts = p if parts is None else parts + p
    if reduce:
        parts = reduce(parts)
    clip = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if hasattr(norm, "full_tensor"):                                   # FSDP2: a DTensor
        norm = norm.full_tensor()
    return dict(zip(KEYS, parts.tolist()), grad_norm=float(norm))


# ---- the trainer -------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.d = _init_distributed()
        self.log = print if self.d.main else (lambda *a, **k: None)
        self.state = self._resume_state()
        self.tokenizer = self._prepare_tokenizer()
        self.model_config = self._model_config()
        self._prepare_data()
        self._build_model()
        self._check_sample_tokens()
        self.start_step = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self.last_saved = -1
        if self.d.main:                # after _build_model: with --init X --out X, X has been read
            self._tidy_out()
        self.d.barrier()
        if self.state is not None:
            self._restore(self.state)
            self.state = None          # the tensors now live in the model and optimizer

    # ---- setup ---------------------------------------------------------------------------------
    def _resume_state(self) -> dict | None:
        """The saved state of a run being resumed (None for a fresh run), after checking that the
        flags describe the same computation."""
        cfg, path = self.cfg, self.out / STATE_FILE
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; give a directory")
        if not path.exists():
            self._check_out_is_free()
            if cfg.resume:
                self.log(f"--resume: no checkpoint in {self.out} yet; starting from step 0")
            return None
        if not cfg.resume:
            if cfg.overwrite:
                self.log(f"--overwrite: the training run in {self.out} is replaced by this one")
                return None
            raise ValueError(f"{self.out} already holds a training run ({STATE_FILE}); pass --resume to "
                             f"continue it, --overwrite to replace it, or choose another --out")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
            raise ValueError(f"--resume: {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is damaged. "
                             f"Start over with --overwrite, or choose another --out") from None
        saved = state["config"]
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
                   for k, v in dataclasses.asdict(cfg).items()
                   if k not in TrainConfig.RESUME_MAY_CHANGE and saved.get(k) != v]
        if saved.get("steps") != cfg.steps:
            self.log(f"--resume: --steps {saved.get('steps')} -> {cfg.steps}: the learning-rate schedule is "
                     f"stretched from here on, so the run continues but no longer matches one planned for "
                     f"{cfg.steps} steps from the start")
        if changed:
            raise ValueError(f"--resume: this run's flags differ from the checkpoint's in {self.out}, which "
                             f"would not continue the same training: {'; '.join(changed)}. Rerun with the "
                             f"original values, or start a new run with another --out (or replace this one: "
                             f"--overwrite without --resume)")
        return state

    def _check_out_is_free(self):
        """Refuse a non-empty --out that holds no run of this trainer (a checkpoint from elsewhere, the
        --init checkpoint itself) unless --overwrite: writing there would mix its files with ours."""
        cfg = self.cfg
        names = sorted(p.name for p in self.out.iterdir()) if self.out.is_dir() else []
        if not names or cfg.overwrite:
            return
        init_here = bool(cfg.init) and Path(cfg.init).resolve() == self.out.resolve()
        early = METRICS_FILE in names and all(n in _EARLY_FILES and (self.out / n).is_file() for n in names)
        if early and not init_here:  # a run stopped before its first checkpoint: nothing of value to lose
            return
        if init_here:
            what = (f"--out {self.out} is the --init checkpoint itself: training would overwrite the "
                    f"checkpoint it starts from")
        else:
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} entries)" if len(names) > 6 else "")
            what = (f"--out {self.out} is not empty ({shown}) and holds no training run of its own ({STATE_FILE}); "
                    f"writing there would leave its files mixed with this run's checkpoint")
        raise ValueError(f"{what}. Choose another --out, or pass --overwrite to replace what it holds")

    def _check_sample_tokens(self):
        """--sample-tokens must fit the model's context (the sample's cache is allocated for it)."""
        cfg, cap = self.cfg, self.model_config.max_position_embeddings
        if cfg.sample_tokens and len(self.tokenizer.encode(cfg.sample_prompt)) + cfg.sample_tokens > cap:
            raise ValueError(f"--sample-tokens {cfg.sample_tokens} plus the --sample-prompt does not fit the model's "
                             f"context of {cap} tokens (max_position_embeddings); lower --sample-tokens")

    def _tidy_out(self):
        """Rank 0, before training: remove temporary files a killed save left; with --overwrite, the
        replaced checkpoint's files; on --resume, repair an export (and metrics.jsonl) the last save did
        not finish."""
        if not self.out.is_dir():
            return
        doomed = [self.out / n for n in _TEMP_FILES]
        if self.state is None and self.cfg.overwrite:
            if self.cfg.init and Path(self.cfg.init).resolve() == self.out.resolve():
                # fine-tuning in place: the starting checkpoint stays until the first save replaces it
                # (a run stopped before then loses nothing); only another run's state and logs go
                doomed += [self.out / n for n in (STATE_FILE, METRICS_FILE, "loss.png")]
            else:
                doomed += [p for g in _CHECKPOINT_GLOBS for p in self.out.glob(g)]
        for p in doomed:
            if p.is_file():
                p.unlink()
        if self.state is not None:
            self._repair_export(self.state)
            _truncate_metrics(self.out / METRICS_FILE, self.state["step"])

    def _repair_export(self, state: dict):
        """Re-export the model from ``state`` unless config.json and model.safetensors already hold
        exactly its weights: ``save`` renames train_state.pt first, so a run killed before the model's
        rename leaves the export one checkpoint behind (or, at the first save, absent)."""
        if self._export_matches(state["model"]):
            return
        _plain_model(self.model_config, state["model"]).save_pretrained(self.out)
        self.log(f"--resume: the exported model in {self.out} was not the one of {STATE_FILE} (step {state['step']}): "
                 f"the last save was interrupted; re-exported it")

    def _export_matches(self, msd: dict) -> bool:
        """Whether the exported checkpoint in OUT is config + ``msd`` exactly (one read of its weights)."""
        from .safetensors_io import SafeTensorsFile
        config, weights = self.out / "config.json", self.out / "model.safetensors"
        if not (config.is_file() and weights.is_file()) or (self.out / "model.safetensors.index.json").exists():
            return False
        try:
            if HybridConfig.from_json(config) != self.model_config:
                return False
            f = SafeTensorsFile(weights)
        except (ValueError, OSError):
            return False
        tied = self.model_config.tie_word_embeddings
        want = {k: v for k, v in msd.items() if not (tied and k == "lm_head.weight")}
        return set(f.keys()) == set(want) and all(
            f.dtype(k) == v.dtype and f.shape(k) == tuple(v.shape) and torch.equal(f.get(k), v)
            for k, v in want.items())

    def _prepare_tokenizer(self):
        """From OUT (resume), --tokenizer, the --init checkpoint, or trained on the corpus (rank 0
        trains, the others wait and read its result)."""
        from .data import Corpus, default_cache_dir
        from .tokenizer import load_tokenizer, train_tokenizer
        cfg = self.cfg
        if self.state is not None:
            return load_tokenizer(self.out)
        if cfg.tokenizer or cfg.init:
            return load_tokenizer(cfg.tokenizer or cfg.init)
        self.corpus = Corpus(cfg.data, cfg.text_field, cfg.val_fraction)
        vocab = self._base_config().vocab_size
        cache = Path(cfg.cache_dir or default_cache_dir()) / "tokenizers"
        digest = self._broadcast(self.corpus.scan()["digest"] if self.d.main else None)
        where = cache / f"bpe{vocab}-{digest[:24]}"
        if self.d.main and not (where / "tokenizer.json").exists():
            plan = self.corpus.scan()
            self.log(f"training a byte-level BPE tokenizer (vocab {vocab}) on {cfg.data} ...")
            tok = train_tokenizer(self.corpus.split("train"), vocab, plan["documents"] - plan["val_documents"],
                                  max_length=self._base_config().max_position_embeddings,
                                  show_progress=cfg.progress)
            tok.save(where)
        self.d.barrier()
        return load_tokenizer(where)

    def _broadcast(self, obj):
        if self.d.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _base_config(self) -> HybridConfig:
        cfg = self.cfg
        overrides = parse_overrides(cfg.overrides)
        if cfg.init:
            from .checkpoint import read_config
            base = read_config(Path(cfg.init))
            return base.replace(**overrides) if overrides else base
        return preset(cfg.preset, **overrides)

    def _model_config(self) -> HybridConfig:
        """The architecture: the checkpoint's on resume; else the preset/init config, with the
        tokenizer's vocabulary and special ids for a fresh model (printed, never silent)."""
        if self.state is not None:
            return HybridConfig.from_dict(self.state["model_config"])
        mc = self._base_config()
        tok = self.tokenizer
        if self.cfg.init:
            if tok.vocab_size > mc.vocab_size:
                raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but {self.cfg.init} embeds only "
                                 f"{mc.vocab_size}; use the checkpoint's own tokenizer")
            return mc
        changes = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        if tok.vocab_size != mc.vocab_size:
            self.log(f"model vocab_size {mc.vocab_size} -> {tok.vocab_size} (the tokenizer's)")
            changes["vocab_size"] = tok.vocab_size
        return mc.replace(**changes)

    def _prepare_data(self):
        from .data import (
            Corpus,
            PackedSequences,
            SampleOrder,
            evenly_spaced,
            open_tokens,
            tokenize_corpus,
        )
        cfg = self.cfg
        corpus = getattr(self, "corpus", None) or Corpus(cfg.data, cfg.text_field, cfg.val_fraction)
        # rank 0 tokenises (or finds the cache); the others map the files it names
        path = tokenize_corpus(corpus, self.tokenizer, cfg.cache_dir or None, progress=cfg.progress).path \
            if self.d.main else None
        self.tokens = tokens = open_tokens(Path(self._broadcast(str(path) if path else None)))
        self.train_seqs = PackedSequences(tokens.train, cfg.seq_len)
        self.val_seqs = PackedSequences(tokens.val, cfg.seq_len)
        if len(self.train_seqs) == 0:
            raise ValueError(f"the training split has {len(tokens.train)} tokens, fewer than --seq-len + 1 = "
                             f"{cfg.seq_len + 1}; lower --seq-len or add data")
        self.order = SampleOrder(len(self.train_seqs), cfg.seed)
        world = self.d.world
        self.micro = cfg.micro_batch or max(1, cfg.batch_size // world)
        if cfg.batch_size % (self.micro * world):
            raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch x processes "
                             f"= {self.micro} x {world}; change one of them")
        self.accum = cfg.batch_size // (self.micro * world)
        _check_micro_batch_fits(self.model_config, self.micro, cfg.seq_len, cfg.micro_batch == 0)
        if cfg.batch_size > len(self.train_seqs):    # e.g. --batch-size 1e8: one step would never end
            raise ValueError(f"--batch-size {cfg.batch_size} sequences per step is more than the training split's "
                             f"{len(self.train_seqs):,} windows of {cfg.seq_len + 1} tokens (one step would read the "
                             f"corpus {cfg.batch_size / len(self.train_seqs):,.0f} times); use --batch-size "
                             f"{len(self.train_seqs)} or less, or add data")
        val = evenly_spaced(len(self.val_seqs), cfg.eval_sequences)
        val = val[:len(val) // world * world]
        self.val_ids = val[self.d.rank::world]          # same count on every rank (FSDP needs that)
        if not self.val_ids:
            self.log(f"note: the validation split has {len(tokens.val)} tokens, less than one sequence per "
                     f"process; validation is off (raise --val-fraction or lower --seq-len)")

    def _build_model(self):
        cfg, mc = self.cfg, self.model_config
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if cfg.init and self.state is None:
            model = HybridLM.from_pretrained(cfg.init, dtype=torch.float32)
            if model.config != mc:
                model = self._reshape(model, mc)
        else:
            model = HybridLM(mc).init_weights(cfg.seed)
        model = model.float().to(self.d.device).train()
        model.requires_grad_(True)
        model.checkpointing = cfg.checkpointing
        self.model = model
        step = LossModule(model, cfg.activation_loss, self._teacher(mc), cfg.distill)
        if self.d.world > 1 and cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            # an expert that receives no token in a micro-batch gets no gradient: DDP must look for those
            has_moe = any(mc.is_moe(i) for i in range(mc.num_hidden_layers))
            step = DistributedDataParallel(step, find_unused_parameters=has_moe)
        elif self.d.world > 1:
            from torch.distributed.fsdp import fully_shard
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(step)
        self.step_module = step
        from .optim import build_optimizer, build_scheduler
        fsdp = self.d.world > 1 and cfg.parallel == "fsdp"
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, fused=not fsdp)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup, cfg.steps, cfg.min_lr_ratio)

    def _teacher(self, mc: HybridConfig) -> HybridLM | None:
        """--distill-from: the teacher, frozen, in fp32 on this process's device; it must read the
        student's tokens as the student does (same tokenizer), so its logits mean the same tokens."""
        cfg = self.cfg
        if not cfg.distill_from:
            return None
        from .tokenizer import load_tokenizer
        where = Path(cfg.distill_from)
        if not (where / "config.json").is_file():
            raise ValueError(f"--distill-from {cfg.distill_from}: not a checkpoint directory (no config.json); "
                             f"give the directory of a trained model (hybridlm train --out, or a HF checkpoint)")
        try:
            theirs = load_tokenizer(where).fingerprint()
        except (OSError, ValueError) as e:
            raise ValueError(f"--distill-from {cfg.distill_from}: its tokenizer cannot be read ({e}); the teacher "
                             f"needs the tokenizer it was trained with") from None
        if theirs != self.tokenizer.fingerprint():
            raise ValueError(f"--distill-from {cfg.distill_from}: its tokenizer differs from this run's; a teacher "
                             f"must share the student's tokenizer (train the student with --tokenizer "
                             f"{cfg.distill_from}, or --init a model that has it)")
        teacher = HybridLM.from_pretrained(where, dtype=torch.float32)
        if teacher.config.vocab_size != mc.vocab_size:
            raise ValueError(f"--distill-from {cfg.distill_from}: the teacher's vocabulary has "
                             f"{teacher.config.vocab_size} rows, the student's {mc.vocab_size}")
        self.log(f"distilling from {cfg.distill_from} ({teacher.num_params():,} parameters, frozen): loss = "
                 f"{1 - cfg.distill:g} x cross-entropy + {cfg.distill:g} x KL(teacher || student)")
        return teacher.to(self.d.device).eval().requires_grad_(False)

    @staticmethod
    def _reshape(model: HybridLM, mc: HybridConfig) -> HybridLM:
        """--init with --overrides: a model of the new config holding the checkpoint's weights."""
        new = HybridLM(mc)
        try:
            new.load_state_dict(model.state_dict())
        except RuntimeError as e:
            raise ValueError(f"--overrides change the shapes of the --init checkpoint's weights: {e}") from None
        return new

    # ---- state ---------------------------------------------------------------------------------
    def _full_state(self):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )
        return get_state_dict(self.model, self.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _restore(self, state: dict):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if torch.cuda.is_available() and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        if state.get("data_key", self.tokens.path.name) != self.tokens.path.name:
            self.log(f"note: the data differ from the checkpoint's (token cache {state['data_key']} -> "
                     f"{self.tokens.path.name}: a file or the tokenizer changed); training continues on the new "
                     f"data, so it will not reproduce the original run")
        self.start_step = self.last_saved = state["step"]
        self.tokens_seen, self.train_time = state["tokens"], state["train_time"]
        self.log(f"resumed {self.out} at step {self.start_step} ({self.tokens_seen:,} tokens seen)")

    def _params_finite(self) -> bool:
        ok = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                 for p in self.model.parameters())
        return self.d.all_true(ok)

    def save(self, step: int) -> HybridLM | None:
        """Checkpoint after ``step`` optimizer steps (collective: every process calls it). Returns, on
        rank 0, a plain model holding the full weights (for export and sampling)."""
        msd, osd = self._full_state()
        if not self.d.main:
            self.d.barrier()
            return None
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {"format": 1, "step": step, "samples": step * self.cfg.batch_size, "tokens": self.tokens_seen,
                 "train_time": self.train_time, "model": msd, "optimizer": osd,
                 "scheduler": self.scheduler.state_dict(), "rng": rng, "config": dataclasses.asdict(self.cfg),
                 "model_config": self.model_config.to_dict(), "world": self.d.world,
                 "data_key": self.tokens.path.name}
        self.out.mkdir(parents=True, exist_ok=True)
        # the resume state first: it alone is read by --resume, and it is replaced in one rename
        tmp = self.out / (STATE_FILE + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out / STATE_FILE)
        export = _plain_model(self.model_config, msd)
        export.save_pretrained(self.out)
        self.tokenizer.save(self.out)
        if self.cfg.plot:
            plot_metrics(self.out / METRICS_FILE, self.out / "loss.png")
        self.last_saved = step
        self.d.barrier()
        return export

    # ---- the loop ------------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """The training dtype, with 'auto' resolved for this device (see TrainConfig.dtype)."""
        return resolve_dtype(self.cfg.dtype, self.d.device)

    def _micro_batches(self, step: int):
        """(inputs, targets, is_last) of this process's micro-batches for optimizer step ``step``."""
        g, b, w = self.cfg.batch_size, self.micro, self.d.world
        for m in range(self.accum):
            first = step * g + (m * w + self.d.rank) * b
            x, y = self.train_seqs.batch([self.order[first + i] for i in range(b)])
            yield x.to(self.d.device), y.to(self.d.device), m == self.accum - 1

    def _sync_context(self, last: bool):
        """Gradients are all-reduced only on the last micro-batch of a step."""
        m = self.step_module
        if self.d.world > 1 and self.cfg.parallel == "fsdp":
            m.set_requires_gradient_sync(last)
        elif self.d.world > 1 and not last:
            return m.no_sync()
        return contextlib.nullcontext()

    def train_step(self, step: int) -> dict:
        return train_step(self.step_module, self._micro_batches(step), self.accum, self.model.parameters(),
                          self.cfg.grad_clip, self.dtype, sync=self._sync_context, reduce=self.d.mean)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token cross-entropy over the fixed validation subset (all processes together); with
        --distill-from, ``self.val_agree`` becomes the share of its positions where the student's most
        likely token is the teacher's."""
        if not self.val_ids:
            return None
        self.model.eval()
        total = torch.zeros(3, device=self.d.device)                     # sums of ce, agree (x sequences), sequences
        for i in range(0, len(self.val_ids), self.micro):
            x, y = self.val_seqs.batch(self.val_ids[i:i + self.micro])
            with autocast(self.d.device, self.dtype):
                out = self.step_module(x.to(self.d.device), y.to(self.d.device))
            total += torch.stack([out["ce"].float() * len(x), out["agree"].float() * len(x),
                                  torch.tensor(float(len(x)), device=self.d.device)])
        self.model.train()
        total = self.d.mean(total)
        self.val_agree = float(total[1] / total[2])
        return float(total[0] / total[2])

    def fit(self) -> dict:
        cfg, d = self.cfg, self.d
        if self.start_step >= cfg.steps:
            self.log(f"{self.out} is already at step {self.start_step} of {cfg.steps}; nothing to do")
            return {"step": self.start_step}
        self._describe()
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(self.out)
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=self.start_step, desc="train", unit="step", file=sys.stderr,
                   disable=not (d.main and cfg.progress), dynamic_ncols=True)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        if d.main:  # lines past the checkpoint (a killed run, or one stopped before its first save) go
            _truncate_metrics(self.out / METRICS_FILE, self.start_step)
        metrics_file = open(self.out / METRICS_FILE, "a") if d.main else None
        row, val, export = {}, None, None
        try:
            for step in range(self.start_step, cfg.steps):
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                m = self.train_step(step)
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    self._diverged(step, m)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                self.train_time += dt
                self.tokens_seen += tokens_per_step
                done = step + 1
                row = {"step": done, "loss": m["loss"], "ce": m["ce"], "aux": m["aux"], "lr": lr,
                       "grad_norm": m["grad_norm"], "tokens": self.tokens_seen, "tok_per_s": tokens_per_step / dt,
                       "train_time": self.train_time}
                if cfg.activation_loss:
                    row["act"] = m["act"]
                if cfg.distill_from:
                    row["kd"], row["agree"] = m["kd"], m["agree"]
                if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
                    val = self.evaluate()
                    if val is not None:
                        row["val_loss"], row["val_ppl"] = val, math.exp(min(val, 700.0))
                        agree = ""
                        if cfg.distill_from:
                            row["val_agree"] = self.val_agree
                            agree = f"  val agreement with the teacher {self.val_agree:.1%}"
                        if d.main:
                            bar.write(f"step {done}: train loss {m['ce']:.4f}  val loss {val:.4f}  "
                                      f"val ppl {row['val_ppl']:.2f}{agree}", file=sys.stderr)
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                bar.set_postfix_str(f"loss {m['loss']:.3f}  {row['tok_per_s']:.0f} tok/s  lr {lr:.2e}", refresh=False)
                bar.update(1)
                if done == cfg.steps or done % cfg.save_every == 0:
                    export = self.save(done)
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
        summary = {"step": cfg.steps, "loss": row.get("loss"), "val_loss": val,
                   "val_ppl": math.exp(min(val, 700.0)) if val is not None else None, "tokens": self.tokens_seen,
                   "train_time": self.train_time, "tok_per_s": self.tokens_seen / max(self.train_time, 1e-9)}
        if d.main:
            self._report(summary, export)
        return summary

    def _diverged(self, step: int, m: dict):
        """Stop with a clear message; keep a usable checkpoint. The bad update was not applied, so the
        weights are still those after step ``step`` (0-based count of completed steps)."""
        what = "loss" if not math.isfinite(m["loss"]) else "gradient norm"
        value = m["loss"] if what == "loss" else m["grad_norm"]
        self.optimizer.zero_grad(set_to_none=True)
        kept = self.last_saved
        if self._params_finite() and self.last_saved != step:
            self.save(step)
            kept = step
        where = (f"{self.out} holds the checkpoint of step {kept} (loadable by HybridLM.from_pretrained and "
                 f"transformers; --resume continues from it)" if kept >= 0 else
                 "no checkpoint was written (the weights were already non-finite)")
        raise TrainingDiverged(
            f"training diverged at step {step + 1}: the {what} is {value} (loss {m['loss']}, gradient norm "
            f"{m['grad_norm']}); the update was not applied and training stopped. {where}. To avoid it: "
            f"lower --lr (now {self.cfg.lr}), lengthen --warmup (now {self.cfg.warmup}), keep --grad-clip > 0 "
            f"(now {self.cfg.grad_clip}), or train in --dtype fp32 (now {self.dtype})")

    def _describe(self):
        cfg, mc = self.cfg, self.model_config
        n = self.model.num_params()
        t = self.tokens.meta["tokens"]
        self.log(f"model: {cfg.init or cfg.preset} {mc.pattern} ({n:,} parameters, vocab {mc.vocab_size})")
        self.log(f"data: {cfg.data}: {t['train']:,} training tokens ({len(self.train_seqs):,} sequences of "
                 f"{cfg.seq_len}), {t['val']:,} validation tokens ({len(self.val_ids) * self.d.world} sequences "
                 f"evaluated)")
        self.log(f"batch: {cfg.batch_size} sequences x {cfg.seq_len} tokens = {cfg.batch_size * cfg.seq_len:,} "
                 f"tokens/step ({self.d.world} process(es) x micro-batch {self.micro} x {self.accum} accumulation); "
                 f"{self.dtype}{' (auto)' if cfg.dtype == 'auto' else ''}"
                 f"{', activation checkpointing' if cfg.checkpointing else ''}"
                 f"{f', {cfg.parallel}' if self.d.world > 1 else ''}; {torch.get_num_threads()} threads/process")

    def _report(self, s: dict, export: HybridLM | None):
        val = f"val loss {s['val_loss']:.4f} (ppl {s['val_ppl']:.2f})" if s["val_loss"] is not None else "no validation"
        self.log(f"done: step {s['step']}, train loss {s['loss']:.4f}, {val}; {s['tokens']:,} tokens in "
                 f"{s['train_time']:.1f} s of training ({s['tok_per_s']:.0f} tok/s); checkpoint: {self.out}")
        if self.cfg.sample_tokens and export is not None:
            self.log(f"sample (temperature 0.8, prompt {self.cfg.sample_prompt!r}):\n" + sample(
                export, self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens, seed=self.cfg.seed))


def _plain_model(mc: HybridConfig, state_dict: dict) -> HybridLM:
    """A HybridLM whose parameters are the given (full, CPU) tensors, without copying them."""
    with torch.device("meta"):
        model = HybridLM(mc)
    model.load_state_dict(state_dict, assign=True)
    if mc.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def sample(model: HybridLM, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
           seed: int = 0) -> str:
    """Text continuing ``prompt``, cut at the first end-of-sequence token."""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eos_id]          # an empty prompt starts a new document
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed, stop_token_ids=[tokenizer.eos_id])
    new = []
    for t in out[0, len(ids):].tolist():  # up to the stop token (a stopped row is padded after it)
        if t in (tokenizer.eos_id, tokenizer.pad_id):
            break
        new.append(t)
    return prompt + tokenizer.decode(new)


def _metric_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of each row of metrics.jsonl. A torn last line (a run killed while writing it) is
    left out; a bad line elsewhere is a ValueError that says which."""
    lines = [(n, line) for n, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1)
             if line.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {n} is not a metrics row ({line[:80]!r}); remove the line (or move "
                             f"the file away) and rerun")
        out.append((line, row))
    return out


def _truncate_metrics(path: Path, step: int):
    """Drop lines logged after ``step`` (a killed run logs past its last checkpoint) and a torn last line."""
    if not path.exists():
        return
    keep = [line for line, row in _metric_lines(path) if row["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (of a running or killed run too: a torn last line is left out)."""
    return [row for _, row in _metric_lines(Path(path))]


def plot_metrics(metrics: str | Path, png: str | Path):
    """Training loss (per step, and a moving average) and validation loss against tokens seen."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, so {png} is not drawn (pip install 'hybridlm[train]')",
              file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics) if Path(metrics).exists() else []
    if not rows:
        return
    steps = [r["step"] for r in rows]
    ce = [r["ce"] for r in rows]
    k = max(1, len(ce) // 50)
    smooth = [sum(ce[max(0, i - k + 1):i + 1]) / len(ce[max(0, i - k + 1):i + 1]) for i in range(len(ce))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, ce, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
    ax.plot(steps, smooth, color="tab:blue", lw=1.5, label=f"train ({k}-step mean)")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png).with_name(Path(png).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)


def _check_micro_batch_fits(mc: HybridConfig, micro: int, seq_len: int, derived: bool):
    """Refuse a micro-batch whose activations cannot fit in this machine's memory, before any allocation
    (--batch-size 1e8 otherwise asks the allocator for petabytes). The estimate is a lower bound, so only
    hopeless sizes are refused: the logits and their gradient (2 x vocab floats per token) and one fp32 hidden
    state per layer and its gradient (2 x layers x hidden floats per token)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    per_seq = seq_len * 4 * (2 * mc.vocab_size + 2 * mc.num_hidden_layers * mc.hidden_size)
    if micro * per_seq <= ram:
        return
    what = f"--batch-size / processes = {micro}" if derived else f"--micro-batch {micro}"
    raise ValueError(f"{what} sequences of {seq_len} tokens need at least {micro * per_seq / 2**30:,.0f} GiB of "
                     f"activations, more than this machine's {ram / 2**30:,.0f} GiB of memory; pass a --micro-batch "
                     f"well below {ram // per_seq:,} (that many fill the memory with logits and hidden states alone; "
                     f"gradient accumulation keeps the global batch), or lower --batch-size")


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as ``cfg`` says; returns the final summary (step, loss, val_loss,
    val_ppl, tokens, train_time, tok_per_s). Raises TrainingDiverged on a NaN/inf loss."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return Trainer(cfg).fit()
    finally:
        torch.set_num_threads(threads)


def train_cli(**flags) -> int:
    cfg = TrainConfig(**flags)
    try:
        train(cfg)
    except TrainingDiverged as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"hybridlm train: {e}", file=sys.stderr)
        return 1
    except ImportError as e:                    # an optional dependency; the message says which
        print(f"hybridlm train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# The command's flags are TrainConfig's fields: cli.py reads this signature, type hints and docstring.
train_cli.__signature__ = inspect.signature(TrainConfig)
train_cli.__annotations__ = {**typing.get_type_hints(TrainConfig), "return": int}
train_cli.__doc__ = TrainConfig.__doc__
