"""Command-line and configuration helpers: flags built from a config dataclass, range checks, saved
configs read back, and `run_main`, which turns a UserError into one line and exit code 2."""

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import types
import typing
from pathlib import Path

from distributed import cleanup_distributed


class UserError(Exception):
    """A problem with the user's input; scripts print it on one line and exit with code 2."""


def run_main(main_fn, argv=None):
    """Call a script's main, turning UserError into a one-line message and exit code 2."""
    try:
        return main_fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup_distributed()  # a torchrun process that stops on an error still leaves its group cleanly


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    """Flags `--field-name` for every field of a dataclass. Flags not given are absent from the
    namespace, so presets can fill them in."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        # a field's `aliases` (older or reference names) are accepted as flags too
        flags = ["--" + name.replace("_", "-") for name in (f.name, *f.metadata.get("aliases", ()))]
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if "(default" not in helptext and "(required)" not in helptext:  # help that explains its default keeps it
            helptext = f"{helptext} (default: {default})" if helptext else f"(default: {default})"
        helptext = helptext.replace("%", "%%")
        kw = dict(help=helptext, dest=f.name)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is tuple:
            elem = typing.get_args(tp)[0]
            if f.metadata.get("repeatable"):  # `--flag a --flag b` collects both, as `--flag a b` does
                kw["action"] = "extend"
            parser.add_argument(*flags, nargs="*", type=elem, metavar=elem.__name__.upper(), **kw)
        else:
            def conv(s, tp=tp, optional=optional):
                if optional and s.lower() in ("none", "null", ""):
                    return None
                return tp(s)
            conv.__name__ = tp.__name__
            parser.add_argument(*flags, type=conv, metavar=tp.__name__.upper(), **kw)
    return parser


def parse_config(cls, argv, presets: dict[str, dict] | None = None, description: str = ""):
    """Build a config dataclass from command-line flags: defaults < preset < explicit flags.

    Unknown flags are rejected by argparse (exit code 2)."""
    parser = build_parser(cls, description)
    given = vars(parser.parse_args(argv))
    values = {}
    if presets is not None:
        default_preset = next(f.default for f in dataclasses.fields(cls) if f.name == "preset")
        name = given.get("preset", default_preset)
        if name not in presets:
            parser.error(f"unknown preset {name!r}; choose from {', '.join(presets)}")
        values.update(presets[name])
    values.update(given)
    return cls(**values), set(given)


def field(default, help: str = "", **metadata):
    """A dataclass field with help text for its flag. metadata may hold `choices` and `aliases`: other
    names (e.g. ("beta",)) accepted as flags (--beta) and as keys of saved configs (dataclass_from_dict)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def flag(name: str) -> str:
    """The command-line flag of a config field: 'batch_size' -> '--batch-size'."""
    return "--" + name.replace("_", "-")


# --seed's range in every script: numpy's np.random.seed takes 0 .. 2**32 - 1 and default_rng no negatives,
# and seed * 1_000_003 + epoch (training's data order) must fit torch's 64-bit generator seeds.
SEED_RANGE = f"[0, {2 ** 32 - 1}]"


def check_ranges(cfg, ranges: dict[str, str]):
    """Raise UserError for the first field of `cfg` outside its range, naming the flag, the range and
    what the flag does (its help text). Ranges read '>= 1', '> 0' or an interval such as '[0, 1)';
    a field that is None (an optional setting left off) passes. NaN and infinities never pass."""
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cfg)}
    for name, rule in ranges.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if rule.startswith((">=", ">")):
            low, high = float(rule.lstrip(">= ")), math.inf
            closed_low, closed_high = rule.startswith(">="), False
            text = f"at least {rule[2:].strip()}" if closed_low else f"above {rule[1:].strip()}"
        else:
            low, high = (float(v) for v in rule[1:-1].split(","))
            closed_low, closed_high = rule[0] == "[", rule[-1] == "]"
            text = f"in {rule}"
        ok = ((isinstance(value, int) or math.isfinite(value)) and (value >= low if closed_low else value > low)
              and (value <= high if closed_high else value < high))
        if not ok:
            what = f" ({helps[name]})" if helps.get(name) else ""
            raise UserError(f"{flag(name)} {value} is out of range: it must be {text}{what}")


@contextlib.contextmanager
def as_user_error():
    """Re-raise a ValueError from the block (a library check, such as mingpt.check_sampling) as a
    UserError with the same one-line message."""
    try:
        yield
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None


def dataclass_from_dict(cls, values: dict):
    """cls built from a saved dict (a checkpoint's config): keys under a field's older name (its
    `aliases` metadata) are renamed to the field; keys cls has no field for are ignored."""
    return cls(**_known_fields(cls, values))


def _known_fields(cls, values: dict) -> dict:
    """The entries of `values` that are fields of cls, under the fields' current names."""
    out = {}
    for f in dataclasses.fields(cls):
        for name in (*f.metadata.get("aliases", ()), f.name):  # the current name wins over an alias
            if name in values:
                out[f.name] = values[name]
    return out


def resumed_config(cfg, given: set, saved: dict, fixed: tuple, what: str):
    """The saved run's config (a dict), updated with the flags given now; a given flag that changes
    one of `fixed` (the architecture, the data) is refused with a message naming each difference."""
    saved = _known_fields(type(cfg), saved)
    now = config_dict(cfg)
    changed = [k for k in given if k in fixed and k in saved and now[k] != saved[k]]
    if changed:
        diffs = ", ".join(f"{k}: checkpoint {saved[k]!r} vs flag {now[k]!r}" for k in changed)
        raise UserError(f"--resume with a different {what} ({diffs}); drop those flags or use a new --out-dir")
    values = dict(saved)
    values.update({k: getattr(cfg, k) for k in given})
    return type(cfg)(**values)


def config_dict(config) -> dict:
    """A dataclass as a dict of builtins (tuples become lists): JSON- and weights_only-safe."""
    out = {}
    for k, v in dataclasses.asdict(config).items():
        out[k] = list(v) if isinstance(v, tuple) else (str(v) if isinstance(v, Path) else v)
    return out


def write_json(path, obj):
    """Write obj as indented JSON, creating the folder; used for --json outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path
