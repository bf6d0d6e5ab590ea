"""Representation metrics of every layer (SPEC §1): pure, vectorized functions on torch tensors.

The metrics are the ones of Skean et al., "Does Representation Matter?" (arXiv 2412.09563) and
"Layer by Layer" (arXiv 2502.02013), implemented from their definitions (see
``research/metrics-reference-notes.md``), without the reference code's known bugs (elementwise clamp of
Gram matrices, batch-dependent centering, right/left padding mix-ups, NaN-prone edge cases).

Conventions shared by every function:

* Any number of leading batch dimensions (written ``...``, typically the layer axis) is accepted. The
  work is vectorized over leading dimensions, prompts, tokens and views: one ``eigvalsh`` call per
  function call covers a whole layer stack.
* Token-level inputs are ``hidden[..., B, T, D]`` with ``mask[B, T]`` (or any shape that broadcasts to
  ``hidden.shape[:-1]``; bool or 0/1, ``True`` = real token, ``None`` = all real). Any padding side works,
  holes included. Padded slots may hold anything (NaN and inf too): they never reach a result.
* Set-level inputs are ``pooled[..., M, D]`` (one row per prompt); views are ``views[..., M, Q, D]``.
* Computation is in float64 internally. Results are float64 for float64 inputs and float32 otherwise,
  on the input's device. Inputs are never modified.
* Undefined values are NaN, never an exception: too few tokens, a prompt whose tokens are all identical,
  non-finite values. A non-finite value poisons only its own prompt (token-level) or its own layer
  (set-level).
* Matrix spectra come from the smaller of the ``n x n`` Gram matrix and the ``D x D`` covariance (same
  non-zero eigenvalues). Eigenvalues ``<= EIGENVALUE_RTOL * max`` are dropped. Nothing is clamped
  elementwise.

Implementation notes. Token-level metrics visit the flattened ``(..., B)`` prompts longest first (the layers
of one prompt side by side) in blocks of a few MB: each block is cropped to its longest prompt, copied to
float64 (from strided views of the input where possible, not gathered), centered and fully vectorized; on
CPU, float64 passes over a cache-sized block are many times faster than over one huge fresh tensor. Gram
matrices are grouped by padded size (``_GRAM_SIZE_STEP``) so that short prompts don't pay LAPACK's n^3 for
the longest one; all groups go through one ``eigvalsh`` batch spread over the CPU cores, in upper-triangle
storage so that LAPACK skips the zero padding. Curvature reuses the Gram diagonals, or without a Gram takes
each token's products with itself and its next two in one batched matrix product. LiDAR works in the
``M·Q``-sized space (Woodbury identity) when that is smaller than ``D``.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "EIGENVALUE_RTOL",
    "SET_CHUNK_BYTES",
    "PROBE_FOLDS",
    "PROBE_RIDGE",
    "SINK_NORM_RATIO",
    "best_layer",
    "bimodality",
    "check_labels",
    "curvature",
    "dataset_entropy",
    "dime",
    "effective_rank",
    "infonce",
    "infonce_chance",
    "label_folds",
    "lidar",
    "linear_cka",
    "massive_activation",
    "mean_pool",
    "normalize",
    "prompt_entropy",
    "prompt_entropy_without_sinks",
    "probe_accuracy",
    "set_level_peak_bytes",
    "sink_tokens",
    "token_metrics",
]

logger = logging.getLogger(__name__)

#: Eigenvalues ``lambda <= EIGENVALUE_RTOL * max(lambda)`` of a Gram/covariance matrix are treated as zero.
#: float64 rounding leaves the exactly-zero eigenvalues (centering makes every Gram rank deficient) at
#: about ``n * 1e-16 * max(lambda)``; 1e-12 sits safely above that and below any eigenvalue that matters.
EIGENVALUE_RTOL = 1e-12

#: The same threshold for spectra computed in float32 (float32 and bfloat16 hidden states): their rounding
#: leaves the zero eigenvalues at up to about 1e-7 of the largest one. Eigenvalues this small change an
#: entropy by less than 1e-5 nats each.
FLOAT32_EIGENVALUE_RTOL = 1e-6

#: A centered row whose norm is ``<= ZERO_ROW_RTOL`` times the scale of its set (norm of the mean or of
#: the largest centered row) is an exact zero up to rounding (e.g. all tokens of a prompt identical): it
#: becomes a zero row, which contributes nothing to any Gram matrix.
ZERO_ROW_RTOL = 1e-10

#: A difference vector ``v_k = z_{k+1} - z_k`` of unit-norm tokens with ``|v_k|^2 <= CURVATURE_ZERO_TOL``
#: counts as zero-length (consecutive tokens identical up to rounding); pairs using it are skipped.
CURVATURE_ZERO_TOL = 1e-10

#: Working memory of one chunk of the ``M x M`` set-level matrices (DiME's Hadamard products, InfoNCE's logits).
#: A chunk holds at least one matrix, so for very large ``M`` the floor is a few ``M x M`` float64 matrices.
SET_CHUNK_BYTES = 256 << 20
_DIME_MATRICES_PER_ITEM = 5  # kernels of its layer (2), the gathered product, eigvalsh's copy and workspace
_INFONCE_MATRICES_PER_ITEM = 3  # logits, logsumexp's temporaries

# Target size (bytes) of one block of rows in the CPU row-normalization loop.
_CPU_BLOCK_BYTES = 4 << 20
_ACCELERATOR_BLOCK_BYTES = 512 << 20

# Prompt-entropy Gram matrices are grouped by size in steps of this many rows, and each group goes through
# eigvalsh at its own size: LAPACK's cost grows as n^3, so short prompts must not pay for the longest one.
_GRAM_SIZE_STEP = 16


# ----------------------------------------------------------------------------------------------------
# validation and dtype helpers
# ----------------------------------------------------------------------------------------------------


def _result_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tf32_matmuls(device: torch.device) -> bool:
    """Whether float32 matrix products on ``device`` may run in TF32 (10-bit mantissa). The flags are only read,
    never set: they are global, and torch raises when its two APIs for them are mixed."""
    if device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", None)
        if precision is None:  # torch < 2.9
            return bool(matmul.allow_tf32)
        if precision == "none":  # follows the global setting
            precision = getattr(torch.backends, "fp32_precision", "ieee")
        return precision == "tf32"
    except RuntimeError:
        return True


def _working_dtype(hidden: Tensor) -> torch.dtype:
    """Dtype of the products of token-level metrics: float32 for float32/bfloat16/float16 states (results agree
    with float64 to 1e-4), float64 for float64 states, and where float32 products would run in TF32."""
    if hidden.dtype == torch.float64 or _tf32_matmuls(hidden.device):
        return torch.float64
    return torch.float32


def _check_real(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"`{name}` must be a real tensor, got dtype {x.dtype}")


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"`alpha` must be a positive finite number (1.0 for von Neumann entropy), got {alpha}")
    return alpha


def _bool_mask(mask: Tensor, shape: torch.Size, device: torch.device) -> Tensor:
    """A bool mask broadcast (as a view) to ``shape``; ValueError if it does not broadcast."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"`mask` must be a torch.Tensor or None, got {type(mask).__name__}")
    try:
        broadcast = torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"`mask` of shape {tuple(mask.shape)} does not broadcast to {tuple(shape)}; pass the attention "
            "mask [B, T] (True/1 = real token)"
        )
    mask = mask.to(device=device)
    mask = mask if mask.dtype == torch.bool else mask != 0
    return mask.expand(shape)


