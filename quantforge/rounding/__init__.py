"""Optimized rounding inside the standard GGUF types: the same block layouts and scale searches as llama.cpp,
with the codes (and super-scales) chosen to lower the layer's output error rather than each weight's own.

Modes: ``rtn`` (the type's default rounding, byte-exact with llama.cpp) and ``gptq`` (:mod:`.gptq`, error
feedback through the inverse of the inputs' second-moment matrix saved by calibration, :mod:`.hessians`), and
``tune`` (:mod:`.tune`, ``gptq``'s codes and block scales refined further against the same output error).
``gptq`` covers the k-quants, the legacy types, ``q8_0``, ``iq4_nl`` / ``iq4_xs`` (feedback per column) and the
lattice i-quants ``iq1_s`` ... ``iq3_s`` (:mod:`.lattice`, feedback per 256-weight super-block); ``tune`` covers
the types with consecutive integer codes and gives ``gptq``'s rounding to the others.
"""

import functools

MODES = ("rtn", "gptq", "tune")


def build_rounders(types: dict[str, str], default: str = "rtn", per_tensor: dict[str, str] | None = None,
                   hessians: object = None, cache: object = None) -> dict[str, object]:
    """``{weight name: quantize(rows, imatrix) callable}`` for the weights whose mode is not ``rtn``.

    ``types`` maps GGUF weight names to format names, ``default`` is the mode of every weight ``per_tensor`` (a
    plan's choices) does not name, ``hessians`` the calibration's ``hessians.safetensors`` (``cache``: a
    :class:`.gptq.FactorCache` to share factors with other calls). A weight keeps the
    default rounding where the mode cannot apply: no recorded input (token embedding, output head, norms,
    stacked experts) or a type without codes to choose (floats, the ternary ``tq`` types); ``tune`` gives
    ``gptq``'s rounding to the types it does not cover (``iq4_nl``, ``iq4_xs`` and the lattice i-quants).
    """
    from ..errors import InputError

    per_tensor = per_tensor or {}
    modes = {name: per_tensor.get(name, default) for name in types}
    for mode in set(modes.values()):
        if mode not in MODES:
            raise InputError(f"unknown rounding mode {mode!r}; expected one of {', '.join(MODES)}")
    wanted = [name for name, mode in modes.items() if mode in ("gptq", "tune")]
    if not wanted:
        return {}
    if hessians is None:
        raise InputError(f"--optimize {modes[wanted[0]]} needs --calibration DIR with hessians.safetensors "
                         "('quantforge calibrate MODEL --data F -o DIR --hessians')")
    from ..formats import get_format
    from .gptq import FactorCache, GptqRounder
    from .grids import SUPPORTED
    from .hessians import Hessians
    from .lattice import covers as lattice_covers
    from .tune import SecondMoments, TuneRounder, covers

    store = Hessians(hessians)
    cache = cache or FactorCache()
    moments = SecondMoments()
    out: dict[str, object] = {}
    for name in wanted:
        group = store.group_of(name)
        if (types[name] not in SUPPORTED and not lattice_covers(types[name])) or group is None:
            continue
        out[name] = GptqRounder(get_format(types[name]), functools.partial(store.for_tensor, name), group, cache)
        if modes[name] == "tune" and covers(types[name]):
            out[name] = TuneRounder(get_format(types[name]), functools.partial(store.for_tensor, name), group,
                                    out[name], moments, tokens=store.tokens.get(group))
    return out


class ModeRounders:
    """Round trips of single weights under a rounding mode, for measuring what a tensor loses in the format and
    rounding it will be written with (calibration's sensitivity stage): the same rounders the exporter builds
    (:func:`build_rounders`), with the factors of the last few input groups kept between calls."""

    def __init__(self, mode: str, hessians: object) -> None:
        from .gptq import FactorCache

        if mode not in MODES:
            from ..errors import InputError

            raise InputError(f"unknown rounding mode {mode!r}; expected one of {', '.join(MODES)}")
        self.mode, self.hessians = mode, hessians
        self.cache = FactorCache()
        self._h: tuple[str, object] | None = None

    def second_moments(self, name: str, device: object = None) -> object:
        """``H`` (float32 ``(n, n)`` on ``device``) of GGUF tensor ``name``'s inputs, or ``None`` without one; the
        last group read is kept."""
        from .hessians import Hessians

        store = Hessians(self.hessians)
        group = store.group_of(name)
        if group is None:
            return None
        if self._h is None or self._h[0] != group:
            self._h = (group, store.for_tensor(name))
        return self._h[1].to(device) if device is not None else self._h[1]

    def round_trip(self, name: str, weight: object, fmt: str, imatrix: object = None) -> object:
        """``weight`` rows ``(R, n)`` of GGUF tensor ``name`` encoded as ``fmt`` under the mode and decoded
        (float32), or ``None`` where the mode keeps the type's default rounding."""
        import torch

        from ..formats import get_format

        if weight.dim() != 2:
            return None
        rounder = build_rounders({name: fmt}, self.mode, hessians=self.hessians, cache=self.cache).get(name)
        if rounder is None:
            return None
        w = weight.to(torch.float32)
        im = None if imatrix is None else torch.as_tensor(imatrix, dtype=torch.float32, device=w.device)
        return get_format(fmt).dequantize(rounder(w, im)).reshape(w.shape)
