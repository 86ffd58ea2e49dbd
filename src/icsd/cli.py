"""The `icsd` command line: one subcommand per stage, plus `run`, `report`, `compare` and `config`.

Only wiring lives here. Each stage command is derived from its stage's spec
(:mod:`icsd.stages`): the options are the fields of its config model (their descriptions are the
help), every command resolves its settings through :func:`icsd.config.resolve` (``RUN/config.yaml``
<- ``-c FILE`` with its ``base:`` chain <- ``--stage.key VALUE`` <- the command's own flags), the
stage function runs, the closing line is printed. User mistakes raise
:class:`icsd.errors.UserError` and end as one line with exit 2.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic.fields import FieldInfo

from .data import cli as data_cli
from .errors import UserError, write_failure_reason
from .sandbox import cli as sandbox_cli

if TYPE_CHECKING:
    from .stages._base import StageSpec

APP_SETTINGS: dict[str, Any] = dict(
    name="icsd",
    help="Train image captioners on multi-context synthetic data only (ICSD, AAAI 2024).\n\n"
    "Run `icsd run` for the offline quickstart, or one stage at a time:\n\n"
    "  icsd ingest captions.json --run runs/demo\n\n"
    "  icsd embed --run runs/demo && icsd group --run runs/demo --k 30\n\n"
    "Every stage command also takes -c FILE (a pipeline config or one stage's block) and\n"
    "--stage.key VALUE overrides; `icsd config show` prints what a command would use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# the commands that are not stages (caption, run, compare, config, sandbox, data, export); build_app adds the stages
commands = typer.Typer()
config_app = typer.Typer(help="Inspect resolved settings.", no_args_is_help=True)
commands.add_typer(config_app, name="config")
commands.add_typer(sandbox_cli.app, name="sandbox")
commands.add_typer(data_cli.app, name="data")
commands.command("export", epilog=data_cli.EXPORT_EPILOG)(data_cli.export_command)

EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _done(result: Any) -> None:
    for note in getattr(result, "notes", []):
        typer.echo(note, err=True)
    typer.echo(result.summary())


def _epilog(examples: tuple[str, ...]) -> str:
    """Examples block of ``--help``: commands indented, sentences (ending in a period) as they are."""
    return "Examples:\n\n" + "\n\n".join(e if e.endswith(".") else f"  {e}" for e in examples)


# ----------------------------------------------------------------------------- dotted overrides


def split_run_args(args: list[str], allow_config: bool = True) -> tuple[Path | None, dict[str, str]]:
    """``[CONFIG] [--stage.key VALUE | --stage.key=VALUE ...]`` in any order -> (config, overrides)."""
    config: Path | None = None
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            if config is not None or not allow_config:
                raise UserError(f"unexpected argument {arg!r}; overrides look like --stage.key VALUE")
            config = Path(arg)
            i += 1
            continue
        key, eq, value = arg.lstrip("-").partition("=")
        if "." not in key:
            raise UserError(f"unknown option {arg!r}; overrides look like --stage.key VALUE (see --help)")
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"override {arg} needs a value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return config, out


def stage_overrides(args: list[str], known_flags: list[str]) -> dict[str, str]:
    """The ``--stage.key VALUE`` arguments of a stage command; anything else is an unknown option."""
    from .registry import closest

    for arg in args:
        if arg.startswith("-") and "." not in arg.split("=", 1)[0]:
            flag = arg.split("=", 1)[0]
            raise UserError(f"unknown option {flag}{closest(flag, known_flags)}; see --help")
    return split_run_args(args, allow_config=False)[1]


# ----------------------------------------------------------------------------- options from fields


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type of a field annotation, whether it is a list)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _base_type(args[0])
    if origin is list:
        return str, True
    if annotation in (bool, int, float):
        return annotation, False
    return str, False


def _choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    for arg in typing.get_args(annotation):
        found = _choices(arg)
        if found:
            return found
    return []


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    choices = _choices(info.annotation)
    if choices and not all(c in text for c in choices):
        text += f" ({'|'.join(choices)})"
    default = info.get_default(call_default_factory=True)
    if default not in (None, [], "") and "default" not in text:
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text += f" [default: {shown}]"
    return text


def field_parameter(name: str, info: FieldInfo, positional: bool = False) -> inspect.Parameter:
    """The Typer parameter of one config field: ``--field-name`` (or the field's ``cli_flags``)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    kind, is_list = _base_type(info.annotation)
    dash = name.replace("_", "-")
    declared = extra.get("cli_flags")
    flags = [str(f) for f in declared] if isinstance(declared, list) else (
        [f"--{dash}/--no-{dash}"] if kind is bool else [f"--{dash}"])  # fmt: skip
    if positional:
        marker: Any = typer.Argument(help=info.description or "")
        annotation: Any = str
        default: Any = inspect.Parameter.empty
    elif _nullable_number(info):
        # int/float settings that may be null take "null" too (as in YAML); pydantic checks the value
        marker = typer.Option(*flags, help=_help(info), show_default=False, metavar=f"{kind.__name__.upper()}|null")
        annotation = str | None
        default = None
    else:
        marker = typer.Option(*flags, help=_help(info), show_default=False)
        annotation = list[str] | None if is_list else kind | None
        default = None
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, marker]
    )


