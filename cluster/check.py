"""Check a run's config before any rank starts: `python -m cluster.check [--world-size N] <overrides>`.

The launch scripts run it first, so a typo in a path fails in seconds, on the login node's terminal,
with every problem listed at once, instead of once per rank after the ranks have started (or, for a
held-out file, after training). It composes the config exactly as `train.py` does (Hydra, then the
typed schema, which rejects unknown keys and wrong types), then checks every path the config names:
each `data.sources[i]` resolves to files, `heldout.file` exists, `deepspeed.config` is a usable
DeepSpeed JSON (config/deepspeed.py), a `data.chat_template` file exists (a name without a path or suffix is a
template, checked when the tokenizer loads), `model.name_or_path` and `model.tokenizer_name_or_path` exist
when they are local paths, an explicit `training.resume_from_checkpoint` is a directory, and
`output_dir` can be created. With `--world-size`, the checkpoint a resume would load is checked
against it (cluster/resume.py: a ZeRO checkpoint resumes only on the world size that saved it).

Exit status: 0 when the config passes, 2 with one line per problem (the config key first) otherwise.
Hydra flags (`--config-name`, `-m`, ...) are not understood here: the check then steps aside (status 0)
and leaves the config to `train.py`, except `-m` with a world size over 1 (status 2: launch/sweep.sh instead).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from cluster.resume import check_resume_compatible, resolve_resume_checkpoint
from config.deepspeed import check_deepspeed_config
from config.schema import RunConfig, did_you_mean, load_run_config
from data_pipeline.sources import resolve_files
from data_pipeline.templates import chat_template_path
from embedded.paths import EMBEDDED_PREFIX

EXIT_PROBLEMS = 2
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")


def _local_model_problem(key: str, value: str | None) -> str | None:
    """A local model directory that is not there. A name that is not a local path is a hub id: left to the hub."""
    if value is None or value.startswith(EMBEDDED_PREFIX):
        return None
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{key}: '{value}' is a file; give the model's directory (with config.json) or a hub id"
        return None
    if value.startswith(LOCAL_PATH_PREFIXES):
        return f"{key}: no such directory '{value}' (relative paths start at the launch directory {Path.cwd()})"
    return None


def _output_dir_problem(value: str) -> str | None:
    path = Path(value).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"output_dir: '{existing}' is a file, so '{value}' cannot be a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output_dir: cannot create or write '{value}': no write permission on '{existing}'"
    return None


def _names_a_file(chat_template: str) -> bool:
    """Whether `data.chat_template` names a file (a path, or a name with a suffix) rather than a template: one the
    project ships, or one of the tokenizer's named ones (`default`, `tool_use`), checked when the tokenizer loads."""
    return chat_template.startswith(LOCAL_PATH_PREFIXES) or "/" in chat_template or Path(chat_template).suffix != ""


def _failure(check: Callable[..., object], *args: object) -> str | None:
    """The message of the error `check(*args)` raises, or None when it passes."""
    try:
        check(*args)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return None


def config_problems(run: RunConfig, world_size: int | None = None) -> list[str]:
    """Every problem with the paths a composed run names (empty when it can start).

    Args:
        run: the typed config, as `train.py` builds it.
        world_size: the ranks the launcher will start; None skips the resume world-size check.
    """
    problems = [_failure(resolve_files, spec, index) for index, spec in enumerate(run.data.specs)]
    if run.heldout.file is not None and not Path(run.heldout.file).is_file():
        problems.append(
            f"heldout.file: no such file '{run.heldout.file}' (relative paths start at the launch directory "
            f"{Path.cwd()}); or heldout.file=null to skip the before/after comparison"
        )
    if run.data.chat_template is not None and _names_a_file(run.data.chat_template):
        problems.append(_failure(chat_template_path, run.data.chat_template))
    deepspeed_problem = _failure(check_deepspeed_config, run.deepspeed.config)
    problems.append(deepspeed_problem)
    problems.append(_local_model_problem("model.name_or_path", run.model.name_or_path))
    problems.append(_local_model_problem("model.tokenizer_name_or_path", run.model.tokenizer_name_or_path))
    problems.append(_output_dir_problem(run.output_dir))
    try:
        resume_from = resolve_resume_checkpoint(run.training.resume_from_checkpoint, run.output_dir)
    except ValueError as e:
        problems.append(str(e))
    else:
        if world_size is not None and deepspeed_problem is None:
            problems.append(_failure(check_resume_compatible, resume_from, world_size, run.deepspeed.config))
    return [problem for problem in problems if problem is not None]


def composition_message(error: Exception) -> str:
    """A config error as one message, with the closest valid key when Hydra refused a misspelled one."""
    cause = f" ({error.__cause__})" if error.__cause__ is not None and str(error.__cause__) not in str(error) else ""
    message = f"{error}{cause}"
    if (match := re.search(r"full_key: (\S+)", message)) and re.search(r"Key '[^']+' (is )?not in", message):
        message = f"unknown config key '{match.group(1)}'{did_you_mean(match.group(1))}"
    return message


def refuse_bad_overrides(argv: list[str]) -> None:
    """Compose the config as `train.py` will, and on a config error exit with one line and status 2, naming the
    closest valid key for a misspelled one (Hydra's own message would exit 1 without it). Hydra flags (`-m`, ...)
    are left to Hydra."""
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        load_run_config(argv)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: config: {composition_message(e)}", file=sys.stderr)  # noqa: T201  before any logging
        sys.exit(EXIT_PROBLEMS)


def main(argv: list[str] | None = None) -> int:
    """Check the config the overrides compose; print the problems. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m cluster.check", description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, help="ranks the launcher will start (checks a resume against it)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args, flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    # Only real problems reach the terminal: train.py logs the resume choice again, with its warnings.
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    if {"-m", "--multirun"} & set(flags) and (args.world_size or 1) > 1:
        print(  # noqa: T201
            f"cluster.check: -m with {args.world_size} ranks: a multi-rank launch cannot restart its process group "
            "between a sweep's jobs; launch each setting on its own (SWEEP=key=a,b launch/sweep.sh ...)",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    if flags:
        print(f"cluster.check: skipped, Hydra flags {flags} are left to train.py", file=sys.stderr)  # noqa: T201
        return 0
    try:
        run = load_run_config(args.overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        problems = [f"config: {composition_message(e)}"]
    else:
        problems = config_problems(run, args.world_size)
    if problems:
        print(f"cluster.check: {len(problems)} problem(s) in the run config:", file=sys.stderr)  # noqa: T201
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)  # noqa: T201
        return EXIT_PROBLEMS
    print("cluster.check: config and paths OK", file=sys.stderr)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
