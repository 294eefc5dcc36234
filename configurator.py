"""
The scripts' configuration, as in nanoGPT: every setting is a module-level global with a default, a
declared range next to it, config files of plain assignments, and `--key=value` overrides.

    python train_diffusion.py config/shapes_cpu.py --max_steps=1000   # file first, then overrides

Also here, because every script needs them: `UserError` (one line, exit code 2), `run_cli`, the
device choice and whether the Hugging Face Hub answers.
"""

import ast
import math
import os
import sys
from types import SimpleNamespace

import torch


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback, exit code 2."""


def run_cli(main, argv):
    """Run main(argv); a UserError becomes one line on stderr and exit code 2, no traceback."""
    try:
        return main(argv)
    except UserError as e:
        report(e)
        sys.exit(2)


def report(e):
    """A UserError as the one line the user sees."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Reading values: from the command line (text) or a config file (Python literals)

KIND = {bool: "true or false", int: "an integer", float: "a number", str: "text", tuple: "integers like 1,2,2"}


def _convert(key, text, default):
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            text = text.strip("()[] ")
            return tuple(int(v) for v in text.split(",") if v.strip())
        return text
    except ValueError:
        raise UserError(f"--{key}={text}: expected {KIND[type(default)]}") from None


def _literal(key, value, default, where):
    """A config file's value, checked against the default's type (an int is a fine float, a list a tuple)."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"{where}: {key} = {value!r}: expected {KIND[type(default)]}")
    return value


def is_config_file(arg):
    """Does this command-line argument name a config file (rather than a --key=value)?"""
    return arg.endswith(".py") and not arg.startswith("--")


def read_config_file(path, defaults, _seen=()):
    """A config file holds plain assignments `key = literal` (comments welcome) and nothing else:
    it is parsed, never executed, so it can only set known keys to values of the right type.
    `base = "other.py"` (a path relative to this file) reads that file first, and this file's
    assignments then change its values: a recipe states only how it differs from another.
    defaults None: any key, unchecked (for benchmarks that read a few keys of a recipe)."""
    if os.path.abspath(path) in _seen:
        raise UserError(f"config file {path} is its own base (through {' -> '.join(_seen)}): break the loop")
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist: pass a file such as config/shapes_cpu.py")
    try:
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    except (SyntaxError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid Python ({e}): write one `key = value` a line") from None
    values = {}
    for node in tree.body:
        where = f"{path} line {node.lineno}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{where}: only `key = value` assignments are allowed in a config file")
        key = node.targets[0].id
        if key == "base":
            base = node.value.value if isinstance(node.value, ast.Constant) else None
            if not isinstance(base, str) or values:
                raise UserError(f'{where}: base must come first and name a config file, e.g. base = "shapes_cpu.py"')
            base_path = os.path.join(os.path.dirname(path), base)
            if not os.path.isfile(base_path):
                raise UserError(f"{where}: base {base!r}: {base_path} does not exist (the path is relative to {path})")
            values = read_config_file(base_path, defaults, _seen + (os.path.abspath(path),))
            continue
        if defaults is not None and key not in defaults:
            raise UserError(f"{where}: unknown key {key}; valid keys: {', '.join(defaults)}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(
                f"{where}: {key} must be a literal (a number, text, true/false or a tuple), not an expression"
            ) from None
        values[key] = value if defaults is None else _literal(key, value, defaults[key], where)
    return values


# -----------------------------------------------------------------------------
# Declared ranges: "[1, 65536]" and "(0, 1]" are intervals (open at a parenthesis), "1+ of [1, 16]"
# a tuple of at least one integer in [1, 16], a tuple of strings the choices, "text" any text,
# "nonempty" any text but "", "bool" true or false.


def _interval(spec):
    lo, hi = (float(v) for v in spec[1:-1].split(","))
    return lo, hi, spec[0] == "(", spec[-1] == ")"


def _in_interval(value, spec):
    lo, hi, lo_open, hi_open = _interval(spec)
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > lo if lo_open else value >= lo)
        and (value < hi if hi_open else value <= hi)
    )


def is_valid(value, spec):
    """Does `value` lie in the declared range `spec`?"""
    if isinstance(spec, tuple):
        return value in spec
    if spec == "bool":
        return isinstance(value, bool)
    if spec in ("text", "nonempty"):
        return isinstance(value, str) and (spec == "text" or value.strip() != "")
    if " of " in spec:
        count, interval = spec.split(" of ")
        return (
            isinstance(value, tuple)
            and len(value) >= int(count.rstrip("+"))
            and all(isinstance(v, int) and _in_interval(v, interval) for v in value)
        )
    return _in_interval(value, spec)


def describe(spec):
    if isinstance(spec, tuple):
        return "one of " + ", ".join(spec)
    if spec == "nonempty":
        return "non-empty text"
    if " of " in spec:
        count, interval = spec.split(" of ")
        how_many = "any number of" if count == "0+" else "at least " + count.rstrip("+")
        return f"{how_many} integers in {interval}, comma-separated"
    return {"bool": "true or false", "text": "any text"}.get(spec, f"a finite number in {spec}")


def check_ranges(config, ranges):
    """Every value with a declared range must lie in it; a key without one has had its type checked only."""
    for key, value in config.items():
        spec = ranges.get(key)
        if spec is not None and not is_valid(value, spec):
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise UserError(f"--{key}={shown} is out of range: use {describe(spec)}")


def read_script_settings(path):
    """The settings of a script such as train_diffusion.py as data, without importing it (scripts never import
    scripts): its module-level `key = literal` assignments between `_before_settings = set(globals())` and
    `DEFAULTS = collect_settings(...)`, the block that collect_settings reads when the script runs."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    names = [
        n.targets[0].id if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) else None for n in tree.body
    ]
    start, end = names.index("_before_settings"), names.index("DEFAULTS")
    return {
        names[i]: ast.literal_eval(tree.body[i].value)
        for i in range(start + 1, end)
        if names[i] is not None and not names[i].startswith("_")
    }


