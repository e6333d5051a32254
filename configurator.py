"""
Command-line configuration shared by every script, in nanoGPT's style:

    python train.py [config/some_file.py] [--key=value ...] [--help]

A script defines its defaults as plain module-level variables, then calls
`configure(globals())`. A config file is Python that assigns some of those names;
`--key=value` overrides come after it. Only existing keys can be set, and a value must
have its default's type (an int is accepted where a float is expected).
"""
import ast
import os
import re
import sys

SIMPLE_TYPES = (bool, int, float, str)


def die(message):
    """Stop with a one-line error and a non-zero exit, no traceback."""
    raise SystemExit(f"error: {message}")


def at_least(low, **flags):
    """Stop with a one-line error naming the first of the flags whose value is below low."""
    for flag, v in flags.items():
        if v < low:
            die(f"--{flag} must be at least {low}, got {v}")


def _convert(key, raw, default):
    want = type(default)
    if want is str:
        return raw
    if want is bool:
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        die(f"--{key} expects a bool (True/False), got {raw!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        die(f"--{key} expects {want.__name__}, got {raw!r}")
    return _check_type(key, value, default)


def _check_type(key, value, default):
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if type(value) is not want:
        die(f"--{key} expects {want.__name__}, got {value!r}")
    return value


def _help_text(defaults, script, module=None):
    """One line per key: its default and the comment written beside it in the script."""
    comments = {}
    try:
        with open(script) as f:
            for line in f:
                m = re.match(r"^(\w+)\s*=\s*.+?#\s*(.*)$", line)
                if m:
                    comments[m.group(1)] = m.group(2).strip()
    except OSError:
        pass
    # a toolkit script runs as a module (python -m toolkit.explore), a top-level one by its file
    command = f"-m {module}" if module and "." in module else os.path.basename(script)
    lines = [f"usage: python {command} [config/FILE.py] [--key=value ...]", "", "keys (default):"]
    for k, v in defaults.items():
        lines.append(f"  --{k}={v!r}".ljust(40) + (f" {comments[k]}" if k in comments else ""))
    return "\n".join(lines)


def _assigned_names(script):
    """Names a script assigns at its top level (`name = ...` at the start of a line)."""
    try:
        with open(script) as f:
            return {m.group(1) for m in re.finditer(r"^(\w+)\s*=", f.read(), re.M)}
    except OSError:
        return None


def read_config(path):
    """{key: value} of the settings a config file assigns (imports and helpers inside it left out)."""
    file_vars = {}
    with open(path) as f:
        exec(f.read(), {}, file_vars)
    return {k: v for k, v in file_vars.items() if not k.startswith("_") and type(v) in SIMPLE_TYPES}


def configure(namespace, argv=None, given=None):
    """Apply the config file and --key=value overrides in argv to namespace (usually a script's
    globals()); returns the resulting {key: value} of every configurable key. The keys the config
    file and flags set are added to the set `given`, for a script that takes a value from elsewhere
    (trained weights' shape) unless the user named one."""
    argv = sys.argv[1:] if argv is None else argv
    script = namespace.get("__file__", sys.argv[0])
    assigned = _assigned_names(script)  # the script's own defaults, not constants it imported
    defaults = {k: v for k, v in namespace.items()
                if not k.startswith("_") and type(v) in SIMPLE_TYPES and (assigned is None or k in assigned)}
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            spec = namespace.get("__spec__")
            print(_help_text(defaults, script, spec.name if spec is not None else None))
            raise SystemExit(0)
        if not arg.startswith("--"):  # a config file
            if not os.path.isfile(arg):
                die(f"config file {arg!r} not found (arguments are a config file or --key=value)")
            for key, value in read_config(arg).items():
                if key not in defaults:
                    die(f"unknown key {key!r} in config file {arg}")
                config[key] = _check_type(key, value, defaults[key])
                if given is not None:
                    given.add(key)
            continue
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            die(f"{arg!r} is not of the form --key=value")
        if key not in defaults:
            die(f"unknown flag --{key} (see --help)")
        config[key] = _convert(key, raw, defaults[key])
        if given is not None:
            given.add(key)
    namespace.update(config)
    return config