def _nullable_number(info: FieldInfo) -> bool:
    """An int/float setting whose default is a number but that may be set to null."""
    kind, is_list = _base_type(info.annotation)
    nullable = type(None) in typing.get_args(info.annotation)
    return not is_list and kind in (int, float) and nullable and info.get_default() is not None


def _flag_value(info: FieldInfo, value: Any) -> Any:
    """Repeated or comma-separated list options -> one list; ``null`` for a nullable number -> None;
    other values pass through."""
    if isinstance(value, str) and _nullable_number(info):
        import yaml

        return yaml.safe_load(value)
    if value is None or not isinstance(value, list):
        return value
    return [part.strip() for item in value for part in str(item).split(",") if part.strip()]


@contextlib.contextmanager
def run_dir_guard(run: Path | None) -> Iterator[None]:
    """A command that fails leaves no run directory of its own making behind (an empty one)."""
    from .locks import LOCK_DIR

    created = run is not None and not run.exists()
    try:
        yield
    except BaseException:
        if created and run is not None and run.is_dir() and not any(p.name != LOCK_DIR for p in run.iterdir()):
            shutil.rmtree(run, ignore_errors=True)
        raise


@contextlib.contextmanager
def writing(run: Path | None, stage: str) -> Iterator[None]:
    """A stage command's hold on what it writes (readers, and commands without a run, hold nothing)."""
    from . import interrupt, locks

    interrupt.at(stage)
    if run is None or stage in READERS:
        yield
        return
    with locks.stage_writer(run, stage):
        yield


READERS = ("report",)


RUN_PARAM = inspect.Parameter(
    "run",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Annotated[Path, typer.Option("--run", "-r", help="Run directory (created if missing).")],
)
OPTIONAL_RUN_PARAM = inspect.Parameter(
    "run",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Path | None, typer.Option("--run", "-r", help="Run directory: read its settings, write into it.")
    ],
)
CONFIG_PARAM = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML file: a whole pipeline config (with base:) or one stage's block."),
    ],
)


def file_option(name: str, help_text: str) -> inspect.Parameter:
    """``--name PATH`` (optional) of a stage command (``StageSpec.file_options``)."""
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Path | None, typer.Option(f"--{name.replace('_', '-')}", help=help_text)],
    )


def stage_command(target: typer.Typer, spec: StageSpec) -> None:
    """Register ``icsd <stage>``: options from the stage's config fields, help from its spec."""
    stage = spec.name
    fields = spec.config.section().model_fields
    extra = tuple(file_option(name, text) for name, text in spec.file_options)
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [field_parameter(n, fields[n], positional=True) for n in spec.arguments]
    params += [OPTIONAL_RUN_PARAM if spec.run_optional else RUN_PARAM]
    params += [field_parameter(n, f) for n, f in fields.items() if n not in spec.arguments]
    params += [*extra, CONFIG_PARAM]
    own = {p.name for p in extra} | {"ctx", "run", "config"}
    known_flags = ["--run", "--config"] + [f"--{n.replace('_', '-')}" for n in fields]

    def command(ctx: typer.Context, **kw: Any) -> None:
        from .config import resolve
        from .store import RunDir

        run: Path | None = kw["run"]
        flags = {n: _flag_value(fields[n], v) for n, v in kw.items() if n not in own}
        overrides = stage_overrides(list(ctx.args), known_flags)
        with run_dir_guard(run):
            resolved = resolve(kw["config"], overrides, run, stage=stage, flags=flags)
            cfg = getattr(resolved.config, stage)
            with writing(run, stage):
                if spec.main is not None:
                    result = spec.main(cfg, run, {p.name: kw[p.name] for p in extra})
                else:
                    assert run is not None
                    result = spec.run(cfg, RunDir.at(run))
        table = getattr(result, "table", None)
        if table:
            typer.echo(table)
        _done(result)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = spec.summary
    command.__name__ = stage
    target.command(stage, context_settings=EXTRA_ARGS, epilog=_epilog(spec.examples))(command)


