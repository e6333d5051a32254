"""
What the test files share: the tokenizer offline, one thread, tiny models, scripts run as a user
runs them, and two sets of tiny runs built once per test session (tests only read them, or copy
them before writing):

    tiny_runs    a TopK run and its dense twin, a few SGD steps on topic text, saved as train.py
                 saves them (ckpt_{iter}.pt series and ckpt.pt): for steer, analysis, entropy, sae
    train_runs   train.py itself, uninterrupted, stopped and resumed, and on two gloo processes:
                 for test_train.py and test_errors.py

and two jobs started in the background as soon as their tests are collected: .ci/gpu's CPU dry
run and ablate.py over tiny runs.
"""
import collections
import concurrent.futures
import contextlib
import hashlib
import io
import os
import pathlib
import random
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# the files the tests read: tiktoken_cache/ (GPT-2's tokenizer) and data/ (a FineWeb-Edu sample),
# in ../shared beside the repository, or where TOPK_TEST_FILES says (.ci/gpu sets it)
FILES = os.environ.get("TOPK_TEST_FILES") or os.path.join(HERE, "..", "shared")
# tiktoken reads TIKTOKEN_CACHE_DIR relative to the working directory, and tests start scripts in
# temporary folders: make it absolute
os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(
    os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(FILES, "tiktoken_cache"))
# one thread per process: the models here are too small to gain from more, and on a busy 2-core
# machine threads waiting for each other make them several times slower
# and the repository on the path, for the toolkit's scripts, run as modules (python -m toolkit.explore)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
FINEWEB_SAMPLE = os.path.join(FILES, "data", "fineweb-edu-sample-150.parquet")  # 150 real documents

from model import GPT, GPTConfig  # noqa: E402
from toolkit.common import save_checkpoint
from toolkit.data import EOT, encode, write_shard
from toolkit.dictionary import SparseCoder, model_shape, save_dictionary

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]  # a test on both, the CUDA case where a GPU is
TINY = dict(block_size=32, vocab_size=50304, n_layer=3, n_head=2, n_embd=32, topk=8, n_nontopk=1)
TINY_DENSE = dict(block_size=16, vocab_size=512, n_layer=2, n_embd=16, topk=0, n_nontopk=0)  # for dictionaries
WORDS = {'work': 'job office salary manager boss desk'.split(), 'food': 'soup bread oven salt butter rice'.split()}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(seed=0, **overrides): a GPT in eval mode, by default 3 blocks of width 32 with
    k = 8 of 128 and the last block dense, the full GPT-2 vocabulary."""
    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return GPT(GPTConfig(**{**TINY, **overrides})).eval()
    return make


@pytest.fixture(scope="session")
def run():
    """run(script, *args, cwd=HERE, launcher=(python,)): a script of this repository as a
    subprocess, one thread, output captured; script is a top-level file (train.py) or a toolkit
    module (toolkit.explore), run as a user runs it."""
    def run_script(script, *args, cwd=HERE, launcher=(sys.executable,), env=None, timeout=300):
        return subprocess.run([*launcher, *command_of(script), *args], cwd=cwd, env=env or ENV,
                              capture_output=True, text=True, timeout=timeout)
    return run_script


INTEROP_REQUIRED = os.environ.get("TOPK_INTEROP_REQUIRED") == "1"  # .ci/run sets it: in CI the optional tests must run


def import_or_skip(packages, requirements):
    """Skip the calling test file if an optional package is missing, except in CI, where its own
    import error then stands."""
    if not INTEROP_REQUIRED:
        for package in packages:
            pytest.importorskip(package, reason=f"an optional package: pip install -r {requirements}")


def command_of(script):
    """How a user starts a script: python train.py for a top-level file, python -m toolkit.explore
    for a toolkit module."""
    return [os.path.join(HERE, script)] if script.endswith(".py") else ["-m", script]


def main_of(script, *args):
    """The script's __main__ run in this process, without an interpreter start: what it printed to
    stdout (stderr is left to pytest). A die() inside raises SystemExit; sys.exit(0) returns.
    script: a top-level file (train.py) or a toolkit module (toolkit.explore)."""
    argv, sys.argv = sys.argv, [script, *args]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out, warnings.catch_warnings():
            if script.endswith(".py"):
                runpy.run_path(os.path.join(HERE, script), run_name="__main__")
            else:  # a module the tests imported already runs anew as __main__, as intended
                warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
                runpy.run_module(script, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (None, 0):  # a clean exit (--help) is a normal end
            raise
    finally:
        sys.argv = argv
    return out.getvalue()


@pytest.fixture
def run_main():
    """run_main(script, *args): main_of, for a test."""
    return main_of


def topic_text(n_docs, seed):
    """Documents on one topic each, like the toy corpus: the topic shows only in its words."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = WORDS[rng.choice(sorted(WORDS))]
        docs.append(' '.join(f"{rng.choice(['Anna', 'Ben', 'Tom'])} saw the {rng.choice(words)} and the "
                             f"{rng.choice(words)}." for _ in range(rng.randint(2, 5))))
    return docs


