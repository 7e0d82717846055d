"""Feature atlas: what every SAE feature responds to, as a static offline site and a JSONL export.

One streaming ``prisma predict`` pass (:class:`~prisma_lightning.modules.AtlasModule` +
:class:`~prisma_lightning.callbacks.AtlasWriter`) computes, per feature, its firing frequency, mean and max
activation, a histogram of its activations, its top-k images with the feature's value on every patch, the
labels (and for dSprites the generative factors) of those images, its nearest features by decoder cosine and,
for CLIP backbones with a zero-shot classifier, the closest class names. The output folder holds the site
(``index.html``, see :mod:`prisma_lightning.atlas.site`), ``features.jsonl``, ``atlas.json`` and, for data with
generative factors, ``ground_truth.json`` (:mod:`prisma_lightning.metrics.ground_truth`).

Definitions: a feature *fires* on a token when its activation is > 0. An image's *score* for a feature is its
maximum over the tokens the SAE reads (all tokens, the patches, or the class token, per ``cfg.tokens``); top-k
images are ranked by score (ties: lower image index first). *Image index* is the sample's index in the predict
dataset (for ``DSpritesDataModule``: in the validation split); *source index* is the image's index in its source
(the dSprites factor grid) when known.

SCHEMA of ``features.jsonl`` (one JSON object per line, in feature order; :data:`FEATURE_SCHEMA` is the JSON
Schema, :func:`validate_feature` checks a record). Names follow Neuronpedia's feature export where one applies.

==============================  ==========================================================================
field                           meaning
==============================  ==========================================================================
``modelId``                     backbone name (``cfg.model_name``)
``layer``                       hook the SAE reads, e.g. ``blocks.1.hook_resid_post``
``index``                       feature index
``sae``                         SAE folder or repo the atlas was made from
``tokens``                      tokens the SAE reads: ``all``, ``cls`` or ``patches``
``frac_nonzero``                fraction of those tokens on which the feature fires
``frac_images``                 fraction of images with at least one firing token
``maxActApprox``                largest activation seen (exact over the data)
``mean_act_firing``             mean activation over firing tokens (null if it never fired)
``mean_act``                    mean activation over all tokens
``freq_hist_data_bar_heights``  firing-token counts per histogram bin (log-spaced bins shared by all features;
                                values outside the range counted in the first / last bin)
``freq_hist_data_bar_values``   geometric centre of each bin
``label_purity``                share of the labelled top images that have the most common label (null: none)
``label_distribution``          ``[{label, name, count}]`` labels of the top images, most common first
``topkCosSimIndices/Values``    nearest features by decoder cosine, most similar first
``pos_str/pos_values``          CLIP: class names closest to the decoder direction in the text space (cosine);
                                ``neg_str/neg_values`` the farthest; empty lists otherwise
``patch_grid``                  ``[time steps, rows, columns]`` of the patch tokens (``[0, 0, 0]``: no patches)
``activations``                 the top images, best first: ``imageIndex``, ``sourceIndex`` (or null), ``image``
                                (PNG path relative to the folder, or null), ``label``/``labelName`` (or null),
                                ``maxValue`` (the image score), ``maxValueTokenIndex`` (patch holding the score,
                                row-major over ``patch_grid``; null when a prefix token holds it), ``values``
                                (the feature on every patch token, from uint8 maps: 1/255 of the score
                                resolution), ``factors`` (``{factor: class index}`` for dSprites, else null)
==============================  ==========================================================================
"""

from prisma_lightning.atlas.data import AtlasData, FactorSource, decoder_neighbours, dsprites_factors
from prisma_lightning.atlas.export import FEATURE_SCHEMA, feature_records, validate_feature, write_json, write_jsonl
from prisma_lightning.atlas.site import js_json, png_bytes, write_images, write_site
from prisma_lightning.atlas.stats import FeatureAccumulator, all_gather_merge, decode_keys, encode_keys, hist_edges

__all__ = [
    "FEATURE_SCHEMA",
    "AtlasData",
    "FactorSource",
    "FeatureAccumulator",
    "all_gather_merge",
    "decode_keys",
    "decoder_neighbours",
    "dsprites_factors",
    "encode_keys",
    "feature_records",
    "hist_edges",
    "js_json",
    "png_bytes",
    "validate_feature",
    "write_images",
    "write_json",
    "write_jsonl",
    "write_site",
]
