"""
A TopK LM in the interpretability tools people already use: Hugging Face transformers (and
nnsight, which wraps it), TransformerLens and SAELens. export.py writes the files; this module
builds and reads them, and importing it registers the TopK LM's MLP with SAELens.

A TopK LM is GPT-2 with one change, the activation of the MLP in its TopK blocks (the first
n_layer - n_nontopk): of the d_ff pre-activations x = c_fc(h) of a token it keeps the k largest
and applies GELU to them, the rest are 0. So:

  transformers      GPT2LMHeadModel holds every weight (Conv1D stores them transposed, the lm_head
                    is tied to wte, the vocabulary has the model's 50,304 padded rows, or GPT-2's
                    50,257 for a run from its weights, with its tanh GELU). A dense run needs
                    nothing else; load_hf() puts the TopK activation at transformer.h.L.mlp.act.
  TransformerLens   HookedTransformer of the same weights (its own GPT-2 conversion), the TopK
                    activation as blocks.L.mlp.act_fn: the neurons are blocks.L.mlp.hook_post.
  SAELens           each TopK block's MLP is a TopK transcoder with no reconstruction error,
                    from blocks.L.ln2.hook_normalized to blocks.L.hook_mlp_out: encoder c_fc
                    (with ln_2's weight and bias folded in under TransformerLens 3, which hooks
                    the normalized vector before them), decoder c_proj. SAELens's own TopK applies
                    ReLU to the kept values, so the architecture "topk_lm_transcoder" below,
                    registered through sae_lens.registry, applies GELU (or ReLU, for sae.py's
                    transcoders).
"""
import json
import os
from dataclasses import dataclass
from importlib.metadata import version

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopK as SAELensTopK
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from safetensors.torch import load_file
from tiktoken.load import read_file_cached
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from model import TopK, topk_layers
from toolkit.dictionary import TopKReLU
from toolkit.pretrained import CONV1D, GELU_OF, HF_GELU


# GPT-2's own tokenizer files, the ones tiktoken reads its 'gpt2' encoding from (and caches, so this
# works offline wherever tiktoken does); transformers reads them as vocab.json and merges.txt
GPT2_FILES = {'vocab.json': 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json',
              'merges.txt': 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe'}


def write_tokenizer(folder):
    """GPT-2's tokenizer into folder: AutoTokenizer.from_pretrained(folder) then loads it offline
    (tokenizer_config.json names its class, so no transformers config.json is needed)."""
    for name, url in GPT2_FILES.items():
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(read_file_cached(url))
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump({'tokenizer_class': 'GPT2Tokenizer'}, f)


# -----------------------------------------------------------------------------
# Hugging Face transformers


def hf_config(c):
    """GPT2Config of a GPTConfig c, with topk and n_nontopk as extra keys of config.json."""
    return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                      n_layer=c.n_layer, n_head=c.n_head, activation_function=HF_GELU[c.gelu],
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256,
                      architectures=['GPT2LMHeadModel'], topk=c.topk, n_nontopk=c.n_nontopk)


def to_hf(model):
    """A GPT2LMHeadModel holding model's weights, with the TopK activation in its TopK blocks."""
    hf = GPT2LMHeadModel(hf_config(model.config))
    ours = model.state_dict()
    assert set(ours) <= set(hf.state_dict()), set(ours) - set(hf.state_dict())  # no weight left behind
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            if name in ours:
                p.copy_(ours[name].t() if name.endswith(CONV1D) else ours[name])
            else:  # a run with bias=False: GPT-2 always has biases, and zero ones are the same model
                assert name.endswith('.bias'), name
                p.zero_()
    return with_topk(hf).eval()


def with_topk(hf):
    """Put the TopK activation (alpha = 0) into the TopK blocks of a GPT2LMHeadModel."""
    c = hf.config
    for layer in topk_layers(c.n_layer, getattr(c, 'topk', 0), getattr(c, 'n_nontopk', 0)):
        hf.transformer.h[layer].mlp.act = TopK(c.topk, GELU_OF[c.activation_function])
    return hf


def load_hf(path):
    """A folder written by `export.py --format=hf`, as transformers loads it, with the TopK
    activation at transformer.h.L.mlp.act in the TopK blocks (a dense run's folder loads as is)."""
    return with_topk(GPT2LMHeadModel.from_pretrained(path)).eval()