def add_stage_commands(target: typer.Typer) -> None:
    """One command per registered stage, in chain order (plugin stages included)."""
    from .stages import loaded_specs

    for spec in loaded_specs():
        stage_command(target, spec)



CAPTION_SETTINGS = ("beams", "min_new_tokens", "max_new_tokens", "batch_size", "device")
"""The decoding settings ``icsd caption`` takes: :class:`icsd.config.EvaluateConfig`'s fields, so
its flags, defaults, help and checks are those of ``icsd evaluate --model``."""


def add_caption_command(target: typer.Typer) -> None:
    """Register ``icsd caption``: images and checkpoint by hand, decoding options from ``EvaluateConfig``."""
    from pydantic import ValidationError

    from .config import EvaluateConfig, format_validation_error

    fields = EvaluateConfig.model_fields
    params = [
        inspect.Parameter(
            "images",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[list[str], typer.Argument(help="Image files, globs or folders.")],
        ),
        inspect.Parameter(
            "model",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[
                str, typer.Option("--model", "-m", help="Checkpoint folder (e.g. RUN/train/best).")
            ],
        ),
        *(field_parameter(name, fields[name]) for name in CAPTION_SETTINGS),
        inspect.Parameter(
            "format",
            inspect.Parameter.KEYWORD_ONLY,
            default="jsonl",
            annotation=Annotated[str, typer.Option("--format", "-f", help="jsonl | coco (results format)")],
        ),
        inspect.Parameter(
            "out",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None, typer.Option("--out", "-o", help="Output file (default: stdout).")
            ],
        ),
    ]

    def caption(**kw: Any) -> None:
        from .caption import caption_files

        given = {name: kw[name] for name in CAPTION_SETTINGS if kw[name] is not None}
        try:
            settings = EvaluateConfig.model_validate(given)
        except ValidationError as exc:
            raise UserError(format_validation_error(exc)) from None
        result = caption_files(
            kw["model"],
            kw["images"],
            **{name: getattr(settings, name) for name in CAPTION_SETTINGS},
            fmt=kw["format"],
            out=kw["out"],
        )
        typer.echo(result.summary(), err=kw["out"] is None)

    caption.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    caption.__doc__ = "Caption images with a trained checkpoint; unreadable files are reported and skipped."
    target.command(
        "caption",
        epilog="Examples:\n\n"
        "  icsd caption --model runs/coco/train/best photo.jpg\n\n"
        "  icsd caption --model runs/coco/train/best 'photos/*.jpg' --out captions.jsonl\n\n"
        "  icsd caption --model runs/coco/train/best coco/val2014 --format coco --out predictions.json",
    )(caption)


add_caption_command(commands)


# ----------------------------------------------------------------------------- whole chain


