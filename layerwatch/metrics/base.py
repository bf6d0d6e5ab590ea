"""The metrics' shared machinery (checks, centering, token blocks, eigenvalue paths, matrix entropies), and the
conventions that every public function of ``layerwatch.metrics`` follows.

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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

logger = logging.getLogger("layerwatch.metrics")

T = TypeVar("T")
R = TypeVar("R")


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


