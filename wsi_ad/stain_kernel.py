"""The stain transform on the CPU: one compiled pass over the pixels.

:class:`wsi_ad.stain.StainNormalizer` maps every uint8 RGB pixel through optical density, the exact
2-stain non-negative lasso concentrations with the source stain matrix, a rescale to the target's maximum
concentrations, and the target's stain matrix back to uint8 RGB. This module compiles that arithmetic with
numba into one loop over the pixels: no float temporaries (the numpy version it replaced made ~50 passes
over memory per pixel and ran ~5x slower: 24 vs 130 Mpx/s), with the log and exp replaced by tables.

The arithmetic, with ``S`` the source stain matrix (unit rows, H then E), ``G = inv(S S^T)``, ``R`` the
target stain matrix with the concentration rescale folded in (2 x 3), λ the concentration penalty:

* ``b = od @ S^T - λ`` per pixel, from six 256-entry tables (``od(v) * S[k, channel]``);
* concentrations ``max(min(c, b), 0)`` per stain, with ``c = b @ G`` the solution with both stains
  active. This is the exact closed form of :func:`wsi_ad.stain.concentrations` without a branch: with
  unit rows and cosine ``ρ = S[0]·S[1] >= 0``, ``c_H = b_H - ρ c_E``, so ``c_E < 0`` (eosin inactive:
  haematoxylin alone, ``max(b_H, 0)``) is exactly when ``c_H > b_H``, and likewise for eosin; both
  negative only when both ``b`` are (for ``ρ < 0`` the inequalities flip: ``max(c, b, 0)``). The branchy
  form ran 1.5x slower, its branch mispredicted on the ~17 % of tissue pixels with one stain alone;
* rendered OD ``conc @ R``;
* ``uint8 = round(255 exp(-OD))``, from a table of exp at OD steps of 1/4096 plus one comparison with the
  exact rounding threshold in that step, so the rounding matches ``round(255 exp(-OD))`` computed in
  float32. (A threshold taken from the output value instead of the step made the loop 4x slower: a load
  that waits on another load.)

Over all 2^24 colours the output differs from a float64 computation by at most 1 grey level, in 3e-5 of
the channel values. Tried and left out: a table of every colour's output filled as colours are met (64 MiB
per slide) was 3.5x faster on synthetic slides (134k distinct colours in 41 Mpx) but slower on real H&E
(548k distinct colours in 2 Mpx at 0.5 µm/px: 58 vs 80 Mpx/s for an earlier, branchy version of this
loop), as every new colour costs a cache miss.

The loop is compiled on first use and cached on disk by numba (``cache=True``: ~1 s the first time,
~0.3 s to load in a new process), and releases the GIL, so threads can run it on parts of one image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from wsi_ad.optical_density import gram_inverse, rgb_to_od

#: OD step of the exp table (OD units). Rounding thresholds of round(255 exp(-OD)) are >= 1/255 apart,
#: so a cell of the table holds at most one threshold and one comparison settles the rounding.
EXP_STEP_OD = 1.0 / 4096
#: Rendered OD is clamped here: 255 exp(-20) < 1e-6 rounds to 0.
MAX_OD = 20.0


@dataclass(frozen=True)
class TransformTables:
    """The constants of one source → target transform, in the layout the compiled loop reads.

    Attributes:
        od_terms: (6, 256) float32; ``b_k = od_terms[3k, R] + od_terms[3k+1, G] + od_terms[3k+2, B]`` is
            ``od · S[k] - λ`` (λ folded into the red row).
        gram_inverse: (2, 2) float32 ``inv(S S^T)``; concentrations with both stains are ``b @ gram_inverse``.
        cosine_nonnegative: whether the source stains' cosine ``S[0] · S[1]`` is >= 0 (always, for
            non-negative stain vectors); it decides the closed form of the concentrations.
        render: (2, 3) float32 target OD per unit of source concentration (rescale folded in).
        exp_table: uint8 ``round(255 exp(-k * EXP_STEP_OD))`` for OD 0 .. ``MAX_OD``.
        round_down_above: float32, one per ``exp_table`` cell: the OD ``-ln((o - 0.5) / 255)`` above which
            ``round(255 exp(-OD))`` drops below the cell's ``o = exp_table[k]`` (inf where ``o`` is 0).
    """

    od_terms: np.ndarray
    gram_inverse: np.ndarray
    cosine_nonnegative: bool
    render: np.ndarray
    exp_table: np.ndarray
    round_down_above: np.ndarray

    @classmethod
    def build(cls, stain_matrix: np.ndarray, render: np.ndarray, concentration_lambda: float) -> TransformTables:
        """Tables for source ``stain_matrix`` (2 x 3, unit rows) and ``render`` (2 x 3: target stain matrix
        rows scaled by target max / source max concentration), λ = ``concentration_lambda`` (OD units)."""
        s = np.asarray(stain_matrix, dtype=np.float64)
        render = np.asarray(render, dtype=np.float64)
        ginv = gram_inverse(s)
        od = rgb_to_od(np.arange(256, dtype=np.uint8)).astype(np.float64)  # float32 values, as the torch path
        od_terms = np.empty((6, 256), dtype=np.float64)
        for k in range(2):
            for ch in range(3):
                od_terms[3 * k + ch] = od * s[k, ch]
            od_terms[3 * k] -= concentration_lambda
        steps = np.arange(int(MAX_OD / EXP_STEP_OD) + 2, dtype=np.float64) * EXP_STEP_OD
        exp_table = np.clip(np.rint(255.0 * np.exp(-steps)), 0, 255).astype(np.uint8)
        # output o (at the cell's low edge) drops to o - 1 above OD -ln((o - 0.5) / 255)
        with np.errstate(divide="ignore", invalid="ignore"):  # o = 0 cells: inf, never used
            round_down_above = np.where(exp_table > 0, -np.log((exp_table - 0.5) / 255.0), np.inf)
        f32 = np.float32
        return cls(od_terms=od_terms.astype(f32), gram_inverse=ginv.astype(f32),
                   cosine_nonnegative=bool(s[0] @ s[1] >= 0), render=render.astype(f32),
                   exp_table=exp_table, round_down_above=round_down_above.astype(f32))

    def transform(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(P, 3) uint8 C-contiguous → (P, 3) uint8, written into ``out`` when given (same shape)."""
        if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 or not pixels.flags.c_contiguous:
            raise ValueError(f"pixels must be C-contiguous (P, 3) uint8, got {pixels.dtype} {pixels.shape}")
        out = np.empty_like(pixels) if out is None else out
        if out.shape != pixels.shape or out.dtype != np.uint8:
            raise ValueError(f"out must be (P, 3) uint8 like pixels, got {out.dtype} {out.shape}")
        _transform(pixels, out, self.od_terms, self.gram_inverse, self.render, self.exp_table,
                   self.round_down_above, np.float32(1.0 / EXP_STEP_OD), self.cosine_nonnegative)
        return out


