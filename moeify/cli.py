"""The `moeify` command line.

    moeify inspect model.py[:NAME]                       FFN regions found and candidates skipped
    moeify convert model.py[:NAME] -o out/ [options]     convert, verify, save, print a summary
    moeify export out/ -o model.onnx [--mode fused]      ONNX for onnxruntime (checked against PyTorch)
    moeify convert-checkpoint model.py dense.safetensors -o out/   out-of-core upcycling, one layer in memory
                                                         (or a Hugging Face folder / its index.json)
    moeify stats out/ [--plot util.png]                  router statistics and expert-utilisation heatmap

Every `MoEConfig` field is an option (`--num-experts 8 --top-k 2 --router switch ...`), generated
from the dataclass so the CLI never lags behind the config. Errors print one line and exit 2; the
traceback only with `--debug`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from moeify.config import DROP_POLICIES, EXPORT_ATOL, INITS, ROUTERS, SPLIT_METHODS, MoEConfig
from moeify.errors import ConfigError, MoeifyError, one_line

_SCALAR = {"int": int, "float": float, "str": str}


class _Unset:
    """The value `--capacity-factor none` gives: set the field to None (an option not given is None too)."""

    def __repr__(self) -> str:
        return "none"


class OrNone(click.ParamType):
    """A number, or `none` / `null` for a field that may be None (to override a --config file's value)."""

    def __init__(self, kind: type) -> None:
        self.kind, self.name = kind, f"{kind.__name__}|none"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, _Unset) or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return _Unset()
        try:
            return self.kind(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not {'an integer' if self.kind is int else 'a number'} or none", param, ctx)


def _option_for(f: dataclasses.Field):
    """A click option for one MoEConfig field; None for fields the CLI does not expose."""
    if f.name == "version":
        return None
    flag = "--" + f.name.replace("_", "-")
    kind = str(f.type).replace(" ", "")
    help_text = f"{f.metadata['help']} (MoEConfig.{f.name}, default {f.default!r})"
    choices = {"router": ROUTERS, "init": INITS, "split_method": SPLIT_METHODS, "drop_policy": DROP_POLICIES}
    if f.name in choices:
        help_text += f": one of {', '.join(choices[f.name])}"
    if kind == "bool":
        return click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text)
    if kind.startswith("tuple["):
        inner = _SCALAR[kind[len("tuple["):].split(",")[0]]
        return click.option(flag, f.name, type=inner, multiple=True, help=help_text + "; repeat for several")
    base = kind.split("|")[0]
    if base in _SCALAR and "|None" in kind and base != "str":
        return click.option(flag, f.name, type=OrNone(_SCALAR[base]), default=None,
                            help=help_text + "; none sets None")
    if base in _SCALAR:
        return click.option(flag, f.name, type=_SCALAR[base], default=None, help=help_text)
    raise TypeError(f"MoEConfig.{f.name} has a type the CLI cannot express: {f.type}")


def config_options(fn):
    for f in reversed(dataclasses.fields(MoEConfig)):
        option = _option_for(f)
        if option is not None:
            fn = option(fn)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="JSON file with MoEConfig fields; options given on the command line override it")(fn)


def build_config(config_file: str | None, options: dict[str, Any]) -> MoEConfig:
    data: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {config_file} does not exist: pass a JSON file of MoEConfig fields")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {config_file} is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            kind = {"list": "an array", "str": "a string", "NoneType": "null", "bool": "a boolean"}.get(
                type(data).__name__, "a number")
            raise ConfigError(f"config file {config_file} holds {kind}, not a JSON object of MoEConfig fields: "
                              'write {"num_experts": 8, ...}')
    from_file = set(data)
    for f in dataclasses.fields(MoEConfig):
        value = options.get(f.name)
        if value is None or (isinstance(value, tuple) and not value):
            continue
        data[f.name] = None if isinstance(value, _Unset) else value
        from_file.discard(f.name)
    try:
        return MoEConfig.from_dict(data)
    except ConfigError as exc:  # the options' values: say which options (from --config too, which they override)
        def origin(name: str) -> str:
            if name in from_file:
                return f"from {config_file}"
            return "" if name in data else "the default"
        raise ConfigError(cli_spelling(str(exc), origin)) from exc


