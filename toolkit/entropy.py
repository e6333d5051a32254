"""
How specific the neurons are, per layer, at every checkpoint of a run (formation tracing),
optionally beside a second run (the dense baseline) on the same tokens in the same semantic space.

    python -m toolkit.entropy --out_dir=out-toy --compare=out-toy-dense

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

from configurator import at_least, configure, die
from model import GPT, GPTConfig, trained_alpha
from toolkit.analysis import analyse, mean_over_firing, semantic_clusters, specificity_order, write_page
from toolkit.common import load_checkpoint, load_model, resolve_device, run_checkpoints
from toolkit.cpu_fast import enable as cpu_fast_paths
from toolkit.data import atomic_write, decode
from toolkit.neurons import is_topk, parse_neuron, run_eval_tokens

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


def trace_run(run, name, tokens, cluster_of, dev):
    """Every checkpoint of a run analysed at the alpha it was trained with at that step:
    dict(checkpoints=[JSON rows], final=(model, stats, tables), history=[(iter, {layer: top_ids})],
    alpha_zero_iter)."""
    rows, history = [], []
    for it, path in run_checkpoints(run):
        model, ckpt = load_model(path, dev)
        cpu_fast_paths(model)
        if ckpt['model_args']['block_size'] < tokens.size(1):
            die(f"{path} has block_size {ckpt['model_args']['block_size']} < the {tokens.size(1)}-token evaluation sequences")
        cfg, alpha = ckpt.get('config', {}), trained_alpha(ckpt)
        model.set_alpha(alpha)
        stats, tables = analyse(model, tokens, list(range(len(model.transformer.h))), top_m, cluster_of, batch_size)
        rows.append({'iter': it, 'alpha': alpha, 'layers': [
            {'layer': l, 'topk': is_topk(model, l), 'token_entropy_mean': mean_over_firing(t['h_tok']),
             'semantic_entropy_mean': mean_over_firing(t['h_sem']), 'dead_fraction': t['dead'].float().mean().item()}
            for l, t in tables.items()]})
        history.append((it, {l: t['top_ids'] for l, t in tables.items()}))
        print(f"{name} iter {it} (alpha {alpha:.2f}): token entropy " +
              " ".join(f"{r['token_entropy_mean']:.2f}" for r in rows[-1]['layers']) + ", dead " +
              " ".join(f"{r['dead_fraction']:.2f}" for r in rows[-1]['layers']), flush=True)
    return dict(checkpoints=rows, final=(model, stats, tables), history=history,
                alpha_zero_iter=cfg.get('annealing_ratio', 0) * cfg.get('max_iters', 0))


def plot_final(path, runs, kinds):
    """The distribution of entropies per layer at the final checkpoint, the runs side by side."""
    names = list(runs)
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
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_vs_step(path, runs, kinds):
    """Formation: mean entropy per layer against the training step."""
    names = list(runs)
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
    fig.savefig(path, dpi=80)
    plt.close(fig)


def traced_neuron(model, stats, tables, kinds):
    """--neuron, or the most specific neuron among those that fire at least top_m times at the end
    (TopK layers if any)."""
    if neuron:
        return parse_neuron(neuron, model)
    layers = [l for l, k in enumerate(kinds) if k == 'TopK'] or list(tables)
    candidates = [(tables[l]['h_tok'][j].item(), -tables[l]['freq'][j].item(), l, j) for l in layers
                  for j in specificity_order(tables[l]) if stats[l]['fires'][j] >= top_m]
    if not candidates:
        die(f"no neuron fires {top_m} times on the evaluation tokens; give --neuron=L:J")
    return min(candidates)[2:]


def plot_formation(path, history, l, j, run_name, vocab_size):
    """One neuron's top tokens at each checkpoint (neuron j of layer l is the same unit throughout)."""
    counts = [torch.bincount(ids[l][:, j][ids[l][:, j] >= 0], minlength=vocab_size) for _, ids in history]
    shown = torch.stack(counts).sum(0).topk(8).indices
    shown = shown[torch.stack(counts).sum(0)[shown] > 0].tolist()
    share = np.array([[c[t].item() / top_m for c in counts] for t in shown] +
                     [[1 - sum(c[t].item() for t in shown) / top_m for c in counts]])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(history) + 2), 0.4 * len(share) + 1.5))
    ax.imshow(share, cmap='Oranges', vmin=0, vmax=1, aspect='auto')
    ax.set_xticks(range(len(history)), [it for it, _ in history], rotation=90)
    ax.set_yticks(range(len(share)), [repr(decode([t])) for t in shown] + ['other / not firing'])
    ax.set_xlabel('training step')
    ax.set_title(f'neuron {l}:{j} of {run_name}: share of its top-{top_m} positions per token')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    configure(globals())
    at_least(1, eval_tokens=eval_tokens, top_m=top_m, n_clusters=n_clusters, batch_size=batch_size)
    dev = resolve_device(device)
    final_ckpt = load_checkpoint(out_dir)
    if neuron:  # checked now against the model's shape (on the meta device: no weights), not after the sweep
        with torch.device('meta'):
            parse_neuron(neuron, GPT(GPTConfig(**final_ckpt['model_args'])))
    if compare:  # the headline compares layer by layer
        depth, other = final_ckpt['model_args']['n_layer'], load_checkpoint(compare)['model_args']['n_layer']
        if depth != other:
            die(f"--compare={compare} has {other} layers, --out_dir={out_dir} {depth}: they must match")
    tokens = run_eval_tokens(eval_data, final_ckpt, eval_tokens, final_ckpt['model_args']['block_size'])
    wte = (load_checkpoint(reference) if reference else final_ckpt)['model']['transformer.wte.weight']
    cluster_of = semantic_clusters(wte, tokens, n_clusters, seed)
    print(f"{tokens.numel():,} evaluation tokens, {int(cluster_of.max()) + 1} semantic clusters")
    runs = {}
    for run in [out_dir] + ([compare] if compare else []):
        name = os.path.basename(os.path.abspath(run))
        name = name if name not in runs else name + '-compare'
        runs[name] = trace_run(run, name, tokens, cluster_of, dev)

    first = next(iter(runs))
    model, stats, tables = runs[first]['final']
    kinds = ['TopK' if is_topk(model, l) else 'dense' for l in tables]
    l, j = traced_neuron(model, stats, tables, kinds)  # before any file is replaced: it may stop
    out = os.path.join(out_dir, 'analysis')
    os.makedirs(out, exist_ok=True)
    summary = {'eval_tokens': tokens.numel(), 'top_m': top_m, 'n_clusters': int(cluster_of.max()) + 1,
               'runs': {n: {'alpha_zero_iter': r['alpha_zero_iter'], 'checkpoints': r['checkpoints']} for n, r in runs.items()}}
    atomic_write(os.path.join(out, 'entropy.json'), lambda f: f.write(json.dumps(summary, indent=1).encode()))
    plot_final(os.path.join(out, 'entropy_final.png'), runs, kinds)
    plot_vs_step(os.path.join(out, 'entropy_vs_step.png'), runs, kinds)
    plot_formation(os.path.join(out, 'neuron_formation.png'), runs[first]['history'], l, j, first, wte.size(0))
    print(f"traced neuron {l}:{j}")
    if pages:
        for layer in tables:
            if is_topk(model, layer):
                write_page(os.path.join(out, f'neurons_layer{layer}.html'), model, tokens, layer, stats[layer], tables[layer])
    topk_layers = [l for l, k in enumerate(kinds) if k == 'TopK']
    for n, r in runs.items():  # the headline number: TopK layers of the first run, same layers of the other
        last = r['checkpoints'][-1]['layers']
        if topk_layers:
            print(f"{n} final: mean token entropy over layers {topk_layers} "
                  f"{np.mean([last[l]['token_entropy_mean'] for l in topk_layers]):.3f} bits, semantic "
                  f"{np.mean([last[l]['semantic_entropy_mean'] for l in topk_layers]):.3f} bits")
    print(f"wrote {out}/entropy.json, entropy_final.png, entropy_vs_step.png, neuron_formation.png")


if __name__ == '__main__':
    main()
