"""pretrained.py and train.py --init_from=WEIGHTS: a TopK LM started from a trained dense model (a
dense run of this project, or a transformers GPT-2 folder) is that model at iteration 0 (alpha = 1),
with a fresh optimizer and schedule."""

import pytest
import torch

from conftest import ENV, INTEROP_REQUIRED, TRAIN, main_of
from model import GPT, GPTConfig
from toolkit.common import load_model
from toolkit.pretrained import load_weights

try:  # transformers only writes the GPT-2 folders here; train.py reads them without it
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:
    if INTEROP_REQUIRED:
        raise
    GPT2LMHeadModel = None
needs_transformers = pytest.mark.skipif(GPT2LMHeadModel is None, reason="pip install -r toolkit/requirements-interop.txt")


def tokens():
    return torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def topkified(data, tmp_path_factory):
    """A dense run of TRAIN's shape, and a TopK run (TRAIN's k and n_nontopk) started from its final
    ckpt.pt and stopped at iteration 0, where alpha is 1 (linear annealing over 2 iterations); both
    train.py in this process."""
    dense, topk = tmp_path_factory.mktemp("dense"), tmp_path_factory.mktemp("topkified")
    dense_log = main_of("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={dense}", "--topk=0")
    topk_log = main_of("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={topk}",
                       f"--init_from={dense / 'ckpt.pt'}", "--stop_iter=0")
    return dense, dense_log, topk, topk_log


def last_evaluation(log):
    return [line.split(":", 1)[1] for line in log.splitlines() if line.startswith("step ")][-1]


def test_a_topkified_run_starts_from_the_dense_weights(topkified):
    dense, _, topk, _ = topkified
    a, b = (torch.load(run / "ckpt.pt", weights_only=True) for run in (dense, topk))
    assert a["model_args"]["topk"] == 0 and b["model_args"]["topk"] == 8
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_topkified_run_has_a_fresh_optimizer_and_schedule(topkified):
    dense, _, topk, _ = topkified
    a, b = (torch.load(run / "ckpt.pt", weights_only=True) for run in (dense, topk))
    assert a["iter_num"] == 4 and a["optimizer"]["state"]  # the dense run's Adam moments...
    assert b["iter_num"] == 0 and b["optimizer"]["state"] == {}  # ...are not carried over


def test_at_iteration_0_the_topkified_model_has_the_dense_models_loss(topkified, data):
    dense, dense_log, topk, topk_log = topkified
    assert last_evaluation(topk_log) == last_evaluation(dense_log)  # the same evaluation batches, train and val
    x = tokens()
    dense_model, _ = load_model(str(dense))
    topk_model, _ = load_model(str(topk))
    topk_model.set_alpha(1.0)  # train.py's alpha at iteration 0
    with torch.no_grad():
        assert torch.equal(topk_model(x, x)[1], dense_model(x, x)[1])
    topk_model.set_alpha(0.0)
    with torch.no_grad():
        assert not torch.equal(topk_model(x, x)[1], dense_model(x, x)[1])  # k of 128 neurons: another model


def gpt2_folder(path, activation_function, safetensors=True, n_layer=2):
    """A tiny GPT-2 as transformers saves it: 2 blocks of width 32, 64 positions, the 50,257 tokens."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=2, n_embd=32, n_positions=64,
                                    activation_function=activation_function)).eval()
    hf.save_pretrained(path, safe_serialization=safetensors)
    return hf


@needs_transformers
@pytest.mark.parametrize("activation_function,safetensors", [("gelu_new", True), ("gelu", True), ("gelu_new", False)])
def test_weights_of_a_transformers_folder_give_its_logits_dense_and_at_alpha_1(tmp_path, activation_function, safetensors):
    hf = gpt2_folder(tmp_path, activation_function, safetensors)
    shape, weights = load_weights(str(tmp_path))
    assert shape == dict(n_layer=2, n_head=2, n_embd=32, bias=True, block_size=64, vocab_size=50257,
                         gelu="tanh" if activation_function == "gelu_new" else "none")
    with torch.no_grad():
        expected = hf(tokens()).logits
        for topk in (0, 8):
            model = GPT(GPTConfig(**shape, topk=topk, n_nontopk=1)).eval()
            model.load_state_dict(weights)
            model.set_alpha(1.0)
            logits, _ = model(tokens(), tokens())
            assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5, topk


@needs_transformers
def test_train_py_topkifies_a_transformers_gpt2_with_its_logits_at_iteration_0(tmp_path, data, train):
    hf = gpt2_folder(tmp_path / "gpt2", "gelu_new")
    shape = [a for a in TRAIN if a.startswith(("--n_layer", "--n_head", "--n_embd"))]
    assert shape == ["--n_layer=2", "--n_head=2", "--n_embd=32"]  # TRAIN's shape is the tiny GPT-2's
    train(data, tmp_path / "run", f"--init_from={tmp_path / 'gpt2'}", "--stop_iter=0")  # block_size 32 of its 64
    model, ckpt = load_model(str(tmp_path / "run"))
    assert ckpt["model_args"]["vocab_size"] == 50257 and ckpt["model_args"]["gelu"] == "tanh"
    model.set_alpha(1.0)
    with torch.no_grad():
        expected = hf(tokens()).logits
        logits, _ = model(tokens(), tokens())
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_gpt2_by_name_comes_from_the_hub_and_offline_fails_in_one_line(tmp_path, data, run):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache, no network
    result = run("train.py", *TRAIN, f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--init_from=gpt2",
                 "--n_layer=12", "--n_head=12", "--n_embd=768", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --init_from=gpt2: cannot fetch openai-community/gpt2 from the Hugging Face hub")
    assert not (tmp_path / "run").exists()


@needs_transformers
def test_a_run_from_weights_takes_their_shape_and_says_it(tmp_path, data):
    gpt2_folder(tmp_path / "gpt2", "gelu_new", n_layer=3)  # as gpt2-medium to -xl: not train.py's default shape
    flags = [a for a in TRAIN if not a.startswith(("--n_layer", "--n_head", "--n_embd", "--block_size"))]
    log = main_of("train.py", *flags, f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}",
                  f"--init_from={tmp_path / 'gpt2'}", "--stop_iter=0")
    assert f"the shape of the weights in {tmp_path / 'gpt2'}: n_layer 3, n_head 2, n_embd 32, bias True, block_size 64" in log
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert {k: ckpt["model_args"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")} == \
        dict(n_layer=3, n_head=2, n_embd=32, block_size=64) == {k: ckpt["config"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    # and the run resumes without the shape typed either
    main_of("train.py", *flags, f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--init_from=resume", "--stop_iter=1")
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter_num"] == 1
