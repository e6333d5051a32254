"""The repository's shape: model.py stands alone, imports run one way (scripts, then the toolkit,
then model.py and configurator.py), none hides inside a function, and the commands README.md and
RESULTS.md give name scripts, config files and flags that exist."""
import ast
import os
import re
import shlex

from conftest import HERE

SCRIPTS = ("train", "prepare", "sample", "steer")  # the top-level scripts: nothing imports them


def source_files():
    """Every .py file of the repository but the tests, relative to its root."""
    out = []
    for folder in (".", "toolkit", "config"):
        out += [os.path.normpath(os.path.join(folder, f)) for f in sorted(os.listdir(os.path.join(HERE, folder)))
                if f.endswith(".py") and not f.startswith("test_") and f != "conftest.py"]
    return out


def imports(path):
    """(the node's enclosing function or None, the module imported) of every import in a file."""
    tree = ast.parse(open(os.path.join(HERE, path)).read())
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((function, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append((function, child.module))
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            visit(child, inner)
    visit(tree, None)
    return found


def test_model_py_imports_nothing_of_the_repository():
    local = set(SCRIPTS) | {"configurator", "toolkit"}
    assert [m for _, m in imports("model.py") if m.split(".")[0] in local] == []


def test_the_toolkit_imports_no_top_level_script():
    toolkit = [p for p in source_files() if p.startswith("toolkit")]
    assert len(toolkit) > 20
    assert [(p, m) for p in toolkit for _, m in imports(p) if m.split(".")[0] in SCRIPTS] == []


def test_no_import_hides_inside_a_function():
    assert [(p, f, m) for p in source_files() for f, m in imports(p) if f is not None] == []


def flags_of(script):
    """The names a script assigns at its top level: its flags (and constants)."""
    with open(os.path.join(HERE, script)) as f:
        return set(re.findall(r"^(\w+)\s*=", f.read(), re.M))


def commands():
    """(file, command) for every `python ...` command in README.md and RESULTS.md's code blocks."""
    out = []
    for doc in ("README.md", "RESULTS.md"):
        blocks, inside = [], None
        for line in open(os.path.join(HERE, doc)):
            if line.startswith("```"):
                inside = None if inside is not None else line[3:].strip()
            elif inside in ("", "bash", "sh"):
                blocks.append(line)
        for line in "".join(blocks).replace("\\\n", " ").splitlines():
            line = line.split("  #")[0]
            for m in re.finditer(r"(?:python3?|torchrun(?: --[\w-]+=?\S*)*) ((?:-m )?[\w./]+)((?: [^|&;]*)?)", line):
                if m.group(1).endswith(".py") or m.group(1).startswith("-m toolkit"):
                    out.append((doc, m.group(1), m.group(2)))
    return out


def faults(doc, script, args):
    """What is wrong with one documented command: a script, flag or config file that does not exist."""
    path = script[3:].replace(".", "/") + ".py" if script.startswith("-m ") else script
    if not os.path.isfile(os.path.join(HERE, path)):
        return [f"{doc}: no script {script}"]
    flags = flags_of(path)
    return [f"{doc}: {script} has no flag {arg}" if arg.startswith("--") else f"{doc}: no config file {arg}"
            for arg in shlex.split(args.strip())
            if arg.startswith("--") and arg[2:].split("=")[0] not in flags
            or arg.startswith("config/") and not os.path.isfile(os.path.join(HERE, arg))]


def test_documented_commands_name_real_scripts_configs_and_flags():
    assert [fault for command in commands() for fault in faults(*command)] == []


def test_a_command_naming_a_missing_script_flag_or_config_is_found():
    assert faults("README.md", "-m toolkit.nothing", "") == ["README.md: no script -m toolkit.nothing"]
    assert faults("README.md", "train.py", "config/none.py --topk=8 --nonsense=1") == [
        "README.md: no config file config/none.py", "README.md: train.py has no flag --nonsense=1"]


def test_a_toolkit_script_shows_how_it_is_run_in_its_help(run_main):
    assert run_main("toolkit.entropy", "--help").startswith("usage: python -m toolkit.entropy ")
    assert run_main("sample.py", "--help").startswith("usage: python sample.py ")


def test_the_docs_give_commands_of_every_kind():
    kinds = {script for _, script, _ in commands()}
    assert {"train.py", "prepare.py", "sample.py", "steer.py", "-m toolkit.explore", "-m toolkit.ablate"} <= kinds
