"""
Steer generation with one neuron: set its activation to a value at every position (after the
TopK mask, alpha = 0) and compare with unsteered samples drawn with the same seeds.

    python steer.py --out_dir=out-toy --layer=1 --neuron=42 --scale=2
    python steer.py --out_dir=out-toy --concept="job office salary manager career boss"

--concept finds the neuron with search.py: candidates from what neurons read, predict and write,
ranked by a steering trial; the --n_finalists best are each swept here. Hit rate: the fraction
of samples whose continuation holds a concept word (whole word, any case). Fluency: each
continuation's perplexity under the unsteered model, averaged. Without --scale or --value the
strength is swept over --scales from the weakest up to the first past --max_ppl_ratio x the
baseline's perplexity (all of them with --full_sweep=True; if the strongest is still fluent, it is
doubled while fluent up to --max_scale), then --refine more strengths are tried by bisection where
fluency breaks; the best hit rate within the bound is kept. The finalists are swept side by side,
each round of strengths sampled as one batch. The last output line is one JSON object (with the
seconds spent loading and searching, and steering). The sweep is toolkit/sweep.py, and its
steer_concept() is the same search and sweep as a call (sae.py uses it).
"""
import json
import math
import os
import time

from configurator import at_least, configure, die
from toolkit.common import load_model, resolve_device, run_folder
from toolkit.cpu_fast import enable as cpu_fast_paths
from toolkit.data import decode, encode_prompt
from toolkit.dictionary import attach_file
from toolkit.neurons import collect, contexts_text, decoder_directions, is_topk, run_eval_tokens
from toolkit.search import concept_search, concept_token_ids, concept_words, trial_strength
from toolkit.sweep import MAX_SCALE, PROMPTS, SCALES, hit_pattern, plot_sweep, steer_finalists

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run to steer (its ckpt.pt), or a checkpoint file
layer = -1  # the neuron's layer (with --concept alone: restrict the search to it; -1 = all TopK layers)
neuron = -1  # the neuron's index in its layer (-1 with --concept: search for it)
concept = ''  # words naming a concept, e.g. "job salary boss": picks the neuron, scores samples
value = float('nan')  # the activation to set, absolute; nan = a multiple of the neuron's max
scale = float('nan')  # strength as a multiple of the neuron's max on evaluation data; nan = sweep --scales
scales = ','.join(map(str, SCALES))  # the strengths swept when neither --scale nor --value is given
max_ppl_ratio = 2.0  # the sweep keeps strengths whose steered perplexity is at most this times the baseline's
refine = 3  # with a sweep: strengths tried by bisection where fluency breaks, between the last fluent scale and the next
full_sweep = False  # with a sweep: sample every scale; False stops at the first scale past the fluency bound
max_scale = float(MAX_SCALE)  # with a sweep: while the strongest scale is fluent, double it up to this; 0 = stop
plot = False  # with a sweep: write hit rate and perplexity against scale to OUT_DIR/analysis/steering_L_J.png
prompts = '|'.join(PROMPTS)  # neutral prompts, separated by |
num_samples = 10  # samples per prompt, baseline and steered each
max_new_tokens = 60  # tokens generated per sample
temperature = 0.8  # sampling temperature
top_k = 200  # sample among the top_k most likely tokens; 0 = all
seed = 1337  # the baseline and steered samples of a prompt share this seed
eval_data = ''  # data dir (val shards) or .txt file to find the neuron / its max; '' = the run's data_dir
eval_tokens = 32768  # evaluation tokens for --concept and --scale
top_m = 32  # top-activating positions kept per neuron
candidates = 6  # with --concept: the best neurons of each layer by each signal, tried by steering
n_finalists = 4  # with --concept: the candidates swept: each layer's best by the trial, then the next best
batch_size = 16  # sequences per forward pass on evaluation data
dictionary = ''  # an SAE or transcoder file from sae.py: steer its latents (in place of its layer's neurons)
device = 'auto'
cpu_fast = True  # on a CPU, toolkit/cpu_fast.py's sparse TopK MLP (model.py's numbers, faster); False: model.py's code
# -----------------------------------------------------------------------------
configure(globals())
at_least(1, max_new_tokens=max_new_tokens, num_samples=num_samples, candidates=candidates, n_finalists=n_finalists,
         top_m=top_m, batch_size=batch_size, eval_tokens=eval_tokens)
at_least(0, refine=refine, top_k=top_k, temperature=temperature)
if max_scale < 0:
    die(f"--max_scale must be at least 0 (0: no doubling past --scales), got {max_scale}")
if not max_ppl_ratio > 0:
    die(f"--max_ppl_ratio must be positive, got {max_ppl_ratio}")
try:
    sweep_scales = [float(s) for s in scales.split(',')]
except ValueError:
    die(f"--scales expects numbers separated by commas, e.g. 0.5,1,2,4, got {scales!r}")
if not all(0 < s < math.inf for s in sweep_scales):  # a multiple of the neuron's maximum: 0 is no steering
    die(f"--scales must be positive, got {scales!r}")
prompt_list = prompts.split('|')
prompt_ids = [encode_prompt(p, '--prompts') for p in prompt_list]  # before loading the model: dies on an empty prompt

started = time.perf_counter()
# the model, and the layer: with a dictionary, its site, whose latents are steered as neurons
model, ckpt = load_model(out_dir, resolve_device(device))
if cpu_fast:
    cpu_fast_paths(model)
site = attach_file(model, dictionary) if dictionary else None
search = bool(concept) and neuron == -1  # else the given neuron is steered (and scored on the concept)
if site is not None:
    if layer not in (-1, site):
        die(f"--layer={layer}, but --dictionary={dictionary} sits at layer {site}")
    layer = site
