"""
How specific the neurons are, per layer, at every checkpoint of a run (formation tracing),
optionally beside a second run (the dense baseline) on the same tokens in the same semantic space.

    python entropy.py --out_dir=out-toy --compare=out-toy-dense

For every checkpoint (the ckpt_*.pt series and the final ckpt.pt) and every block: the mean
token entropy and semantic entropy of its neurons that fire (analysis.py has the definitions)
and its dead fraction (neurons that never fire on the evaluation tokens). Each checkpoint is
analysed at the alpha it was trained with at that step (1 -> 0 over annealing_ratio * max_iters,
0 after), i.e. the model as it was, so the plots show what annealing does. Writes into
OUT_DIR/analysis/: entropy.json, entropy_final.png (the distribution per layer at the final
checkpoint), entropy_vs_step.png, neuron_formation.png (one neuron's top tokens at each
checkpoint), and neurons_layer{L}.html for every TopK layer of the final checkpoint.
"""
import json
import os

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch

from analysis import analyse, mean_over_firing, semantic_clusters, specificity_order, write_page
from common import atomic_write, decode, load_checkpoint, resolve_device, run_checkpoints
from configurator import configure, die
from model import annealed_alpha, load_model
from neurons import is_topk, parse_neuron, run_eval_tokens

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run to analyse
compare = ''  # a second run (e.g. the dense baseline) analysed the same way; '' = none
reference = ''  # checkpoint or run whose wte defines the semantic clusters; '' = OUT_DIR's final ckpt.pt
eval_data = ''  # data dir (val shards) or .txt file; '' = OUT_DIR's data_dir
eval_tokens = 32768  # N: evaluation tokens, the same for every checkpoint and run
top_m = 32  # M: top-activating positions per neuron
n_clusters = 64  # k-means clusters for semantic entropy
seed = 1337  # k-means initialisation
neuron = ''  # L:J whose top tokens are traced across checkpoints; '' = the most specific at the end
pages = True  # write the neuron pages of the final checkpoint's TopK layers
batch_size = 16  # sequences per forward pass
device = 'auto'
# -----------------------------------------------------------------------------
configure(globals())
device = resolve_device(device)


final_ckpt = load_checkpoint(out_dir)
seq_len = final_ckpt['model_args']['block_size']
tokens = run_eval_tokens(eval_data, final_ckpt, eval_tokens, seq_len)
wte = load_checkpoint(reference or out_dir)['model']['transformer.wte.weight']
cluster_of = semantic_clusters(wte, tokens, n_clusters, seed)
print(f"{tokens.numel():,} evaluation tokens, {int(cluster_of.max()) + 1} semantic clusters")

runs = {}  # name -> dict(checkpoints=[json rows], final=(model, stats, tables), ids=[(iter, {layer: top_ids})])
for run in [out_dir] + ([compare] if compare else []):
    name = os.path.basename(os.path.abspath(run))
    name = name if name not in runs else name + '-compare'
    rows, history = [], []
    for it, path in run_checkpoints(run):
        model, ckpt = load_model(path, device)
        if ckpt['model_args']['block_size'] < seq_len:
            die(f"{path} has block_size {ckpt['model_args']['block_size']} < the {seq_len}-token evaluation sequences")
        cfg = ckpt.get('config', {})
        alpha = annealed_alpha(ckpt['iter_num'], cfg.get('annealing_ratio', 0), cfg.get('max_iters', 0))
        model.set_alpha(alpha)
        layers = list(range(len(model.transformer.h)))
        stats, tables = analyse(model, tokens, layers, top_m, cluster_of, batch_size)
        rows.append({'iter': it, 'alpha': alpha, 'layers': [
            {'layer': l, 'topk': is_topk(model, l), 'token_entropy_mean': mean_over_firing(t['h_tok']),
             'semantic_entropy_mean': mean_over_firing(t['h_sem']), 'dead_fraction': t['dead'].float().mean().item()}
            for l, t in tables.items()]})
        history.append((it, {l: t['top_ids'] for l, t in tables.items()}))
        print(f"{name} iter {it} (alpha {alpha:.2f}): token entropy " +
              " ".join(f"{r['token_entropy_mean']:.2f}" for r in rows[-1]['layers']) + ", dead " +
              " ".join(f"{r['dead_fraction']:.2f}" for r in rows[-1]['layers']), flush=True)
    runs[name] = dict(checkpoints=rows, final=(model, stats, tables), history=history,
                      alpha_zero_iter=cfg.get('annealing_ratio', 0) * cfg.get('max_iters', 0))

out = os.path.join(out_dir, 'analysis')
os.makedirs(out, exist_ok=True)
summary = {'eval_tokens': tokens.numel(), 'top_m': top_m, 'n_clusters': int(cluster_of.max()) + 1,
           'runs': {n: {'alpha_zero_iter': r['alpha_zero_iter'], 'checkpoints': r['checkpoints']} for n, r in runs.items()}}