@commands.command(
    "run",
    context_settings=EXTRA_ARGS,
    options_metavar="[CONFIG] [OPTIONS] [--stage.key VALUE ...]",
    epilog="Examples:\n\n"
    "  icsd run                                    # the offline quickstart (CPU, no downloads)\n\n"
    "  icsd run configs/icsd_coco.yaml --run runs/coco     # or: icsd run -c configs/icsd_coco.yaml\n\n"
    "  icsd run configs/icsd_coco.yaml --from render --to train\n\n"
    "  icsd run --render.model CompVis/stable-diffusion-v1-4 --render.size 512\n\n"
    "  icsd run configs/icsd_coco.yaml --force summarize\n\n"
    "  icsd run configs/icsd_coco.yaml --rehearse --run runs/rehearsal   # a plan before the GPU-day",
)
def run_chain(
    ctx: typer.Context,
    run: Annotated[Path | None, typer.Option("--run", "-r", help="Run directory (default runs/<name>).")] = None,
    start: Annotated[str | None, typer.Option("--from", help="First stage to run.")] = None,
    stop: Annotated[str | None, typer.Option("--to", help="Last stage to run.")] = None,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Redo this stage from scratch (repeatable).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Pipeline config YAML (the same as CONFIG).")
    ] = None,
    rehearse: Annotated[
        bool,
        typer.Option(
            "--rehearse",
            help="Real architectures with random weights on a small slice, reduced steps, offline: "
            "a plan of the full run in RUN/rehearsal.json (--rehearse.captions N, .images, .steps, "
            ".train_steps, .batch, .eval_images, .prompts, .corpus_size).",
        ),
    ] = False,
) -> None:
    """icsd run [CONFIG] [--stage.key VALUE ...]: the whole chain.

    CONFIG is a pipeline YAML (default: the bundled offline quickstart). Settings resolve as
    RUN/config.yaml <- CONFIG (with its base: chain) <- --stage.key VALUE. Unchanged stages are
    skipped, interrupted ones resume. With --rehearse: every model at its real architecture with
    random weights, a small slice, reduced steps; prints and writes RUN/rehearsal.json.
    """
    from . import pipeline

    config_file, overrides = split_run_args(list(ctx.args))
    if config is not None and config_file is not None:
        raise UserError(f"two configs given ({config_file} and -c {config}); pass one")
    config_file = config if config is not None else config_file
    if rehearse:
        from .locks import run_writer
        from .rehearse import rehearse as run_rehearsal

        with run_dir_guard(run), run_writer(run) if run is not None else contextlib.nullcontext():
            rehearsal = run_rehearsal(config_file, overrides, run, echo=typer.echo)
        typer.echo(rehearsal.table)
        typer.echo(f"rehearsal: {rehearsal.document['wall_seconds']:.0f}s -> {rehearsal.path}")
        return
    if any(key.startswith("rehearse.") for key in overrides):
        raise UserError("--rehearse.* options need --rehearse")
    cfg = pipeline.load_config(config_file, overrides, run)
    run_path = run if run is not None else pipeline.default_run_dir(cfg)
    if cfg.notice:
        typer.echo(f"{cfg.name}: {cfg.notice}")
    with run_dir_guard(run_path):
        result = pipeline.run(cfg, run_path, start=start, stop=stop, force=force or [], echo=typer.echo)
    for line in closing_lines(result, cfg.notice):
        typer.echo(line)
    if config_file is None:
        typer.echo(
            "This was the offline quickstart in the sandbox world (docs/sandbox.md: what it shows and what\n"
            "it does not); the real-model smoke chain: icsd run pkg:configs/smoke.yaml.\n"
            "For the paper's setting on a GPU machine:\n"
            "  icsd run configs/icsd_coco.yaml   (see configs/README.md for the keys you must set)"
        )


def closing_lines(result: Any, notice: str | None = None) -> list[str]:
    """What ``icsd run`` ends with: the scores, the report, the model, the test images' folder and
    an ``icsd caption`` command on one of them that can be pasted as it is, then the chain's notice."""
    import shlex

    from .sandbox.report import evaluate_settings, test_examples

    root = result.run.root
    lines = [f"run: {len(result.ran)} stage(s) ran, {len(result.skipped)} skipped in {result.seconds:.1f}s -> {root}"]
    evals = sorted((root / "eval").glob("*/scores.json")) if (root / "eval").exists() else []
    lines += [f"  scores:       {f}{headline_score(f)}" for f in evals]
    if (root / "report.html").exists():
        lines.append(f"  report:       {root / 'report.html'}")
    model = next((root / "train" / n for n in ("best", "last") if (root / "train" / n / "config.json").exists()), None)
    if model is not None:
        lines.append(f"  model:        {model}")
    images = evaluate_settings(root).get("images")
    if images and Path(str(images)).is_dir():
        lines.append(f"  test images:  {images}")
        example = test_examples(root, 1)
        first = example[0].image if example else next((p for p in sorted(Path(str(images)).iterdir()) if p.is_file()), None)
        if model is not None and first is not None:
            lines.append(f"  caption one:  icsd caption --model {shlex.quote(str(model))} {shlex.quote(str(first))}")
    if notice:
        lines.append(f"note: {notice}")
    return lines


