"""The ``hybridlm`` command line: a table of plain typed functions.

Each command is an ordinary function elsewhere in the package; its signature becomes the flags
(parameters without a default are positional, ``bool`` defaults become ``--flag``/``--no-flag``) and its
docstring becomes the help: the first paragraph is the summary, an ``Args:`` section documents the
flags, an ``Examples:`` section is shown as is. Modules are imported only when their command runs.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import typing

COMMANDS: dict[str, str] = {
    "generate": "hybridlm.generate:generate_cli",
    "chat": "hybridlm.chat:chat",
    "serve": "hybridlm.serve:serve",
    "train": "hybridlm.train:train_cli",
    "bench": "hybridlm.bench:bench",
    "quantize": "hybridlm.quant:quantize_cli",
    "export": "hybridlm.gguf:export_cli",
    "ablate": "hybridlm.eval.ablate:ablate",
    "eval": "hybridlm.eval.quality:eval_cli",
    "inspect": "hybridlm.summary:inspect_cmd",
    "plan": "hybridlm.summary:plan_cmd",
}


# the import names of each optional extra's packages (pyproject.toml), to name the one to install
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "jinja2", "tokenizers", "sentencepiece"),
    "train": ("tomli", "tokenizers", "numpy", "tqdm", "matplotlib", "pyarrow"),
    "gguf": ("gguf", "numpy", "tokenizers"),
    "plot": ("matplotlib",),
}
COMMAND_EXTRA = {"serve": "serve", "chat": "serve", "train": "train", "export": "gguf"}


class CLIError(Exception):
    """A user error: printed without a traceback, exit code 2."""


def set_threads(threads: int):
    """``--threads`` of the inference commands: torch's CPU threads (0 keeps torch's default). More threads
    than cores only slows torch and the kernels down (each waits on the others' time slices), so it is
    refused, as ``hybridlm train`` refuses it."""
    import torch
    problem = threads_problem(threads)
    if problem:
        raise CLIError(problem)
    if threads:
        torch.set_num_threads(threads)


def threads_problem(threads: int) -> str | None:
    """What is wrong with a ``--threads`` value (None: nothing); every command that takes one checks it so."""
    cores = os.cpu_count() or 1
    if threads < 0 or threads > cores:
        return (f"--threads {threads}: give 1 to {cores} (the CPU cores of this machine; more threads than cores "
                f"only slow torch and the kernels down), or 0 for torch's default")
    return None


def missing_dependency(e: ImportError, command: str | None = None) -> str:
    """What to say when ``command`` stops on ImportError ``e``: the package and the extra that installs it."""
    name = (e.name or "").split(".")[0]
    if not name or name == "hybridlm":      # our own message, which says what to install
        return str(e)
    extras = [x for x, mods in EXTRAS.items() if name in mods]
    extra = COMMAND_EXTRA.get(command) if COMMAND_EXTRA.get(command) in extras else (extras or ["all"])[0]
    return (f"{'this command' if command is None else command!r} needs the optional package {name!r}, which is "
            f"not installed; install it with: pip install 'hybridlm[{extra}]'")


def _load(target: str, command: str | None = None):
    mod, fn = target.split(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except ImportError as e:
        raise CLIError(missing_dependency(e, command)) from None


def _doc_parts(fn) -> tuple[str, dict[str, str], str]:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0]
    args, examples = {}, ""
    m = re.search(r"^Args:\n(.*?)(?=^\w+:\n|\Z)", doc, re.S | re.M)
    if m:
        for name, text in re.findall(r"^\s+(\w+):\s*(.*(?:\n\s{8,}.*)*)", m.group(1), re.M):
            args[name] = " ".join(text.split())
    m = re.search(r"^Examples:\n(.*)", doc, re.S | re.M)
    if m:
        examples = "examples:\n" + m.group(1)
    return summary, args, examples


def _base_type(ann):
    if ann is inspect.Parameter.empty:
        return str
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    return _base_type(args[0]) if args else ann


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in COMMANDS.items():
        try:
            fn = _load(target, name)
        except (CLIError, AttributeError, ModuleNotFoundError):
            sub.add_parser(name, help="(not available: missing module or optional dependency)")
            continue
        summary, arg_help, examples = _doc_parts(fn)
        p = sub.add_parser(name, help=summary.split("\n")[0], description=summary, epilog=examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        hints = typing.get_type_hints(fn)
        for pname, param in inspect.signature(fn).parameters.items():
            typ = _base_type(hints.get(pname, param.annotation))
            flag = "--" + pname.replace("_", "-")
            help_ = arg_help.get(pname, "")
            if pname == "model":  # every command names its model the same two ways: MODEL or --model MODEL
                p.add_argument("_model", nargs="?", metavar="MODEL", help=help_)
                p.add_argument("--model", dest="model", default=None, help="same as MODEL")
                p.set_defaults(_model_required=param.default is inspect.Parameter.empty or not param.default)
            elif param.default is inspect.Parameter.empty:
                p.add_argument(pname, type=typ, help=help_)
            elif typ is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default, help=help_)
            elif typing.get_origin(hints.get(pname)) is list or typ is list:
                p.add_argument(flag, nargs="*", default=param.default, help=help_)
            else:
                shown = f" (default: {param.default})" if param.default not in ("", None) else ""
                p.add_argument(flag, type=typ, default=param.default, help=f"{help_}{shown}".strip())
        p.set_defaults(_fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if not hasattr(args, "_fn"):
        try:
            _load(COMMANDS[args.command], args.command)
        except CLIError as e:    # the reason the command is not available
            print(f"hybridlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "_fn", "_model", "_model_required")}
    if hasattr(args, "_model"):
        if args._model and args.model and args._model != args.model:
            parser.error(f"{args.command}: model given twice ({args._model!r} and --model {args.model!r})")
        chosen = args._model or args.model
        if not chosen and args._model_required:
            parser.error(f"{args.command}: give the model: a checkpoint directory or a preset name "
                         f"(hybridlm {args.command} MODEL ... or --model MODEL)")
        if chosen:
            kwargs["model"] = chosen
        else:
            kwargs.pop("model")
    try:
        result = args._fn(**kwargs)
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except ImportError as e:  # an optional dependency, imported where the command first needs it
        if (e.name or "").split(".")[0] == "hybridlm":   # a bug of ours: its traceback
            raise
        print(f"hybridlm {args.command}: error: {missing_dependency(e, args.command)}", file=sys.stderr)
        return 2
    except (CLIError, OSError, ValueError) as e:   # OSError: missing, unreadable or not-a-directory paths
        print(f"hybridlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