def tokens_of(docs):
    return [t for d in docs for t in [EOT] + encode(d)]


def concept_data():
    """8 rows of 32 tokens of work/food text, and the token ids of the work words (the concept)."""
    tokens = torch.tensor(tokens_of(topic_text(40, seed=3))[:8 * 32]).view(8, 32)
    return tokens, [encode(' ' + w)[0] for w in WORDS['work']]


def train_tiny(model, out_dir, data_dir, train_tokens, max_iters=8, every=4):
    """A few plain SGD steps of a tiny model, saved as train.py saves them (ckpt_{iter}.pt series
    and ckpt.pt, with model_args and config), alpha annealed over the first 3/4."""
    model.train()
    model_args = {k: getattr(model.config, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias',
                                                        'vocab_size', 'dropout', 'topk', 'n_nontopk')}
    config = dict(data_dir=str(data_dir), annealing_ratio=0.75, max_iters=max_iters, topk=model.config.topk)
    g = torch.Generator().manual_seed(0)
    for it in range(max_iters + 1):
        model.set_alpha(max(0.0, 1 - it / (0.75 * max_iters)))
        if it % every == 0:
            ckpt = dict(model=model.state_dict(), model_args=model_args, iter_num=it, config=config)
            save_checkpoint(ckpt, os.path.join(out_dir, f'ckpt_{it:06d}.pt'))
        if it == max_iters:
            save_checkpoint(ckpt, os.path.join(out_dir, 'ckpt.pt'))
            break
        starts = torch.randint(0, len(train_tokens) - 33, (4,), generator=g)
        xy = torch.stack([train_tokens[s:s + 33] for s in starts])
        _, loss = model(xy[:, :-1], xy[:, 1:])
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_model):
    """A folder with data/ (val and train shards of topic text), topk/ (k = 8) and dense/ (its twin)."""
    root = tmp_path_factory.mktemp('tiny_runs')
    data = root / 'data'
    write_shard(str(data / 'tiny_val_000000.bin'), tokens_of(topic_text(150, seed=1)))
    train_tokens = torch.tensor(tokens_of(topic_text(300, seed=2)))
    write_shard(str(data / 'tiny_train_000001.bin'), train_tokens.numpy())  # what sae.py trains on
    train_tiny(tiny_model(topk=8), root / 'topk', data, train_tokens)
    train_tiny(tiny_model(topk=0), root / 'dense', data, train_tokens)
    return root


def planted(n_rows, directions, k, g):
    """Rows that are sparse positive codes (k of the directions, weights in [1, 2]) times known unit
    directions, plus an offset: the data a TopK SAE is built to decompose."""
    codes = torch.zeros(n_rows, directions.size(1))
    active = torch.rand(n_rows, directions.size(1), generator=g).topk(k, dim=1).indices
    codes.scatter_(1, active, 1 + torch.rand(n_rows, k, generator=g))
    return codes @ directions.T + 0.3


TRACE_PROMPT = torch.tensor([EOT] + encode(' Anna saw the job and the office'))  # trace.py's tests


