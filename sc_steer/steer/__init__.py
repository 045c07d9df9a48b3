"""Steering generation with SAE features (activation additions), applied at every generation step.

A recipe is a list of interventions, each at a site (``resid_post.{i}`` above all; ``attn_out``,
``mlp_out`` and ``mlp_act`` too, each edited where its SAE reads it):

* ``add``    -- ``h += coeff * W_dec[i]`` (unit decoder row), or ``coeff * vector`` for a raw vector;
* ``remove`` -- error-preserving ablation ``h -= f_i(h) W_dec[i]``, recomputed from the current h;
* ``clamp``  -- ``h += (coeff - f_i(h)) W_dec[i]`` (set the feature to ``coeff``);
* ``scale``  -- ``h += (coeff - 1) f_i(h) W_dec[i]``.

Positions: ``all`` (every position of every step), ``prompt`` (the prompt, at the prefill step),
``generated`` (the newly generated tokens, at the decoding steps), ``last`` (the newest position of
each step). The BOS position is left alone unless ``include_bos`` is set: its activations are far
outside what the SAEs were trained on (training, graphs and evaluation never use BOS), so encoding it
for remove/clamp/scale reads meaningless feature values, and editing it moves every later position
through attention. With the KV cache the prefill step sees ``[B, prompt_len, d]`` and later steps ``[B, 1, d]``;
the edit is a forward hook on the site's module (``LM.edited``), so it runs at every step of
``transformers``' own ``generate``: steering costs the edit and nothing else. A raw ``vector`` of shape
``[L, d]`` (an ActAdd difference) is added to the first ``L`` prompt positions.

Whether steering worked is measured without a judge (``scores.py``: concept, fluency and side effect,
read by the unsteered model), methods are compared at matched cost (``compare.py``, ``methods.py``,
``sc-steer steer-eval``), and which features steer at all is ranked by their output score
(``steerability.py``, ``sc-steer steerability``).
"""
from .compare import steer_eval
from .effects import measure_effects
from .generate import bos_positions, edit_hidden, generate, generate_ids, step_mask
from .recipe import MAX_COEFF, MODE_DOCS, MODES, POSITIONS, Intervention, Recipe
from .scores import Concept, score_continuations
from .steerability import output_scores
from .vectors import actadd_vector, contrast_vector, decompose

__all__ = ["MAX_COEFF", "MODES", "MODE_DOCS", "POSITIONS", "Concept", "Intervention", "Recipe", "actadd_vector",
           "bos_positions", "contrast_vector", "decompose", "edit_hidden", "generate", "generate_ids",
           "measure_effects", "output_scores", "score_continuations", "steer_eval", "step_mask"]
