"""Native multimodal Transformers on one backbone: Chameleon, Transfusion and Mixture-of-Transformers.

One decoder-only Transformer reads and writes *interleaved* sequences of text tokens and images.
Two settings choose the design, and nothing else differs between them:

- ``image``: how an image enters the sequence.

  - ``vq`` (Chameleon, arXiv 2405.09818): an image is the grid of its VQ autoencoder codes, read
    row by row; code ``k`` is token ``text_vocab + k`` of one shared vocabulary. The loss is the
    next-token loss everywhere (text and codes), plus a z-loss ``z_loss * log^2 Z`` on the
    logits' normaliser that keeps them from drifting (with QK-norm, what keeps Chameleon stable).
    Attention is causal everywhere: codes are generated one after the other.
  - ``latent`` (Transfusion, arXiv 2408.11039): an image is the continuous latent grid of a KL
    autoencoder, one token per latent cell, projected in with a timestep embedding added and
    projected out to the noise that was added to it (``patch: linear``: one map a cell; ``conv``:
    two 3x3 convolutions over the grid each way, the paper's U-Net patch layers in small, so a
    token reads its neighbouring cells). ``patch_size: 2`` makes one token of each 2x2 block of
    cells (its 4 x C values; the paper's patch size): an 8x8 grid is 16 tokens, not 64, so a
    drawing costs less of every step and :meth:`OmniModel.image_tokens` gives ``(C p^2, g/p, g/p)``
    grids. The loss is the text next-token loss plus
    ``diffusion_weight`` (lambda, 5 in the paper) times the diffusion loss (epsilon prediction,
    cosine schedule) on the image tokens. Attention is causal across the sequence and
    bidirectional inside each image: a causal image block took the paper's FID from 20.3 to 61.3
    (Table 5). ``time_conditioning: adaln`` also lets the timestep scale and shift every block's
    norms on image tokens and scale their residual updates (DiT's adaLN, per image, zero at the
    start; text tokens untouched); ``input`` (the paper's) adds it to the input tokens only.
    ``text_condition`` adds the mean input embedding of the text before an image to that
    condition (DiT's pooled text), so every image token gets its prompt in one vector as well as
    through attention; the KV cache keeps the running sum of the cached text for it.
    ``align_encoder`` (REPA, arXiv 2410.06940) names a trained model with an image feature map (a
    detector): while training, a small MLP on the image tokens' hidden states after
    ``align_depth`` blocks predicts that model's features of the *clean* image on each latent
    cell, and ``align_weight`` times ``1 - cosine similarity`` joins the loss, so the denoiser's
    early blocks learn what the picture holds (which shape is where) from a noised image and its
    prompt. The encoder and the MLP are for training only: a saved model has neither.

- ``layout``: how the parameters are shared.

  - ``dense``: every position goes through the same norms, attention projections and MLP.
  - ``mot`` (Mixture-of-Transformers, arXiv 2411.04996): each block has one set of those
    parameters per modality (0 text, 1 image) and each position goes through its own modality's;
    attention stays global over the whole sequence. A token costs the same FLOPs as in ``dense``,
    and the blocks hold twice the parameters.

The two layouts are one block class, :class:`OmniBlock`, with ``experts = 1`` (dense) or ``2``
(mot) parameter sets; its attention is the shared Transformer's (:class:`~polymodal.nn.layers.Attention`'s
projections and QK-norm, its rotary positions, its KV cache, its :func:`~polymodal.nn.layers.segment_mask`),
run once over the whole sequence.

**The sequence.** An example is a list of segments (:class:`OmniExample`): text token ids, or an
image (its codes or its latent grid). Packing frames each image by ``<boi>`` and ``<eoi>``::

    caption first (draw):     <bos> a red star ... <boi> [64 image tokens] <eoi> <eos>
    image first (caption):    <bos> <boi> [64 image tokens] <eoi> <eos> a red star ... <eos>
    question (VQA):           <bos> <boi> [64 image tokens] <eoi> what colour ...? <eos> red <eos>

After an image the text is ``prompt <eos> target <eos>`` as in the captioner (an empty prompt for
a caption), so "caption this" and "answer this" are told apart by what follows ``<eoi>``. Every
position carries a modality id (0 text, ``<boi>`` and ``<eoi>`` included; 1 image), a segment id
(0 text, ``k`` on every token of the sequence's ``k``-th image) and, on image tokens, the index of
its latent cell (a learned per-cell embedding gives the 2-D place, from small random values or,
with ``image_positions: sincos``, from DiT's 2-D sine-cosine codes; rotary positions give the
1-D one, or with ``rotary: 2d`` the cell's row and column on two thirds of each head's channel
pairs, so attention between cells sees their offset on the grid). Padding positions go through no
parameter set (:class:`Routing`'s ``skip``): their rows are not computed at all. Batches are
padded on the right for training and on the left for generation (so all rows grow at the same
place); a padding query still sees itself, so no attention row is empty
(SDPA returns NaN on an empty row).

:func:`examples_from_rows` makes training examples from the shapes world's rows: 80% of image
and caption pairs caption-first, 20% image-first with their noise capped at ``t <= 500`` (so
captioning learns from clean-ish images: the paper's Table 8), captions dropped with chance
``caption_dropout`` (for classifier-free guidance), and VQA as question and answer after the image.

**Generation** (all with the KV cache of :mod:`polymodal.nn.layers`, which can be turned off
for a check): :meth:`OmniModel.generate_text` (greedy, beam search or nucleus over the text vocabulary);
:meth:`OmniModel.generate_image` (``vq``: codes sampled with top-p and classifier-free guidance
against a dropped-caption pass, never greedy, which gives blank images; ``latent``: the diffusion
sampler run on the image block in place, bidirectional inside it, the prefix cached once);
:meth:`OmniModel.generate_interleaved` (text until ``<boi>``, an image, text again).

**The family** (:mod:`polymodal.models.family`): one model that captions, answers and draws, so
it answers each task's entry point as the family that does only that task does, and callers
(the command line, the server, the evaluators) need not know it is one model:
:meth:`OmniModel.generate` given a data batch of images (and questions) writes text as a
captioner's ``generate`` does (:meth:`OmniModel.write`); given prompt strings it draws images as a
text-to-image model's ``generate`` does (:meth:`OmniModel.draw`); given segment prefixes it is
:meth:`OmniModel.generate_interleaved`. ``polymodal eval`` scores captions and answers with the
captioner's metrics and, given a judge, drawings with the text-to-image family's GenEval-style
scores, under the same keys. Training encodes each training image once: its codes or latents
are cached by the file it came from (:meth:`OmniModel.training_tokens`), so the frozen
autoencoder does not run every step.

The modules: :mod:`~polymodal.models.omni.sequence` (settings, examples, packed batches, the
cache), :mod:`~polymodal.models.omni.blocks` (the block and its routing),
:mod:`~polymodal.models.omni.model` (the network, its loss and its family entry points),
:mod:`~polymodal.models.omni.generation` (prompts, decoding, sampling and each task's entry point).
"""

from polymodal.models.omni.blocks import ModalityWeights, OmniBlock, Routing
from polymodal.models.omni.generation import AsCaptioner
from polymodal.models.omni.model import OmniModel, check_autoencoder
from polymodal.models.omni.sequence import (
           IMAGE,
           IMAGE_KINDS,
           LAYOUTS,
           TEXT,
           Interleaved,
           OmniCache,
           OmniConfig,
           OmniExample,
           examples_from_rows,
)

__all__ = ["IMAGE", "IMAGE_KINDS", "LAYOUTS", "TEXT", "AsCaptioner", "Interleaved", "ModalityWeights", "OmniBlock",
           "OmniCache", "OmniConfig", "OmniExample", "OmniModel", "Routing", "check_autoencoder", "examples_from_rows"]