def planted_circuit(model, j=5, token=' salary'):
    """Neuron j of layer 1 made to fire everywhere (a large c_fc bias keeps it among the k; its
    weights, untouched, still read the residual stream) and to write token's unembedding: the
    circuit that should explain the prediction of token."""
    X = encode(token)[0]
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[j] = 30.0
        model.transformer.h[1].mlp.c_proj.weight[:, j] = 2 * model.lm_head.weight[X] / model.lm_head.weight[X].norm()
    return X


def transcoders_for(model, layers, k=4, seed=0):
    """{layer: a transcoder} for model's blocks, randomly initialised (b_pre too, so that its bias
    term counts): what trace.py reads needs no training."""
    torch.manual_seed(seed)
    coders = {}
    for l in layers:
        coders[l] = SparseCoder(model.config.n_embd, 4 * model.config.n_embd, k, transcoder=True)
        torch.nn.init.normal_(coders[l].b_pre, std=0.1)
    return coders


def save_transcoders(model, coders, folder, kind='transcoder'):
    """Each coder as sae.py saves it, as folder/transcoder_layerL.pt (kind: what its meta says it is)."""
    for l, coder in coders.items():
        meta = dict(kind=kind, layer=l, d_in=model.config.n_embd, n_latents=coder.decoder.weight.size(1),
                    k=coder.act.k, model_args=model_shape(model))
        save_dictionary(str(folder / f'transcoder_layer{l}.pt'), coder, meta)


@pytest.fixture
def copied_runs(tiny_runs, tmp_path):
    """The tiny runs copied for a test that writes into them (pages, plots, dictionaries)."""
    for name in ('topk', 'dense'):
        shutil.copytree(tiny_runs / name, tmp_path / name)
    return tmp_path


# -----------------------------------------------------------------------------
# train.py runs

# 4 iterations of 2 micro-batches; dropout on and alpha annealing over iterations 0-2, so exact resume
# and DDP cover both; ckpt.pt is saved at iterations 2 and 4, the ckpt_{iter}.pt series at 0, 2, 4
TRAIN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
         "--gradient_accumulation_steps=2", "--topk=8", "--n_nontopk=1", "--dropout=0.1",
         "--max_iters=4", "--eval_interval=2", "--eval_iters=3", "--log_interval=1", "--ckpt_interval=2",
         "--warmup_iters=1", "--lr_decay_iters=4", "--annealing_ratio=0.5", "--learning_rate=1e-3",
         "--device=cpu", "--dtype=float32", "--compile=False"]


def write_data(folder, train_tokens=3000, val_tokens=1000):
    """Random token ids (the model has nothing to learn; these runs are about the machinery)."""
    rng = np.random.default_rng(0)
    write_shard(os.path.join(folder, "tiny_val_000000.bin"), rng.integers(0, 50257, val_tokens))
    write_shard(os.path.join(folder, "tiny_train_000001.bin"), rng.integers(0, 50257, train_tokens))
    write_shard(os.path.join(folder, "tiny_train_000002.bin"), rng.integers(0, 50257, train_tokens // 2))
    return folder


@pytest.fixture(scope="session")
def train(run):
    """train(data, out, *flags, launcher=...): train.py with TRAIN and the flags; its stdout."""
    def train_run(data, out, *flags, launcher=(sys.executable,)):
        result = run("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={out}", *flags, launcher=launcher)
        assert result.returncode == 0, result.stderr
        return result.stdout
    return train_run


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp("data")))


Run = collections.namedtuple("Run", "stdout out")


@pytest.fixture(scope="session")
def train_runs(data, train, tmp_path_factory):
    """The runs the tests compare, each in its own out_dir, started side by side (they are
    independent, and each spends seconds importing torch): {name: Run}."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    jobs = {
        "uninterrupted": lambda out: train(data, out),
        "stopped at 2, resumed": lambda out: train(data, out, "--stop_iter=2") + train(data, out, "--init_from=resume"),
        "two processes": lambda out: train(data, out, launcher=torchrun),
    }
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        outs = {name: tmp_path_factory.mktemp("run") for name in jobs}
        futures = {name: pool.submit(job, outs[name]) for name, job in jobs.items()}
        return {name: Run(future.result(), outs[name]) for name, future in futures.items()}


@pytest.fixture(scope="session")
def reference(train_runs):
    """The uninterrupted single-process run."""
    return train_runs["uninterrupted"]


def saved_sizes(forward):
    """The number of elements of every tensor that forward() saves for the backward, weights aside."""
    sizes = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sizes


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fingerprint(folder):
    """Every folder and file below folder, files with their size, inode, modification time and
    contents: a file written, replaced, created or removed, or a folder created or removed,
    changes it."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder)] = "folder"
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_ino, st.st_mtime_ns, sha256(path))
    return out