# -----------------------------------------------------------------------------
# TransformerLens

def tl_config(n_layer, n_head, n_embd, block_size, vocab_size, gelu='none'):
    """HookedTransformerConfig arguments of this project's GPT-2 (LayerNorm eps 1e-5; gelu as GPTConfig's)."""
    return dict(d_model=n_embd, d_head=n_embd // n_head, n_heads=n_head, d_mlp=4 * n_embd, n_layers=n_layer,
                n_ctx=block_size, eps=1e-5, d_vocab=vocab_size, act_fn=HF_GELU[gelu], normalization_type='LN',
                original_architecture='GPT2LMHeadModel', default_prepend_bos=False)


def tl_weights(model):
    """(HookedTransformerConfig arguments, weights under TransformerLens's names) of a model of
    this project, by TransformerLens's own GPT-2 conversion of its transformers twin."""
    c = model.config
    args = tl_config(c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.gelu)
    return args, convert_gpt2_weights(to_hf(model), HookedTransformerConfig(**args))


def hooked(cfg, state_dict, topk, n_nontopk, tokenizer=None, cls=HookedTransformer):
    """The weights unprocessed: LayerNorm folding and centring would change the weights and the
    residual stream that this project's analysis reads; the neurons are blocks.L.mlp.hook_post.
    cls: HookedTransformer or a subclass (SAELens's HookedSAETransformer, which SAEDashboard runs)."""
    tl = cls(cfg, tokenizer=tokenizer)
    tl.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    for layer in topk_layers(cfg.n_layers, topk, n_nontopk):
        tl.blocks[layer].mlp.act_fn = TopK(topk, GELU_OF[tl.cfg.act_fn])
    return tl.eval()


def load_transformer_lens(path, cls=HookedTransformer):
    """A folder written by `export.py --format=transformer_lens` (TransformerLens's weight names in
    model.safetensors; config.json: HookedTransformerConfig's arguments, topk and n_nontopk; GPT-2's
    tokenizer files, so that to_tokens and to_str_tokens work)."""
    with open(os.path.join(path, 'config.json')) as f:
        config = json.load(f)
    topk, n_nontopk = config.pop('topk'), config.pop('n_nontopk')
    return hooked(HookedTransformerConfig(**config), load_file(os.path.join(path, 'model.safetensors')),
                  topk, n_nontopk, GPT2TokenizerFast.from_pretrained(path), cls)


# -----------------------------------------------------------------------------
# SAELens

ARCHITECTURE = 'topk_lm_transcoder'  # a name of this project's, so no SAELens class can take its place


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    k: int = 64
    activation: str = 'gelu'  # of the kept pre-activations: 'gelu' or 'gelu_new' (a TopK LM) or 'relu' (sae.py)

    @classmethod
    def architecture(cls):
        return ARCHITECTURE


class KeptTopK(SAELensTopK):
    """The k largest pre-activations through GELU (a TopK LM) or ReLU (sae.py's transcoders), the
    rest 0. A subclass of SAELens's TopK (which applies ReLU), so that tools checking for a TopK
    activation treat it as one: SAEDashboard then encodes every latent and picks the features
    it shows, where for other activations it would drop the rest from the encoder first."""

    def __init__(self, k, activation):
        super().__init__(k)
        self.kept = TopK(k, GELU_OF[activation]) if activation in GELU_OF else TopKReLU(k)  # the model's own (alpha 0), or sae.py's

    def forward(self, x):
        return self.kept(x)


class TopKTranscoder(Transcoder):
    """A transcoder whose latents are the k largest pre-activations through GELU or ReLU."""

    def get_activation_fn(self):
        return KeptTopK(self.cfg.k, self.cfg.activation)

    def fold_W_dec_norm(self):
        """Nothing to fold. Folding rescales latent j by its decoder norm, and the k kept would then
        be the largest of the rescaled pre-activations: other latents than the model's (SAELens's
        own TopK refuses to fold for this reason). SAEDashboard calls it before reading features,
        which therefore shows the neurons as the model computes them."""

    @classmethod
    def from_dict(cls, config_dict):
        return cls(TopKTranscoderConfig.from_dict(config_dict))