def collect_settings(script_globals, before):
    """A script's settings and their defaults: the globals it defined after `before = set(globals())`
    (names starting with _ excluded). Each must be a value the command line can set."""
    settings = {k: v for k, v in script_globals.items() if k not in before and not k.startswith("_")}
    for key, value in settings.items():
        if type(value) not in KIND or (isinstance(value, tuple) and not all(type(v) is int for v in value)):
            raise UserError(f"setting {key} = {value!r}: use true/false, a number, text or a tuple of integers")
    return settings


def check_utf8(key, text):
    """Python hands argv bytes that are not UTF-8 over as lone surrogates (\udce9 for the byte 0xe9): as a
    prompt they would reach the tokenizer, as a path every message that prints it. One line instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = text[e.start].encode("utf-8", "surrogateescape")[0] if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # caf\xe9
        raise UserError(
            f"--{key}={shown} is not valid UTF-8"
            + (f" (byte 0x{byte:02x} at character {e.start + 1})" if byte is not None else "")
            + ": pass UTF-8 text (rename a file or folder whose name is not)"
        ) from None


def parse_config(argv, defaults, ranges=None):
    """nanoGPT-style configuration. argv: config files (*.py) first, then `--key=value` for any
    key of `defaults`, converted to the default's type; every value with a declared range in
    `ranges` is then checked against it (a key without one, such as a constant a user added to a
    script, is type-checked only). Returns (C, explicit): a namespace of all settings and the set
    of keys that a file or the command line set."""
    config, explicit, seen_override = dict(defaults), set(), False
    for arg in argv:
        if is_config_file(arg):
            if seen_override:
                raise UserError(f"config file {arg} comes after a --key=value: put config files first")
            values = read_config_file(arg, defaults)
            config.update(values)
            explicit.update(values)
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(
                f"cannot read argument {arg!r}: write --key=value or give a config file (valid keys: "
                f"{', '.join(defaults)})"
            )
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise UserError(f"unknown key --{key}; valid keys: {', '.join(defaults)}")
        check_utf8(key, text)
        config[key] = _convert(key, text, defaults[key])
        explicit.add(key)
        seen_override = True
    check_ranges(config, ranges or {})
    return SimpleNamespace(**config), explicit


# -----------------------------------------------------------------------------
# Where the scripts run: the device, and whether the Hub answers (decides `auto`)


DEVICES = ("auto", "cuda", "mps", "cpu")  # the --device choices of both scripts


def mps_available():
    """Apple's Metal GPU (torch's mps backend), on a Mac with a torch built for it."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def pick_device(name):
    """--device=auto|cuda|mps|cpu -> a torch.device; auto takes a CUDA GPU if one is visible, else
    Apple's GPU (mps), else the CPU."""
    if name not in DEVICES:
        raise UserError(f"--device={name}: use auto, cuda, mps or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA GPU is visible: use --device=cpu or --device=auto")
    if name == "mps" and not mps_available():
        raise UserError("--device=mps but Apple's GPU (mps) is not available here: use --device=cpu or --device=auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    return torch.device(name)


def hub_reachable(timeout=5.0):
    """Does the Hugging Face Hub answer? HF_HUB_OFFLINE=1 says no without asking."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(endpoint, timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # it answered, even if with an error status
    except (urllib.error.URLError, OSError):
        return False


def offline_banner(what):
    print("=" * 78, file=sys.stderr)
    print(f"The Hugging Face Hub cannot be reached: using {what}.", file=sys.stderr)
    print("Choose explicitly with --dataset=shapes|pokemon|<hub id>|<folder> and", file=sys.stderr)
    print("--text_encoder=minilm|openai/clip-vit-base-patch32|<path>.", file=sys.stderr)
    print("=" * 78, file=sys.stderr)
