"""
SAEDashboard's feature pages (optional: pip install -r toolkit/requirements-interop.txt) for neurons of a
TopK LM, read from what export.py wrote: the TransformerLens model and the layer's SAELens
transcoder, whose latents are the neurons. The evaluation tokens are the ones analysis.py reads,
so a page's top activations are the top contexts of that neuron on analysis.py's page.

    python -m toolkit.export --out_dir=out-toy --format=transformer_lens
    python -m toolkit.export --out_dir=out-toy --format=saelens
    python -m toolkit.dashboard --out_dir=out-toy --layer=1 --neurons=7,12   # out-toy/dashboard_layer1.html
"""
import os

import torch
from sae_dashboard.components_config import (ActsHistogramConfig, Column, FeatureTablesConfig, LogitsHistogramConfig,
                                             LogitsTableConfig, SequencesConfig)
from sae_dashboard.data_writing_fns import save_feature_centric_vis
from sae_dashboard.layout import SaeVisLayoutConfig
from sae_dashboard.sae_vis_data import SaeVisConfig
from sae_dashboard.sae_vis_runner import SaeVisRunner
from sae_lens import SAE, HookedSAETransformer

from configurator import configure, die
from toolkit import interop  # registers the TopK LM's transcoder with SAELens
from toolkit.common import load_checkpoint, run_folder
from toolkit.neurons import run_eval_tokens

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run: its evaluation tokens, and where export.py's folders are by default
layer = 0  # a TopK layer
neurons = ''  # comma-separated neuron indices J of that layer, e.g. 7,12
tl_dir = ''  # export.py --format=transformer_lens's folder; '' = OUT_DIR/export_transformer_lens
saelens_dir = ''  # export.py --format=saelens's folder; '' = OUT_DIR/export_saelens
eval_data = ''  # val shards of this data dir, or a .txt file; '' = the run's data_dir (as analysis.py)
eval_tokens = 32768  # evaluation tokens (analysis.py's default)
dest = ''  # the page; '' = OUT_DIR/dashboard_layer{L}.html
# -----------------------------------------------------------------------------


def dashboard(tl, sae, tokens, features, path):
    """SAEDashboard's feature-centric page of the features of sae over tokens (rows), run on the
    HookedSAETransformer tl; written to path whole (temporary file, then rename). Returns its data."""
    # SAEDashboard's default page, except that a top activation may lie anywhere in its row (buffer
    # None: the whole row is its context), where by default the first 6 and last 5 positions are
    # passed over; so the top activations are the top contexts analysis.py finds
    layout = SaeVisLayoutConfig(columns=[
        Column(FeatureTablesConfig()), Column(ActsHistogramConfig(), LogitsTableConfig(), LogitsHistogramConfig()),
        Column(SequencesConfig(stack_mode='stack-none', buffer=None))], height=750)
    cfg = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name, features=features, minibatch_size_tokens=16,
                       device='cpu', feature_centric_layout=layout)
    data = SaeVisRunner(cfg).run(encoder=sae, model=tl, tokens=tokens)
    partial = f"{path}.tmp.html"  # SAEDashboard writes by file name
    save_feature_centric_vis(data, partial)
    os.replace(partial, path)
    return data


def main():
    configure(globals())
    run = run_folder(out_dir)
    model_dir = tl_dir or os.path.join(run, 'export_transformer_lens')
    sae_dir = os.path.join(saelens_dir or os.path.join(run, 'export_saelens'), f'layer_{layer}')
    for flag, folder, format in (('tl_dir', model_dir, 'transformer_lens'), ('saelens_dir', sae_dir, 'saelens')):
        if not os.path.isdir(folder):
            die(f"no {folder} (--{flag}): write it first with python -m toolkit.export --out_dir={out_dir} --format={format}")
    try:
        features = [int(j) for j in neurons.split(',')]
    except ValueError:
        die(f"--neurons must be comma-separated neuron indices, e.g. 7,12; got {neurons!r}")
    sae = SAE.load_from_disk(sae_dir)
    bad = [j for j in features if not 0 <= j < sae.cfg.d_sae]
    if bad:
        die(f"--neurons {bad} out of range: layer {layer} has {sae.cfg.d_sae} neurons")
    tl = interop.load_transformer_lens(model_dir, cls=HookedSAETransformer)
    tokens = run_eval_tokens(eval_data, load_checkpoint(out_dir, 'cpu'), eval_tokens, tl.cfg.n_ctx)
    path = dest or os.path.join(run, f'dashboard_layer{layer}.html')
    with torch.no_grad():
        dashboard(tl, sae, tokens, features, path)
    print(f"wrote {path}")


if __name__ == '__main__':
    main()