atomic_write(os.path.join(out, 'entropy.json'), lambda f: f.write(json.dumps(summary, indent=1).encode()))
names = list(runs)
main_model, main_stats, main_tables = runs[names[0]]['final']
kinds = ['TopK' if is_topk(main_model, l) else 'dense' for l in main_tables]

# (1) the distribution of entropies per layer at the final checkpoint, the runs side by side
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, key, title in zip(axes, ('h_tok', 'h_sem'), ('token entropy', 'semantic entropy')):
    for i, n in enumerate(names):
        tables = runs[n]['final'][2]
        data = [t[key][~t[key].isnan()].numpy() for t in tables.values()]
        offset = (i - (len(names) - 1) / 2) * 0.35
        bp = ax.boxplot(data, positions=np.arange(len(data)) + offset, widths=0.3, patch_artist=True, showfliers=False)
        for box in bp['boxes']:
            box.set_facecolor(f'C{i}')
        ax.plot([], [], color=f'C{i}', lw=8, label=n)
    ax.set_xticks(range(len(kinds)), [f'{l}\n{k}' for l, k in enumerate(kinds)])
    ax.set_xlabel(f'layer (MLP of {names[0]})')
    ax.set_ylabel('bits')
    ax.set_title(f'{title}, final checkpoint')
    ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out, 'entropy_final.png'), dpi=80)

# (2) formation: mean entropy per layer against training step
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, key, title in zip(axes, ('token_entropy_mean', 'semantic_entropy_mean'), ('token entropy', 'semantic entropy')):
    for i, n in enumerate(names):
        rows = runs[n]['checkpoints']
        for l in range(len(rows[0]['layers'])):
            y = [np.nan if r['layers'][l][key] is None else r['layers'][l][key] for r in rows]
            ax.plot([r['iter'] for r in rows], y, color=f'C{l}',
                    ls='-' if i == 0 else '--', marker='.', label=f'layer {l} {kinds[l]}' if i == 0 else None)
    ax.axvline(runs[names[0]]['alpha_zero_iter'], color='gray', ls=':', label='alpha reaches 0')
    ax.set_xlabel('training step')
    ax.set_ylabel('mean bits')
    ax.set_title(f'{title}: {names[0]} solid' + (f', {names[1]} dashed' if len(names) > 1 else ''))
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(out, 'entropy_vs_step.png'), dpi=80)

# (3) one neuron's top tokens at each checkpoint (neuron j of layer l is the same unit throughout)
if neuron:
    l, j = parse_neuron(neuron, main_model)
else:  # the most specific neuron among those that fire at least M times (TopK layers if any)
    layers = [l for l, k in enumerate(kinds) if k == 'TopK'] or list(main_tables)
    candidates = [(main_tables[l]['h_tok'][j].item(), -main_tables[l]['freq'][j].item(), l, j) for l in layers
                  for j in specificity_order(main_tables[l]) if main_stats[l]['fires'][j] >= top_m]
    if not candidates:
        die(f"no neuron fires {top_m} times on the evaluation tokens; give --neuron=L:J")
    _, _, l, j = min(candidates)
history = runs[names[0]]['history']
counts = [torch.bincount(ids[l][:, j][ids[l][:, j] >= 0], minlength=wte.size(0)) for _, ids in history]
shown = torch.stack(counts).sum(0).topk(8).indices
shown = shown[torch.stack(counts).sum(0)[shown] > 0].tolist()
share = np.array([[c[t].item() / top_m for c in counts] for t in shown] +
                 [[1 - sum(c[t].item() for t in shown) / top_m for c in counts]])
fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(history) + 2), 0.4 * len(share) + 1.5))
ax.imshow(share, cmap='Oranges', vmin=0, vmax=1, aspect='auto')
ax.set_xticks(range(len(history)), [it for it, _ in history], rotation=90)
ax.set_yticks(range(len(share)), [repr(decode([t])) for t in shown] + ['other / not firing'])
ax.set_xlabel('training step')
ax.set_title(f'neuron {l}:{j} of {names[0]}: share of its top-{top_m} positions per token')
fig.tight_layout()
fig.savefig(os.path.join(out, 'neuron_formation.png'), dpi=80)
print(f"traced neuron {l}:{j}")

if pages:
    for l in main_tables:
        if is_topk(main_model, l):
            write_page(os.path.join(out, f'neurons_layer{l}.html'), main_model, tokens, l, main_stats[l], main_tables[l])
topk_layers = [l for l, k in enumerate(kinds) if k == 'TopK']
for n, r in runs.items():  # the headline number: TopK layers of the first run, same layers of the other
    last = r['checkpoints'][-1]['layers']
    if topk_layers:
        print(f"{n} final: mean token entropy over layers {topk_layers} "
              f"{np.mean([last[l]['token_entropy_mean'] for l in topk_layers]):.3f} bits, semantic "
              f"{np.mean([last[l]['semantic_entropy_mean'] for l in topk_layers]):.3f} bits")
print(f"wrote {out}/entropy.json, entropy_final.png, entropy_vs_step.png, neuron_formation.png")