registered = SAE_CLASS_REGISTRY.get(ARCHITECTURE)
if registered is None:
    register_sae_class(ARCHITECTURE, TopKTranscoder, TopKTranscoderConfig)
elif registered[0].__qualname__ != TopKTranscoder.__qualname__:  # the same class imported again is fine
    raise RuntimeError(f"SAELens already has another class for {ARCHITECTURE!r}: {registered[0]}")


# TransformerLens 3 hooks ln2.hook_normalized before LayerNorm's weight and bias, 2.x after them (at
# the MLP's input itself): a SAELens folder reads what the TransformerLens it was exported with hooks
HOOK_BEFORE_AFFINE = int(version('transformer-lens').split('.')[0]) >= 3


def mlp_input_encoder(ln, fc, before_affine=HOOK_BEFORE_AFFINE):
    """(W_enc, b_enc) of fc reading blocks.L.ln2.hook_normalized: the MLP input n * w + b itself
    (before_affine=False), or n before LayerNorm's weight w and bias b, folded into the encoder:
    fc(n * w + b) = (W_fc * w) n + (W_fc b + b_fc)."""
    b_fc = zeros_if_none(fc.bias, fc.out_features)
    if not before_affine:
        return fc.weight.t(), b_fc
    return (fc.weight * ln.weight).t(), b_fc + (fc.weight @ ln.bias if ln.bias is not None else 0)


def zeros_if_none(bias, size):  # a run trained with bias=False
    return bias if bias is not None else torch.zeros(size)


def mlp_transcoder(model, layer, metadata):
    """TopK block `layer`'s MLP as a SAELens TopKTranscoder from blocks.L.ln2.hook_normalized
    (mlp_input_encoder) to blocks.L.hook_mlp_out: exactly the MLP, its latents the neurons."""
    block = model.transformer.h[layer]
    d, d_ff = block.mlp.c_fc.in_features, block.mlp.c_fc.out_features
    cfg = TopKTranscoderConfig(d_in=d, d_sae=d_ff, d_out=d, k=model.config.topk, activation=HF_GELU[model.config.gelu],
                               apply_b_dec_to_input=False, metadata=SAEMetadata(
                                   hook_name=f'blocks.{layer}.ln2.hook_normalized',
                                   hook_name_out=f'blocks.{layer}.hook_mlp_out', **metadata))
    return filled(TopKTranscoder(cfg), *mlp_input_encoder(block.ln_2, block.mlp.c_fc), block.mlp.c_proj.weight.t(),
                  zeros_if_none(block.mlp.c_proj.bias, d))


def dictionary_sae(coder, meta, model, metadata):
    """A dictionary of sae.py as SAELens reads it: an SAE is SAELens's own TopK SAE of the MLP
    output (b_pre is its b_dec, subtracted before encoding); a transcoder is a TopKTranscoder
    with ReLU from blocks.L.ln2.hook_normalized (mlp_input_encoder of the model's ln_2) to the
    MLP output (b_pre is its output bias)."""
    layer, d, n = meta['layer'], meta['d_in'], meta['n_latents']
    if meta['kind'] == 'sae':
        sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=meta['k'], apply_b_dec_to_input=True, metadata=SAEMetadata(
            hook_name=f'blocks.{layer}.hook_mlp_out', **metadata)))
        return filled(sae, coder.encoder.weight.t(), coder.encoder.bias, coder.decoder.weight.t(), coder.b_pre)
    sae = TopKTranscoder(TopKTranscoderConfig(d_in=d, d_sae=n, d_out=d, k=meta['k'], activation='relu',
                                              apply_b_dec_to_input=False, metadata=SAEMetadata(
                                                  hook_name=f'blocks.{layer}.ln2.hook_normalized',
                                                  hook_name_out=f'blocks.{layer}.hook_mlp_out', **metadata)))
    return filled(sae, *mlp_input_encoder(model.transformer.h[layer].ln_2, coder.encoder), coder.decoder.weight.t(),
                  coder.b_pre)


def filled(sae, w_enc, b_enc, w_dec, b_dec):
    with torch.no_grad():
        for name, value in dict(W_enc=w_enc, b_enc=b_enc, W_dec=w_dec, b_dec=b_dec).items():
            getattr(sae, name).copy_(value)
    return sae.eval()
