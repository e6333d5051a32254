"""graph_page.py: a trace graph as circuit-tracer's graph JSON and as a page that renders, with a
neuron's top contexts on a click, in headless Chromium."""
import shutil

import pytest

from conftest import import_or_skip  # the check comes before the optional import
import_or_skip(("playwright",), "toolkit/requirements-explore.txt")

from playwright.sync_api import sync_playwright  # noqa: E402 (after the check that it is installed)

from conftest import TRACE_PROMPT as PROMPT, planted_circuit  # noqa: E402
from toolkit import graph_page, pruning, trace  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def planted(tiny_model):
    """The planted circuit's graph, pruned; its files; the planted neuron's node id."""
    model = tiny_model()
    planted_circuit(model)
    graph = trace.attribute(model, PROMPT)
    keep, edges, influence = pruning.prune(graph, node_threshold=1.0, edge_threshold=1.0)
    j = graph['nodes'].index(('neuron', 1, len(PROMPT) - 1, 5))
    data = graph_page.graph_json(graph, keep, edges, influence, 'Anna saw the job and the office', 'anna', 3,
                                 clerps={j: 'promotes salary'})
    return graph, keep, data, f"1_5_{len(PROMPT) - 1}"


def opened(path, look):
    """(the page's script errors, look(page)) for the page at path in headless Chromium."""
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
        page = browser.new_page()
        page.on('pageerror', lambda e: errors.append(str(e)))
        page.goto(f'file://{path}')
        seen = look(page)
        browser.close()
    return errors, seen


def test_the_file_holds_the_kept_nodes_with_their_cumulative_influence(planted):
    graph, keep, data, planted_id = planted
    assert len(data['nodes']) == int(keep.sum())
    by_id = {n['node_id']: n for n in data['nodes']}
    top = by_id[planted_id]  # the most influential node: the smallest cumulative share
    assert top['clerp'] == 'promotes salary' and top['activation'] > 0
    shares = [n['influence'] for n in data['nodes'] if n['feature_type'] != 'logit']  # logits: None, as there
    assert top['influence'] == min(shares) and max(shares) <= 1 + 1e-6


def test_the_page_renders_and_shows_a_neurons_contexts_on_a_click(planted, tmp_path):
    _, _, data, planted_id = planted
    path = tmp_path / 'graph.html'
    path.write_text(graph_page.page(data, {planted_id: ['  1.000  the [[job]] market']}))
    def look(page):
        counts = page.locator('circle.node').count(), page.locator('line.link').count()
        page.click(f'#n-{planted_id}')
        return counts, page.inner_text('#picked'), page.inner_text('#contexts')
    errors, ((circles, lines), picked, contexts) = opened(path, look)
    assert not errors and circles == len(data['nodes']) and lines == len(data['links'])
    assert picked == f"neuron 1:5 at {len(PROMPT) - 1}" and '[[job]]' in contexts


def test_a_dense_graphs_page_renders_every_link(planted, tmp_path):
    """A dense twin's graph keeps 10^5 edges: the page draws them all (no argument list that long)."""
    _, _, data, _ = planted
    links = data['links'] * (200_000 // len(data['links']) + 1)
    path = tmp_path / 'dense.html'
    path.write_text(graph_page.page(dict(data, links=links), {}))
    errors, lines = opened(path, lambda page: page.locator('line.link').count())
    assert not errors and lines == len(links)