def headline_score(scores_file: Path) -> str:
    """`` (CIDEr 0.812, Bleu_4 0.301)`` from an evaluation's scores.json, or ``""``."""
    try:
        data = json.loads(scores_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    scores = data.get("scores", data) if isinstance(data, dict) else {}
    shown = [f"{k} {scores[k]:.3f}" for k in ("CIDEr", "Bleu_4") if isinstance(scores.get(k), int | float)]
    return f" ({', '.join(shown)})" if shown else ""


@config_app.command(
    "show",
    context_settings=EXTRA_ARGS,
    options_metavar="[OPTIONS] [--stage.key VALUE ...]",
    epilog="Examples:\n\n"
    "  icsd config show -c configs/ablation_k10.yaml\n\n"
    "  icsd config show -r runs/coco --origin\n\n"
    "  icsd config show -c configs/icsd_coco.yaml --train.batch_size 32 --stage train\n\n"
    "  icsd config show --stage evaluate     # the quickstart's test images and references",
)
def config_show(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Pipeline config YAML.")] = None,
    run: Annotated[
        Path | None, typer.Option("--run", "-r", help="Run directory whose config.yaml is the first layer.")
    ] = None,
    stage: Annotated[str | None, typer.Option(help="Show only this stage's settings.")] = None,
    origin: Annotated[bool, typer.Option("--origin", help="Say where each value came from.")] = False,
) -> None:
    """Print the settings a command would use, resolved as RUN/config.yaml <- -c FILE <- overrides,
    with every pkg: and sandbox: path as the file it names. With neither -c nor -r: the bundled
    quickstart's, what `icsd run` uses."""
    import yaml

    from .config import STAGE_CONFIGS, quickstart_config_path, resolve, to_yaml
    from .registry import closest

    if run is not None and not run.is_dir():
        raise UserError(f"no run at {run}")
    if config is None and run is None:
        config = quickstart_config_path()
    overrides = split_run_args(list(ctx.args), allow_config=False)[1]
    resolved = resolve(config, overrides, run)
    if stage is None:
        typer.echo(to_yaml(resolved, origin), nl=False)
        return
    if stage not in STAGE_CONFIGS:
        raise UserError(f"unknown stage {stage!r}{closest(stage, list(STAGE_CONFIGS))}")
    block = getattr(resolved.config, stage).model_dump(mode="json")
    for key, value in block.items():
        line = yaml.safe_dump({f"{stage}.{key}": value}, width=1000, allow_unicode=True).rstrip()
        typer.echo(f"{line}  # {resolved.origin(f'{stage}.{key}')}" if origin else line)


@commands.command(
    epilog="Examples:\n\n"
    "  icsd compare runs/icsd_coco runs/uni_coco\n\n"
    "  icsd compare runs/* --metric CIDEr --csv > table.csv"
)
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories.")],
    metric: Annotated[str | None, typer.Option(help="Show only this metric (e.g. CIDEr) and sort by it.")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV instead of Markdown.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of Markdown.")] = False,
) -> None:
    """One table across runs: the settings that differ, synthetic-data counts and every score."""
    from . import compare as cmp

    columns, rows = cmp.compare_rows(runs, metric)
    if as_json:
        typer.echo(cmp.to_json(columns, rows))
    elif as_csv:
        typer.echo(cmp.to_csv(columns, rows), nl=False)
    else:
        typer.echo(cmp.to_markdown(columns, rows))


def build_app() -> typer.Typer:
    """The command line over the stages registered now: one command per stage, then the others."""
    built = typer.Typer(**APP_SETTINGS)
    add_stage_commands(built)
    built.registered_commands += commands.registered_commands
    built.registered_groups += commands.registered_groups
    return built


app = build_app()


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    from . import interrupt

    previous = interrupt.install()
    try:
        _main()
    finally:
        interrupt.restore(previous)


def _main() -> None:
    from . import interrupt
    from .console import quiet_libraries

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)  # closing lines reach logs as they happen
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and interrupt.received() is None:
            raise
        typer.echo(interrupt.closing_line(), err=True)  # (Typer turns an interrupt into exit 130)
        sys.exit(interrupt.exit_code())
    except Exception as exc:
        reason = write_failure_reason(exc)
        if reason is None:
            raise
        typer.echo(f"error: cannot write to disk ({reason}); finished parts are kept: "
                   "free space (or fix the disk) and run the same command again", err=True)  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    main()