n_layer = len(model.transformer.h)
if not -1 <= layer < n_layer or (layer == -1 and not search):
    die(f"--layer must be in [0, {n_layer - 1}], got {layer}" + ("" if concept else " (or give --concept)"))
if not search and not 0 <= neuron < decoder_directions(model, layer).size(1):
    die(f"--neuron must be in [0, {decoder_directions(model, layer).size(1) - 1}], got {neuron}")

# the neuron: the concept search's finalists, or the one given, with its max activation for a --scale
absolute = not math.isnan(value)
words = concept_words(concept)
tokens = run_eval_tokens(eval_data, ckpt, eval_tokens, model.config.block_size) if search or not absolute else None
if search:
    ids = concept_token_ids(words)
    layers = [layer] if layer >= 0 else [i for i in range(n_layer) if is_topk(model, i)]
    if not layers:
        print("note: this model has no TopK block (topk = 0); searching its dense blocks")
        layers = list(range(n_layer))
    stats, finalists = concept_search(model, tokens, ids, layers, trial_strength(value, scale), top_m, candidates,
                                      n_finalists, batch_size)
    print(f"concept tokens: {' '.join(repr(decode([t])) for t in ids)}")
    for f in finalists:
        print(f"finalist {f['layer']}:{f['neuron']}, proposed by {'+'.join(f['signals'])} (" +
              ", ".join(f"{k} {v:.2f}" for k, v in f['scores'].items()) +
              f"), steered concept probability {f['probability']:.4f}")
else:
    stats = None if tokens is None else collect(model, tokens, [layer], top_m, batch_size)
    peak = None if stats is None else stats[layer]['values'][0, neuron].item()
    if peak is not None and peak <= 0:
        die(f"--neuron={neuron} of layer {layer} never fires on the evaluation data; give --value instead of --scale")
    finalists = [dict(layer=layer, neuron=neuron, peak=peak, signals=None)]
if absolute:  # the strength is the value itself, not a multiple of a max
    finalists = [dict(f, peak=None) for f in finalists]

searched = time.perf_counter()
# the steering: each finalist's samples with its neuron set (toolkit/neurons.py's hook) beside the
# baseline from the same seeds; hit rate and fluency (perplexity under the unsteered model) of each
strengths = [value] if absolute else [scale] if not math.isnan(scale) else sweep_scales
settings = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
pattern = hit_pattern(words) if words else None
results, win = steer_finalists(model, finalists, strengths, prompt_ids, pattern, settings, refine, max_ppl_ratio,
                               full_sweep, max_scale if strengths is sweep_scales else 0)
steered = time.perf_counter()


def quality_text(r, with_hits):
    return (f"hit rate {r['hit_rate']:.2f}, " if with_hits else "") + f"perplexity {r['ppl']:.2f}"


# every finalist's sweep beside its baseline, then the strength kept: the best hit rate (without a
# concept, the strongest) within the fluency bound, else the most fluent
with_hits, kind = pattern is not None, 'value' if absolute else 'scale'
for f, base, sweep, kept in results:
    print(f"neuron {f['layer']}:{f['neuron']}" + (f", max activation {f['peak']:.3f}" if f['peak'] else "") +
          f"; baseline: {quality_text(base, with_hits)}")
    for r in sweep:
        print(f"  {kind} {r['scale']:g} (value {r['value']:.3f}): {quality_text(r, with_hits)}")
best, base, sweep, kept = results[win]
chosen = f"chosen: neuron {best['layer']}:{best['neuron']} at {kind} {kept['scale']:g}, "
if kept['ppl'] <= max_ppl_ratio * base['ppl']:
    print(chosen + ("the best hit rate" if with_hits else "the strongest") +
          f" with perplexity within {max_ppl_ratio:g}x the baseline's")
else:
    print(chosen + f"no strength stayed within {max_ppl_ratio:g}x the baseline perplexity: the most fluent")
if stats is not None:
    print("\n".join(contexts_text(tokens, stats[best['layer']], best['neuron'])))
if not is_topk(model, best['layer']):
    print(f"note: layer {best['layer']} is a dense GELU block, not TopK: its neurons are not sparse features")
if plot and len(sweep) > 1:
    path = os.path.join(run_folder(out_dir), 'analysis', f"steering_{best['layer']}_{best['neuron']}.png")
    title = f"neuron {best['layer']}:{best['neuron']}" + (f", concept: {concept}" if concept else "")
    plot_sweep(path, sweep, base, title)
    print(f"wrote {path}")

# the samples at the kept strength beside their baselines, then both qualities and the JSON line
for i, text in enumerate(prompt_list):
    for n in range(num_samples):
        print(f"--- prompt {text!r}, sample {n + 1}")
        print(f"baseline: {text + base['texts'][i][n]!r}")
        print(f" steered: {text + kept['texts'][i][n]!r}")
print(f"over {len(prompt_list) * num_samples} samples: baseline {quality_text(base, with_hits)}; "
      f"steered {quality_text(kept, with_hits)}")
print(json.dumps({'layer': best['layer'], 'neuron': best['neuron'], 'value': kept['value'],
                  'baseline_hit_rate': base['hit_rate'], 'steered_hit_rate': kept['hit_rate'],
                  'baseline_ppl': base['ppl'], 'steered_ppl': kept['ppl'],
                  'scale': None if absolute else kept['scale'], 'signals': best['signals'],
                  'sweep': [{k: r[k] for k in ('scale', 'value', 'hit_rate', 'ppl')} for r in sweep],
                  'finalists': [f"{f['layer']}:{f['neuron']}" for f, *_ in results],
                  'seconds': {'load_and_search': searched - started, 'steering': steered - searched}}))