def cli_spelling(message: str, origin: Callable[[str], str] = lambda name: "") -> str:
    """A config error's Python spellings of MoEConfig fields as this CLI's options: `MoEConfig.num_experts=1` is
    `--num-experts 1`, `router='topk'` `--router topk`, `preserve_scale=False` `--no-preserve-scale`,
    `capacity_factor=None` `no --capacity-factor` and `layers=(0, 2)` `--layers 0 --layers 2`.

    The value the error is about (`MoEConfig.` before its name) says where it came from when `origin(name)`
    does: a --config file's value is spelled as in JSON (`top_k=0 (from cfg.json)`, `"router": "x"` as
    `router="x"`), a default is marked (`--top-k 2 (the default)`)."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(MoEConfig) if f.name != "version"}
    names = "|".join(sorted(kinds, key=len, reverse=True))

    def option(match: re.Match) -> str:
        subject, name, value = match.group(1), match.group(2), match.group(3)
        where = origin(name) if subject else ""
        try:
            literal = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # inf, nan
            literal = value
        if where.startswith("from "):
            return f"{name}={json.dumps(literal) if literal is not value else value} ({where})"
        flag = "--" + name.replace("_", "-")
        if value == "None":
            spelled = f"no {flag}"
        elif kinds[name] == "bool" and value in ("True", "False"):
            spelled = flag if value == "True" else f"--no-{flag[2:]}"
        elif isinstance(literal, tuple):
            spelled = " ".join(f"{flag} {item}" for item in literal) or f"no {flag}"
        else:
            spelled = f"{flag} {value.strip(chr(39))}"
        return f"{spelled} ({where})" if where else spelled

    return re.sub(rf"(MoEConfig\.)?\b({names})=('[^']*'|\([^()]*\)|[\w.+-]+)", option, message)


def handle_errors(fn):
    """Print a MoeifyError as one line and exit 2; anything else that escapes (a bug, or input moeify
    did not foresee) as one line naming its type, and exit 1. `--debug` re-raises with the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except BrokenPipeError:  # the reader went away (`moeify inspect ... | head`): stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
            ctx.exit(128 + signal.SIGPIPE)
        except Exception as exc:  # noqa: BLE001 - the last resort: one line, not a traceback
            if ctx.find_root().params.get("debug"):
                raise
            if isinstance(exc, MoeifyError):
                click.echo(f"error: {exc}", err=True)
                ctx.exit(2)
            click.echo(f"error: {one_line(exc)} (moeify --debug {ctx.info_name} ... shows the traceback)",
                       err=True)
            ctx.exit(1)

    return wrapper


def load_model(spec: str):
    """(dense model, python module, ModelSource) for a model.py[:NAME] or package.module:factory spec."""
    from moeify.source import ModelSource

    source = ModelSource.parse(spec)
    model, module = source.build()
    return model, module, source


