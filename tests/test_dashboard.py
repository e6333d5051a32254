"""dashboard.py: SAEDashboard renders a TopK LM's neurons from export.py's TransformerLens and
SAELens folders, with analysis.py's top contexts, on conftest's tiny TopK run."""
import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from conftest import import_or_skip  # the check comes before the optional imports
import_or_skip(("sae_dashboard",), "toolkit/requirements-interop.txt")

from sae_lens import SAE, HookedSAETransformer  # noqa: E402 (after the check that they are installed)

from toolkit import dashboard  # noqa: E402
from toolkit import interop  # noqa: E402
from toolkit.common import load_model  # noqa: E402
from toolkit.neurons import collect, run_eval_tokens  # noqa: E402

LAYER = 1


class Scripts(HTMLParser):
    """The text of each <script> of a page, which the parser hands over in pieces."""
    def __init__(self):
        super().__init__()
        self.scripts, self.inside = [], False

    def handle_starttag(self, tag, attrs):
        self.inside = tag == 'script'
        self.scripts += [''] if self.inside else []

    def handle_endtag(self, tag):
        self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.scripts[-1] += data


def page_data(page):
    """What a SAEDashboard page renders: the object that defineData() in its script returns."""
    parser = Scripts()
    parser.feed(page.read_text())
    script = next(text for text in parser.scripts if 'function defineData' in text)
    returned = script.index('return', script.index('function defineData'))
    return json.JSONDecoder().raw_decode(script, script.index('{', returned))[0]


@pytest.fixture
def exported(tiny_runs, tmp_path, run_main):
    """A copy of the tiny TopK run with its transformer_lens and saelens exports (export.py's
    default folders in the run)."""
    run = tmp_path / 'topk'
    shutil.copytree(tiny_runs / 'topk', run)
    for format in ('transformer_lens', 'saelens'):
        run_main('toolkit.export', f'--out_dir={run}', f'--format={format}')
    return run


def test_the_page_shows_the_neurons_top_contexts_as_analysis_finds_them(exported):
    model, ckpt = load_model(str(exported))
    tokens = run_eval_tokens('', ckpt, 1024, model.config.block_size)
    top = collect(model, tokens, [LAYER], top_m=4)[LAYER]
    firing = top['values'][0].gt(0).nonzero().flatten().tolist()[:3]  # neurons that fire
    tl = interop.load_transformer_lens(str(exported / 'export_transformer_lens'), cls=HookedSAETransformer)
    sae = SAE.load_from_disk(exported / 'export_saelens' / f'layer_{LAYER}')
    page = exported / 'page.html'
    data = dashboard.dashboard(tl, sae, tokens, firing, str(page))
    assert page.stat().st_size > 0 and not list(exported.glob('*.tmp.html'))
    T = tokens.size(1)
    for j in firing:
        best = data.feature_data_dict[j].sequence_data.seq_group_data[0].seq_data[0]  # the top activation
        assert (best.original_index, best.qualifying_token_index) == divmod(top['positions'][0, j].item(), T)
        value = best.feat_acts[best.qualifying_token_index - 1]  # the row is shown from its second token
        assert value == pytest.approx(top['values'][0, j].item(), abs=1e-4)  # SAEDashboard rounds to 4 places


def test_the_command_line_writes_the_page_and_refuses_what_it_cannot_read(exported, run_main):
    with pytest.raises(SystemExit, match=r"no /nonexistent \(--tl_dir\): write it first with python -m toolkit.export .*--format=transformer_lens"):
        run_main('toolkit.dashboard', f'--out_dir={exported}', '--neurons=1', '--tl_dir=/nonexistent')
    with pytest.raises(SystemExit, match=r"--neurons \[999\] out of range: layer 1 has 128 neurons"):
        run_main('toolkit.dashboard', f'--out_dir={exported}', f'--layer={LAYER}', '--neurons=3,999')
    with pytest.raises(SystemExit, match="--neurons must be comma-separated"):
        run_main('toolkit.dashboard', f'--out_dir={exported}', f'--layer={LAYER}', '--neurons=a')
    model, ckpt = load_model(str(exported))
    top = collect(model, run_eval_tokens('', ckpt, 512, model.config.block_size), [LAYER], top_m=1)[LAYER]
    firing = top['values'][0].gt(0).nonzero().flatten().tolist()[:2]  # two neurons that fire on those tokens
    printed = run_main('toolkit.dashboard', f'--out_dir={exported}', f'--layer={LAYER}',
                       f'--neurons={",".join(map(str, firing))}', '--eval_tokens=512')
    page = exported / f'dashboard_layer{LAYER}.html'
    assert f"wrote {page}" in printed
    shown = page_data(page)['DASHBOARD_DATA']
    assert list(shown) == [str(j) for j in firing]  # a feature view for each neuron asked, no other
    for j in firing:  # the heading of its top activations, "TOP ACTIVATIONS<br>MAX = 0.096": analysis's top value
        heading = next(g['title'] for g in shown[str(j)]['tokenData'].values() if g['title'].startswith('TOP'))
        assert float(re.search(r'MAX = ([\d.]+)', heading)[1]) == pytest.approx(top['values'][0, j].item(), abs=6e-4)
