"""
Steer generation with one neuron: set its activation to a value at every position (after the
TopK mask, alpha = 0) and compare with unsteered samples drawn with the same seeds.

    python steer.py --out_dir=out-toy --layer=1 --neuron=42 --scale=2
    python steer.py --out_dir=out-toy --concept="busy paid corporate job office salary manager"

With --concept, the neuron is found by analysis.concept_neuron: among the neurons of each TopK
layer that fire most selectively on the concept's tokens in the evaluation data (what a neuron
reads), the one whose steering gives those tokens the most probability (what it writes). Both
steps matter: on the toy corpus at --scale=4, the most selective neuron of all (in the last
TopK layer) raised the hit rate from 0.10 to 0.20, the two-step choice to 1.0. A neuron that
fires on a word predicts what follows the word, so name a concept by the words that come
before its words too (the toy corpus's topic adjectives: "busy paid corporate ..."); with the
work nouns alone, no candidate promoted them. The concept's tokens are the single-token forms
of each word (" job", "job", " Job", "Job"). The hit rate of a set of samples is the fraction
that contain any concept word in their continuation (whole word, case-insensitive).
The last output line is one JSON object with the neuron, the value and both hit rates.
"""
import json
import math
import re

import torch

from analysis import collect, concept_neuron, contexts_text, is_topk, run_eval_tokens, steering
from common import decode, encode, encode_prompt, load_model, resolve_device
from configurator import configure, die

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run to steer (its ckpt.pt), or a checkpoint file
layer = -1  # the neuron's layer (with --concept alone: restrict the search to it; -1 = all TopK layers)
neuron = -1  # the neuron's index in its layer (-1 with --concept: search for it)
concept = ''  # words naming a concept, e.g. "work job salary": picks the neuron, scores samples
value = float('nan')  # the activation to set, absolute; nan = --scale times the neuron's max
scale = 1.5  # strength as a multiple of the neuron's max activation on evaluation data (toy corpus: 4 made word lists)
prompts = 'The story began|On Monday,|Anna said that|Here is what happened'  # neutral prompts, separated by |
num_samples = 5  # samples per prompt, baseline and steered each
max_new_tokens = 60  # tokens generated per sample
temperature = 0.8  # sampling temperature
top_k = 200  # sample among the top_k most likely tokens; 0 = all
seed = 1337  # the baseline and steered samples of a prompt share this seed
eval_data = ''  # data dir (val shards) or .txt file to find the neuron / its max; '' = the run's data_dir
eval_tokens = 32768  # evaluation tokens for --concept and --scale
top_m = 32  # top-activating positions kept per neuron
candidates = 6  # with --concept: the most selective neurons of each layer, tried by their steering effect
batch_size = 16  # sequences per forward pass on evaluation data
device = 'auto'
# -----------------------------------------------------------------------------
configure(globals())
if max_new_tokens < 1:
    die(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
if num_samples < 1:
    die(f"--num_samples must be at least 1, got {num_samples}")
if candidates < 1:
    die(f"--candidates must be at least 1, got {candidates}")
prompt_list = prompts.split('|')
prompt_ids = [encode_prompt(p, '--prompts') for p in prompt_list]  # dies on an empty prompt
device = resolve_device(device)
model, ckpt = load_model(out_dir, device)
n_layer, d_ff = len(model.transformer.h), 4 * model.config.n_embd
search = bool(concept) and neuron == -1  # else the given neuron is steered (and scored on the concept)
if not -1 <= layer < n_layer or (layer == -1 and not search):
    die(f"--layer must be in [0, {n_layer - 1}], got {layer}" + ("" if concept else " (or give --concept)"))
if not search and not 0 <= neuron < d_ff:
    die(f"--neuron must be in [0, {d_ff - 1}], got {neuron}")


def evaluation(layers, marked_ids=None):
    tokens = run_eval_tokens(eval_data, ckpt, eval_tokens, model.config.block_size)
    marked = torch.isin(tokens, torch.tensor(marked_ids)) if marked_ids else None
    return tokens, collect(model, tokens, layers, top_m, batch_size, marked)


words = concept.replace(',', ' ').split()
if search:
    ids = sorted({t[0] for w in words for form in (' ' + w, w, ' ' + w.capitalize(), w.capitalize())
                  if len(t := encode(form)) == 1})
    if not ids:
        die(f"--concept: none of {words} is a single GPT-2 token")
    layers = [layer] if layer >= 0 else [l for l in range(n_layer) if is_topk(model, l)]
    if not layers:
        print("note: this model has no TopK block (topk = 0); searching its dense blocks")
        layers = list(range(n_layer))
    tokens, stats = evaluation(layers, ids)
    if any(s['n_marked'] == 0 for s in stats.values()):
        die(f"--concept: no concept token ({', '.join(repr(decode([t])) for t in ids)}) in the evaluation data")
    trial = tokens[:8].to(device)  # a few sequences show what a neuron promotes
    best = concept_neuron(model, stats, ids, trial, lambda peak: scale * peak if math.isnan(value) else value,
                          candidates)
    if best is None:
        die("--concept: none of the candidate neurons fires on the evaluation data")
    probability, layer, neuron, score = best
    print(f"concept tokens: {' '.join(repr(decode([t])) for t in ids)}")
    print(f"chosen neuron: layer {layer} neuron {neuron}, selectivity {score:.3f} (mean activation on concept "
          f"tokens minus elsewhere, over its max), steered concept probability {probability:.3f}")
    print("\n".join(contexts_text(tokens, stats[layer], neuron)))
elif math.isnan(value):
    tokens, stats = evaluation([layer])
if not is_topk(model, layer):
    print(f"note: layer {layer} is a dense GELU block, not TopK: its neurons are not sparse features")
if math.isnan(value):
    peak = stats[layer]['values'][0, neuron].item()
    if peak <= 0:
        die(f"--neuron={neuron} of layer {layer} never fires on the evaluation data; give --value instead of --scale")
    value = scale * peak
    print(f"value = {scale} x max activation {peak:.3f} = {value:.3f}")

# -----------------------------------------------------------------------------
pattern = re.compile(r'\b(?:' + '|'.join(map(re.escape, words)) + r')\b', re.IGNORECASE) if words else None
hits = {'baseline': [], 'steered': []}
for i, (text, ids) in enumerate(zip(prompt_list, prompt_ids)):
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = {}
    for mode in hits:
        torch.manual_seed(seed + i)  # the same random draws for both: only the steering differs
        with steering(model, layer, neuron, value if mode == 'steered' else None):  # same path for both
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None)
        out[mode] = [decode(row[len(ids):].tolist()) for row in y]
        if pattern:
            hits[mode] += [bool(pattern.search(s)) for s in out[mode]]
    for n in range(num_samples):
        print(f"--- prompt {text!r}, sample {n + 1}")
        for mode in hits:
            print(f"{mode:>8}: {text + out[mode][n]!r}")
rates = {m: sum(h) / len(h) if h else None for m, h in hits.items()}
if pattern:
    print(f"concept-hit rate over {len(hits['baseline'])} samples: baseline {rates['baseline']:.2f}, "
          f"steered {rates['steered']:.2f}")
print(json.dumps({'layer': layer, 'neuron': neuron, 'value': value,
                  'baseline_hit_rate': rates['baseline'], 'steered_hit_rate': rates['steered']}))