class OneLineErrors(click.Group):
    """click's own errors (a bad option value, a missing argument, a path that does not exist) as one
    `error: ...` line naming the help to read, as moeify's own are, with click's exit code (2); an
    interrupt as "Aborted!" and exit 1. The rest of click's standalone handling is unchanged."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "moeify"
            message = " ".join(exc.format_message().split())
            click.echo(f"error: {message} (`{where} --help` lists what it takes)", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors)
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.version_option(package_name="moeify")
def main(debug: bool) -> None:
    """moeify: convert dense PyTorch FFNs into sparsely gated Mixture-of-Experts layers."""


@main.command()
@click.argument("model_spec")
@handle_errors
def inspect(model_spec: str) -> None:
    """List the FFN regions of MODEL_SPEC (model.py[:NAME]) and the candidates skipped, without converting."""
    from moeify.convert import find_regions, nearest_candidates, task_heads
    from moeify.passes.plan_regions import plan_regions

    model, _, _ = load_model(model_spec)
    found, skipped, cap = find_regions(model)
    skipped = skipped + plan_regions([f.owner for f in found], MoEConfig(), task_heads(found))[1]  # as convert's
    if not found and not skipped:  # nothing to list: say why, as convert would
        click.echo(f"{type(model).__name__}: 0 FFN regions: {nearest_candidates(skipped, model, cap)}")
        return
    click.echo(f"{type(model).__name__}: {len(found)} FFN region(s)")
    rows = [("owner", "kind", "activation", "d_model", "d_ff", "linears", "captured by")]
    rows += [(f.owner or "<model>", f.region.kind, f.region.activation or "-", str(f.region.d_model),
              str(f.region.d_ff or "-"), ", ".join(dict.fromkeys(f.key)), f.unit.how) for f in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if skipped:
        click.echo(f"skipped ({len(skipped)}), as convert reports them:")
        for s in skipped:
            click.echo(f"  - {s}")
    for module, why in cap.failures:
        click.echo(f"not traceable as a whole: {module}: {why}")


@main.command()
@click.argument("model_spec")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--force", is_flag=True, help="replace an existing output directory")
@click.option("--verify/--no-verify", default=True,
              help="check outputs at init against the dense model on example_inputs() (default on)")
@config_options
@handle_errors
def convert(model_spec: str, output: str, force: bool, verify: bool, config_file: str | None, **options) -> None:
    """Convert MODEL_SPEC (model.py[:NAME]) into an MoE model, verify it, and save it to OUTPUT."""
    import moeify
    from moeify.serialization import check_output
    from moeify.source import example_inputs_of

    cfg = build_config(config_file, options)
    check_output(output, force=force)
    model, module, source = load_model(model_spec)
    args, kwargs = example_inputs_of(module, model_spec) if verify else ((), {})
    result = moeify.convert(model, cfg, example_inputs=args, example_kwargs=kwargs, verify=verify)
    result.source = source.to_dict()
    moeify.save(result, output, force=force)
    click.echo(str(result.report))
    click.echo(f"saved to {output}")


@main.command("convert-checkpoint")
@click.argument("model_spec")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--force", is_flag=True, help="replace an existing output directory")
@config_options
@handle_errors
def convert_checkpoint(model_spec: str, checkpoint: str, output: str, force: bool, config_file: str | None,
                       **options) -> None:
    """Upcycle CHECKPOINT (dense .safetensors of MODEL_SPEC, or a sharded checkpoint's
    model.safetensors.index.json, or the folder holding either) out of core: one layer in memory at a time."""
    from moeify.ooc import convert_checkpoint as ooc_convert
    from moeify.serialization import check_output
    from moeify.source import ModelSource, example_inputs_of

    cfg = build_config(config_file, options)
    check_output(output, force=force)
    source = ModelSource.parse(model_spec)
    module = source.load_module()  # its example_inputs(), if any, show which optional inputs stay None
    args, kwargs = example_inputs_of(module, source.target) if hasattr(module, "example_inputs") else ((), {})
    result = ooc_convert(checkpoint, output, cfg, model=lambda: source.build(module)[0], source=source, force=force,
                         example_inputs=args, example_kwargs=kwargs)
    click.echo(str(result.report))
    click.echo(f"saved to {output}")


# stats and export: a saved conversion's plan with the weights of a later checkpoint (moeify.load(weights=...))
weights_option = click.option(
    "--weights", type=click.Path(exists=True), default=None,
    help="take the weights from this checkpoint of the converted model (a save_pretrained folder, such as a "
         "Trainer checkpoint, its model.safetensors or its index.json) instead of OUT_DIR's")


@main.command()
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="also write a per-layer expert utilisation heatmap (PNG) to this path")
@weights_option
@handle_errors
def stats(out_dir: str, plot_path: str | None, weights: str | None) -> None:
    """Router statistics of a saved conversion (OUT_DIR) on its model_source.py example_inputs()."""
    import torch

    import moeify
    from moeify.plots import check_plot_path, plot_utilization
    from moeify.serialization import saved_example_inputs

    if plot_path:
        check_plot_path(plot_path)
    model = moeify.load(out_dir, weights=weights).model.eval()
    args, kwargs = saved_example_inputs(out_dir)
    with torch.no_grad():
        model(*args, **kwargs)
    click.echo(moeify.format_stats(moeify.router_stats(model)))
    if plot_path:
        path = plot_utilization(model, plot_path, title=f"{out_dir}: share of tokens per expert")
        click.echo(f"utilisation heatmap: {path}")


@main.command("export")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write")
@click.option("--mode", type=click.Choice(["fused", "portable"]), default="fused", show_default=True,
              help="fused: one com.microsoft.MoE node per MoE layer (onnxruntime); portable: standard ONNX ops only")
@click.option("--fallback", type=click.Choice(["none", "portable"]), default="none", show_default=True,
              help="fused mode: lower the layers the op cannot express exactly with standard ops instead of refusing")
@click.option("--allow-approximate-gelu", is_flag=True,
              help="fused mode: accept the op's tanh GELU for exact-GELU experts (up to 5e-4 off per activation; "
                   "the report notes how far the outputs move)")
@click.option("--static", is_flag=True, help="fixed batch and sequence axes (default: dynamic)")
@click.option("--force", is_flag=True, help="replace an earlier export (an ONNX file, and the .data file it uses)")
@click.option("--check/--no-check", default=True, show_default=True,
              help="compare onnxruntime with PyTorch at two input shapes before writing")
@click.option("--external-data/--single-file", default=None,
              help="weights in OUTPUT.data beside the ONNX file, or in the file itself (default: beside it only "
                   "from 2 GiB on, which one file cannot hold)")
@click.option("--dynamic-axes", "dynamic_axes", default=None, metavar="JSON",
              help="name the dynamic axes of inputs the guess gets wrong, as export_onnx's dynamic_axes: "
                   "'{\"input\": {\"0\": \"seq\", \"1\": \"batch\"}}' ({} makes an input static)")
@click.option("--atol", type=float, default=EXPORT_ATOL, show_default=True,
              help="largest |onnxruntime - PyTorch| the check accepts")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="the exported weights and floating-point inputs (float16: for onnxruntime's CUDA provider; the "
                   "routers stay float32, and the check compares within 2 float16 epsilons of the largest output "
                   "where that exceeds --atol)")
@click.option("--output-name", "output_names", multiple=True,
              help="name the graph's outputs, one per output tensor in order (repeat the option); default: after the "
                   "model's outputs (logits, last_hidden_state; output, output_0... for tensors and tuples)")
@weights_option
@handle_errors
def export(out_dir: str, output: str, mode: str, fallback: str, allow_approximate_gelu: bool, static: bool,
           force: bool, check: bool, external_data: bool | None, dynamic_axes: str | None, atol: float,
           dtype: str, output_names: tuple[str, ...], weights: str | None) -> None:
    """Export the saved conversion OUT_DIR to ONNX (example inputs from its saved model_source.py)."""
    from moeify.onnx_export import export_saved
    from moeify.serialization import check_output

    check_output(output, force=force, directory=False)  # before loading anything
    report = export_saved(out_dir, output, mode=mode, fallback=fallback,
                          allow_approximate_gelu=allow_approximate_gelu, dynamic=not static, check=check,
                          force=force, external_data=external_data, output_names=output_names or None,
                          weights=weights, atol=atol, dynamic_axes=_dynamic_axes(dynamic_axes), dtype=dtype)
    click.echo(report.format())


def _dynamic_axes(text: str | None) -> dict[str, dict[int, str]] | None:
    """--dynamic-axes JSON as export_onnx takes it: {input: {dim: axis name}} (JSON keys are strings)."""
    if text is None:
        return None
    try:
        data = json.loads(text)
        return {str(name): {int(dim): str(axis) for dim, axis in dims.items()} for name, dims in data.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"--dynamic-axes {text!r} is not a JSON object of {{input: {{dim: axis name}}}} ({exc}): "
                          "for example '{\"input\": {\"0\": \"seq\", \"1\": \"batch\"}}'") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