@numba.njit(cache=True, nogil=True, inline="always")
def _od_to_uint8(od, exp_table, round_down_above, inv_step):  # pragma: no cover - compiled
    """round(255 exp(-od)) (od clamped to 0 .. MAX_OD), from the exp table and one threshold."""
    k = np.uint32(min(max(od * inv_step, np.float32(0.0)), np.float32(exp_table.shape[0] - 1)))
    return exp_table[k] - np.uint8(od > round_down_above[k])  # branch-free: both loads depend on k alone


@numba.njit(cache=True, nogil=True, inline="always")
def _render_colour(red, green, blue, od_terms, gram_inverse, render, exp_table, round_down_above, inv_step,
                   cosine_nonnegative):  # pragma: no cover - compiled
    """Output (R, G, B) of one input colour (see the module docstring)."""
    zero = np.float32(0.0)
    b0 = od_terms[0, red] + od_terms[1, green] + od_terms[2, blue]
    b1 = od_terms[3, red] + od_terms[4, green] + od_terms[5, blue]
    c0 = b0 * gram_inverse[0, 0] + b1 * gram_inverse[1, 0]
    c1 = b0 * gram_inverse[0, 1] + b1 * gram_inverse[1, 1]
    if cosine_nonnegative:  # a constant in each loop of _transform: folded away by the compiler
        h = max(min(c0, b0), zero)
        e = max(min(c1, b1), zero)
    else:
        h = max(max(c0, b0), zero)
        e = max(max(c1, b1), zero)
    return (_od_to_uint8(h * render[0, 0] + e * render[1, 0], exp_table, round_down_above, inv_step),
            _od_to_uint8(h * render[0, 1] + e * render[1, 1], exp_table, round_down_above, inv_step),
            _od_to_uint8(h * render[0, 2] + e * render[1, 2], exp_table, round_down_above, inv_step))


@numba.njit(cache=True, nogil=True)
def _transform(pixels, out, od_terms, gram_inverse, render, exp_table, round_down_above, inv_step,
               cosine_nonnegative):  # pragma: no cover - compiled
    if cosine_nonnegative:
        for i in range(pixels.shape[0]):
            out[i, 0], out[i, 1], out[i, 2] = _render_colour(
                pixels[i, 0], pixels[i, 1], pixels[i, 2], od_terms, gram_inverse, render, exp_table,
                round_down_above, inv_step, True)
    else:
        for i in range(pixels.shape[0]):
            out[i, 0], out[i, 1], out[i, 2] = _render_colour(
                pixels[i, 0], pixels[i, 1], pixels[i, 2], od_terms, gram_inverse, render, exp_table,
                round_down_above, inv_step, False)
