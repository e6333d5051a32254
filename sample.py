"""
Sample from a trained TopK LM (alpha = 0: exactly k neurons per token, as after training).

    python sample.py --out_dir=out-toy --start="The office" --num_samples=3
"""
import torch

from configurator import at_least, configure, die
from toolkit.common import autocast, load_model, resolve_device, resolve_dtype
from toolkit.cpu_fast import enable as cpu_fast_paths
from toolkit.data import N_TOKENS, decode, encode_prompt

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run to sample from (its ckpt.pt), or a checkpoint file
start = 'The'  # the prompt; or FILE:path to read it from a file
num_samples = 3  # number of samples
max_new_tokens = 100  # tokens generated per sample
temperature = 0.8  # < 1 sharper, > 1 more random; 0 = greedy
top_k = 200  # sample among the top_k most likely tokens; 0 = all
seed = 1337
device = 'auto'  # 'auto', 'cpu', 'cuda', ...
cpu_fast = True  # on a CPU, toolkit/cpu_fast.py's sparse TopK MLP (model.py's numbers, faster); False: model.py's code
dtype = 'auto'  # 'auto' (bfloat16 on GPUs that compute in it natively, float16 on older ones, float32 on CPU), 'float32', 'bfloat16', 'float16'
# -----------------------------------------------------------------------------
configure(globals())
at_least(1, max_new_tokens=max_new_tokens, num_samples=num_samples)
at_least(0, top_k=top_k)
if temperature < 0:
    die(f"--temperature must be >= 0, got {temperature}")

prompt = encode_prompt(start)  # before loading the model, so a bad prompt fails at once
device = resolve_device(device)
model, _ = load_model(out_dir, device)
if cpu_fast:  # a model off the CPU is left as it is
    cpu_fast_paths(model)
x = torch.tensor([prompt], dtype=torch.long, device=device)
torch.manual_seed(seed)
with autocast(device, resolve_dtype(dtype, device)):
    for _ in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, vocab_size=N_TOKENS)
        print(decode(y[0, 1:].tolist()))  # without the <|endoftext|> the prompt starts with
        print('---------------')