def _check_tokens(hidden: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Validate token-level inputs; return hidden and a bool mask broadcast to ``hidden.shape[:-1]``."""
    _check_real(hidden, "hidden")
    if hidden.dim() < 3:
        raise ValueError(f"`hidden` must have shape [..., B, T, D] (at least 3 dims), got {tuple(hidden.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError("`hidden` has hidden size D = 0")
    if mask is None:
        return hidden, None
    return hidden, _bool_mask(mask, hidden.shape[:-1], hidden.device)


def _check_sets(x: Tensor, name: str, min_dim: int = 2) -> None:
    _check_real(x, name)
    if x.dim() < min_dim:
        what = "[..., M, D]" if min_dim == 2 else "[..., M, Q, D]"
        raise ValueError(f"`{name}` must have shape {what}, got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"`{name}` has feature size D = 0")


# A block whose rows form more evenly spaced runs than this is gathered with one index_select instead.
_MAX_COPY_RUNS = 4


def _even_runs(index: list[int]) -> list[tuple[int, int, int, int]]:
    """Split ``index`` into maximal runs ``index[a:b]`` of evenly spaced increasing values ``first + k * step``:
    ``[(a, b, first, step), ...]``."""
    runs, a = [], 0
    while a < len(index):
        b, step = a + 1, 1
        if b < len(index) and index[b] > index[a]:
            step = index[b] - index[a]
            while b < len(index) and index[b] - index[b - 1] == step:
                b += 1
        runs.append((a, b, index[a], step))
        a = b
    return runs


class _TokenBlocks:
    """Prompts of a token-level input, visited longest first in blocks of a few MB.

    ``hidden[..., B, T, D]`` is flattened to ``rows = prod(...) * B`` prompts. Sorting by length groups
    prompts of similar length (the layers of one prompt share its length), so each block is cropped to its
    longest prompt and most blocks hold a single length (no padding left, no mask needed); if the padding
    is not on the right, a block's valid tokens are moved to the front (in order) first. Prompts without
    valid tokens (sorted last) are never visited.

    :attr:`groups` splits the visited sorted rows into ``(start, stop, size)`` runs whose prompts fit a
    ``size x size`` matrix (one run, of the longest prompt's size, unless :meth:`group_by_size` is called);
    :meth:`blocks` yields the ``(start, stop, width)`` blocks of one run and :meth:`gather_into` copies a block's
    tokens; per-prompt results in sorted order go back to the input order with :meth:`unsort`. This is a
    loop over memory blocks, each processed by vectorized ops, not over prompts.
    """

    def __init__(self, hidden: Tensor, mask: Tensor | None, itemsize: int = 8) -> None:
        *self.lead, t, d = hidden.shape
        self.itemsize = itemsize  # bytes per element of the blocks
        self.device = hidden.device
        self.rows = rows = math.prod(self.lead)
        self.tokens, self.hidden_size = hidden.reshape(rows, t, d), d
        if mask is None:
            self.valid = None
            count = torch.full((rows,), t, dtype=torch.long, device=self.device)
            self.prefix = True
        else:
            self.valid = mask.reshape(rows, t)
            count = self.valid.sum(-1)
            positions = torch.arange(t, device=self.device)
            self.prefix = bool((self.valid == (positions < count.unsqueeze(-1))).all()) if rows else True
        # longest first; among equal lengths by prompt, so that the rows of one prompt (its layers) are adjacent
        by_prompt = torch.argsort(torch.arange(rows, device=self.device) % max(hidden.shape[-3], 1), stable=True)
        self.order = by_prompt[torch.argsort(count[by_prompt], descending=True, stable=True)]
        self.order_list = self.order.tolist()
        self.count = count[self.order]  # valid tokens per prompt, sorted order
        self.lengths = self.count.tolist()
        self.longest = self.lengths[0] if rows else 0
        self.visited = rows - self.lengths.count(0)
        self.groups = [(0, self.visited, self.longest)] if self.visited else []

    def group_by_size(self, step: int) -> None:
        """Split the visited rows into runs of equal ``ceil(length / step) * step`` (at most the longest)."""
        sizes = [min(-(-n // step) * step, self.longest) for n in self.lengths[: self.visited]]
        self.groups = []
        for row, size in enumerate(sizes):
            if self.groups and self.groups[-1][2] == size:
                self.groups[-1] = (self.groups[-1][0], row + 1, size)
            else:
                self.groups.append((row, row + 1, size))

    def blocks(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """``(start, stop, width)`` of the blocks of sorted rows ``[first, last)`` (a run of :attr:`groups`)."""
        lengths = self.lengths
        descending = [-n for n in lengths]
        target = _CPU_BLOCK_BYTES if self.device.type == "cpu" else _ACCELERATOR_BLOCK_BYTES
        start = first
        while start < last:
            width = lengths[start]  # the block's longest prompt
            stop = min(last, start + max(1, target // (width * self.hidden_size * self.itemsize)))
            # prompts of one length make a block without padding (and without mask): end the block where the
            # length changes unless that would leave it less than half full
            same = bisect.bisect_right(descending, -width, start, stop)
            if 2 * (same - start) >= stop - start:
                stop = same
            yield start, stop, width
            start = stop

    def gather_into(self, out: Tensor, start: int, stop: int, width: int) -> Tensor | None:
        """Copy sorted rows ``[start, stop)``, cropped to ``width`` tokens with the valid ones first, into
        ``out[p, width, D]``; return their ``valid[p, width]`` mask (``None``: all valid)."""
        uniform = self.lengths[stop - 1] == width
        if not self.prefix:  # left padding or holes: valid tokens first, in their order
            index = self.order[start:stop]
            mb = self.valid.index_select(0, index)
            token_order = torch.argsort((~mb).to(torch.uint8), dim=-1, stable=True)[:, :width]
            out.copy_(self.tokens[index.unsqueeze(-1), token_order])
            return None if uniform else torch.take_along_dim(mb, token_order, dim=-1)
        # right padding (or none): the first `width` tokens hold every valid token. Rows whose input indices
        # are evenly spaced (the layers of one prompt are) are copied from a strided view, without a gather.
        runs = _even_runs(self.order_list[start:stop])
        if len(runs) <= _MAX_COPY_RUNS:
            for a, b, first, step in runs:
                out[a:b].copy_(self.tokens[first : first + (b - a - 1) * step + 1 : step, :width])
        else:
            out.copy_(self.tokens[:, :width].index_select(0, self.order[start:stop]))
        if self.valid is None or uniform:
            return None
        return torch.arange(width, device=self.device) < self.count[start:stop, None]

    def unsort(self, values: Tensor) -> Tensor:
        """Per-prompt values ``[rows, ...]`` in sorted order -> ``[..., B, ...]`` in input order."""
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.rows, device=self.device)
        return values[inverse].reshape(*self.lead, *values.shape[1:])


class _Scratch:
    """Buffers of the working dtype reused by the blocks of one call, one per thread (fresh multi-MB allocations
    cost page faults); freed with the call."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float64) -> None:
        self.device, self.dtype = device, dtype
        self.buffers: dict[int, Tensor] = {}

    def take(self, *shape: int) -> Tensor:
        """A ``shape`` view of this thread's buffer, valid until the thread's next ``take``."""
        numel, thread = math.prod(shape), threading.get_ident()
        buffer = self.buffers.get(thread)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[thread] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buffer[:numel].view(shape)


# ----------------------------------------------------------------------------------------------------
# numerical core (float64)
# ----------------------------------------------------------------------------------------------------


def _zero_rows(x: Tensor, invalid: Tensor) -> None:
    """Set the rows ``x[..., i, :]`` where ``invalid[..., i]`` to exactly 0, in place (x contiguous)."""
    if x.device.type == "cpu":
        # a row-wise index fill is ~10x faster on CPU than masked_fill_ with a broadcast mask
        rows = invalid.reshape(-1).nonzero().squeeze(-1)
        if rows.numel():
            x.view(-1, x.shape[-1]).index_fill_(0, rows, 0.0)
    else:
        x.masked_fill_(invalid.unsqueeze(-1), 0.0)


def _valid_mean(rows: Tensor, mask: Tensor | None) -> Tensor:
    """Mean ``[..., 1, D]`` of the valid rows of ``rows[..., N, D]`` (owned by the caller: its invalid rows are
    zeroed first, so garbage in them (NaN, inf) never reaches a result)."""
    if mask is None:
        return rows.mean(-2, keepdim=True)
    _zero_rows(rows, ~mask)
    return rows.sum(-2, keepdim=True) / mask.sum(-1, keepdim=True).unsqueeze(-1).clamp(min=1)


def _center_(rows: Tensor, mask: Tensor | None, *, zero_invalid: bool = True) -> tuple[Tensor, Tensor]:
    """Subtract the mean of the valid rows from float32/float64 ``rows[..., N, D]`` in place; return the mean
    ``[..., 1, D]`` (float64) and its norm ``[..., 1]`` (in the rows' dtype). After centering, invalid rows are
    zeroed again (they would hold ``-mean``) unless ``zero_invalid=False`` (callers that never read them).

    Float32 rows are centered in two passes (the corrected two-pass algorithm): the mean of the once-centered
    rows, exact up to rounding of the (small) centered values, is subtracted too. That removes the first mean's
    rounding error, which under a large common offset (massive activations: mean 10^4 times the spread) would
    otherwise be a shift of up to 1e-3 of the spread shared by every row; the mean is their float64 sum.
    """
    mean = _valid_mean(rows, mask)
    rows.sub_(mean)
    if rows.dtype != torch.float64:
        if mask is not None:
            _zero_rows(rows, ~mask)
        correction = _valid_mean(rows, mask)
        rows.sub_(correction)
        mean = mean.double() + correction.double()
    if mask is not None and zero_invalid:
        _zero_rows(rows, ~mask)
    return mean, torch.linalg.vector_norm(mean, dim=-1).to(rows.dtype)


def _inverse_norms(squared_norms: Tensor, mean_norm: Tensor) -> tuple[Tensor, Tensor]:
    """``1 / ||c_i||`` for the centered rows, 0 for rows that are zero up to rounding; and the bad-set flag.

    ``squared_norms[..., N]``, ``mean_norm[..., 1]``. A set is bad (``[...]`` True) when it holds a
    non-finite value.
    """
    norms = torch.sqrt(squared_norms)
    scale = torch.maximum(mean_norm, norms.amax(-1, keepdim=True)) if norms.shape[-1] else mean_norm
    keep = norms > ZERO_ROW_RTOL * scale
    inverse = torch.where(keep, norms.reciprocal(), 0.0)
    bad = ~torch.isfinite(scale.squeeze(-1))
    return inverse, bad


def _center_unit(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """normalize() in float64: ``(z, bad)`` with ``z[..., N, D]`` (invalid and zero rows exactly 0) and
    ``bad[...]`` True where the set holds a non-finite value (its ``z`` is meaningless)."""
    z = x.to(torch.float64, copy=True)
    _, mean_norm = _center_(z, mask)
    inverse, bad = _inverse_norms(torch.linalg.vector_norm(z, dim=-1).square(), mean_norm)
    z.mul_(inverse.unsqueeze(-1))
    return z, bad


_POOL: ThreadPoolExecutor | None = None


def _spread(fn: Callable[[T], R], items: list[T], *, device: torch.device, enough: bool) -> list[R]:
    """``[fn(item) for item in items]``, spread over the CPU cores when there is ``enough`` work.

    Torch runs one op after another, and its intra-op threads only split each op: on small ops (a block of a
    few prompts, one small eigendecomposition) they mostly wait for each other. Independent items on Python
    threads with one intra-op thread each (ops release the GIL) keep every core busy: on 2 cores, 2x faster for
    small eigendecompositions, about 1.1x for blocks of Gram products. ``fn`` must only write to memory of its own
    item. The previous thread count is restored before returning; the probe runs while training waits, so nothing
    else is computing meanwhile.
    """
    global _POOL
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or not enough or len(items) < 2:
        return [fn(item) for item in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="layerwatch-metrics")
    torch.set_num_threads(1)
    try:
        return list(_POOL.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def _cpu_eigvalsh(stacks: list[Tensor]) -> list[Tensor]:
    """``torch.linalg.eigvalsh(s, UPLO="U")`` of each CPU stack ``s[..., n, n]``, spread over the CPU cores.

    UPLO="U": LAPACK then reduces from the last column, so zero padding at the end costs almost nothing.
    """
    if not stacks:
        return []
    threads = torch.get_num_threads()
    flat = [s.reshape(-1, *s.shape[-2:]) for s in stacks]
    chunks = [(i, chunk) for i, f in enumerate(flat) for chunk in f.chunk(threads)]
    chunks.sort(key=lambda item: -item[1].shape[0] * item[1].shape[-1] ** 3)  # largest first: balanced threads
    work = sum(f.shape[0] * f.shape[-1] ** 3 for f in flat)
    values = _spread(
        lambda item: torch.linalg.eigvalsh(item[1], UPLO="U"),
        chunks,
        device=stacks[0].device,
        enough=work >= 4 * threads * 16**3,
    )
    # chunks of one stack keep their relative order through the stable sort
    parts: list[list[Tensor]] = [[] for _ in stacks]
    for (i, _), value in zip(chunks, values):
        parts[i].append(value)
    return [torch.cat(p).reshape(s.shape[:-1]) for p, s in zip(parts, stacks)]


def _eigvalsh_by_path(stacks: list[Tensor], paths: list[str]) -> list[Tensor]:
    """Eigenvalues of each stack on its path: ``"device"`` (``eigvalsh`` where the stack is) or ``"cpu"`` (copied
    to the CPU, all such stacks in one batch spread over the cores, eigenvalues copied back)."""
    values: list[Tensor | None] = [
        torch.linalg.eigvalsh(s, UPLO="U") if path == "device" else None for s, path in zip(stacks, paths)
    ]
    on_cpu = [i for i, path in enumerate(paths) if path == "cpu"]
    for i, value in zip(on_cpu, _cpu_eigvalsh([stacks[i].cpu() for i in on_cpu])):
        values[i] = value.to(stacks[i].device)
    return values  # type: ignore[return-value]


def _time_eigenvalue_path(path: str, sample: Tensor) -> float:
    """Seconds to get the eigenvalues of ``sample[k, n, n]`` on ``path``, after a warm-up call (the first call
    on a device creates solver handles), synchronized by reading a value back."""
    _eigvalsh_by_path([sample[:1]], [path])[0].sum().item()
    start = time.perf_counter()
    _eigvalsh_by_path([sample], [path])[0].sum().item()
    return time.perf_counter() - start


#: On an accelerator, eigenvalues of matrices up to this size are computed there without a measurement: torch
#: hands batches of such small matrices to one batched solver call (cuSOLVER's syevjBatched).
DEVICE_BATCHED_EIGH_MAX = 32

#: Matrices of the stack timed on each path when the eigenvalue path of a larger size is measured.
EIGH_PATH_SAMPLE = 16


class EigenvaluePaths:
    """Where the eigenvalues of a stack of ``n x n`` matrices are computed, chosen once per (n, dtype, device).

    On the CPU, always ``"cpu"`` (the stack spread over the cores). On an accelerator, ``"device"`` for
    ``n <= DEVICE_BATCHED_EIGH_MAX``; for larger ``n`` both paths are timed on up to ``EIGH_PATH_SAMPLE``
    matrices of the first stack of that size (a few milliseconds, once) and the faster one is kept. The
    measurement is there because, for ``n > 32``, many PyTorch releases call cuSOLVER once per matrix in a loop
    (pytorch/pytorch issue #175585, PR #175403): 1,024 matrices of 128 x 128 then take seconds on the GPU, but
    milliseconds copied to the CPU; a release that batches the solver wins the measurement instead. Each choice
    is logged once at debug level and kept in :attr:`choices`.

    Args:
        timer: ``timer(path, sample) -> seconds``; the default runs and times the real computation.
    """

    def __init__(self, timer: Callable[[str, Tensor], float] = _time_eigenvalue_path) -> None:
        self.timer = timer
        self.choices: dict[tuple[int, torch.dtype, str], str] = {}

    def choose(self, stack: Tensor, device: torch.device | None = None) -> str:
        """The path for ``stack[..., n, n]`` (``device`` overrides the stack's device, for tests)."""
        device = stack.device if device is None else device
        if device.type == "cpu":
            return "cpu"
        n = stack.shape[-1]
        key = (n, stack.dtype, str(device))
        if key not in self.choices:
            if n <= DEVICE_BATCHED_EIGH_MAX:
                path, reason = "device", f"batched solver for n <= {DEVICE_BATCHED_EIGH_MAX}"
            else:
                sample = stack.reshape(-1, n, n)[:EIGH_PATH_SAMPLE]
                seconds = {option: self.timer(option, sample) for option in ("device", "cpu")}
                path = min(seconds, key=seconds.__getitem__)
                reason = ", ".join(f"{option} {1e3 * t:.2f} ms" for option, t in seconds.items())
                reason = f"measured on {sample.shape[0]} matrices: {reason}"
            self.choices[key] = path
            logger.debug("eigenvalues of %d x %d %s matrices on %s: %s path (%s)", n, n, stack.dtype, device, path, reason)
        return self.choices[key]


_EIGENVALUE_PATHS = EigenvaluePaths()


def _eigvalsh(stacks: list[Tensor]) -> list[Tensor]:
    """``eigvalsh`` of each stack ``s[..., n, n]`` (all on one device): on the CPU one batch spread over the cores;
    on an accelerator each stack on the path :class:`EigenvaluePaths` chose for its size."""
    if not stacks or stacks[0].device.type == "cpu":
        return _cpu_eigvalsh(stacks)
    return _eigvalsh_by_path(stacks, [_EIGENVALUE_PATHS.choose(s) for s in stacks])


def _safe_eigvalsh(mats: Tensor, bad: Tensor | None = None) -> Tensor:
    """Batched eigenvalues; a non-finite matrix gets NaN eigenvalues without failing the batch.

    ``bad[...]``, when given, flags every matrix that may be non-finite (the others are known finite);
    ``mats`` is then owned by the caller and overwritten with zeros there.
    """
    return _safe_eigvalsh_stacks([mats], None if bad is None else [bad])[0]


def _nonfinite_matrices(stacks: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``(stacks, bads)``: ``bads[...]`` flags the matrices holding a non-finite value, which are replaced by
    zeros (in a copy) so that they cannot fail a batched solver."""
    bads = [~torch.isfinite(s).flatten(-2).all(-1) for s in stacks]
    stacks = [torch.where(bad[..., None, None], 0.0, s) if bool(bad.any()) else s for s, bad in zip(stacks, bads)]
    return stacks, bads


def _safe_eigvalsh_stacks(stacks: list[Tensor], bads: list[Tensor] | None = None) -> list[Tensor]:
    """:func:`_safe_eigvalsh` of several stacks (of different sizes) in one spread-out batch."""
    if bads is None:
        stacks, bads = _nonfinite_matrices(stacks)
    else:
        for s, bad in zip(stacks, bads):
            if bool(bad.any()):
                s[bad] = 0.0
    values = _eigvalsh([s for s in stacks if s.numel()])
    results = [values.pop(0) if s.numel() else s.new_zeros(s.shape[:-1]) for s in stacks]
    return [torch.where(bad.unsqueeze(-1), math.nan, v) for v, bad in zip(results, bads)]


def _kept_eigenvalues(values: Tensor) -> tuple[Tensor, Tensor]:
    """Zero out eigenvalues below the relative threshold of their precision (``EIGENVALUE_RTOL`` for float64,
    ``FLOAT32_EIGENVALUE_RTOL`` otherwise); return (kept values in float64, undefined flag)."""
    rtol = EIGENVALUE_RTOL if values.dtype == torch.float64 else FLOAT32_EIGENVALUE_RTOL
    values = values.to(torch.float64)
    top = values.amax(-1, keepdim=True)
    keep = values > rtol * top
    kept = torch.where(keep, values, 0.0)
    undefined = torch.isnan(top.squeeze(-1)) | ~(top.squeeze(-1) > 0)
    return kept, undefined


def _entropy_from_eigenvalues(values: Tensor, alpha: float) -> Tensor:
    """Matrix Rényi entropy S_alpha (nats, float64) of the spectrum ``values[..., n]``; NaN if no eigenvalue is
    kept."""
    kept, undefined = _kept_eigenvalues(values)
    p = kept / kept.sum(-1, keepdim=True)
    if alpha == 1.0:
        entropy = 0.0 - torch.special.xlogy(p, p).sum(-1)  # 0.0 - x: a zero entropy is +0, not -0
    else:
        entropy = torch.log(torch.where(p > 0, p, 0.0).pow(alpha).sum(-1)) / (1.0 - alpha)
    return torch.where(undefined, math.nan, entropy)


def _collision_entropy(mats: Tensor) -> Tensor:
    """S_2 (nats, float64) of symmetric positive semi-definite ``mats[..., n, n]`` without eigenvalues:
    ``sum p^2 = sum lambda^2 / (sum lambda)^2 = ||K||_F^2 / tr(K)^2``. NaN for a zero or non-finite matrix.

    Eigenvalues below the relative threshold (rounding noise) enter as ``lambda^2 <= 1e-12 max(lambda)^2``:
    invisible at the precision of the result."""
    trace = torch.diagonal(mats, 0, -2, -1).sum(-1, dtype=torch.float64)
    frobenius = torch.linalg.matrix_norm(mats).to(torch.float64)
    entropy = 2.0 * (torch.log(trace) - torch.log(frobenius))
    return torch.where(torch.isfinite(entropy) & (trace > 0), entropy, math.nan)


def _matrix_entropies(stacks: list[Tensor], alpha: float, bads: list[Tensor] | None = None) -> list[Tensor]:
    """Matrix Rényi entropy S_alpha (nats, float64) of each symmetric PSD matrix of each stack ``s[..., n, n]``.

    ``alpha = 2`` from Frobenius norms and traces (no eigenvalues); other orders from the eigenvalues of all
    stacks in one batch. ``bads`` as in :func:`_safe_eigvalsh_stacks` (flagged matrices give NaN).
    """
    if alpha != 2.0:
        return [_entropy_from_eigenvalues(v, alpha) for v in _safe_eigvalsh_stacks(stacks, bads)]
    if bads is None:
        stacks, bads = _nonfinite_matrices(stacks)
    return [torch.where(bad, math.nan, _collision_entropy(s)) for s, bad in zip(stacks, bads)]


def _gram(z: Tensor, side: str = "auto") -> Tensor:
    """``z zᵀ`` (n x n) or ``zᵀ z`` (D x D) for ``z[..., n, D]``: the smaller one by default."""
    n, d = z.shape[-2], z.shape[-1]
    if side == "auto":
        side = "rows" if n <= d else "columns"
    return z @ z.mT if side == "rows" else z.mT @ z


def _gram_eigenvalues(z: Tensor, side: str = "auto") -> Tensor:
    """Eigenvalues of ``z zᵀ`` (n x n) or ``zᵀ z`` (D x D) for ``z[..., n, D]``: the smaller one by default."""
    return _safe_eigvalsh(_gram(z, side))


def _curvature_from_bands(
    d0: Tensor, d1: Tensor, d2: Tensor, count: Tensor
) -> tuple[Tensor, Tensor]:
    """Signed and absolute curvature from the three Gram diagonals of compacted unit tokens.

    ``d0[..., T] = <z_k, z_k>``, ``d1[..., T-1] = <z_k, z_{k+1}>``, ``d2[..., T-2] = <z_k, z_{k+2}>``;
    ``count[...]`` = number of valid tokens (they come first).
    """
    t = d0.shape[-1]
    if t < 3:
        nan = torch.full(d0.shape[:-1], math.nan, dtype=d0.dtype, device=d0.device)
        return nan, nan.clone()
    length_sq = d0[..., :-1] + d0[..., 1:] - 2.0 * d1  # |v_k|^2, k = 0..T-2
    dot = d1[..., 1:] - d0[..., 1:-1] - d2 + d1[..., :-1]  # <v_k, v_{k+1}>, k = 0..T-3
    nonzero = length_sq > CURVATURE_ZERO_TOL
    index = torch.arange(t - 2, device=d0.device)
    pair = (index < (count.unsqueeze(-1) - 2)) & nonzero[..., :-1] & nonzero[..., 1:]
    denominator = torch.sqrt(torch.where(pair, length_sq[..., :-1] * length_sq[..., 1:], 1.0))
    cosine = torch.where(pair, dot / denominator, 0.0).clamp(-1.0, 1.0)
    pairs = pair.sum(-1)
    signed = torch.where(pair, torch.arccos(cosine), 0.0).sum(-1) / pairs
    absolute = torch.where(pair, torch.arccos(cosine.abs()), 0.0).sum(-1) / pairs
    none = pairs == 0
    return torch.where(none, math.nan, signed), torch.where(none, math.nan, absolute)


def _token_core(
    hidden: Tensor,
    mask: Tensor | None,
    *,
    entropy: bool = False,
    curvature: bool = False,
    pool: bool = False,
    alpha: float = 1.0,
    normalized: bool = True,
) -> dict[str, Tensor]:
    """Shared engine of mean_pool, prompt_entropy, curvature and token_metrics (float64, shape [..., B]).

    Blocks of prompts (see :class:`_TokenBlocks`) are copied to the working dtype (:func:`_working_dtype`:
    float32 for float32/bfloat16/float16 states, float64 for float64 ones) and centered; their means (summed
    in float64) are the mean-pooled embeddings. For entropy, the Gram matrices of their unit rows (or the
    D x D covariances when the longest prompt exceeds D) are written into zero-padded stacks, one per size
    group, that go through one spread-out ``eigvalsh`` batch (``alpha = 2``: Frobenius norms instead, no
    eigenvalues); the entropies are computed in float64 from the eigenvalues. Curvature needs only the Gram diagonals ``<z_k, z_k>``,
    ``<z_k, z_{k+1}>``, ``<z_k, z_{k+2}>``: read from the Gram matrices when there are some, else computed
    as one batched product of each token with itself and its next two.
    """
    hidden, mask = _check_tokens(hidden, mask)
    work = _working_dtype(hidden)
    blocks = _TokenBlocks(hidden, mask, itemsize=torch.finfo(work).bits // 8)
    rows, d = blocks.rows, blocks.hidden_size
    size = max(blocks.longest, 1)  # all-padding token positions are dropped everywhere
    use_gram = entropy and size <= d
    use_cov = entropy and size > d
    if use_gram:
        blocks.group_by_size(_GRAM_SIZE_STEP)
    f64 = dict(dtype=torch.float64, device=hidden.device)
    # the zero-padded Gram (n x n) or covariance (D x D) matrices of each group of rows
    sizes = [(stop - start, n if use_gram else d) for start, stop, n in blocks.groups] if entropy else []
    matrices = [torch.empty(count, n, n, dtype=work, device=hidden.device) for count, n in sizes]
    bad = torch.zeros(rows, dtype=torch.bool, device=hidden.device)  # prompts holding non-finite values
    if curvature:  # bands[row, i, k] = <c_i, c_{i+k}> of the centered tokens (of the unit tokens with a Gram)
        bands = torch.zeros(rows, size, 3, **f64)
    if curvature and not use_gram:  # to scale the bands to unit tokens afterwards
        mean_norms = torch.zeros(rows, 1, **f64)
    pooled = torch.full((rows, d), math.nan, **f64) if pool else None
    scratch = _Scratch(hidden.device, work)

    def reduce_block(block: tuple[int, int, int, int, int]) -> None:
        group, first, start, stop, width = block
        p = stop - start
        # two spare zero rows after the block: the band products of its last tokens read past it
        flat = scratch.take(p * width + 2, d)
        c = flat[: p * width].view(p, width, d)
        mb = blocks.gather_into(c, start, stop, width)
        if not (entropy or curvature):  # mean pooling only: one pass (the mean's rounding is relative to itself)
            pooled[start:stop] = _valid_mean(c, mb).squeeze(-2)
            return
        mean, mean_norm = _center_(c, mb, zero_invalid=entropy)
        if pool:
            pooled[start:stop] = mean.squeeze(-2)
        if use_gram:
            # Gram of the centered rows, scaled to unit rows: G_ij = <c_i, c_j> / (|c_i| |c_j|); the rows and
            # columns beyond the block's longest prompt are exactly zero
            stack = matrices[group][start - first : stop - first]
            stack[:, width:] = 0.0
            stack[:, :width, width:] = 0.0
            g = torch.matmul(c, c.mT, out=stack[:, :width, :width])
            inverse, bad[start:stop] = _inverse_norms(torch.diagonal(g, 0, -2, -1), mean_norm)
            g.mul_(inverse.unsqueeze(-1)).mul_(inverse.unsqueeze(-2))
            if curvature:
                for k in range(min(3, width)):
                    bands[start:stop, : width - k, k] = torch.diagonal(g, k, -2, -1)
            return
        if curvature:
            flat[-2:] = 0.0
            # token i times tokens i, i+1, i+2 of the flattened block, as one batched (1 x D) @ (D x 3); the
            # products that reach into the next prompt land beyond each prompt's band and are never read
            products = torch.bmm(flat[:-2].unsqueeze(-2), flat.unfold(0, 3, 1))
            bands[start:stop, :width] = products.view(p, width, 3)
            mean_norms[start:stop] = mean_norm
        if use_cov:
            squared = bands[start:stop, :width, 0] if curvature else torch.linalg.vector_norm(c, dim=-1).square_()
            inverse, bad[start:stop] = _inverse_norms(squared, mean_norm)
            z = c.mul_(inverse.unsqueeze(-1))
            torch.matmul(z.mT, z, out=matrices[group][start - first : stop - first])

    todo = [
        (group, first, *block)
        for group, (first, last, _) in enumerate(blocks.groups)
        for block in blocks.blocks(first, last)
    ]
    # Gram blocks are matrix products: threads help. Without Gram the blocks are memory-bound: they do not.
    _spread(reduce_block, todo, device=hidden.device, enough=use_gram and len(todo) >= 4)

    count = blocks.count
    results: dict[str, Tensor] = {}
    if entropy:
        values = torch.full((rows,), math.nan, **f64)
        bads = [bad[start:stop] for start, stop, _ in blocks.groups]
        for (start, stop, _), group_values in zip(blocks.groups, _matrix_entropies(matrices, alpha, bads)):
            values[start:stop] = group_values
        if normalized:
            values = values / torch.log(count.to(torch.float64).clamp(max=d))
        results["prompt_entropy"] = torch.where((count < 2) | bad, math.nan, values)
    if curvature:
        d0, d1, d2 = bands[..., 0], bands[:, : size - 1, 1], bands[:, : max(size - 2, 0), 2]
        if not use_gram:  # products of the centered tokens -> products of the unit tokens
            inverse, bad = _inverse_norms(d0, mean_norms)
            d0 = d0 * inverse * inverse
            d1 = d1 * inverse[:, :-1] * inverse[:, 1:]
            d2 = d2 * inverse[:, :-2] * inverse[:, 2:]
        signed, absolute = _curvature_from_bands(d0, d1, d2, count)
        results["curvature"] = torch.where(bad, math.nan, signed)
        results["curvature_abs"] = torch.where(bad, math.nan, absolute)
    if pool:
        results["mean_pool"] = pooled
    return {key: blocks.unsort(value) for key, value in results.items()}


def _dime_permutations(m: int, n_permutations: int, generator: torch.Generator | None) -> Tensor:
    """``[n_permutations, m]`` uniformly random permutations from ``generator`` (its own device)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    keys = torch.rand(n_permutations, m, generator=generator, dtype=torch.float64, device=generator.device)
    return keys.argsort(dim=-1)


def set_level_peak_bytes(num_prompts: int, metrics: Iterable[str]) -> int:
    """Estimated peak working memory (bytes) of the set-level step for ``num_prompts`` prompts and these metric
    names: the part that grows like ``M²`` (and beyond :data:`SET_CHUNK_BYTES`, cannot be chunked away): one
    DiME item of :data:`_DIME_MATRICES_PER_ITEM` ``M x M`` float64 matrices, InfoNCE's ``M x M`` logits of one
    layer. The pooled rows the metrics start from (``layers x M x D``) come on top; they grow only linearly.
    Eigendecomposition time grows like ``M³`` per layer and permutation.
    """
    names, m = set(metrics), int(num_prompts)
    item = 0
    if "dime" in names:
        item = max(item, _DIME_MATRICES_PER_ITEM * m * m * 8)
    if "infonce" in names or "infonce_chance" in names:
        item = max(item, _INFONCE_MATRICES_PER_ITEM * m * m * 8)
    return max(item, SET_CHUNK_BYTES) if item else 0  # chunks fill up to SET_CHUNK_BYTES, or hold one item


def _chunk_items(item_bytes: int) -> int:
    """How many items of ``item_bytes`` working memory each fit in one chunk of :data:`SET_CHUNK_BYTES` (>= 1)."""
    return max(1, SET_CHUNK_BYTES // max(1, item_bytes))


def _dime_entropies(a: Tensor, b: Tensor, perms: Tensor, alpha: float) -> Tensor:
    """``[..., R]``: H(K_A ∘ P_r K_B P_rᵀ) for the rows ``perms[R, M]``, chunked over (layer, permutation) pairs.

    Each chunk builds only the kernels of the layers it touches and its own Hadamard products, so the working
    set is a few ``M x M`` matrices per item, whatever the number of layers and permutations.
    """
    lead, m = a.shape[:-2], a.shape[-2]
    flat_a, flat_b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    count = perms.shape[0]
    total = flat_a.shape[0] * count
    out = torch.empty(total, dtype=torch.float64, device=a.device)
    step = _chunk_items(_DIME_MATRICES_PER_ITEM * m * m * 8)
    for start in range(0, total, step):
        stop = min(start + step, total)
        first, last = start // count, (stop - 1) // count + 1
        kernel_a = flat_a[first:last] @ flat_a[first:last].mT  # [l, M, M], only the layers of this chunk
        kernel_b = flat_b[first:last] @ flat_b[first:last].mT
        index = torch.arange(start, stop, device=a.device)
        layer, rows = index // count - first, perms[index % count]
        stack = kernel_b[layer[:, None, None], rows[:, :, None], rows[:, None, :]]  # [c, M, M]
        stack.mul_(kernel_a[layer])
        del kernel_a, kernel_b
        out[start:stop] = _matrix_entropies([stack], alpha)[0]
    return out.reshape(*lead, count)


def _infonce_losses(a: Tensor, b: Tensor, temperature: float, *, chance: bool = False) -> Tensor:
    """``[...]`` InfoNCE of unit rows ``a, b[..., M, D]``, over chunks of (layer, query rows): the ``M x M``
    logits of all layers never exist at once. ``chance=True``: the positive of row i is the mean of its M - 1
    other logits (the expected loss over uniformly random shuffles that pair no prompt with itself)."""
    lead, m = a.shape[:-2], a.shape[-2]
    flat_a, flat_b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    total = torch.zeros(flat_a.shape[0], dtype=torch.float64, device=a.device)
    layers_per = _chunk_items(_INFONCE_MATRICES_PER_ITEM * m * m * 8)
    rows_per = m if layers_per > 1 else _chunk_items(_INFONCE_MATRICES_PER_ITEM * m * 8)
    for first in range(0, flat_a.shape[0], layers_per):
        layers = slice(first, first + layers_per)
        for row in range(0, m, rows_per):
            rows = slice(row, row + rows_per)
            logits = (flat_a[layers, rows] @ flat_b[layers].mT) / temperature  # [l, r, M]
            positive = torch.diagonal(logits, row, -2, -1)  # row i of the block pairs with column row + i
            if chance:
                positive = (logits.sum(-1) - positive) / (m - 1)
            total[layers] += (torch.logsumexp(logits, dim=-1) - positive).sum(-1)
    return (total / m).reshape(lead)


def _lidar_kernel(z: Tensor, delta: float, method: str = "auto") -> Tensor:
    """Symmetric matrix whose non-zero spectrum is that of Σ_w^{-1/2} Σ_b Σ_w^{-1/2}.

    ``z[..., M, Q, D]`` are rows already normalized jointly over all M·Q rows (float64, finite).
    ``method``: "woodbury" works in the M·Q-sized space (Σ_w^{-1} via the Woodbury identity and the
    within-class Gram), "direct" in the D-sized space (Cholesky of the D x D Σ_w); "auto" picks the
    smaller.
    """
    *lead, m, q, d = z.shape
    class_means = z.mean(-2)  # [..., M, D]
    grand_mean = class_means.mean(-2, keepdim=True)
    between = (class_means - grand_mean).mT / math.sqrt(m)  # B [..., D, M]: Σ_b = B Bᵀ
    within = (z - class_means.unsqueeze(-2)).reshape(*lead, m * q, d) / math.sqrt(m * q)  # W̃: Σ_w = W̃ᵀW̃ + δI
    if method == "auto":
        method = "woodbury" if m * q < d else "direct"
    if method == "woodbury":
        # Bᵀ Σ_w^{-1} B = (BᵀB - (W̃B)ᵀ (δI + W̃W̃ᵀ)^{-1} (W̃B)) / δ      (M x M)
        small = within @ within.mT
        small.diagonal(dim1=-2, dim2=-1).add_(delta)
        cross = within @ between  # [..., MQ, M]
        factor, info = torch.linalg.cholesky_ex(small)
        solved = torch.cholesky_solve(cross, factor)
        kernel = (between.mT @ between - cross.mT @ solved) / delta
        kernel = 0.5 * (kernel + kernel.mT)
    elif method == "direct":
        # L^{-1} B with Σ_w = L Lᵀ: (L^{-1}B)(L^{-1}B)ᵀ is similar to Σ_w^{-1} Σ_b
        sigma_w = within.mT @ within
        sigma_w.diagonal(dim1=-2, dim2=-1).add_(delta)
        factor, info = torch.linalg.cholesky_ex(sigma_w)
        scaled = torch.linalg.solve_triangular(factor, between, upper=False)  # [..., D, M]
        kernel = scaled @ scaled.mT if d <= m else scaled.mT @ scaled
    else:
        raise ValueError(f"unknown LiDAR method {method!r}")
    failed = info != 0
    if bool(failed.any()):
        logger.debug("lidar: Cholesky factorization failed for %d of %d sets", int(failed.sum()), failed.numel())
        kernel = torch.where(failed[..., None, None], math.nan, kernel)
    return kernel


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def normalize(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Center the (valid) rows of each set and scale every row to unit L2 norm.

    This is the preprocessing the papers apply before every metric, and part of each metric's
    definition. A row equal to the mean (up to rounding) becomes a zero row instead of NaN.

    Args:
        x: ``[..., N, D]`` rows (any real dtype).
        mask: optional ``[..., N]`` (broadcastable; bool or 0/1, True = valid row). Invalid rows are
            excluded from the mean and returned as zeros.

    Returns:
        ``[..., N, D]``, float64 for float64 input and float32 otherwise. A set holding a non-finite
        valid value returns NaN in its valid rows.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import normalize
        >>> normalize(torch.tensor([[1.0, 1.0], [3.0, 1.0], [7.0, 7.0]]), torch.tensor([True, True, False]))
        tensor([[-1.,  0.],
                [ 1.,  0.],
                [ 0.,  0.]])
    """
    _check_sets(x, "x")
    bool_mask = None
    if mask is not None:
        bool_mask = _bool_mask(mask, x.shape[:-1], x.device)
    z, bad = _center_unit(x, bool_mask)
    if bool(bad.any()):
        poisoned = bad[..., None] if bool_mask is None else bad[..., None] & bool_mask
        z = torch.where(poisoned.unsqueeze(-1), math.nan, z)
    return z.to(_result_dtype(x))


@torch.no_grad()
def mean_pool(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of each prompt's valid (raw, not normalized) token vectors.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask (broadcastable to ``hidden.shape[:-1]``; True/1 = real).

    Returns:
        ``[..., B, D]``; NaN for a prompt without valid tokens.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import mean_pool
        >>> hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), 0.0]]])
        >>> mean_pool(hidden, torch.tensor([[1, 1, 0]]))
        tensor([[2., 3.]])
    """
    hidden, bool_mask = _check_tokens(hidden, mask)
    if bool_mask is None or bool(bool_mask.all()):  # every token real: one reduction over the input, no copy
        return hidden.mean(-2, dtype=_result_dtype(hidden))
    return _token_core(hidden, bool_mask, pool=True)["mean_pool"].to(_result_dtype(hidden))


@torch.no_grad()
def prompt_entropy(
    hidden: Tensor, mask: Tensor | None = None, *, alpha: float = 1.0, normalized: bool = True
) -> Tensor:
    """Matrix Rényi entropy of each prompt's normalized tokens (SPEC §1).

    Per prompt: ``Z = normalize(valid tokens)``, ``S_alpha(Z)`` from the eigenvalues of the ``N x N``
    Gram, zero-padded to the longest prompt of the call (or of the ``D x D`` covariance when the longest
    prompt exceeds ``D``); if ``normalized``, divided by ``ln(min(N, D))`` with ``N`` the prompt's number
    of valid tokens.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask (any padding side; padded values are ignored).
        alpha: Rényi order (1 = von Neumann / Shannon, the papers' choice).
        normalized: divide by ``ln(min(N, D))``.

    Returns:
        ``[..., B]``; NaN for prompts with fewer than 2 valid tokens, with all tokens identical, or with
        non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import prompt_entropy
        >>> tokens = torch.tensor([[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]])
        >>> prompt_entropy(tokens, normalized=False)  # two orthogonal directions: ln 2
        tensor([0.6931])
        >>> prompt_entropy(tokens)  # divided by ln(min(4, 3))
        tensor([0.6309])
    """
    alpha = _check_alpha(alpha)
    out = _token_core(hidden, mask, entropy=True, curvature=False, alpha=alpha, normalized=normalized)
    return out["prompt_entropy"].to(_result_dtype(hidden))


@torch.no_grad()
def curvature(hidden: Tensor, mask: Tensor | None = None, *, absolute: bool = False) -> Tensor:
    """Average curvature of each prompt's token trajectory (SPEC §1).

    Per prompt: ``Z = normalize(valid tokens)``, ``v_k = z_{k+1} - z_k``, ``c_k = arccos(cos(v_k, v_{k+1}))``
    in ``[0, pi]``, mean over ``k``. Pairs with a zero-length ``v`` are skipped. ``absolute=True`` uses
    ``arccos(|cos|)`` in ``[0, pi/2]`` (the authors' later code).

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask (any padding side, holes allowed: consecutive means
            consecutive among the valid tokens).
        absolute: fold the angle as in the authors' ICML code.

    Returns:
        ``[..., B]`` in radians; NaN when no pair remains (fewer than 3 valid tokens) or the prompt holds
        non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import curvature
        >>> square = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]   # turns by 90 degrees
        >>> zigzag = [[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]   # reverses every step
        >>> curvature(torch.tensor([square, zigzag]))
        tensor([1.5708, 3.1416])
        >>> curvature(torch.tensor([square, zigzag]), absolute=True)
        tensor([1.5708, 0.0000])
    """
    out = _token_core(hidden, mask, entropy=False, curvature=True)
    return out["curvature_abs" if absolute else "curvature"].to(_result_dtype(hidden))


@torch.no_grad()
def token_metrics(
    hidden: Tensor, mask: Tensor | None = None, *, alpha: float = 1.0, normalized: bool = True
) -> dict[str, Tensor]:
    """Prompt entropy, curvature, absolute curvature and the mean-pooled embeddings in one pass.

    Equivalent to calling :func:`prompt_entropy`, :func:`curvature` (both variants) and :func:`mean_pool`,
    but every prompt is read, centered and turned into a Gram matrix once: centering yields the mean, and
    curvature only needs the Gram entries ``<z_k, z_k>``, ``<z_k, z_{k+1}>`` and ``<z_k, z_{k+2}>``.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask.
        alpha: Rényi order of the entropy.
        normalized: divide the entropy by ``ln(min(N, D))``.

    Returns:
        ``{"prompt_entropy", "curvature", "curvature_abs"}``, each ``[..., B]``, and ``"mean_pool"``
        ``[..., B, D]``.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import token_metrics
        >>> tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])
        >>> values = token_metrics(tokens)
        >>> sorted(values)
        ['curvature', 'curvature_abs', 'mean_pool', 'prompt_entropy']
        >>> values["prompt_entropy"], values["curvature"]
        (tensor([1.]), tensor([1.5708]))
    """
    alpha = _check_alpha(alpha)
    out = _token_core(hidden, mask, entropy=True, curvature=True, pool=True, alpha=alpha, normalized=normalized)
    dtype = _result_dtype(hidden)
    return {key: value.to(dtype) for key, value in out.items()}


@torch.no_grad()
def dataset_entropy(pooled: Tensor, *, alpha: float = 1.0, normalized: bool = True) -> Tensor:
    """Matrix Rényi entropy of the set of pooled prompt embeddings (SPEC §1).

    ``Z = normalize(pooled)`` over the M rows, ``S_alpha(Z)``; if ``normalized``, divided by
    ``ln(min(M, D))``.

    Args:
        pooled: ``[..., M, D]``, one row per prompt (e.g. from :func:`mean_pool`).
        alpha: Rényi order.
        normalized: divide by ``ln(min(M, D))``.

    Returns:
        ``[...]``; NaN for M < 2 and for sets holding non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import dataset_entropy
        >>> pooled = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
        >>> dataset_entropy(pooled, normalized=False), dataset_entropy(pooled)
        (tensor(0.6931), tensor(0.6309))
    """
    _check_sets(pooled, "pooled")
    alpha = _check_alpha(alpha)
    m, d = pooled.shape[-2], pooled.shape[-1]
    z, bad = _center_unit(pooled, None)
    result = _matrix_entropies([_gram(z)], alpha)[0]
    if normalized:
        result = result / math.log(min(m, d)) if min(m, d) > 1 else torch.full_like(result, math.nan)
    if m < 2:
        result = torch.full_like(result, math.nan)
    return torch.where(bad, math.nan, result).to(_result_dtype(pooled))


@torch.no_grad()
def effective_rank(pooled: Tensor) -> Tensor:
    """RankMe effective rank of the pooled embeddings (SPEC §1).

    ``sigma`` = singular values of ``normalize(pooled)`` (square roots of the Gram eigenvalues, the same
    relative threshold applied to ``sigma**2``), ``p = sigma / sum(sigma)``, ``exp(-sum p ln p)``.

    Args:
        pooled: ``[..., M, D]``, one row per prompt.

    Returns:
        ``[...]``, between 1 and ``min(M - 1, D)``; NaN for sets with non-finite values or no spread.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import effective_rank
        >>> pooled = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
        >>> effective_rank(pooled)
        tensor(2.0000)
    """
    _check_sets(pooled, "pooled")
    z, bad = _center_unit(pooled, None)
    kept, undefined = _kept_eigenvalues(_gram_eigenvalues(z))
    sigma = torch.sqrt(kept)
    p = sigma / sigma.sum(-1, keepdim=True)
    result = torch.exp(-torch.special.xlogy(p, p).sum(-1))
    return torch.where(bad | undefined, math.nan, result).to(_result_dtype(pooled))


@torch.no_grad()
def infonce(view_a: Tensor, view_b: Tensor, *, temperature: float = 0.1) -> Tensor:
    """InfoNCE loss between two views of the same prompts (SPEC §1), in nats.

    ``A = normalize(view_a)``, ``B = normalize(view_b)`` (each over its own M rows);
    ``L = mean_i -log softmax_j(<a_i, b_j> / temperature)[i]``. Lower means the views of a prompt are
    identifiable among the others. Compare it with :func:`infonce_chance` (the same layer, shuffled pairing), not
    with ``ln M``: with a small temperature a layer whose nearest neighbours are other prompts scores far above
    ``ln M``.

    Args:
        view_a: ``[..., M, D]`` pooled embeddings of view A.
        view_b: ``[..., M, D]`` pooled embeddings of view B (row i = same prompt as row i of A).
        temperature: softmax temperature.

    Returns:
        ``[...]``; NaN for layers with non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import infonce
        >>> a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> infonce(a, a, temperature=1.0), infonce(a, a[[1, 0, 3, 2]], temperature=1.0)
        (tensor(0.6265), tensor(2.6265))
    """
    return _infonce(view_a, view_b, temperature, chance=False)


@torch.no_grad()
def infonce_chance(view_a: Tensor, view_b: Tensor, *, temperature: float = 0.1) -> Tensor:
    """InfoNCE of the same views under a shuffled pairing: a measured chance baseline for :func:`infonce`, in nats.

    With ``logits = <a_i, b_j> / temperature`` as in :func:`infonce`, each prompt's view A is paired with the view B
    of another prompt chosen uniformly at random, and the loss is averaged over all such shuffles (derangements)
    exactly: ``mean_i [logsumexp_j logits_ij - mean_{j != i} logits_ij]``. It is what InfoNCE would be if this
    layer could not tell a prompt's own view from the others', measured on the same layer, so ``infonce`` below it
    means better than chance. It is not ``ln M``: with temperature 0.1 it can be far above it.

    Args:
        view_a: ``[..., M, D]`` pooled embeddings of view A (M >= 2).
        view_b: ``[..., M, D]`` pooled embeddings of view B.
        temperature: softmax temperature (the same as :func:`infonce`'s).

    Returns:
        ``[...]``; NaN for layers with non-finite values and for M < 2.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import infonce_chance
        >>> a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> infonce_chance(a, a, temperature=1.0)
        tensor(1.9599)
    """
    return _infonce(view_a, view_b, temperature, chance=True)


def _infonce(view_a: Tensor, view_b: Tensor, temperature: float, *, chance: bool) -> Tensor:
    _check_sets(view_a, "view_a")
    _check_sets(view_b, "view_b")
    if view_a.shape[-2:] != view_b.shape[-2:]:
        raise ValueError(f"views must have the same [M, D], got {tuple(view_a.shape)} and {tuple(view_b.shape)}")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}")
    a, bad_a = _center_unit(view_a, None)
    b, bad_b = _center_unit(view_b, None)
    loss = _infonce_losses(a, b, temperature, chance=chance)
    dtype = torch.float64 if torch.float64 in (view_a.dtype, view_b.dtype) else torch.float32
    return torch.where(bad_a | bad_b, math.nan, loss).to(dtype)


@torch.no_grad()
def lidar(views: Tensor, *, alpha: float = 1.0, delta: float = 1e-4) -> Tensor:
    """LiDAR: matrix entropy of the LDA matrix of augmented views (SPEC §1), in nats.

    ``Z = normalize`` over all ``M·Q`` rows jointly; prompt i is a class with views ``z_ij``; class means
    ``mu_i``, grand mean ``mu``; ``Σ_b = (1/M) Σ_i (mu_i-mu)(mu_i-mu)ᵀ``,
    ``Σ_w = (1/(MQ)) Σ_ij (z_ij-mu_i)(z_ij-mu_i)ᵀ + delta I``; returns ``S_alpha(Σ_w^{-1/2} Σ_b Σ_w^{-1/2})``
    (``exp`` of it is the LiDAR effective rank). The spectrum is computed in an ``M·Q``-sized space with the
    Woodbury identity when ``M·Q < D`` and with ``D x D`` matrices otherwise.

    Args:
        views: ``[..., M, Q, D]``, Q views (e.g. pooled augmentations) of each of M prompts.
        alpha: Rényi order.
        delta: ridge added to Σ_w (absolute, on unit-norm rows).

    Returns:
        ``[...]``; NaN for layers with non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import lidar
        >>> views = torch.tensor([[[1.0, 0.0, 0.1], [1.0, 0.0, -0.1]],     # 4 prompts x 2 views:
        ...                       [[-1.0, 0.0, 0.1], [-1.0, 0.0, -0.1]],   # classes spread evenly over
        ...                       [[0.0, 1.0, 0.1], [0.0, 1.0, -0.1]],     # a plane, views differ only
        ...                       [[0.0, -1.0, 0.1], [0.0, -1.0, -0.1]]])  # along a third axis
        >>> lidar(views)  # two equal LDA eigenvalues: ln 2
        tensor(0.6931)
    """
    _check_sets(views, "views", min_dim=3)
    alpha = _check_alpha(alpha)
    delta = float(delta)
    if not delta > 0:
        raise ValueError(f"`delta` must be positive, got {delta}")
    *lead, m, q, d = views.shape
    z, bad = _center_unit(views.reshape(*lead, m * q, d), None)
    if bool(bad.any()):
        z = torch.where(bad[..., None, None], 0.0, z)
    kernel = _lidar_kernel(z.reshape(*lead, m, q, d), delta)
    result = _matrix_entropies([kernel], alpha)[0]
    return torch.where(bad, math.nan, result).to(_result_dtype(views))


@torch.no_grad()
def dime(
    view_a: Tensor,
    view_b: Tensor,
    *,
    alpha: float = 1.0,
    n_permutations: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DiME: difference of matrix-based entropies between permuted and true view pairings (SPEC §1).

    ``A, B`` normalized as in :func:`infonce`; ``K_A = A Aᵀ``, ``K_B = B Bᵀ`` (always ``M x M``);
    ``H(K) = S_alpha`` of the trace-normalized Hadamard product;
    ``DiME = mean_P H(K_A ∘ P K_B Pᵀ) - H(K_A ∘ K_B)`` over ``n_permutations`` random permutations. The same
    permutations are used for every leading index (layer), so layers are compared on equal terms. The
    ``(layer, permutation)`` matrices are built and decomposed in chunks of at most :data:`SET_CHUNK_BYTES`, so
    memory does not grow with the permutation count or the number of layers (see :func:`set_level_peak_bytes`).

    Args:
        view_a: ``[..., M, D]`` pooled embeddings of view A.
        view_b: ``[..., M, D]`` pooled embeddings of view B.
        alpha: Rényi order.
        n_permutations: number of random permutations.
        generator: source of the permutations; ``None`` uses a fresh generator seeded with 0 (the global
            RNG is never touched).

    Returns:
        ``[...]`` in nats; about 0 when views are unrelated, positive when they share sample structure.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import dime
        >>> a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> dime(a, a, generator=torch.Generator().manual_seed(0))  # identical views share structure
        tensor(0.4159)
    """
    _check_sets(view_a, "view_a")
    _check_sets(view_b, "view_b")
    if view_a.shape[-2:-1] != view_b.shape[-2:-1]:
        raise ValueError(f"views must have the same number of rows M, got {tuple(view_a.shape)} and {tuple(view_b.shape)}")
    alpha = _check_alpha(alpha)
    if int(n_permutations) != n_permutations or n_permutations < 1:
        raise ValueError(f"`n_permutations` must be a positive integer, got {n_permutations}")
    m = view_a.shape[-2]
    a, bad_a = _center_unit(view_a, None)
    b, bad_b = _center_unit(view_b, None)
    perms = _dime_permutations(m, int(n_permutations), generator).to(view_a.device)  # [P, M]
    identity = torch.arange(m, device=view_a.device).unsqueeze(0)
    entropies = _dime_entropies(a, b, torch.cat([identity, perms]), alpha)  # [..., 1 + P]
    result = entropies[..., 1:].mean(-1) - entropies[..., 0]
    dtype = torch.float64 if torch.float64 in (view_a.dtype, view_b.dtype) else torch.float32
    return torch.where(bad_a | bad_b, math.nan, result).to(dtype)


@torch.no_grad()
def bimodality(values: Tensor, dim: int = -1) -> Tensor:
    """Sarle's bimodality coefficient of the finite values along ``dim`` (SPEC §1).

    ``b = (g^2 + 1) / (kappa + 3 (n-1)^2 / ((n-2)(n-3)))`` with ``g`` and ``kappa`` the bias-corrected
    sample skewness and excess kurtosis (as ``scipy.stats.skew(x, bias=False)`` and
    ``scipy.stats.kurtosis(x, bias=False)``). Values above 5/9 (the value of a uniform distribution)
    suggest two modes. Non-finite values are ignored.

    Args:
        values: any tensor (e.g. per-prompt entropies ``[..., B]``).
        dim: the dimension to reduce.

    Returns:
        ``values`` reduced over ``dim``; NaN where fewer than 4 finite values remain or all are equal.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import bimodality
        >>> two_clusters = torch.cat([torch.zeros(10), torch.ones(10)])
        >>> evenly_spread = torch.arange(20.0)
        >>> bimodality(torch.stack([two_clusters, evenly_spread]))
        tensor([0.7669, 0.4275])
    """
    _check_real(values, "values")
    if values.dim() == 0:
        raise ValueError("`values` must have at least one dimension")
    x = values.movedim(dim, -1).to(torch.float64)
    finite = torch.isfinite(x)
    n = finite.sum(-1).to(torch.float64)
    x = torch.where(finite, x, 0.0)
    mean = x.sum(-1, keepdim=True) / n.unsqueeze(-1)
    dev = torch.where(finite, x - mean, 0.0)
    m2 = (dev**2).sum(-1) / n
    m3 = (dev**3).sum(-1) / n
    m4 = (dev**4).sum(-1) / n
    spread = torch.where(finite, x.abs(), 0.0).amax(-1)
    skew = torch.sqrt(n * (n - 1)) / (n - 2) * m3 / m2.pow(1.5)
    # kappa + 3(n-1)^2/((n-2)(n-3)) simplifies to (n^2-1) m4 / (m2^2 (n-2)(n-3)); no cancellation
    denominator = (n * n - 1) * m4 / (m2 * m2 * (n - 2) * (n - 3))
    result = (skew * skew + 1) / denominator
    undefined = (n < 4) | ~(torch.sqrt(m2) > ZERO_ROW_RTOL * spread)
    return torch.where(undefined, math.nan, result).to(_result_dtype(values))


# ----------------------------------------------------------------------------------------------------
# beyond the papers: which layer is best, which layers move, compression or attention sink (SPEC §7)
# ----------------------------------------------------------------------------------------------------

#: Number of cross-validation folds of :func:`probe_accuracy`; every class needs at least this many prompts.
PROBE_FOLDS = 5

#: Ridge strength of :func:`probe_accuracy`, relative to the mean diagonal of the training Gram matrix (the
#: rows are unit-norm after :func:`normalize`, so this is sklearn's ``RidgeClassifier(alpha=1.0)`` on them).
PROBE_RIDGE = 1.0

#: A token whose norm exceeds this multiple of its prompt's median token norm is a sink token (a massive
#: activation, as on the first token of many pretrained decoders). Ordinary tokens of a prompt stay within a
#: few times the median; the sinks reported in the literature sit 100 to 1000 times above it.
SINK_NORM_RATIO = 10.0


def check_labels(labels: Any, num_prompts: int | None = None, *, folds: int = PROBE_FOLDS) -> Tensor:
    """Validate per-prompt class labels; return them as class indices ``0..C-1`` (int64 ``[M]``).

    Labels may be any hashable values (ints, strings); classes are numbered in sorted order.

    Raises:
        ValueError: fewer than two classes, fewer than ``folds`` prompts in some class (the cross-validation
            could not test every class in every fold), or a length different from ``num_prompts``.

    Example:
        >>> from layerwatch.metrics import check_labels
        >>> check_labels(["b", "a", "b", "a", "a", "b"], folds=3)
        tensor([1, 0, 1, 0, 0, 1])
    """
    if isinstance(labels, Tensor):
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"`labels` must be a 1-D integer tensor or a list, got {labels.dtype} of shape {tuple(labels.shape)}")
        labels = labels.tolist()
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise TypeError(f"`labels` must be a sequence with one class per prompt, got {type(labels).__name__}")
    labels = list(labels)
    if num_prompts is not None and len(labels) != num_prompts:
        raise ValueError(f"`labels` has {len(labels)} entries but the probe has {num_prompts} prompts; give one label per prompt")
    try:
        classes = sorted(set(labels))
    except TypeError as error:
        raise TypeError(f"`labels` must be comparable values of one kind (ints or strings): {error}") from None
    if len(classes) < 2:
        raise ValueError(f"`labels` must hold at least two classes for probe_accuracy, got {classes}")
    counts = {c: 0 for c in classes}
    for label in labels:
        counts[label] += 1
    small = {c: n for c, n in counts.items() if n < folds}
    if small:
        raise ValueError(
            f"`labels`: every class needs at least {folds} prompts for {folds}-fold cross-validation; these have fewer: "
            f"{small}. Add prompts of those classes or drop them"
        )
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[label] for label in labels], dtype=torch.int64)


def label_folds(classes: Tensor, *, folds: int = PROBE_FOLDS, seed: int = 0) -> Tensor:
    """Stratified k-fold assignment ``[M]`` (fold of each prompt) fixed by ``seed``.

    Prompts are shuffled with a generator seeded by ``seed``; each class's prompts are then dealt to the folds
    in turn, continuing where the previous class stopped, so folds differ in size by at most one and hold
    every class (given at least ``folds`` prompts per class).

    Example:
        >>> import torch
        >>> from layerwatch.metrics import label_folds
        >>> fold = label_folds(torch.tensor([0, 0, 0, 1, 1, 1]), folds=3)
        >>> sorted(fold[:3].tolist()), sorted(fold[3:].tolist())
        ([0, 1, 2], [0, 1, 2])
    """
    classes = classes.cpu()
    order = torch.randperm(classes.numel(), generator=torch.Generator().manual_seed(int(seed)))
    fold = torch.empty(classes.numel(), dtype=torch.int64)
    dealt = 0
    for c in torch.unique(classes).tolist():  # a loop over classes, not prompts
        members = order[classes[order] == c]
        fold[members] = (torch.arange(members.numel()) + dealt) % folds
        dealt += members.numel()
    return fold


def _ridge_fold_scores(gram: Tensor, targets: Tensor, train: Tensor, test: Tensor, ridge: float) -> Tensor:
    """Class scores ``[..., n_test, C]`` of a ridge regression (with intercept) fitted on the ``train`` rows,
    in the dual form: ``Ktest,train (Ktrain + lambda I)^-1 Y`` with both Grams centered on the training mean."""
    k_train = gram[..., train[:, None], train[None, :]]
    k_test = gram[..., test[:, None], train[None, :]]
    train_means = k_train.mean(-1)  # <x_i, mu_train> for training rows
    grand = train_means.mean(-1, keepdim=True)
    k_train = k_train - train_means[..., :, None] - train_means[..., None, :] + grand[..., None]
    k_test = k_test - k_test.mean(-1, keepdim=True) - train_means[..., None, :] + grand[..., None]
    y = targets[train]
    y_mean = y.mean(0)
    n = train.numel()
    scale = torch.diagonal(k_train, 0, -2, -1).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    system = k_train + (ridge * scale)[..., None, None] * torch.eye(n, dtype=gram.dtype, device=gram.device)
    coefficients = torch.linalg.solve(system, (y - y_mean).expand(*system.shape[:-1], y.shape[-1]))
    return y_mean + k_test @ coefficients


@torch.no_grad()
def probe_accuracy(
    pooled: Tensor, labels: Any, *, folds: int = PROBE_FOLDS, ridge: float = PROBE_RIDGE, seed: int = 0
) -> Tensor:
    """Cross-validated accuracy of a linear (ridge) classifier of the labels on each layer's embeddings (SPEC §7).

    ``Z = normalize(pooled)`` (label-free, so it leaks nothing between folds). For each of ``folds`` stratified
    folds (:func:`label_folds`, fixed by ``seed``) a ridge regression with intercept onto one-hot targets is
    fitted on the other folds in closed form, in the dual ``M x M`` form (cost independent of ``D``), with
    ``lambda = ridge * mean diagonal`` of the centered training Gram; a prompt is predicted as the class with the
    highest score. The result is the fraction of prompts predicted correctly, each tested once.

    Args:
        pooled: ``[..., M, D]`` mean-pooled clean embeddings.
        labels: ``M`` class labels (see :func:`check_labels`).
        folds: number of folds; every class needs at least this many prompts.
        ridge: relative ridge strength.
        seed: fixes the folds.

    Returns:
        ``[...]`` accuracies in ``[0, 1]`` (chance is about ``1 / classes`` for balanced classes); NaN for layers
        with non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import probe_accuracy
        >>> g = torch.Generator().manual_seed(0)
        >>> labels = torch.arange(40) % 2
        >>> signal = torch.randn(40, 8, generator=g); signal[:, 0] += 6 * (2 * labels - 1)
        >>> noise = torch.randn(40, 8, generator=g)
        >>> probe_accuracy(torch.stack([signal, noise]), labels)[0]
        tensor(1.)
    """
    _check_sets(pooled, "pooled")
    if int(folds) != folds or folds < 2:
        raise ValueError(f"`folds` must be an integer >= 2, got {folds}")
    if not float(ridge) > 0:
        raise ValueError(f"`ridge` must be positive, got {ridge}")
    classes = check_labels(labels, pooled.shape[-2], folds=int(folds)).to(pooled.device)
    fold = label_folds(classes, folds=int(folds), seed=seed).to(pooled.device)
    z, bad = _center_unit(pooled, None)
    z = torch.where(bad[..., None, None], 0.0, z)
    gram = z @ z.mT
    targets = torch.nn.functional.one_hot(classes).to(torch.float64)
    correct = torch.zeros(gram.shape[:-1], dtype=torch.float64, device=gram.device)
    for k in range(int(folds)):
        train, test = (fold != k).nonzero().squeeze(-1), (fold == k).nonzero().squeeze(-1)
        predicted = _ridge_fold_scores(gram, targets, train, test, float(ridge)).argmax(-1)
        correct[..., test] = (predicted == classes[test]).to(torch.float64)
    return torch.where(bad, math.nan, correct.mean(-1)).to(_result_dtype(pooled))


def best_layer(accuracy: Tensor) -> int | None:
    """Index of the highest finite value of the per-layer ``accuracy[L]``, the earliest on ties; None if none.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import best_layer
        >>> best_layer(torch.tensor([0.5, 0.9, float("nan"), 0.9]))
        1
    """
    values = torch.as_tensor(accuracy, dtype=torch.float64).reshape(-1)
    finite = torch.isfinite(values)
    if not bool(finite.any()):
        return None
    return int(torch.where(finite, values, -math.inf).argmax())  # argmax returns the first maximum


@torch.no_grad()
def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear centered kernel alignment between two sets of embeddings of the same prompts (SPEC §7).

    ``K = X̃ X̃ᵀ``, ``L = Ỹ Ỹᵀ`` (``M x M`` Grams of the mean-centered rows; dual form),
    ``CKA = <K, L>_F / (||K||_F ||L||_F)``. It is 1 when ``y`` is an orthogonal transform and isotropic scaling
    of ``x`` (nothing moved up to rotation and scale) and 0 for unrelated sets with many samples; for
    independent isotropic Gaussian sets of ``M`` rows and ``D`` features its expectation is about ``D / (M + D)``
    (close to 1 when ``D >> M``: compare values across layers and steps, not with 0).

    Args:
        x: ``[..., M, D1]``.
        y: ``[..., M, D2]`` (same M; D may differ).

    Returns:
        ``[...]`` in ``[0, 1]``; NaN where a set is constant or holds non-finite values.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import linear_cka
        >>> x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        >>> rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
        >>> round(float(linear_cka(x, 3.0 * x @ rotation)), 6)
        1.0
    """
    _check_sets(x, "x")
    _check_sets(y, "y")
    if x.shape[-2] != y.shape[-2]:
        raise ValueError(f"`x` and `y` must hold the same prompts (same M), got {tuple(x.shape)} and {tuple(y.shape)}")
    grams = []
    for rows in (x, y):
        centered = rows.to(torch.float64, copy=True)
        centered -= centered.mean(-2, keepdim=True)
        grams.append(centered @ centered.mT)
    k, l = grams
    result = (k * l).sum((-2, -1)) / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l))
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return torch.where(torch.isfinite(result), result, math.nan).to(dtype)


def _token_norms(hidden: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Token norms ``[..., B, T]`` (float64, NaN at invalid slots), each prompt's median norm ``[..., B]``
    (mean of the two middle values for an even count) and a bad-prompt flag (no valid token, or a non-finite one)."""
    hidden, mask = _check_tokens(hidden, mask)
    # float32 norms (float64 for float64 input) are accurate to ~1e-7 relative and avoid a float64 copy of hidden
    norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=_result_dtype(hidden)).to(torch.float64)
    valid = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask
    count = valid.sum(-1)
    bad = (count == 0) | (valid & ~torch.isfinite(norms)).any(-1)
    norms = torch.where(valid & ~bad[..., None], norms, math.nan)
    ordered = torch.sort(norms, dim=-1).values  # NaN (invalid slots) sort last
    low = ((count - 1).clamp_min(0) // 2).unsqueeze(-1)
    high = (count // 2).clamp_max(norms.shape[-1] - 1).unsqueeze(-1)
    median = 0.5 * (ordered.gather(-1, low) + ordered.gather(-1, high)).squeeze(-1)
    return norms, median, bad


@torch.no_grad()
def massive_activation(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Largest token norm over the median token norm of each prompt (SPEC §7).

    About 1 to 3 for ordinary layers; far above :data:`SINK_NORM_RATIO` where one token (often the first)
    carries a massive activation, the signature of an attention sink.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask.

    Returns:
        ``[..., B]``; NaN for prompts without valid tokens, with non-finite values or a zero median norm.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import massive_activation
        >>> tokens = torch.tensor([[[300.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]]])
        >>> massive_activation(tokens)  # 300 / median(300, 1, 1, 2) = 300 / 1.5
        tensor([200.])
    """
    norms, median, bad = _token_norms(hidden, mask)
    ratio = torch.where(torch.isnan(norms), -math.inf, norms).amax(-1) / median
    return torch.where(bad | ~torch.isfinite(ratio), math.nan, ratio).to(_result_dtype(hidden))


def sink_tokens(hidden: Tensor, mask: Tensor | None = None, *, ratio: float = SINK_NORM_RATIO) -> Tensor:
    """``[..., B, T]`` bool: valid tokens whose norm exceeds ``ratio`` times their prompt's median token norm.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import sink_tokens
        >>> sink_tokens(torch.tensor([[[300.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]]]))
        tensor([[ True, False, False, False]])
    """
    if not float(ratio) > 1:
        raise ValueError(f"`ratio` must be a multiple of the median norm above 1, got {ratio}")
    norms, median, _ = _token_norms(hidden, mask)
    return norms > float(ratio) * median[..., None]  # NaN compares False


@torch.no_grad()
def prompt_entropy_without_sinks(
    hidden: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 1.0,
    normalized: bool = True,
    ratio: float = SINK_NORM_RATIO,
    entropy: Tensor | None = None,
) -> Tensor:
    """:func:`prompt_entropy` of each prompt with its sink tokens (:func:`sink_tokens`) left out (SPEC §7).

    Equal to ``prompt_entropy`` for prompts without a sink token. With ``normalized``, the divisor is
    ``ln(min(N', D))`` with ``N'`` the tokens kept.

    Args:
        hidden: ``[..., B, T, D]`` hidden states.
        mask: optional ``[B, T]`` attention mask.
        alpha, normalized: as in :func:`prompt_entropy`.
        ratio: the sink threshold, a multiple of the prompt's median token norm.
        entropy: ``prompt_entropy(hidden, mask, alpha=alpha, normalized=normalized)`` if already computed:
            then only prompts holding a sink are recomputed.

    Returns:
        ``[..., B]``.

    Example:
        >>> import torch
        >>> from layerwatch.metrics import prompt_entropy, prompt_entropy_without_sinks
        >>> tokens = torch.tensor([[[900.0, 900.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0],
        ...                         [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]])
        >>> float(prompt_entropy(tokens)) < 1e-3  # the sink dominates the mean: all others look alike
        True
        >>> prompt_entropy_without_sinks(tokens)  # two orthogonal directions, ln 2 / ln 3
        tensor([0.6309])
    """
    alpha = _check_alpha(alpha)
    hidden, bool_mask = _check_tokens(hidden, mask)
    sinks = sink_tokens(hidden, bool_mask, ratio=ratio)
    keep = ~sinks if bool_mask is None else bool_mask & ~sinks
    if entropy is None:
        return prompt_entropy(hidden, keep, alpha=alpha, normalized=normalized)
    if entropy.shape != hidden.shape[:-2]:
        raise ValueError(f"`entropy` must have shape {tuple(hidden.shape[:-2])} (one value per prompt), got {tuple(entropy.shape)}")
    result = entropy.clone()
    rows = sinks.any(-1).reshape(-1).nonzero().squeeze(-1)
    if rows.numel():
        flat = hidden.reshape(-1, *hidden.shape[-2:])
        values = prompt_entropy(flat[rows], keep.reshape(-1, keep.shape[-1])[rows], alpha=alpha, normalized=normalized)
        result.view(-1)[rows] = values.to(result.dtype)
    return result
