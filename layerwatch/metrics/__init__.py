"""The maths of layerwatch: pure, vectorized functions on torch tensors (SPEC §1, §7, §8).

Modules: ``tokens`` (per-prompt metrics over token states, fused in ``token_metrics``), ``sets`` (one row per
prompt or view: dataset entropy, RankMe, InfoNCE, DiME, LiDAR, bimodality), ``labels`` (probe accuracy, best
layer, CKA), ``attention_sinks`` (massive activations, sink-free entropy), ``dimension`` (TwoNN intrinsic dimension), ``uncertainty``
(standard errors: per-prompt and jackknife), ``names`` (every metric's name, once), ``base`` (checks, centering,
eigenvalue paths, matrix entropies) and ``registry`` (one ``MetricSpec`` per metric). Conventions shared by
every function: see ``base``'s docstring.
"""

from layerwatch.metrics.base import (
    EIGENVALUE_RTOL,
    SET_CHUNK_BYTES,
    EigenvaluePaths,
)
from layerwatch.metrics.labels import (
    PROBE_FOLDS,
    PROBE_RIDGE,
    best_layer,
    check_labels,
    label_folds,
    linear_cka,
    probe_accuracy,
)
from layerwatch.metrics.attention_sinks import (
    SINK_GAP,
    SINK_NORM_RATIO,
    massive_activation,
    prompt_entropy_without_sinks,
    sink_tokens,
)
from layerwatch.metrics.sets import (
    bimodality,
    dataset_entropy,
    dime,
    effective_rank,
    infonce,
    infonce_chance,
    lidar,
    set_level_peak_bytes,
)
from layerwatch.metrics.tokens import (
    curvature,
    mean_pool,
    normalize,
    prompt_entropy,
    token_metrics,
)
from layerwatch.metrics.dimension import intrinsic_dimension
from layerwatch.metrics.uncertainty import (
    JACKKNIFE_GROUPS,
    jackknife,
    jackknife_groups,
    jackknife_stderr,
    prompt_stderr,
)