# -----------------------------------------------------------------------------
# Two jobs run in processes of their own and need nothing the other tests make: .ci/gpu's CPU dry
# run and ablate.py over four tiny runs, each tens of seconds of one core. They run one after
# the other from the moment the tests are collected, and the tests that read them move to the end,
# so that they use the core that most tests, single-threaded, leave idle.


def ablation_flags(folder):
    """ablate.py's flags for two arms and two seeds of a tiny configuration (TRAIN's shape, 3 blocks)
    written into folder, one run at a time."""
    return [f"--config={folder}/tiny.py", f"--out_dir={folder}/out", "--arms=k16,step", "--seeds=1,2", "--jobs=1",
            "--max_iters=2", "--warmup_iters=1", "--eval_tokens=500", "--entropy_tokens=256", "--n_clusters=4"]


def ablation_command(folder):
    flags = [f for f in TRAIN if not f.startswith(("--max_iters", "--lr_decay_iters", "--warmup_iters",
                                                   "--eval_interval", "--ckpt_interval", "--n_layer"))]
    literal = lambda v: v if v[0].isdigit() or v in ("True", "False") else repr(v)  # cpu, float32: strings
    with open(os.path.join(folder, "tiny.py"), "w") as f:
        f.write("".join(f"{f[2:].split('=')[0]} = {literal(f.split('=', 1)[1])}\n" for f in flags)
                + f"n_layer = 3\ndata_dir = {write_data(os.path.join(folder, 'data'))!r}\n")
    return [sys.executable, "-m", "toolkit.ablate", *ablation_flags(folder)]


BACKGROUND_JOBS = {  # the fixture that waits for it: the command, given its folder
    "gpu_dry_run": lambda folder: [sys.executable, os.path.join(HERE, ".ci", "gpu"), folder, "--cpu-dry-run"],
    "ablation_run": ablation_command,
}
BACKGROUND = {}  # name: (folder, process, its output file), in the order they started
PENDING = []  # the jobs the collected tests need, not started yet


def start_next_job():
    """One job at a time: the next starts once the one before has ended (checked between tests)."""
    if PENDING and all(proc.poll() is not None for _, proc, _ in BACKGROUND.values()):
        name = PENDING.pop(0)
        folder, output = tempfile.mkdtemp(prefix=name + "_"), tempfile.TemporaryFile("w+")
        BACKGROUND[name] = folder, subprocess.Popen(  # a process group of its own, to stop it whole
            BACKGROUND_JOBS[name](folder), env=ENV, stdout=output, stderr=subprocess.STDOUT, text=True,
            start_new_session=True), output


def pytest_collection_modifyitems(items):  # a stable sort: the rest keep their order
    items.sort(key=lambda item: any(name in BACKGROUND_JOBS for name in item.fixturenames))


def pytest_collection_finish(session):
    PENDING[:] = [name for name in BACKGROUND_JOBS if any(name in item.fixturenames for item in session.items)]
    start_next_job()


def pytest_runtest_setup(item):
    start_next_job()


def pytest_sessionfinish(session):
    for folder, proc, _ in BACKGROUND.values():  # also when the session stops before the test ran
        if proc.poll() is None:  # the step it is running too (train.py, torchrun and its ranks)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def background(name):
    """(its folder as a Path, exit status, output) of the job, once it ends."""
    while name not in BACKGROUND:
        for _, proc, _ in BACKGROUND.values():
            proc.wait(timeout=600)
        start_next_job()
    folder, proc, output = BACKGROUND[name]
    proc.wait(timeout=600)
    output.seek(0)
    return pathlib.Path(folder), proc.returncode, output.read()


@pytest.fixture
def gpu_dry_run():
    return background("gpu_dry_run")


@pytest.fixture(scope="session")
def ablation_run():
    return background("ablation_run")
